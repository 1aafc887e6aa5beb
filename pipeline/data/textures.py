"""A second synthetic benchmark, made unlike `rrm synth` on purpose: the class is a texture.

`rrm synth` draws square 96-pixel PNGs whose objects tell their class by the colour of a small
part. This generator checks that nothing in the pipeline was fitted to that:

- **Texture is the class cue, never colour.** Each class has its own pattern (stripes at an
  angle, checks, dots, rings, zigzags, ...) drawn in two inks whose colours are random per
  object, so the colours of a bird and of a cow come from the same distribution.
- **Partial evidence from fading.** A pattern's contrast fades across its object, from full on
  one side to a tenth on the other, in a random direction: a classifier sees the strong side
  best, so CAMs cover part of the object, while the object's flat mean colour, set apart from
  the background, still shows where it ends.
- **Stronger context.** Each class prefers one of three scene kinds (``cooccurrence`` 0.9 by
  default), and the scenes carry low-contrast patterns of their own.
- **Other sizes and files.** Rectangular images of several sizes (portrait and landscape, none
  of them 96x96), larger objects (up to 40% of the shorter side in mean radius), more classes,
  saved as JPEG (lossy, as photos are).

It writes the folder layout that `rrm manifest folder` reads (``images/<id>.jpg``,
``masks/<id>.png``, ``labels.csv`` with a ``split`` column, ``classes.txt``), so it goes through
the pipeline the way a user's own data does. Each image comes from its own generator seeded by
``(seed, split, index)``; the same settings give the same files.
"""

from __future__ import annotations

import colorsys
import csv
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from pipeline.core.io import atomic_open, write_image, write_mask
from pipeline.core.params import check_range
from pipeline.data.manifest import default_palette

SPLITS = ("train", "val")
SIZES = ((128, 160), (160, 128), (144, 192), (176, 144))
"""(height, width) of the images; each image takes one at random."""

JPEG_QUALITY = 90
FADE_FLOOR = 0.1
"""A pattern's contrast at the faint end of its object, as a share of its full contrast."""

Texture = Callable[[np.ndarray, np.ndarray], np.ndarray]
"""(rows, cols) pixel coordinates relative to the object's centre, rotated -> pattern in [0, 1]."""


def _square_wave(phase: np.ndarray) -> np.ndarray:
    return (np.sin(phase) > 0).astype(np.float64)


CLASS_TEXTURES: dict[str, Texture] = {
    "zebra": lambda y, x: _square_wave(2 * np.pi * x / 7),
    "chess": lambda y, x: ((np.floor(y / 5) + np.floor(x / 5)) % 2).astype(np.float64),
    "leopard": lambda y, x: ((np.hypot(y % 8 - 4, x % 8 - 4)) < 2.2).astype(np.float64),
    "target": lambda y, x: _square_wave(2 * np.pi * np.hypot(y, x) / 6),
    "zigzag": lambda y, x: _square_wave(2 * np.pi * (y + 3 * np.abs((x % 8) - 4)) / 8),
    "tartan": lambda y, x: np.maximum(_square_wave(2 * np.pi * y / 9), _square_wave(2 * np.pi * x / 9)),
    "ripple": lambda y, x: 0.5 + 0.5 * np.sin(2 * np.pi * (x + 2.5 * np.sin(2 * np.pi * y / 14)) / 6),
    "weave": lambda y, x: _square_wave(2 * np.pi * (x + y) / 6) * _square_wave(2 * np.pi * (x - y) / 12),
}
"""The classes and their patterns, in class order."""

CLASS_NAMES: tuple[str, ...] = tuple(CLASS_TEXTURES)

SCENES = ("meadow", "sky", "sand")
"""Scene kinds; class ``c`` prefers scene ``c % 3``."""


@dataclass(frozen=True)
class TextureParams:
    """Settings of the texture benchmark; ``object_radius`` is a share of the shorter image side."""

    num_classes: int = 8
    train_images: int = 480
    val_images: int = 160
    seed: int = 0
    max_objects: int = 2
    object_radius: tuple[float, float] = (0.22, 0.4)
    cooccurrence: float = 0.9

    def __post_init__(self) -> None:
        check_range("num_classes", self.num_classes, 1, len(CLASS_NAMES))
        check_range("train_images", self.train_images, 1)
        check_range("val_images", self.val_images, 0)
        check_range("seed", self.seed, 0)
        check_range("max_objects", self.max_objects, 1, 4)
        if len(self.object_radius) != 2 or not 0.05 <= self.object_radius[0] <= self.object_radius[1] <= 0.45:
            raise ValueError(f"object_radius={self.object_radius!r} must be (low, high) within [0.05, 0.45]")
        check_range("cooccurrence", self.cooccurrence, 0.0, 1.0)

    @property
    def classes(self) -> tuple[str, ...]:
        return CLASS_NAMES[: self.num_classes]


def rgb(hue: float, saturation: float, value: float) -> np.ndarray:
    return 255.0 * np.array(colorsys.hsv_to_rgb(hue % 1.0, saturation, value))


def _smooth_noise(shape: tuple[int, int], cell: int, rng: np.random.Generator) -> np.ndarray:
    """Noise in [-1, 1] varying over about ``cell`` pixels (a coarse grid, bilinearly enlarged)."""
    rows, cols = shape[0] // cell + 2, shape[1] // cell + 2
    coarse = rng.uniform(-1, 1, (rows, cols))
    y = np.linspace(0, rows - 1.001, shape[0])
    x = np.linspace(0, cols - 1.001, shape[1])
    y0, x0 = y.astype(int), x.astype(int)
    fy, fx = (y - y0)[:, None], (x - x0)[None, :]
    top = coarse[y0][:, x0] * (1 - fx) + coarse[y0][:, x0 + 1] * fx
    bottom = coarse[y0 + 1][:, x0] * (1 - fx) + coarse[y0 + 1][:, x0 + 1] * fx
    return top * (1 - fy) + bottom * fy


def scene(kind: int, shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A float (H, W, 3) background of scene ``kind``: a colour family, a gradient, a faint pattern."""
    height, width = shape
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    if SCENES[kind] == "meadow":
        base = rgb(rng.uniform(0.22, 0.36), rng.uniform(0.35, 0.6), rng.uniform(0.35, 0.6))
        shade = 1 + 0.25 * _smooth_noise(shape, 10, rng) + 0.08 * np.sin(2 * np.pi * x / rng.uniform(3, 5))
    elif SCENES[kind] == "sky":
        base = rgb(rng.uniform(0.55, 0.62), rng.uniform(0.25, 0.5), rng.uniform(0.6, 0.85))
        shade = 1 + 0.3 * (y / height - 0.5) + 0.1 * _smooth_noise(shape, 24, rng)
    else:
        base = rgb(rng.uniform(0.08, 0.14), rng.uniform(0.25, 0.45), rng.uniform(0.55, 0.8))
        angle = rng.uniform(0, np.pi)
        dunes = np.sin(2 * np.pi * (x * np.cos(angle) + y * np.sin(angle)) / rng.uniform(16, 28))
        shade = 1 + 0.15 * dunes + 0.12 * _smooth_noise(shape, 6, rng)
    return shade[..., None] * base


def _blob(shape: tuple[int, int], centre: np.ndarray, radius: float, rng: np.random.Generator) -> np.ndarray:
    """An irregular convex-ish blob: the union of an ellipse and two smaller ones overlapping it."""
    y, x = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float64) + 0.5
    blob = np.zeros(shape, dtype=bool)
    for index in range(3):
        scale = 1.0 if index == 0 else rng.uniform(0.45, 0.7)
        offset = np.zeros(2) if index == 0 else rng.normal(0, 0.45 * radius, 2)
        angle = rng.uniform(0, np.pi)
        a, b = radius * scale * rng.uniform(1.0, 1.3), radius * scale * rng.uniform(0.7, 1.0)
        dy, dx = y - centre[0] - offset[0], x - centre[1] - offset[1]
        u, v = dx * np.cos(angle) + dy * np.sin(angle), -dx * np.sin(angle) + dy * np.cos(angle)
        blob |= (u / a) ** 2 + (v / b) ** 2 <= 1
    return blob


def _object_pixels(class_index: int, shape: tuple[int, int], centre: np.ndarray, radius: float,
                   rng: np.random.Generator) -> np.ndarray:
    """The object's float (H, W, 3) colours: its class pattern in two random inks, fading across it."""
    y, x = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float64) + 0.5
    dy, dx = y - centre[0], x - centre[1]
    turn = rng.uniform(0, 2 * np.pi)
    u, v = dx * np.cos(turn) + dy * np.sin(turn), -dx * np.sin(turn) + dy * np.cos(turn)
    pattern = CLASS_TEXTURES[CLASS_NAMES[class_index]](v, u)
    fade_angle = rng.uniform(0, 2 * np.pi)
    along = (dx * np.cos(fade_angle) + dy * np.sin(fade_angle)) / (2 * radius) + 0.5
    contrast = FADE_FLOOR + (1 - FADE_FLOOR) * np.clip(along, 0, 1)
    hue = rng.uniform(0, 1)
    light = rgb(hue, rng.uniform(0.2, 0.6), rng.uniform(0.75, 0.95))
    dark = rgb(hue + rng.uniform(-0.15, 0.15), rng.uniform(0.4, 0.8), rng.uniform(0.15, 0.4))
    mean = (light + dark) / 2
    weight = (contrast * (pattern - 0.5))[..., None]
    return mean + weight * (light - dark)


@dataclass(frozen=True)
class TextureSample:
    image: np.ndarray
    """uint8 (H, W, 3) RGB."""
    mask: np.ndarray
    """uint8 (H, W): 0 background, class index + 1."""
    labels: tuple[int, ...]
    scene: int


def render(params: TextureParams, rng: np.random.Generator) -> TextureSample:
    """One image: a scene chosen by its first object's class, then 1..max_objects non-overlapping objects."""
    shape = SIZES[int(rng.integers(len(SIZES)))]
    count = int(rng.integers(1, params.max_objects + 1))
    classes = rng.integers(0, params.num_classes, count)
    kind = int(classes[0]) % len(SCENES) if rng.random() < params.cooccurrence else int(rng.integers(len(SCENES)))
    image = scene(kind, shape, rng)
    mask = np.zeros(shape, dtype=np.uint8)
    short = min(shape)
    for class_index in classes:
        radius = rng.uniform(*params.object_radius) * short / count ** 0.5
        for _ in range(30):
            centre = np.array([rng.uniform(radius, shape[0] - radius), rng.uniform(radius, shape[1] - radius)])
            blob = _blob(shape, centre, radius, rng)
            if not (blob & (mask > 0)).any():
                image[blob] = _object_pixels(int(class_index), shape, centre, radius, rng)[blob]
                mask[blob] = class_index + 1
                break
    image = image + rng.normal(0, 4.0, image.shape)
    labels = tuple(int(value) - 1 for value in np.unique(mask) if value > 0)
    return TextureSample(np.clip(np.rint(image), 0, 255).astype(np.uint8), mask, labels, kind)


def sample_rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, SPLITS.index(split), index, 7])


Sample = Any
"""What a benchmark's ``render`` returns: ``image`` uint8 (H, W, 3), ``mask`` uint8 (H, W), ``labels``."""


def write_benchmark(root: Path, classes: tuple[str, ...], sizes: dict[str, int],
                    draw: Callable[[str, int], Sample], image_suffix: str, quality: int = 95) -> dict[str, Any]:
    """Write the images ``draw(split, index)`` renders, ``sizes[split]`` of each split, under
    ``root`` in the layout of `rrm manifest folder`; returns counts. ``labels.csv`` is written
    last (atomically): once it is there, the dataset is whole."""
    root = Path(root)
    palette = default_palette(len(classes) + 1)
    rows = []
    per_class = [0] * len(classes)
    with tqdm(total=sum(sizes.values()), desc=root.name, unit="image", disable=None) as bar:
        for split, count in sizes.items():
            for index in range(count):
                image_id = f"{split}_{index:05d}"
                sample = draw(split, index)
                write_image(root / "images" / f"{image_id}{image_suffix}", sample.image, quality=quality)
                write_mask(root / "masks" / f"{image_id}.png", sample.mask, palette)
                rows.append((image_id, " ".join(classes[c] for c in sample.labels), split))
                for c in sample.labels:
                    per_class[c] += 1
                bar.update()
    with atomic_open(root / "classes.txt") as handle:
        handle.write(",".join(classes) + "\n")
    with atomic_open(root / "labels.csv") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(("image", "labels", "split"))
        writer.writerows(rows)
    return {"images": sizes, "classes": list(classes), "images_per_class": dict(zip(classes, per_class))}


def generate(params: TextureParams, root: Path) -> dict[str, Any]:
    """Write the benchmark under ``root`` in the layout of `rrm manifest folder` (see
    :func:`write_benchmark`); returns counts."""
    return write_benchmark(root, params.classes, {"train": params.train_images, "val": params.val_images},
                           lambda split, index: render(params, sample_rng(params.seed, split, index)), ".jpg",
                           JPEG_QUALITY)
