"""Datasets and joint image/label transforms for training and inference.

Transforms work on numpy arrays: an RGB image uint8 (H, W, 3) and any number of label arrays
(H, W) that must stay aligned with it. The image is resampled bilinearly, labels by nearest
neighbour, and padding gives the image the ImageNet mean colour (:data:`MEAN_COLOUR`) and labels
``IGNORE``.

Randomness: every item draws from its own ``numpy.random.Generator`` seeded by
``(seed, epoch, index)``. An item's crop, scale and flip therefore depend neither on the order
in which items are fetched nor on how many DataLoader workers fetch them, and a run is repeated
exactly by its seed. Call ``set_epoch(epoch)`` before iterating each epoch; the workers of a
DataLoader receive a fresh copy of the dataset whenever an iterator is created, so this works
as long as ``persistent_workers`` is off.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, default_collate

from pipeline.core.errors import InputError
from pipeline.core.io import IGNORE
from pipeline.core.params import check_colour_jitter, check_long_range, check_range, check_scale_range
from pipeline.data.manifest import Item, Manifest, check_images_exist

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32) * 255
"""Per-channel RGB mean of ImageNet in 0..255, as the ImageNet-trained backbones expect."""
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32) * 255
"""Per-channel RGB standard deviation of ImageNet in 0..255."""
MEAN_COLOUR = np.round(IMAGENET_MEAN).astype(np.uint8)
"""The padding of training crops: the ImageNet mean, which :func:`normalize` takes to (about) zero.
PSA and RRM pad their normalised crops with zeros, so a padded pixel carries no signal into the
network, and RRM's online mining sees the padding in this colour."""

Sample = dict[str, Any]


def normalize(image: np.ndarray) -> np.ndarray:
    """uint8 (H, W, 3) RGB -> float32 (3, H, W), each channel standardised with the ImageNet statistics."""
    standardised = (image.astype(np.float32) - IMAGENET_MEAN) / IMAGENET_STD
    return np.ascontiguousarray(standardised.transpose(2, 0, 1))


def _nearest_indices(source: int, target: int) -> np.ndarray:
    """Source index of each target pixel centre (pixel centres aligned, as in the bilinear resize)."""
    return np.minimum(((np.arange(target) + 0.5) * source / target).astype(np.int64), source - 1)


def resize(
    image: np.ndarray, masks: Sequence[np.ndarray], size: tuple[int, int]
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Resize the image (bilinear) and the label arrays (nearest) to ``size`` = (height, width)."""
    height, width = size
    if (height, width) == image.shape[:2]:
        return image, list(masks)
    resized = np.asarray(Image.fromarray(image).resize((width, height), Image.Resampling.BILINEAR))
    rows = _nearest_indices(image.shape[0], height)
    cols = _nearest_indices(image.shape[1], width)
    return resized, [mask[np.ix_(rows, cols)] for mask in masks]


def rescale(
    image: np.ndarray, masks: Sequence[np.ndarray], factor: float
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Resize the image and labels together by ``factor``, each side rounded (1 pixel at least)."""
    height, width = image.shape[:2]
    return resize(image, masks, (max(1, round(height * factor)), max(1, round(width * factor))))


def random_rescale(
    image: np.ndarray,
    masks: Sequence[np.ndarray],
    scale_range: tuple[float, float],
    rng: np.random.Generator,
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Rescale the image and labels together by a factor drawn uniformly from ``scale_range``."""
    return rescale(image, masks, rng.uniform(*scale_range))


def random_resize_long(
    image: np.ndarray,
    masks: Sequence[np.ndarray],
    long_range: tuple[int, int],
    rng: np.random.Generator,
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Resize the image and labels together so that their long side is a whole number of pixels
    drawn uniformly from ``long_range`` (both ends included), the short side in proportion:
    PSA's rescaling, which makes the object scale independent of the photo's resolution."""
    target = int(rng.integers(long_range[0], long_range[1] + 1))
    return rescale(image, masks, target / max(image.shape[:2]))


def jitter_colours(image: np.ndarray, strengths: tuple[float, float, float, float],
                   rng: np.random.Generator) -> np.ndarray:
    """``image`` with torchvision's colour jitter (PSA's augmentation), drawn from ``rng``.

    ``strengths`` = (brightness, contrast, saturation, hue): the first three scale by a factor
    drawn from ``[max(0, 1 - s), 1 + s]``, hue shifts by one drawn from ``[-h, h]`` (of a full
    turn), the four applied in a random order; a strength of 0 leaves its property alone.
    """
    import torchvision.transforms.functional as TF  # here: torchvision takes seconds to import

    brightness, contrast, saturation, hue = strengths
    adjustments = [
        (TF.adjust_brightness, brightness, rng.uniform(max(0.0, 1 - brightness), 1 + brightness)),
        (TF.adjust_contrast, contrast, rng.uniform(max(0.0, 1 - contrast), 1 + contrast)),
        (TF.adjust_saturation, saturation, rng.uniform(max(0.0, 1 - saturation), 1 + saturation)),
        (TF.adjust_hue, hue, rng.uniform(-hue, hue)),
    ]
    picture = Image.fromarray(image)
    for index in rng.permutation(len(adjustments)):
        adjust, strength, amount = adjustments[index]
        if strength > 0:
            picture = adjust(picture, float(amount))
    return np.asarray(picture)


def hflip(image: np.ndarray, masks: Sequence[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
    """Mirror the image and labels left to right."""
    return np.ascontiguousarray(image[:, ::-1]), [np.ascontiguousarray(mask[:, ::-1]) for mask in masks]


def _window(length: int, size: int, rng: np.random.Generator) -> tuple[slice, slice]:
    """Random placement along one axis: (source slice, slice of the crop it lands in).

    A longer axis is cropped at a random offset; a shorter one lands at a random offset in
    the crop, the rest being padding.
    """
    if length >= size:
        start = int(rng.integers(0, length - size + 1))
        return slice(start, start + size), slice(0, size)
    start = int(rng.integers(0, size - length + 1))
    return slice(0, length), slice(start, start + length)


def random_crop(
    image: np.ndarray, masks: Sequence[np.ndarray], size: int, rng: np.random.Generator
) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
    """Cut a ``size`` x ``size`` window from the image and labels at the same random place.

    Where the image is smaller than the window it is padded, the image with :data:`MEAN_COLOUR`
    and the labels with ``IGNORE``. Returns ``(image, masks, valid)``, ``valid`` bool (size,
    size) marking the pixels that come from the image.
    """
    rows_from, rows_to = _window(image.shape[0], size, rng)
    cols_from, cols_to = _window(image.shape[1], size, rng)
    cropped = np.empty((size, size, image.shape[2]), dtype=image.dtype)
    cropped[:] = MEAN_COLOUR
    cropped[rows_to, cols_to] = image[rows_from, cols_from]
    cropped_masks = []
    for mask in masks:
        padded = np.full((size, size), IGNORE, dtype=mask.dtype)
        padded[rows_to, cols_to] = mask[rows_from, cols_from]
        cropped_masks.append(padded)
    valid = np.zeros((size, size), dtype=bool)
    valid[rows_to, cols_to] = True
    return cropped, cropped_masks, valid


@dataclass(frozen=True)
class Augmentation:
    """The training augmentation, in this order: the long side resized to a random length
    (``resize_long``, pixels, if given), a random rescale (``scale_range``), a random horizontal
    flip, colour jitter (``color_jitter``, see :func:`jitter_colours`, if given), a random square
    crop padded with the mean colour."""

    crop_size: int
    scale_range: tuple[float, float]
    flip: bool
    resize_long: tuple[int, int] | None = None
    color_jitter: tuple[float, float, float, float] | None = None

    def __post_init__(self) -> None:
        check_range("crop_size", self.crop_size, low=1)
        check_scale_range("scale_range", self.scale_range)
        if self.resize_long is not None:
            check_long_range("resize_long", self.resize_long)
        if self.color_jitter is not None:
            check_colour_jitter("color_jitter", self.color_jitter)

    def __call__(
        self, image: np.ndarray, masks: Sequence[np.ndarray], rng: np.random.Generator
    ) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
        if self.resize_long is not None:
            image, masks = random_resize_long(image, masks, self.resize_long, rng)
        image, masks = random_rescale(image, masks, self.scale_range, rng)
        if self.flip and rng.random() < 0.5:
            image, masks = hflip(image, masks)
        if self.color_jitter is not None:
            image = jitter_colours(image, self.color_jitter, rng)
        return random_crop(image, masks, self.crop_size, rng)


class _WorkerInputError(InputError):
    """An :class:`InputError` raised while reading an item, kept to one line across a DataLoader worker.

    A DataLoader re-raises a worker's error in the main process as ``type(error)(text)``, the
    text being the worker's whole traceback, whose last line is ``<class>: <message>``. This
    type keeps only that message, so the error stays one line naming the file.
    """

    def __init__(self, where: str | os.PathLike[str], problem: str | None = None) -> None:
        if problem is None and "\n" in str(where):
            where = str(where).rstrip().rsplit("\n", 1)[-1].split(": ", 1)[1]
        super().__init__(where, problem)


def _one_line_errors(getitem: Callable[[Any, int], Sample]) -> Callable[[Any, int], Sample]:
    """Wrap a dataset's ``__getitem__`` so its input errors reach the caller as one line."""

    @functools.wraps(getitem)
    def wrapped(dataset: Any, index: int) -> Sample:
        try:
            return getitem(dataset, index)
        except InputError as error:
            raise _WorkerInputError(error.where, error.problem) from None

    return wrapped


class _SplitDataset(Dataset):
    """The items of one manifest split; every image file is checked to exist up front.

    The up-front check fails at once, in the calling process; a file that exists but does not
    decode fails when its item is read, in a DataLoader worker maybe, as one line all the same
    (see :class:`_WorkerInputError`).
    """

    def __init__(self, manifest: Manifest, split: str) -> None:
        self.manifest = manifest
        self.items: tuple[Item, ...] = manifest.split(split)
        check_images_exist(manifest, [split])

    def __len__(self) -> int:
        return len(self.items)

    def _labels(self, item: Item) -> torch.Tensor:
        return torch.from_numpy(self.manifest.label_vector(item))


class _AugmentedDataset(_SplitDataset):
    """A split with the training augmentation and per-item random generators (see the module docstring)."""

    def __init__(self, manifest: Manifest, split: str, augment: Augmentation, seed: int) -> None:
        super().__init__(manifest, split)
        self.augment = augment
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng((self.seed, self.epoch, index))


class ClassificationDataset(_AugmentedDataset):
    """Augmented crops with image-level labels, for training the classifier.

    Item: ``image`` float32 (3, S, S) normalised, ``labels`` float32 (C,) multi-hot, ``id``,
    ``valid`` float32 (S, S), 1 on image pixels and 0 on padding.
    """

    @_one_line_errors
    def __getitem__(self, index: int) -> Sample:
        item = self.items[index]
        image, _, valid = self.augment(self.manifest.read_image(item.id), [], self._rng(index))
        return {
            "image": torch.from_numpy(normalize(image)),
            "labels": self._labels(item),
            "id": item.id,
            "valid": torch.from_numpy(valid.astype(np.float32)),
        }


class SegmentationDataset(_AugmentedDataset):
    """Augmented crops with a training mask, for the segmentation branch.

    ``read_label(image_id)`` gives the uint8 (H, W) training mask of an image (for instance
    the reliable regions from the masks store), the same size as the image.
    Item: ``image`` float32 (3, S, S) normalised; ``rgb`` uint8 (3, S, S), the same crop in its
    original colours (the dense energy loss and the CRF compare colours); ``label`` int64
    (S, S), ``IGNORE`` where unlabelled or padded; ``valid`` float32 (S, S); ``labels`` float32
    (C,) multi-hot; ``id``.
    """

    def __init__(
        self,
        manifest: Manifest,
        split: str,
        read_label: Callable[[str], np.ndarray],
        augment: Augmentation,
        seed: int,
    ) -> None:
        super().__init__(manifest, split, augment, seed)
        self.read_label = read_label

    def _read_pair(self, item: Item) -> tuple[np.ndarray, np.ndarray]:
        image = self.manifest.read_image(item.id)
        label = np.asarray(self.read_label(item.id))
        if label.shape != image.shape[:2]:
            raise InputError(
                item.id,
                f"training mask is {label.shape[0]}x{label.shape[1]} but the image is "
                f"{image.shape[0]}x{image.shape[1]}",
            )
        return image, label

    @_one_line_errors
    def __getitem__(self, index: int) -> Sample:
        item = self.items[index]
        image, label = self._read_pair(item)
        image, (label,), valid = self.augment(image, [label], self._rng(index))
        return {
            "image": torch.from_numpy(normalize(image)),
            "rgb": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))),
            "label": torch.from_numpy(label.astype(np.int64)),
            "valid": torch.from_numpy(valid.astype(np.float32)),
            "labels": self._labels(item),
            "id": item.id,
        }


class ImageDataset(_SplitDataset):
    """Whole images, unaugmented, for inference; batch differently sized images with :func:`pad_collate`.

    Item: ``image`` float32 (3, H, W) normalised, ``rgb`` uint8 (H, W, 3), ``labels`` float32
    (C,) multi-hot, ``id``, ``size`` int64 (2,) = (H, W).
    """

    @_one_line_errors
    def __getitem__(self, index: int) -> Sample:
        item = self.items[index]
        rgb = self.manifest.read_image(item.id)
        return {
            "image": torch.from_numpy(normalize(rgb)),
            "rgb": torch.from_numpy(rgb),
            "labels": self._labels(item),
            "id": item.id,
            "size": torch.tensor(rgb.shape[:2], dtype=torch.int64),
        }


def _pad_to(tensor: torch.Tensor, height: int, width: int, row_dim: int) -> torch.Tensor:
    """Zero-pad dims ``row_dim`` and ``row_dim + 1`` (rows, columns) at the end to (height, width)."""
    shape = list(tensor.shape)
    shape[row_dim : row_dim + 2] = [height, width]
    padded = tensor.new_zeros(shape)
    own = [slice(None)] * tensor.dim()
    own[row_dim : row_dim + 2] = [slice(0, tensor.shape[row_dim]), slice(0, tensor.shape[row_dim + 1])]
    padded[tuple(own)] = tensor
    return padded


def pad_collate(batch: Sequence[Sample]) -> Sample:
    """Batch :class:`ImageDataset` items of different sizes: pad each at the bottom and right to the largest.

    ``image`` becomes (N, 3, Hmax, Wmax) and ``rgb`` (N, Hmax, Wmax, 3), both padded with 0;
    ``valid`` float32 (N, Hmax, Wmax) is 1 on each item's own pixels; ``size`` (N, 2) keeps the
    true sizes; ``labels`` and ``id`` are batched as by the default collate.
    """
    sizes = [tuple(sample["size"].tolist()) for sample in batch]
    height = max(h for h, _ in sizes)
    width = max(w for _, w in sizes)
    valid = torch.zeros((len(batch), height, width), dtype=torch.float32)
    for index, (h, w) in enumerate(sizes):
        valid[index, :h, :w] = 1
    rest = default_collate([{key: sample[key] for key in ("labels", "id", "size")} for sample in batch])
    return {
        "image": torch.stack([_pad_to(sample["image"], height, width, row_dim=1) for sample in batch]),
        "rgb": torch.stack([_pad_to(sample["rgb"], height, width, row_dim=0) for sample in batch]),
        "valid": valid,
        **rest,
    }
