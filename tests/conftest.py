"""Shared fixtures: a tiny dataset on disk, built with the project's own writers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.io import write_image, write_mask
from pipeline.manifest import Item, Manifest, default_palette


@pytest.fixture
def tiny_manifest(tmp_path: Path) -> Manifest:
    """Six 20x24 images over three classes, each a coloured square on grey, with masks."""
    rng = np.random.default_rng(0)
    images, masks = tmp_path / "images", tmp_path / "masks"
    palette = default_palette(4)
    items = []
    for index in range(6):
        image = np.full((20, 24, 3), 90, dtype=np.uint8)
        mask = np.zeros((20, 24), dtype=np.uint8)
        cls = index % 3
        top, left = rng.integers(0, 10), rng.integers(0, 12)
        image[top : top + 8, left : left + 10] = palette[cls + 1]
        mask[top : top + 8, left : left + 10] = cls + 1
        write_image(images / f"im{index}.png", image)
        write_mask(masks / f"im{index}.png", mask, palette)
        items.append(Item(f"im{index}", (cls,), True))
    manifest = Manifest(
        name="tiny",
        classes=("red", "green", "yellow"),
        image_dir=images,
        image_suffix=".png",
        mask_dir=masks,
        splits={"train": tuple(items[:4]), "val": tuple(items[4:])},
    )
    path = tmp_path / "manifests" / "tiny.json"
    manifest.save(path)
    from pipeline.manifest import load_manifest

    return load_manifest(path)
