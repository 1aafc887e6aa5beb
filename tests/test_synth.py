import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.core.errors import InputError
from pipeline.core.io import read_image, read_mask
from pipeline.core.params import build_params
from pipeline.data.manifest import check_images_exist, labels_from_mask, load_manifest
from pipeline.data.synth import (
    BACKGROUND_NAMES,
    CLASS_LOOKS,
    CLASS_NAMES,
    SynthParams,
    SynthSample,
    generate,
    render,
    sample_rng,
)

SMALL = SynthParams(image_size=64, num_classes=4, train_images=30, val_images=10, seed=7)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, dict]:
    """A small benchmark on disk: its root (manifest at ``root/synth.json``) and statistics."""
    root = tmp_path_factory.mktemp("synth")
    _, stats = generate(SMALL, root, root / "synth.json")
    return root, stats


@pytest.fixture(scope="module")
def samples() -> list[SynthSample]:
    params = SynthParams(image_size=64, num_classes=6)
    return [render(params, sample_rng(1, "train", index)) for index in range(150)]


def files_under(root: Path) -> dict[str, bytes]:
    files = (path for path in root.rglob("*") if path.is_file())
    return {path.relative_to(root).as_posix(): path.read_bytes() for path in files}


def single_instances(samples: list[SynthSample]) -> list[tuple[SynthSample, int]]:
    """(sample, class) for each class that occurs once in its image, so that its mask value marks
    one object (two objects of a class share one value)."""
    pairs = []
    for sample in samples:
        counts = np.bincount([obj.class_index for obj in sample.scene.objects], minlength=len(CLASS_NAMES))
        pairs += [(sample, int(c)) for c in np.flatnonzero(counts == 1)]
    return pairs


def mean_colour(sample: SynthSample, class_index: int, region: str) -> np.ndarray:
    """Mean RGB of the class's part pixels, or of its body pixels (the object without its part)."""
    part = sample.part_mask == class_index + 1
    pixels = part if region == "part" else (sample.mask == class_index + 1) & ~part
    return sample.image[pixels].mean(axis=0)


def nearest_centroid_accuracy(colours: np.ndarray, classes: np.ndarray) -> float:
    """Two-fold accuracy of assigning each colour the class with the nearest mean colour."""
    fold = np.arange(len(classes)) % 2
    correct = 0
    for held_out in (0, 1):
        train, test = fold != held_out, fold == held_out
        known = np.unique(classes[train])
        centroids = np.stack([colours[train][classes[train] == c].mean(axis=0) for c in known])
        distances = ((colours[test][:, None] - centroids[None]) ** 2).sum(axis=-1)
        correct += (known[distances.argmin(axis=1)] == classes[test]).sum()
    return correct / len(classes)


def neighbour_differences(sample: SynthSample) -> dict[str, np.ndarray]:
    """Colour differences (sum over RGB) of horizontally and vertically adjacent pixel pairs:
    across an object's edge, inside one body (parts left out), and inside the background."""
    image, mask, part = sample.image.astype(float), sample.mask, sample.part_mask > 0
    found: dict[str, list[np.ndarray]] = {"edge": [], "body": [], "background": []}
    for a, b in (
        (np.s_[:, 1:], np.s_[:, :-1]),
        (np.s_[1:, :], np.s_[:-1, :]),
    ):
        difference = np.abs(image[a] - image[b]).sum(axis=-1)
        no_part = ~part[a] & ~part[b]
        found["edge"].append(difference[((mask[a] == 0) != (mask[b] == 0)) & no_part])
        found["body"].append(difference[(mask[a] == mask[b]) & (mask[a] > 0) & no_part])
        found["background"].append(difference[(mask[a] == 0) & (mask[b] == 0)])
    return {key: np.concatenate(values) for key, values in found.items()}


def test_generate_writes_a_voc_layout_and_a_manifest_that_loads(dataset):
    root, _ = dataset
    manifest = load_manifest(root / "synth.json")
    check_images_exist(manifest)
    assert manifest.classes == CLASS_NAMES[:4]
    assert [len(manifest.split(s)) for s in ("train", "val")] == [30, 10]
    assert manifest.split("train")[7].id == "train_00007"
    assert manifest.image_path("val_00003") == root / "JPEGImages" / "val_00003.png"
    for split in ("train", "val"):
        listed = (root / "ImageSets" / "Segmentation" / f"{split}.txt").read_text().split()
        assert listed == [item.id for item in manifest.split(split)]
        for item in manifest.split(split):
            assert item.has_mask
            assert (root / "SegmentationPart" / f"{item.id}.png").is_file()
            assert read_image(manifest.image_path(item.id)).shape == (64, 64, 3)


def test_same_parameters_give_byte_identical_files(dataset, tmp_path):
    root, _ = dataset
    generate(SMALL, tmp_path, tmp_path / "synth.json")
    again, first = files_under(tmp_path), files_under(root)
    assert len(first) == 3 * 40 + 2 + 2  # images, masks, parts; two lists; stats and manifest
    assert again == first


def test_an_image_depends_only_on_seed_split_and_index(dataset):
    root, _ = dataset
    bigger = SynthParams(image_size=64, num_classes=4, train_images=50, val_images=3, seed=7)
    sample = render(bigger, sample_rng(7, "val", 3))
    assert np.array_equal(sample.image, read_image(root / "JPEGImages" / "val_00003.png"))
    for other in (sample_rng(8, "val", 3), sample_rng(7, "train", 3), sample_rng(7, "val", 4)):
        assert not np.array_equal(sample.image, render(bigger, other).image)


def test_labels_are_the_classes_with_visible_parts_and_parts_lie_inside_objects(dataset):
    root, _ = dataset
    manifest = load_manifest(root / "synth.json")
    for item in manifest.split("train") + manifest.split("val"):
        mask = manifest.read_mask(item)
        part = read_mask(root / "SegmentationPart" / f"{item.id}.png", 4)
        assert item.labels == labels_from_mask(part, 4) == labels_from_mask(mask, 4)
        assert len(item.labels) >= 1
        assert np.array_equal(part[part > 0], mask[part > 0])
        assert (part > 0).sum() < 0.5 * (mask > 0).sum()
        assert set(np.unique(mask)) <= {0, 1, 2, 3, 4}


def test_statistics_are_returned_and_written(dataset):
    root, stats = dataset
    assert json.loads((root / "stats.json").read_text()) == stats
    assert stats["images"] == {"train": 30, "val": 10}
    assert stats["classes"] == list(CLASS_NAMES[:4])
    assert 1.0 <= stats["objects_per_image"] <= 3.0
    assert 0.02 < stats["object_area"]["fraction_of_image"] < 0.3
    assert 0.1 <= stats["part_area"]["fraction_of_object"] <= 0.3
    for name, fractions in stats["background_by_class"].items():
        assert list(fractions) == list(BACKGROUND_NAMES)
        assert sum(fractions.values()) == pytest.approx(1.0, abs=1e-3)
        assert stats["images_per_class"][name] > 0


def test_each_part_covers_its_share_of_the_object_and_stays_visible(samples):
    (low, high), min_visible = SynthParams().part_fraction, SynthParams().min_visible
    for sample in samples:
        for obj in sample.scene.objects:
            assert low * obj.area - 0.5 <= obj.part_area <= high * obj.area + 0.5  # rounded to pixels
            assert obj.visible_part_area >= min_visible * obj.part_area
            assert obj.visible_area >= min_visible * obj.area
            visible_share = obj.visible_part_area / obj.visible_area
            assert min_visible * low - 0.01 <= visible_share <= high / min_visible


def test_scenes_hold_one_to_three_objects_of_varied_sizes(samples):
    counts = [len(sample.scene.objects) for sample in samples]
    assert set(counts) == {1, 2, 3}
    areas = [obj.area / 64**2 for sample in samples for obj in sample.scene.objects]
    assert min(areas) < 0.06 and max(areas) > 0.2


def test_body_colour_does_not_tell_the_class_but_part_colour_does(samples):
    pairs = single_instances(samples)
    classes = np.array([c for _, c in pairs])
    bodies = np.array([mean_colour(sample, c, "body") for sample, c in pairs])
    parts = np.array([mean_colour(sample, c, "part") for sample, c in pairs])
    assert len(pairs) > 150
    assert nearest_centroid_accuracy(bodies, classes) < 1 / 6 + 0.1  # chance is 1/6
    assert nearest_centroid_accuracy(parts, classes) > 0.95


def test_object_edges_are_much_sharper_than_texture_inside_bodies_and_backgrounds(samples):
    found = [neighbour_differences(sample) for sample in samples[:40]]
    edge, body, background = (
        np.concatenate([f[key] for f in found]).mean() for key in ("edge", "body", "background")
    )
    assert edge > 8 * body
    assert edge > 8 * background


def test_backgrounds_are_dim_low_saturation_textures_of_every_kind(samples):
    assert {sample.scene.background for sample in samples} == set(range(len(BACKGROUND_NAMES)))
    for sample in samples:
        blocks = sample.image.astype(float).reshape(16, 4, 16, 4, 3).mean(axis=(1, 3))
        plain = (sample.mask.reshape(16, 4, 16, 4) == 0).all(axis=(1, 3))
        brightness = blocks[plain].max(axis=-1)
        saturation = 1 - blocks[plain].min(axis=-1) / brightness
        assert brightness.std() > 3  # 4x4 means keep the texture but average the pixel noise away
        assert brightness.max() < 200 and saturation.max() < 0.35


def test_bodies_stand_out_from_every_background_pixel(samples):
    for sample, c in single_instances(samples):
        background = sample.image[sample.mask == 0].astype(float)
        distance = np.linalg.norm(background - mean_colour(sample, c, "body"), axis=-1)
        assert distance.min() > 60


def test_a_class_with_a_preferred_background_mostly_appears_on_it():
    params = SynthParams(image_size=32, num_classes=2, max_objects=1, cooccurrence=0.8)
    assert CLASS_LOOKS[0].background == 0 and CLASS_LOOKS[1].background is None
    scenes = [render(params, sample_rng(0, "train", index)).scene for index in range(200)]
    on_noise = {c: np.mean([s.background == 0 for s in scenes if s.labels == (c,)]) for c in (0, 1)}
    assert on_noise[0] > 0.7  # 0.8 + 0.2 / 4 expected
    assert on_noise[1] < 0.4  # 1 / 4 expected


def test_class_names_are_twenty_distinct_short_names():
    assert len(CLASS_NAMES) == len(set(CLASS_NAMES)) == 20
    assert all(name.isalpha() and len(name) <= 6 for name in CLASS_NAMES)
    assert len({(look.hue, look.ink) for look in CLASS_LOOKS}) == 20


@pytest.mark.parametrize(
    "values",
    [
        {"num_classes": 21},
        {"num_classes": 0},
        {"image_size": 16},
        {"train_images": 0},
        {"part_fraction": (0.3, 0.1)},
        {"part_fraction": (0.1,)},
        {"object_radius": (0.1, 0.45)},
        {"cooccurrence": 1.5},
    ],
)
def test_parameters_out_of_range_are_rejected(values):
    with pytest.raises(ValueError):
        SynthParams(**values)


def test_parameters_from_params_yaml_name_the_section():
    params = build_params(SynthParams, {"part_fraction": [0.1, 0.2]}, "params.yaml [synth]")
    assert params.part_fraction == (0.1, 0.2)
    with pytest.raises(InputError, match=r"params.yaml \[synth\]: parameter num_classes=25"):
        build_params(SynthParams, {"num_classes": 25}, "params.yaml [synth]")
