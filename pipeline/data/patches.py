"""A third synthetic benchmark: animals that tell their class by a small patch alone.

Made after the description of a benchmark this project has not seen (600 images of 112x144,
5 classes; a class shows only in a small textured patch, bodies share one palette across the
classes; backgrounds that co-occur with some classes), to check the pipeline on data it was not
designed on:

- **One small cue.** Every object is an animal-like body (an ellipse, a head, two legs) in one of
  five colours that all classes share; its class shows only in a black-and-white patch of a few
  pixels' radius on its flank, each class with its own 2-pixel pattern (stripes either way,
  checks, diagonals, dots). A classifier finds the patch; the body is the part it must not lose.
- **Context.** Each class prefers one of the scenes of the texture benchmark
  (:data:`pipeline.data.textures.SCENES`, ``cooccurrence`` 0.8 by default).
- **Small landscape images**, 112x144, saved as PNG, one or two animals each.

It writes the folder layout that `rrm manifest folder` reads, as `rrm textures` does; each image
comes from its own generator seeded by ``(seed, split, index)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.params import check_range
from pipeline.data.textures import SCENES, SPLITS, rgb, scene, write_benchmark

SIZE = (112, 144)
"""(height, width) of every image."""

Pattern = Callable[[np.ndarray, np.ndarray], np.ndarray]
"""Integer (rows, cols) pixel coordinates -> 0 (black) or 1 (white)."""

CLASS_PATTERNS: dict[str, Pattern] = {
    "alpha": lambda y, x: (y // 2) % 2,
    "beta": lambda y, x: (x // 2) % 2,
    "gamma": lambda y, x: (y // 2 + x // 2) % 2,
    "delta": lambda y, x: ((y + x) // 2) % 2,
    "epsilon": lambda y, x: ((y % 3 == 0) & (x % 3 == 0)).astype(np.int64),
}
"""The classes and the 2-pixel patterns of their patches, in class order."""

CLASS_NAMES: tuple[str, ...] = tuple(CLASS_PATTERNS)

BODY_COLOURS = ((0.02, 0.75, 0.85), (0.12, 0.8, 0.9), (0.58, 0.6, 0.8), (0.78, 0.5, 0.75), (0.33, 0.65, 0.7))
"""HSV of the five body colours, which every class draws from."""


@dataclass(frozen=True)
class PatchParams:
    """Settings of the patch benchmark."""

    num_classes: int = 5
    train_images: int = 480
    val_images: int = 120
    seed: int = 0
    max_objects: int = 2
    patch_radius: tuple[int, int] = (5, 7)
    cooccurrence: float = 0.8

    def __post_init__(self) -> None:
        check_range("num_classes", self.num_classes, 1, len(CLASS_NAMES))
        check_range("train_images", self.train_images, 1)
        check_range("val_images", self.val_images, 0)
        check_range("seed", self.seed, 0)
        check_range("max_objects", self.max_objects, 1, 3)
        if len(self.patch_radius) != 2 or not 2 <= self.patch_radius[0] <= self.patch_radius[1] <= 12:
            raise ValueError(f"patch_radius={self.patch_radius!r} must be (low, high) pixels within [2, 12]")
        check_range("cooccurrence", self.cooccurrence, 0.0, 1.0)

    @property
    def classes(self) -> tuple[str, ...]:
        return CLASS_NAMES[: self.num_classes]


def _ellipse(y: np.ndarray, x: np.ndarray, centre: tuple[float, float], axes: tuple[float, float],
             angle: float = 0.0) -> np.ndarray:
    dy, dx = y - centre[0], x - centre[1]
    u, v = dx * np.cos(angle) + dy * np.sin(angle), -dx * np.sin(angle) + dy * np.cos(angle)
    return (u / axes[1]) ** 2 + (v / axes[0]) ** 2 <= 1


def _animal(shape: tuple[int, int], centre: np.ndarray, size: float, facing: int) -> np.ndarray:
    """The body's pixels, bool (H, W): a body ellipse, a round head on one side, two legs below."""
    y, x = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float64) + 0.5
    cy, cx = centre
    body = _ellipse(y, x, (cy, cx), (0.45 * size, 0.8 * size))
    head = _ellipse(y, x, (cy - 0.45 * size, cx + facing * 0.85 * size), (0.35 * size, 0.35 * size))
    legs = np.zeros(shape, dtype=bool)
    for side in (-1, 1):
        left = cx + side * 0.45 * size - 0.1 * size
        legs |= (x >= left) & (x < left + 0.22 * size) & (y >= cy) & (y < cy + 0.95 * size)
    return body | head | legs


@dataclass(frozen=True)
class PatchSample:
    image: np.ndarray
    """uint8 (H, W, 3) RGB."""
    mask: np.ndarray
    """uint8 (H, W): 0 background, class index + 1."""
    labels: tuple[int, ...]
    scene: int


def render(params: PatchParams, rng: np.random.Generator) -> PatchSample:
    """One image: a scene chosen by its first animal's class, then 1..max_objects animals that do
    not overlap, each with its class's patch on its flank."""
    count = int(rng.integers(1, params.max_objects + 1))
    classes = rng.integers(0, params.num_classes, count)
    kind = int(classes[0]) % len(SCENES) if rng.random() < params.cooccurrence else int(rng.integers(len(SCENES)))
    image = scene(kind, SIZE, rng)
    mask = np.zeros(SIZE, dtype=np.uint8)
    y, x = np.mgrid[0 : SIZE[0], 0 : SIZE[1]]
    for class_index in classes:
        size = rng.uniform(16, 24) / count ** 0.3
        for _ in range(30):
            centre = np.array([rng.uniform(size, SIZE[0] - size), rng.uniform(1.3 * size, SIZE[1] - 1.3 * size)])
            body = _animal(SIZE, centre, size, 1 if rng.random() < 0.5 else -1)
            if (body & (mask > 0)).any():
                continue
            image[body] = rgb(*BODY_COLOURS[int(rng.integers(len(BODY_COLOURS)))]) * rng.uniform(0.9, 1.1)
            radius = rng.integers(params.patch_radius[0], params.patch_radius[1] + 1)
            spot = ((y - centre[0]) ** 2 + (x - centre[1]) ** 2 <= radius**2) & body
            pattern = CLASS_PATTERNS[CLASS_NAMES[int(class_index)]](y, x)
            image[spot] = np.where(pattern[spot, None] > 0, 235.0, 20.0)
            mask[body] = class_index + 1
            break
    image = image + rng.normal(0, 3.0, image.shape)
    labels = tuple(int(value) - 1 for value in np.unique(mask) if value > 0)
    return PatchSample(np.clip(np.rint(image), 0, 255).astype(np.uint8), mask, labels, kind)


def sample_rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, SPLITS.index(split), index, 11])


def generate(params: PatchParams, root: Path) -> dict[str, Any]:
    """Write the benchmark under ``root`` in the layout of `rrm manifest folder` (see
    :func:`~pipeline.data.textures.write_benchmark`); returns counts."""
    return write_benchmark(root, params.classes, {"train": params.train_images, "val": params.val_images},
                           lambda split, index: render(params, sample_rng(params.seed, split, index)), ".png")
