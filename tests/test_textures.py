"""The texture benchmark: a second generator, unlike `rrm synth`, that goes through `rrm manifest folder`."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.core.io import read_image, read_mask
from pipeline.data.folder import build_folder
from pipeline.data.textures import CLASS_NAMES, SIZES, TextureParams, render, sample_rng

SMALL = {"num_classes": 5, "train_images": 12, "val_images": 4, "seed": 3}


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("textures") / "data"
    args = ["textures", "--out", str(out), *(f"--{key.replace('_', '-')}={value}" for key, value in SMALL.items())]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "rrm manifest folder --images" in result.output
    return out


def test_the_folder_builds_a_manifest_with_every_image_tagged_by_its_mask(folder):
    classes = (folder / "classes.txt").read_text().strip().split(",")
    assert classes == list(CLASS_NAMES[:5])
    manifest = build_folder(folder / "images", folder / "labels.csv", folder / "masks", classes, "textures")
    assert {name: len(items) for name, items in manifest.splits.items()} == {"train": 12, "val": 4}
    for item in manifest.split("train") + manifest.split("val"):
        image, mask = read_image(manifest.image_path(item.id)), manifest.read_mask(item)
        assert image.shape[:2] == mask.shape and mask.shape in SIZES
        assert tuple(int(v) - 1 for v in np.unique(mask) if v) == item.labels and item.labels


def test_images_are_jpeg_and_masks_palette_pngs(folder):
    rows = list(csv.DictReader((folder / "labels.csv").open()))
    assert (folder / "images" / f"{rows[0]['image']}.jpg").read_bytes()[:2] == b"\xff\xd8"
    assert read_mask(folder / "masks" / f"{rows[0]['image']}.png", 5).dtype == np.uint8


def test_the_same_seed_gives_the_same_images_and_another_seed_others():
    params = TextureParams(**SMALL)
    first, again = render(params, sample_rng(3, "train", 0)), render(params, sample_rng(3, "train", 0))
    other = render(params, sample_rng(4, "train", 0))
    assert np.array_equal(first.image, again.image) and np.array_equal(first.mask, again.mask)
    assert first.image.shape != other.image.shape or not np.array_equal(first.image, other.image)


def test_colour_does_not_tell_the_class_but_the_context_does():
    """Objects' mean colours spread alike for every class; each class mostly comes with its own scene."""
    params = TextureParams(num_classes=3, cooccurrence=0.9)
    colours: dict[int, list[np.ndarray]] = {0: [], 1: [], 2: []}
    scenes: dict[int, list[int]] = {0: [], 1: [], 2: []}
    for index in range(150):
        sample = render(params, sample_rng(0, "train", index))
        for c in sample.labels:
            colours[c].append(sample.image[sample.mask == c + 1].mean(axis=0))
        if len(sample.labels) == 1:
            scenes[sample.labels[0]].append(sample.scene)
    means = np.array([np.mean(colours[c], axis=0) for c in colours])
    spread = min(np.std(colours[c], axis=0).min() for c in colours)
    assert np.abs(means - means.mean(axis=0)).max() < spread / 2  # classes' mean colours within the spread
    for c, seen in scenes.items():
        assert np.mean(np.array(seen) == c % 3) > 0.7


def test_bad_settings_are_one_line(tmp_path):
    result = CliRunner().invoke(main, ["textures", "--out", str(tmp_path / "t"), "--num-classes", "9"])
    assert result.exit_code == 2 and result.output.startswith("error: rrm textures: parameter num_classes=9")
