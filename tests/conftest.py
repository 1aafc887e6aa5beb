"""Shared fixtures: a tiny dataset on disk, built with the project's own writers; a tiny
project's parameters; synthetic images with CAM-like maps for the CRF and pruning tests."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from scipy.ndimage import gaussian_filter

from pipeline.core.io import write_image, write_mask
from pipeline.core.registry import CRF_SETTINGS
from pipeline.data.manifest import Item, Manifest, default_palette
from pipeline.data.synth import SynthParams, render, sample_rng
from pipeline.method.prune import PruneParams


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
    from pipeline.data.manifest import load_manifest

    return load_manifest(path)


TINY: dict[str, dict] = {
    "dataset": {"manifest": "manifests/synth.json", "train_split": "train", "val_split": "val"},
    "run": {"loader_workers": 0, "workers": 1, "chunk_size": 4, "inference_batch": 4},
    "data": {"root": "data/synth", "manifest": "manifests/synth.json", "image_size": 48, "num_classes": 3,
             "train_images": 16, "val_images": 6, "seed": 1},
    "classifier": {"crop_size": 48, "batch_size": 8, "steps": 6},
    "cams": {"scales": [1.0, 0.5]},
    "prune": {key: value for key, value in asdict(PruneParams()).items()
              if f"prune.{key}" in CRF_SETTINGS},
    "refine": {"crop_size": 48, "batch_size": 4, "steps": 2, "log_steps": 3},
    "segment": {"crop_size": 48, "batch_size": 4, "steps": 3, "mining_scales": [1.0]},
    "deeplab": {"backbone": "small", "crop_size": 48, "batch_size": 4, "steps": 2, "scales": [1.0], "flip": False},
}
"""The tiny project every stage test runs: 16 + 6 synthetic 48x48 images, a few training steps,
one process for everything (params.yaml's sections, each over the stage's defaults)."""


def tiny_params(**overrides: dict) -> dict[str, dict]:
    """:data:`TINY` with some sections' keys overridden (or added): ``tiny_params(segment={"crf": False})``."""
    return {section: {**TINY.get(section, {}), **overrides.get(section, {})} for section in {**TINY, **overrides}}


def write_tiny_project(root: Path, **overrides: dict) -> Path:
    """Write the params file of :func:`tiny_params` into ``root``; its path."""
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(tiny_params(**overrides), sort_keys=False))
    return path


def state_key(stage: str) -> str:
    """The key of ``stage``'s training state in the project of the working folder: what it resumes from."""
    return torch.load(f"checkpoints/state/{stage}.pt", map_location="cpu", weights_only=False)["fingerprint"]


def synthetic_cams(index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A default `rrm synth` training image with CAM-like maps of its objects (each object's mask
    blurred plus a weaker blurred copy shifted off it, max-normalised) and their class indices."""
    sample = render(SynthParams(), sample_rng(0, "train", index))
    labels = [label for label in np.unique(sample.mask) if label]
    cams = []
    for label in labels:
        own = (sample.mask == label).astype(np.float32)
        cam = gaussian_filter(own, 3.0) + 0.5 * gaussian_filter(np.roll(own, 9, axis=1), 6.0)
        cams.append(cam / cam.max())
    return sample.image, np.stack(cams), np.array(labels) - 1

