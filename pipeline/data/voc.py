"""The PASCAL VOC 2012 manifest, with the SBD augmentation (``train_aug``).

Expected layout (as distributed)::

    VOC2012/                      <- voc_root
      JPEGImages/<id>.jpg
      Annotations/<id>.xml
      SegmentationClass/<id>.png  (palette PNGs, 0..20 and 255)
      ImageSets/Segmentation/train.txt, val.txt
    dataset/                      <- sbd_root (optional, from the SBD release)
      train.txt, val.txt
      cls/<id>.mat                (struct GTcls with field Segmentation, 0..20)

Splits: ``train`` and ``val`` are VOC's segmentation lists; ``train_aug`` is
(SBD train + SBD val + VOC train) - VOC val, 10,582 images on the full data.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from scipy.io import loadmat
from scipy.io.matlab import MatReadError

from pipeline.core.errors import InputError
from pipeline.core.io import read_mask
from pipeline.data.manifest import Item, Manifest, default_palette, labels_from_mask, make_split
from pipeline.data.screen import screen_splits

VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle",
    "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person",
    "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip
"""The 20 PASCAL VOC foreground classes; class index = position, mask value = index + 1."""

IMAGE_SUFFIX = ".jpg"
MASK_SUFFIX = ".png"


def _read_id_list(path: Path) -> list[str]:
    """Image ids of a VOC/SBD list file, one per line (blank lines skipped)."""
    if not path.is_file():
        raise InputError(path, "image list not found")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def _files_by_id(folder: Path, suffix: str) -> dict[str, Path]:
    """``{id: path}`` of the files in ``folder`` named ``<id><suffix>``, from one directory listing."""
    if not folder.is_dir():
        return {}
    with os.scandir(folder) as entries:
        return {e.name[: -len(suffix)]: Path(e.path) for e in entries if e.name.endswith(suffix)}


def labels_from_xml(path: Path) -> tuple[int, ...]:
    """Class indices of every ``<object><name>`` of a VOC annotation (body parts are not objects)."""
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as error:
        raise InputError(path, f"not valid XML ({error})") from None
    labels = set()
    for obj in root.findall("object"):
        name = (obj.findtext("name") or "").strip()
        if name not in VOC_CLASSES:
            raise InputError(path, f"unknown class {name!r} (known: {', '.join(VOC_CLASSES)})")
        labels.add(VOC_CLASSES.index(name))
    return tuple(sorted(labels))


def read_sbd_mask(path: Path) -> np.ndarray:
    """The class mask ``GTcls.Segmentation`` of an SBD ``cls/<id>.mat`` file."""
    try:
        data = loadmat(path, variable_names=["GTcls"], squeeze_me=True, struct_as_record=False)
        return np.asarray(data["GTcls"].Segmentation)
    except (OSError, ValueError, KeyError, AttributeError, MatReadError) as error:
        raise InputError(path, f"cannot read GTcls.Segmentation ({error})") from None


def _check_voc_root(voc_root: Path) -> None:
    if not (voc_root / "ImageSets" / "Segmentation").is_dir():
        hint = " (point at its VOC2012 folder)" if (voc_root / "VOC2012").is_dir() else ""
        raise InputError(voc_root, f"not a VOC2012 folder: no ImageSets/Segmentation{hint}")


def build_voc12(voc_root: Path, sbd_root: Path | None = None, rejects: Path | None = None) -> Manifest:
    """Manifest ``voc12`` with splits ``train``, ``val`` and ``train_aug``.

    Without ``sbd_root``, ``train_aug`` is VOC ``train`` alone (1,464 images instead of 10,582).
    Image-level labels come from the XML annotation; an image without one takes them from its
    VOC mask, then from its SBD ``cls`` mask. One directory listing per folder and one small XML
    per image give the lists in about half a second; then every image and VOC mask is decoded
    once (see :mod:`pipeline.data.screen`), which takes most of the time: a bad one is an error, or
    with ``rejects`` it is left out and listed there.
    """
    voc_root = Path(voc_root)
    _check_voc_root(voc_root)
    lists = voc_root / "ImageSets" / "Segmentation"
    train = _read_id_list(lists / "train.txt")
    val = _read_id_list(lists / "val.txt")
    sbd_ids: list[str] = []
    sbd_masks: dict[str, Path] = {}
    if sbd_root is not None:
        sbd_root = Path(sbd_root)
        sbd_ids = _read_id_list(sbd_root / "train.txt") + _read_id_list(sbd_root / "val.txt")
        sbd_masks = _files_by_id(sbd_root / "cls", ".mat")
    train_aug = set(sbd_ids + train) - set(val)

    image_dir = voc_root / "JPEGImages"
    mask_dir = voc_root / "SegmentationClass"
    images = _files_by_id(image_dir, IMAGE_SUFFIX)
    masks = _files_by_id(mask_dir, MASK_SUFFIX)
    annotations = _files_by_id(voc_root / "Annotations", ".xml")
    num_classes = len(VOC_CLASSES)

    def item(image_id: str) -> Item:
        if image_id not in images:
            raise InputError(image_dir / f"{image_id}{IMAGE_SUFFIX}", "image not found")
        if image_id in annotations:
            labels = labels_from_xml(annotations[image_id])
        elif image_id in masks:
            labels = labels_from_mask(read_mask(masks[image_id], num_classes), num_classes)
        elif image_id in sbd_masks:
            labels = labels_from_mask(read_sbd_mask(sbd_masks[image_id]), num_classes)
        else:
            raise InputError(image_id, "no image-level labels: no XML annotation, VOC mask or SBD cls mask")
        return Item(image_id, labels, has_mask=image_id in masks)

    items = {image_id: item(image_id) for image_id in sorted(set(train) | set(val) | train_aug)}

    def split(ids: Iterable[str]) -> tuple[Item, ...]:
        return make_split(items[image_id] for image_id in set(ids))

    manifest = Manifest(
        name="voc12",
        classes=VOC_CLASSES,
        image_dir=image_dir,
        image_suffix=IMAGE_SUFFIX,
        mask_dir=mask_dir,
        mask_suffix=MASK_SUFFIX,
        palette=default_palette(num_classes + 1),
        splits={"train": split(train), "val": split(val), "train_aug": split(train_aug)},
    )
    return screen_splits(manifest, manifest.splits, rejects)[0]
