"""The synthetic benchmark: small images that show, on a laptop, the effects RRM was designed for.

Every image holds 1 to ``max_objects`` star-shaped objects on a textured background.

- **Partial evidence.** An object's *body* has a saturated colour drawn independently of its class;
  only a small *part* (a ``part_fraction`` share of the object, off its centre) carries a
  class-specific colour and pattern. A classifier therefore looks at parts, and its CAMs cover parts.
- **Colour-aligned boundaries.** Bodies are flat saturated colours with mild noise and hard edges,
  backgrounds are dim low-saturation textures, so colour-aware refinement (dense CRF, dense energy
  loss) can grow a part into its whole object.
- **Context.** Some classes have a preferred background kind, which the scene's first (largest)
  object gets with probability ``cooccurrence``; CAMs of those classes leak into that texture.

Objects may overlap (later, smaller ones in front), but a placement is kept only if every object
still shows ``min_visible`` of its area and of its part, so image labels (the classes with visible
part pixels) stay honest. Ground truth is the visible object pixels.

Each image is drawn from its own generator seeded by ``(seed, split, index)``, so an image does
not change when the split sizes do, and the same parameters give byte-identical files.
"""

from __future__ import annotations

import colorsys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from skimage.transform import resize
from tqdm import tqdm

from pipeline.core.io import atomic_open, write_image, write_json, write_mask
from pipeline.core.params import build_params, check_range, read_params_file
from pipeline.data.manifest import (
    Item,
    Manifest,
    default_palette,
    labels_from_mask,
    make_split,
)

SPLITS = ("train", "val")
"""The generated splits; a split's position here is part of every image's seed."""

IMAGE_DIR, MASK_DIR, PART_DIR = "JPEGImages", "SegmentationClass", "SegmentationPart"
LIST_DIR = Path("ImageSets") / "Segmentation"
SUFFIX = ".png"

PLACEMENT_TRIES = 20
"""Positions tried for an object before the scene goes without it."""

OUTLINE_AMPLITUDE = 0.45
"""How irregular outlines are; an object reaches at most 1.58 times its mean radius."""

PART_OFFSET = 0.4
"""Where a part sits: its centre is this share of the way from the object's centre to its edge.

Closer to the rim, more of a CAM's blur falls on the background, and the benchmark would test
the blur more than the method (docs/method-notes.md, "Measurements behind the design").
"""

TEXTURE_CONTRAST = 0.18
"""How far a background's texture moves its brightness, as a share of its base colour."""

PIXEL_NOISE = 3.0
"""Standard deviation (in 0..255 units) of the per-pixel noise on objects and backgrounds."""

BLACK_INK = (25, 25, 25)
WHITE_INK = (240, 240, 240)

Pattern = Callable[[np.ndarray, np.ndarray], np.ndarray]

PATTERNS: dict[str, Pattern] = {
    "rows": lambda y, x: y % 4 < 2,
    "columns": lambda y, x: x % 4 < 2,
    "diagonals": lambda y, x: (x + y) % 4 < 2,
    "checks": lambda y, x: (x // 2 + y // 2) % 2 == 0,
    "dots": lambda y, x: (x % 4 < 2) & (y % 4 < 2),
}
"""Where a part shows its ink instead of its class colour, from integer pixel coordinates."""


@dataclass(frozen=True)
class ClassLook:
    """How a class's discriminative part looks, and the background kind it prefers, if any."""

    name: str
    hue: float
    pattern: str
    ink: tuple[int, int, int]
    background: int | None


CLASS_LOOKS: tuple[ClassLook, ...] = (
    ClassLook("ant", 0, "rows", BLACK_INK, 0),
    ClassLook("bee", 72, "checks", WHITE_INK, None),
    ClassLook("cat", 144, "columns", BLACK_INK, 1),
    ClassLook("dog", 216, "dots", WHITE_INK, None),
    ClassLook("eel", 288, "diagonals", BLACK_INK, 2),
    ClassLook("fox", 36, "dots", WHITE_INK, None),
    ClassLook("gnu", 108, "rows", WHITE_INK, 3),
    ClassLook("hen", 180, "checks", BLACK_INK, None),
    ClassLook("ibis", 252, "columns", WHITE_INK, 0),
    ClassLook("jay", 324, "dots", BLACK_INK, None),
    ClassLook("koi", 0, "diagonals", WHITE_INK, 1),
    ClassLook("lynx", 72, "rows", BLACK_INK, None),
    ClassLook("mole", 144, "checks", WHITE_INK, 2),
    ClassLook("newt", 216, "columns", BLACK_INK, None),
    ClassLook("owl", 288, "dots", WHITE_INK, 3),
    ClassLook("pig", 36, "diagonals", BLACK_INK, None),
    ClassLook("quail", 108, "checks", BLACK_INK, 0),
    ClassLook("ram", 180, "rows", WHITE_INK, None),
    ClassLook("seal", 252, "diagonals", BLACK_INK, 1),
    ClassLook("toad", 324, "columns", WHITE_INK, None),
)
"""The 20 classes in order. Hue and ink together are unique per class; the first classes (the
ones a small benchmark uses) have the most distinct hues. Even classes prefer a background."""

CLASS_NAMES: tuple[str, ...] = tuple(look.name for look in CLASS_LOOKS)


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Row and column coordinates of the pixel centres, as float (size, size) arrays."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    return y, x


def _noise_texture(size: int, rng: np.random.Generator) -> np.ndarray:
    """Blotches: a random grid about 12 pixels apart, interpolated smoothly (cubic)."""
    coarse = rng.uniform(-1.0, 1.0, (size // 12 + 2, size // 12 + 2))
    return np.clip(resize(coarse, (size, size), order=3, mode="reflect"), -1.0, 1.0)


def _stripes_texture(size: int, rng: np.random.Generator) -> np.ndarray:
    """Straight soft stripes at a random angle, 10 to 16 pixels apart."""
    y, x = _grid(size)
    angle, period, phase = rng.uniform(0, np.pi), rng.uniform(10, 16), rng.uniform(0, 2 * np.pi)
    return np.sin(2 * np.pi * (x * np.cos(angle) + y * np.sin(angle)) / period + phase)


def _ripples_texture(size: int, rng: np.random.Generator) -> np.ndarray:
    """Concentric soft rings around a random point, possibly outside the image."""
    y, x = _grid(size)
    cy, cx = rng.uniform(-size, 2 * size, 2)
    period, phase = rng.uniform(10, 16), rng.uniform(0, 2 * np.pi)
    return np.sin(2 * np.pi * np.hypot(y - cy, x - cx) / period + phase)


def _weave_texture(size: int, rng: np.random.Generator) -> np.ndarray:
    """A soft checkerboard: the product of a horizontal and a vertical wave."""
    y, x = _grid(size)
    period = rng.uniform(10, 16)
    phase_y, phase_x = rng.uniform(0, 2 * np.pi, 2)
    return np.sin(2 * np.pi * y / period + phase_y) * np.sin(2 * np.pi * x / period + phase_x)


@dataclass(frozen=True)
class BackgroundKind:
    """A background: a smooth texture in [-1, 1] that modulates a dim, greyish colour family."""

    name: str
    hue: float
    texture: Callable[[int, np.random.Generator], np.ndarray]


BACKGROUNDS: tuple[BackgroundKind, ...] = (
    BackgroundKind("noise", 100, _noise_texture),
    BackgroundKind("stripes", 215, _stripes_texture),
    BackgroundKind("ripples", 35, _ripples_texture),
    BackgroundKind("weave", 300, _weave_texture),
)
BACKGROUND_NAMES: tuple[str, ...] = tuple(kind.name for kind in BACKGROUNDS)


def _check_interval(name: str, value: tuple[float, ...], low: float, high: float) -> None:
    if len(value) != 2 or value[0] > value[1]:
        raise ValueError(f"{name}={value!r} must be a [low, high] pair with low <= high")
    for bound in value:
        check_range(name, bound, low, high)


@dataclass(frozen=True)
class SynthParams:
    """Parameters of the synthetic benchmark (section ``synth`` of ``params.yaml``).

    The defaults keep images small enough for the whole default pipeline to run on a laptop CPU.
    ``object_radius`` is the range of an object's mean radius as a share of the image size, and
    ``part_fraction`` the range of the share of an object that its discriminative part covers.
    """

    image_size: int = 96
    num_classes: int = 6
    train_images: int = 400
    val_images: int = 100
    seed: int = 0
    max_objects: int = 3
    object_radius: tuple[float, float] = (0.12, 0.3)
    part_fraction: tuple[float, float] = (0.1, 0.3)
    cooccurrence: float = 0.8
    min_visible: float = 0.7

    def __post_init__(self) -> None:
        check_range("image_size", self.image_size, 32, 4096)
        check_range("num_classes", self.num_classes, 1, len(CLASS_NAMES))
        check_range("train_images", self.train_images, 1)
        check_range("val_images", self.val_images, 0)
        check_range("seed", self.seed, 0)
        check_range("max_objects", self.max_objects, 1, 8)
        # Up to 1.58 times the mean radius, a whole object still fits inside the image.
        _check_interval("object_radius", self.object_radius, 0.05, 0.3)
        _check_interval("part_fraction", self.part_fraction, 0.02, 0.9)
        check_range("cooccurrence", self.cooccurrence, 0.0, 1.0)
        check_range("min_visible", self.min_visible, 0.1, 1.0)

    @property
    def split_sizes(self) -> dict[str, int]:
        return dict(zip(SPLITS, (self.train_images, self.val_images)))


@dataclass(frozen=True)
class SynthObject:
    """One placed object: its class and its areas in pixels, whole and as left visible."""

    class_index: int
    area: int
    part_area: int
    visible_area: int
    visible_part_area: int


@dataclass(frozen=True)
class Scene:
    """What an image shows: its background kind, image-level labels and objects (back to front)."""

    background: int
    labels: tuple[int, ...]
    objects: tuple[SynthObject, ...]


@dataclass(frozen=True)
class SynthSample:
    """A rendered image: RGB uint8 (H, W, 3), ground truth and part masks uint8 (H, W), its scene.

    Both masks hold 0 for background and ``c + 1`` for class ``c``; the part mask only on the
    visible discriminative parts.
    """

    image: np.ndarray
    mask: np.ndarray
    part_mask: np.ndarray
    scene: Scene


@dataclass(frozen=True)
class _Shape:
    """An object's pixels and its part's pixels, as boolean (H, W) masks."""

    class_index: int
    body: np.ndarray
    part: np.ndarray


def sample_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator of one image, independent of every other image and of the split sizes."""
    return np.random.default_rng([seed, SPLITS.index(split), index])


def _hsv(hue: float, saturation: float, value: float) -> np.ndarray:
    """An RGB colour in 0..255 (float) from a hue in degrees and saturation, value in 0..1."""
    return 255.0 * np.array(colorsys.hsv_to_rgb((hue % 360) / 360, saturation, value))


def _choose_background(class_index: int, cooccurrence: float, rng: np.random.Generator) -> int:
    """The preferred kind of the class with probability ``cooccurrence``, else a uniform draw."""
    preferred = CLASS_LOOKS[class_index].background
    if preferred is not None and rng.random() < cooccurrence:
        return preferred
    return int(rng.integers(len(BACKGROUNDS)))


def _render_background(kind: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """A float (size, size, 3) textured background in a dim low-saturation colour family."""
    background = BACKGROUNDS[kind]
    base = _hsv(background.hue + rng.uniform(-15, 15), rng.uniform(0.08, 0.2), rng.uniform(0.35, 0.55))
    shade = 1.0 + TEXTURE_CONTRAST * background.texture(size, rng)
    return shade[..., None] * base + rng.normal(0.0, PIXEL_NOISE, (size, size, 3))


def _outline(rng: np.random.Generator, radius: float) -> Callable[[np.ndarray], np.ndarray]:
    """A random smooth radial function ``r(angle)`` around a mean ``radius``, within 0.42 to 1.58
    times it (harmonics 2 to 5 with amplitudes up to ``OUTLINE_AMPLITUDE / order``)."""
    orders = np.arange(2, 6)
    amplitudes = rng.uniform(0.0, OUTLINE_AMPLITUDE, orders.size) / orders
    phases = rng.uniform(0.0, 2 * np.pi, orders.size)

    def reach(angle: np.ndarray) -> np.ndarray:
        waves = amplitudes * np.cos(np.multiply.outer(angle, orders) + phases)
        return radius * (1.0 + waves.sum(axis=-1))

    return reach


def _star_mask(size: int, centre: np.ndarray, reach: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """The pixels whose centres lie within ``reach(angle)`` of ``centre`` (row, column)."""
    y, x = _grid(size)
    dy, dx = y - centre[0], x - centre[1]
    return np.hypot(dy, dx) <= reach(np.arctan2(dy, dx))


def _part_of(body: np.ndarray, anchor: np.ndarray, fraction: float) -> np.ndarray:
    """The ``fraction`` of the body's pixels nearest to ``anchor``: a compact patch around it."""
    ys, xs = np.nonzero(body)
    count = max(1, round(fraction * ys.size))
    distance = (ys + 0.5 - anchor[0]) ** 2 + (xs + 0.5 - anchor[1]) ** 2
    nearest = np.argsort(distance, kind="stable")[:count]
    part = np.zeros_like(body)
    part[ys[nearest], xs[nearest]] = True
    return part


def _stays_visible(shapes: Sequence[_Shape], min_visible: float) -> bool:
    """Whether every shape, drawn back to front, shows ``min_visible`` of its body and its part."""
    for index, shape in enumerate(shapes):
        hidden = np.zeros_like(shape.body)
        for above in shapes[index + 1 :]:
            hidden |= above.body
        if (shape.body & ~hidden).sum() < min_visible * shape.body.sum():
            return False
        if (shape.part & ~hidden).sum() < min_visible * shape.part.sum():
            return False
    return True


def _place_shapes(params: SynthParams, classes: np.ndarray, rng: np.random.Generator) -> list[_Shape]:
    """Objects from large to small, each at the first tried position that hides no one too much.

    The first object always fits, so the class that chose the background is always present.
    """
    size = params.image_size
    radii = np.sort(rng.uniform(*params.object_radius, classes.size))[::-1] * size
    shapes: list[_Shape] = []
    for class_index, radius in zip(classes, radii):
        reach = _outline(rng, radius)
        fraction = rng.uniform(*params.part_fraction)
        angle = rng.uniform(-np.pi, np.pi)
        direction = np.array([np.sin(angle), np.cos(angle)])
        margin = float(reach(np.linspace(-np.pi, np.pi, 720)).max())
        for _ in range(PLACEMENT_TRIES):
            centre = rng.uniform(margin, size - margin, 2)
            body = _star_mask(size, centre, reach)
            anchor = centre + PART_OFFSET * reach(np.array(angle)) * direction
            candidate = _Shape(int(class_index), body, _part_of(body, anchor, fraction))
            if _stays_visible([*shapes, candidate], params.min_visible):
                shapes.append(candidate)
                break
    return shapes


def _part_colours(look: ClassLook, size: int, rng: np.random.Generator) -> np.ndarray:
    """The class's colour and ink pattern over a whole (size, size, 3) canvas, at a random offset."""
    y, x = np.mgrid[0:size, 0:size] + rng.integers(0, 4, 2)[:, None, None]
    ink = PATTERNS[look.pattern](y, x)
    return np.where(ink[..., None], np.array(look.ink, float), _hsv(look.hue, 0.9, 0.9))


def _measure(shape: _Shape, visible: np.ndarray) -> SynthObject:
    return SynthObject(
        class_index=shape.class_index,
        area=int(shape.body.sum()),
        part_area=int(shape.part.sum()),
        visible_area=int(visible.sum()),
        visible_part_area=int((shape.part & visible).sum()),
    )


def render(params: SynthParams, rng: np.random.Generator) -> SynthSample:
    """Draw one image with its ground truth, part mask and scene description."""
    size = params.image_size
    classes = rng.integers(0, params.num_classes, rng.integers(1, params.max_objects + 1))
    background = _choose_background(int(classes[0]), params.cooccurrence, rng)
    image = _render_background(background, size, rng)
    shapes = _place_shapes(params, classes, rng)
    mask = np.zeros((size, size), dtype=np.uint8)
    part_mask = np.zeros_like(mask)
    owner = np.full((size, size), -1)
    for index, shape in enumerate(shapes):
        # The body's colour is drawn without looking at the class: only the part tells it.
        body_colour = _hsv(rng.uniform(0, 360), rng.uniform(0.6, 0.95), rng.uniform(0.8, 1.0))
        part_colours = _part_colours(CLASS_LOOKS[shape.class_index], size, rng)
        canvas = np.where(shape.part[..., None], part_colours, body_colour)
        image[shape.body] = (canvas + rng.normal(0.0, PIXEL_NOISE, canvas.shape))[shape.body]
        mask[shape.body] = shape.class_index + 1
        part_mask[shape.body] = 0
        part_mask[shape.part] = shape.class_index + 1
        owner[shape.body] = index
    objects = tuple(_measure(shape, owner == index) for index, shape in enumerate(shapes))
    scene = Scene(background, labels_from_mask(part_mask, params.num_classes), objects)
    return SynthSample(np.clip(np.rint(image), 0, 255).astype(np.uint8), mask, part_mask, scene)


def _mean(values: Sequence[float]) -> float:
    return round(float(np.mean(values)), 4)


def summarize(params: SynthParams, scenes: Mapping[str, Sequence[Scene]]) -> dict[str, Any]:
    """What a generated dataset holds: sizes, object and part areas (visible pixels), and how
    often each class appears on each background kind (the co-occurrence skew)."""
    every = [scene for split in scenes.values() for scene in split]
    objects = [obj for scene in every for obj in scene.objects]
    classes = CLASS_NAMES[: params.num_classes]
    per_class = {c: [scene.background for scene in every if c in scene.labels] for c in range(len(classes))}
    return {
        "images": {split: len(items) for split, items in scenes.items()},
        "classes": list(classes),
        "objects_per_image": _mean([len(scene.objects) for scene in every]),
        "object_area": {
            "pixels": _mean([obj.visible_area for obj in objects]),
            "fraction_of_image": _mean([obj.visible_area / params.image_size**2 for obj in objects]),
        },
        "part_area": {
            "pixels": _mean([obj.visible_part_area for obj in objects]),
            "fraction_of_object": _mean([obj.visible_part_area / obj.visible_area for obj in objects]),
        },
        "images_per_class": {name: len(per_class[c]) for c, name in enumerate(classes)},
        "background_by_class": {
            name: {
                kind: round(per_class[c].count(k) / max(1, len(per_class[c])), 4)
                for k, kind in enumerate(BACKGROUND_NAMES)
            }
            for c, name in enumerate(classes)
        },
    }


def generate(params: SynthParams, root: Path, manifest_path: Path) -> tuple[Manifest, dict[str, Any]]:
    """Write the benchmark in VOC layout under ``root``, its ``stats.json``, and its manifest.

    Images go to ``JPEGImages/<id>.png`` (lossless, under VOC's folder name), ground truth to
    ``SegmentationClass``, part masks to ``SegmentationPart`` (palette PNGs) and id lists to
    ``ImageSets/Segmentation/<split>.txt``. The manifest is written last: it marks the dataset
    complete. Returns the manifest and the statistics.
    """
    root, manifest_path = Path(root), Path(manifest_path)
    palette = default_palette(params.num_classes + 1)
    items: dict[str, tuple[Item, ...]] = {}
    scenes: dict[str, list[Scene]] = {}
    with tqdm(total=sum(params.split_sizes.values()), desc="synth", unit="image", disable=None) as bar:
        for split, count in params.split_sizes.items():
            split_items, scenes[split] = [], []
            for index in range(count):
                image_id = f"{split}_{index:05d}"
                sample = render(params, sample_rng(params.seed, split, index))
                write_image(root / IMAGE_DIR / f"{image_id}{SUFFIX}", sample.image)
                write_mask(root / MASK_DIR / f"{image_id}{SUFFIX}", sample.mask, palette)
                write_mask(root / PART_DIR / f"{image_id}{SUFFIX}", sample.part_mask, palette)
                split_items.append(Item(image_id, sample.scene.labels, True))
                scenes[split].append(sample.scene)
                bar.update()
            items[split] = make_split(split_items)
            with atomic_open(root / LIST_DIR / f"{split}.txt") as handle:
                handle.write("".join(f"{item.id}\n" for item in items[split]))
    stats = summarize(params, scenes)
    write_json(root / "stats.json", stats)
    manifest = Manifest(
        name="synth",
        classes=CLASS_NAMES[: params.num_classes],
        image_dir=root / IMAGE_DIR,
        image_suffix=SUFFIX,
        splits=items,
        mask_dir=root / MASK_DIR,
        mask_suffix=SUFFIX,
        palette=palette,
        source=manifest_path,
    )
    manifest.save(manifest_path)
    return manifest, stats


def read_data_params(params_path: Path, overrides: dict[str, Any] | None = None) -> tuple[SynthParams, Path, Path]:
    """The `data:` section: where to write (``root``, ``manifest``) and the generator's settings."""
    section = dict(read_params_file(params_path).get("data") or {}) if params_path.is_file() else {}
    root = Path(section.pop("root", "data/synth"))
    manifest = Path(section.pop("manifest", "manifests/synth.json"))
    section.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return build_params(SynthParams, section, f"{params_path} [data]"), root, manifest
