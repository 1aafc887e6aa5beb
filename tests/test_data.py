from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from pipeline.core.errors import InputError
from pipeline.core.io import IGNORE, write_image, write_mask
from pipeline.data.datasets import (
    MEAN_COLOUR,
    Augmentation,
    ClassificationDataset,
    ImageDataset,
    SegmentationDataset,
    hflip,
    jitter_colours,
    normalize,
    pad_collate,
    random_crop,
    random_rescale,
    random_resize_long,
)
from pipeline.data.manifest import Item, Manifest, labels_from_mask, load_manifest

CLASSES = ("cat", "dog", "bird")
# The colour of label value v is COLOURS[v], so an image's colours encode its label mask.
COLOURS = np.array([[20, 20, 20], [220, 40, 40], [40, 220, 40], [40, 40, 220]], dtype=np.uint8)
SIZES = {"a": (40, 48), "b": (28, 52), "c": (20, 20), "d": (44, 36)}
BLOCK = 8
CROP = 32


def block_mask(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A label mask of BLOCK x BLOCK squares with random labels 0..3."""
    blocks = rng.integers(0, len(COLOURS), (shape[0] // BLOCK + 1, shape[1] // BLOCK + 1))
    return np.kron(blocks, np.ones((BLOCK, BLOCK), dtype=np.int64))[: shape[0], : shape[1]].astype(np.uint8)


@pytest.fixture
def dataset(tmp_path: Path) -> tuple[Manifest, dict[str, np.ndarray]]:
    """A four-image manifest, saved and loaded again, and the label mask of each image."""
    rng = np.random.default_rng(7)
    masks = {image_id: block_mask(shape, rng) for image_id, shape in SIZES.items()}
    items = []
    for image_id, mask in masks.items():
        write_image(tmp_path / "images" / f"{image_id}.png", COLOURS[mask])
        write_mask(tmp_path / "masks" / f"{image_id}.png", mask, COLOURS)
        items.append(Item(image_id, labels_from_mask(mask, len(CLASSES)), has_mask=True))
    manifest = Manifest(
        name="tiny",
        classes=CLASSES,
        image_dir=tmp_path / "images",
        image_suffix=".png",
        mask_dir=tmp_path / "masks",
        splits={"train": tuple(items)},
    )
    manifest.save(tmp_path / "manifests" / "tiny.json")
    return load_manifest(tmp_path / "manifests" / "tiny.json"), masks


def uniform_interior(label: np.ndarray, radius: int = 2) -> np.ndarray:
    """Pixels whose (2 radius + 1)^2 neighbourhood holds one label other than IGNORE."""
    padded = np.pad(label, radius, constant_values=IGNORE)
    height, width = label.shape
    same = label != IGNORE
    for dy in range(2 * radius + 1):
        for dx in range(2 * radius + 1):
            same &= padded[dy : dy + height, dx : dx + width] == label
    return same


def assert_colours_match_labels(rgb_hwc: np.ndarray, label: np.ndarray) -> int:
    """Away from label edges (where bilinear resampling blends colours) each pixel has its label's colour.

    Returns the number of pixels checked.
    """
    inside = uniform_interior(label)
    difference = rgb_hwc[inside].astype(int) - COLOURS[label[inside]].astype(int)
    assert np.abs(difference).max(initial=0) <= 1
    return int(inside.sum())


def test_normalize_uses_imagenet_statistics_channel_first():
    image = np.array([[[0, 0, 0], [255, 255, 255]]], dtype=np.uint8)
    out = normalize(image)
    assert out.dtype == np.float32 and out.shape == (3, 1, 2)
    # (0 - 255 mean) / (255 std) = -mean / std; (255 - 255 mean) / (255 std) = (1 - mean) / std
    # R: -0.485 / 0.229, 0.515 / 0.229; G: -0.456 / 0.224, 0.544 / 0.224; B: -0.406 / 0.225, 0.594 / 0.225
    expected = [[-2.117904, 2.248908], [-2.035714, 2.428571], [-1.804444, 2.64]]
    np.testing.assert_allclose(out[:, 0, :], expected, atol=1e-5)


def coordinate_image(height: int, width: int) -> np.ndarray:
    """Red = row, green = column: every pixel names where it came from."""
    rows, cols = np.mgrid[:height, :width]
    return np.stack([rows, cols, np.full_like(rows, 9)], axis=-1).astype(np.uint8)


def test_random_crop_of_a_larger_image_is_a_window_of_it():
    image = coordinate_image(20, 30)
    mask = image[..., 1].copy()
    crop, (mask_crop,), valid = random_crop(image, [mask], 8, np.random.default_rng(0))
    top, left = crop[0, 0, 0], crop[0, 0, 1]
    np.testing.assert_array_equal(crop, image[top : top + 8, left : left + 8])
    np.testing.assert_array_equal(mask_crop, mask[top : top + 8, left : left + 8])
    assert valid.all()


def test_random_crop_pads_a_smaller_image_and_marks_its_pixels_valid():
    image = coordinate_image(5, 7) + 1  # no zero pixel, so padding is recognisable
    mask = np.arange(35, dtype=np.uint8).reshape(5, 7)
    crop, (mask_crop,), valid = random_crop(image, [mask], 10, np.random.default_rng(3))
    assert crop.shape == (10, 10, 3) and mask_crop.shape == (10, 10) and valid.shape == (10, 10)
    assert valid.sum() == 35
    assert (crop[~valid] == MEAN_COLOUR).all() and (mask_crop[~valid] == IGNORE).all()
    np.testing.assert_array_equal(crop[valid].reshape(5, 7, 3), image)
    np.testing.assert_array_equal(mask_crop[valid].reshape(5, 7), mask)


def test_random_crop_pads_the_short_axis_and_crops_the_long_one():
    image = coordinate_image(4, 30) + 1
    crop, _, valid = random_crop(image, [], 10, np.random.default_rng(1))
    assert valid.sum() == 4 * 10
    rows = np.flatnonzero(valid.any(axis=1))
    np.testing.assert_array_equal(crop[rows, :, 0], np.repeat(np.arange(1, 5)[:, None], 10, axis=1))


def test_random_rescale_keeps_labels_aligned_with_colours():
    mask = block_mask((40, 48), np.random.default_rng(0))
    for seed in range(4):
        image, (label,) = random_rescale(COLOURS[mask], [mask], (0.6, 1.4), np.random.default_rng(seed))
        scale = np.random.default_rng(seed).uniform(0.6, 1.4)
        assert image.shape == (round(40 * scale), round(48 * scale), 3)
        assert label.shape == image.shape[:2] and label.dtype == np.uint8
        assert assert_colours_match_labels(image, label) > 100


def test_padding_is_the_mean_colour_which_normalises_to_about_zero():
    # PSA and RRM pad their normalised crops with zeros: a padded pixel carries no signal.
    padded, _, valid = random_crop(coordinate_image(4, 4), [], 8, np.random.default_rng(0))
    assert np.abs(normalize(padded)[:, ~valid]).max() < 0.01


def test_resize_long_draws_the_long_side_in_pixels_and_keeps_the_proportions():
    mask = block_mask((40, 60), np.random.default_rng(0))
    longs = set()
    for seed in range(30):
        image, (label,) = random_resize_long(COLOURS[mask], [mask], (30, 33), np.random.default_rng(seed))
        assert max(image.shape[:2]) == image.shape[1] and 30 <= image.shape[1] <= 33
        assert image.shape[0] == round(40 * image.shape[1] / 60) and label.shape == image.shape[:2]
        longs.add(image.shape[1])
    assert longs == {30, 31, 32, 33}


def test_colour_jitter_changes_colours_within_its_strengths_and_zero_changes_nothing():
    image = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    np.testing.assert_array_equal(jitter_colours(image, (0, 0, 0, 0), np.random.default_rng(1)), image)
    brighter = [jitter_colours(image, (0.3, 0, 0, 0), np.random.default_rng(seed)) for seed in range(20)]
    ratios = [float(out.astype(float).mean() / image.astype(float).mean()) for out in brighter]
    assert 0.68 < min(ratios) < 0.95 and 1.05 < max(ratios) < 1.32
    hue = jitter_colours(image, (0, 0, 0, 0.1), np.random.default_rng(2))
    assert hue.shape == image.shape and hue.dtype == np.uint8 and (hue != image).any()


def test_augmentation_with_jitter_is_repeated_by_its_generator():
    augment = Augmentation(24, (1.0, 1.0), True, resize_long=(20, 40), color_jitter=(0.3, 0.3, 0.3, 0.1))
    image = coordinate_image(30, 50)
    first = augment(image, [], np.random.default_rng(5))
    again = augment(image, [], np.random.default_rng(5))
    np.testing.assert_array_equal(first[0], again[0])
    assert first[0].shape == (24, 24, 3) and (first[0][~first[2]] == MEAN_COLOUR).all()


def test_hflip_mirrors_image_and_masks():
    image = coordinate_image(2, 3)
    flipped, (mask,) = hflip(image, [image[..., 1]])
    np.testing.assert_array_equal(flipped[..., 1], [[2, 1, 0], [2, 1, 0]])
    np.testing.assert_array_equal(mask, flipped[..., 1])


def test_augmentation_flips_about_half_the_time_only_when_asked():
    image = coordinate_image(6, 6)

    def flipped(flip: bool, seed: int) -> bool:
        augment = Augmentation(crop_size=6, scale_range=(1.0, 1.0), flip=flip)
        out, _, _ = augment(image, [], np.random.default_rng(seed))
        return bool(out[0, 0, 1] == 5)

    assert 4 <= sum(flipped(True, seed) for seed in range(20)) <= 16
    assert not any(flipped(False, seed) for seed in range(20))


@pytest.mark.parametrize(("crop_size", "scale_range", "extra"), [
    (0, (0.7, 1.3), {}), (32, (0.0, 1.0), {}), (32, (1.3, 0.7), {}),
    (32, (1.0, 1.0), {"resize_long": (512, 256)}), (32, (1.0, 1.0), {"resize_long": (0, 10)}),
    (32, (1.0, 1.0), {"color_jitter": (0.3, 0.3, 0.3)}), (32, (1.0, 1.0), {"color_jitter": (0.3, 0.3, 0.3, 0.6)}),
    (32, (1.0, 1.0), {"color_jitter": (-0.1, 0, 0, 0)}),
])
def test_augmentation_rejects_bad_parameters(crop_size, scale_range, extra):
    with pytest.raises(ValueError):
        Augmentation(crop_size=crop_size, scale_range=scale_range, flip=True, **extra)


def segmentation_dataset(
    manifest: Manifest, masks: dict[str, np.ndarray], seed: int = 0
) -> SegmentationDataset:
    return SegmentationDataset(manifest, "train", masks.__getitem__, Augmentation(CROP, (0.7, 1.3), flip=True), seed)


def test_segmentation_items_keep_image_label_and_valid_aligned(dataset):
    manifest, masks = dataset
    data = segmentation_dataset(manifest, masks)
    checked = 0
    for epoch in range(3):
        data.set_epoch(epoch)
        for index, item in enumerate(manifest.split("train")):
            sample = data[index]
            assert sample["id"] == item.id
            assert sample["image"].shape == (3, CROP, CROP) and sample["image"].dtype == torch.float32
            assert sample["rgb"].shape == (3, CROP, CROP) and sample["rgb"].dtype == torch.uint8
            assert sample["label"].shape == (CROP, CROP) and sample["label"].dtype == torch.int64
            assert sample["valid"].dtype == torch.float32
            np.testing.assert_array_equal(sample["labels"].numpy(), manifest.label_vector(item))
            rgb = sample["rgb"].numpy().transpose(1, 2, 0)
            label = sample["label"].numpy()
            padding = sample["valid"].numpy() == 0
            assert (label[padding] == IGNORE).all() and (rgb[padding] == MEAN_COLOUR).all()
            checked += assert_colours_match_labels(rgb, label)
            np.testing.assert_allclose(sample["image"].numpy(), normalize(rgb), atol=1e-6)
    assert checked > 1000


def test_classification_items(dataset):
    manifest, _ = dataset
    data = ClassificationDataset(manifest, "train", Augmentation(CROP, (0.7, 1.3), flip=True), seed=0)
    assert len(data) == 4
    sample = data[2]  # image "c", 20 x 20: at most 26 x 26 after rescaling, so padded in a 32 x 32 crop
    assert sample["id"] == "c"
    assert sample["image"].shape == (3, CROP, CROP) and sample["image"].dtype == torch.float32
    assert sample["valid"].shape == (CROP, CROP) and sample["valid"].dtype == torch.float32
    np.testing.assert_array_equal(sample["labels"].numpy(), manifest.label_vector(manifest.split("train")[2]))
    padding = sample["valid"].numpy() == 0
    assert padding.sum() >= CROP * CROP - 26 * 26
    mean = normalize(MEAN_COLOUR.reshape(1, 1, 3))[:, 0, 0]
    padded_pixels = sample["image"].numpy()[:, padding]
    np.testing.assert_allclose(padded_pixels, np.repeat(mean[:, None], padding.sum(), axis=1))


def assert_samples_equal(first: dict, second: dict) -> None:
    assert first.keys() == second.keys()
    for key, value in first.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, second[key]), key
        else:
            assert value == second[key], key


def test_items_depend_on_seed_and_epoch_only(dataset):
    manifest, masks = dataset
    data = segmentation_dataset(manifest, masks)
    first = [data[i] for i in range(len(data))]
    for index in reversed(range(len(data))):  # the order of fetching does not matter
        assert_samples_equal(data[index], first[index])
    data.set_epoch(1)
    assert not torch.equal(data[0]["label"], first[0]["label"])
    other_seed = segmentation_dataset(manifest, masks, seed=1)
    assert not torch.equal(other_seed[0]["label"], first[0]["label"])


def test_batches_do_not_depend_on_the_number_of_workers(dataset):
    manifest, masks = dataset
    data = segmentation_dataset(manifest, masks)
    data.set_epoch(2)
    single = list(DataLoader(data, batch_size=2, num_workers=0))
    parallel = list(DataLoader(data, batch_size=2, num_workers=2))
    assert len(single) == len(parallel) == 2
    for one, other in zip(single, parallel, strict=True):
        assert_samples_equal(one, other)


def test_image_dataset_and_pad_collate(dataset):
    manifest, _ = dataset
    data = ImageDataset(manifest, "train")
    sample = data[1]
    assert sample["id"] == "b"
    assert sample["image"].shape == (3, 28, 52) and sample["rgb"].shape == (28, 52, 3)
    assert sample["size"].tolist() == [28, 52]
    batch = next(iter(DataLoader(data, batch_size=3, collate_fn=pad_collate)))
    # largest of (40, 48), (28, 52), (20, 20)
    assert batch["image"].shape == (3, 3, 40, 52)
    assert batch["rgb"].shape == (3, 40, 52, 3) and batch["rgb"].dtype == torch.uint8
    assert batch["valid"].shape == (3, 40, 52)
    assert batch["id"] == ["a", "b", "c"]
    assert batch["labels"].shape == (3, len(CLASSES))
    assert batch["size"].tolist() == [[40, 48], [28, 52], [20, 20]]
    for index, (height, width) in enumerate(batch["size"].tolist()):
        valid = batch["valid"][index]
        assert valid.sum() == height * width and valid[:height, :width].all()
        own = manifest.read_image(batch["id"][index])
        np.testing.assert_array_equal(batch["rgb"][index, :height, :width].numpy(), own)
        assert (batch["rgb"][index][valid == 0] == 0).all()
        assert (batch["image"][index][:, valid == 0] == 0).all()
        expected = torch.from_numpy(normalize(own))
        torch.testing.assert_close(batch["image"][index, :, :height, :width], expected)


def test_missing_image_is_an_input_error_naming_the_file(dataset):
    manifest, masks = dataset
    data = ImageDataset(manifest, "train")
    manifest.image_path("b").unlink()
    with pytest.raises(InputError, match=r"b\.png: file not found"):
        data[1]
    with pytest.raises(InputError, match=r"b\.png: image of id 'b' in split 'train' not found"):
        segmentation_dataset(manifest, masks)


def test_training_mask_of_another_size_is_an_input_error(dataset):
    manifest, masks = dataset
    masks["a"] = masks["a"][:-1]
    with pytest.raises(InputError, match=r"^a: training mask is 39x48 but the image is 40x48$"):
        segmentation_dataset(manifest, masks)[0]
