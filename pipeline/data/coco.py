"""The MS COCO manifest (2014 or 2017): the 80 categories, image-level tags from the instance
annotations, and ground-truth class maps rasterised once for scoring.

Expected layout (as distributed)::

    COCO/                                     <- coco_root
      annotations/instances_train2014.json    (and/or instances_val2014.json)
      train2014/COCO_train2014_000000000009.jpg
      val2014/...

Each split whose annotation file is there is built (``train``, ``val``); at least one must be.
Classes are the category names in category-id order; an image's tags are the categories of its
annotations (crowd ones included). An image without annotations is left out, or with
``keep_empty`` kept as background only.

What the builder writes, into ``data_dir`` (the README names ``data/<name>/``), never into the
COCO folder:

- ``masks/<id>.png``: the class map of each image (0 background, class index + 1), its
  instances painted largest first so that where two overlap the smaller one is on top, and 255
  on crowd regions that no instance covers. Polygons and RLE are decoded by pycocotools. Masks
  are written in parallel and atomically: a build that is stopped keeps what it wrote and its
  rerun writes only the missing masks.
- ``images/<file name>``: a link to each image of the splits built, so that the manifest has one
  image folder for both of COCO's (the image file names are unique across them).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as coco_mask
from tqdm import tqdm

from pipeline.core.errors import InputError, ignore_interrupt
from pipeline.core.io import IGNORE, read_json_object, write_mask
from pipeline.data.manifest import Item, Manifest, default_palette, make_split
from pipeline.data.screen import screen_splits

SPLITS = ("train", "val")
YEARS = ("2014", "2017")
MASK_SUFFIX = ".png"


@dataclass(frozen=True)
class Annotation:
    """What a class map needs of one instance annotation: its class index, whether it is a crowd
    region, its area and its segmentation (polygons, or RLE with list or string counts)."""

    label: int
    crowd: bool
    area: float
    segmentation: Any


@dataclass(frozen=True)
class CocoImage:
    """One image of an annotation file: its id in the manifest (the file name's stem), its file,
    its size and its annotations."""

    id: str
    file: Path
    height: int
    width: int
    annotations: tuple[Annotation, ...]

    @property
    def labels(self) -> tuple[int, ...]:
        return tuple(sorted({annotation.label for annotation in self.annotations}))


def annotation_file(coco_root: Path, split: str, year: str) -> Path:
    return coco_root / "annotations" / f"instances_{split}{year}.json"


def _read_instances(path: Path) -> dict[str, Any]:
    data = read_json_object(path, "COCO instances file")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise InputError(path, f"not a COCO instances file: no {key!r} list")
    return data


def category_names(categories: Sequence[Mapping[str, Any]], path: Path) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """(category ids, names), in category-id order."""
    try:
        ordered = sorted((int(category["id"]), str(category["name"])) for category in categories)
    except (KeyError, TypeError, ValueError) as error:
        raise InputError(path, f"a category without an integer id and a name ({error})") from None
    return tuple(cid for cid, _ in ordered), tuple(name for _, name in ordered)


def read_split(path: Path, image_dir: Path) -> tuple[tuple[str, ...], list[CocoImage]]:
    """The class names of one annotation file (in category-id order) and its images with their
    annotations (in image-id order); an annotation naming an unknown image or category is an
    error naming the file. The file, large for COCO's train split, is parsed once."""
    data = _read_instances(path)
    category_ids, classes = category_names(data["categories"], path)
    label_of = {cid: index for index, cid in enumerate(category_ids)}
    images: dict[int, dict[str, Any]] = {}
    for image in data["images"]:
        try:
            images[int(image["id"])] = {"file": str(image["file_name"]), "height": int(image["height"]),
                                        "width": int(image["width"]), "annotations": []}
        except (KeyError, TypeError, ValueError) as error:
            raise InputError(path, f"an image without id, file_name, height and width ({error})") from None
    for annotation in data["annotations"]:
        image_id, category = annotation.get("image_id"), annotation.get("category_id")
        if image_id not in images:
            raise InputError(path, f"annotation {annotation.get('id')!r} names unknown image {image_id!r}")
        if category not in label_of:
            raise InputError(path, f"annotation {annotation.get('id')!r} names unknown category {category!r}")
        images[image_id]["annotations"].append(Annotation(label_of[category], bool(annotation.get("iscrowd", 0)),
                                                          float(annotation.get("area", 0.0)),
                                                          annotation.get("segmentation")))
    return classes, [CocoImage(Path(entry["file"]).stem, image_dir / entry["file"], entry["height"], entry["width"],
                               tuple(entry["annotations"])) for _, entry in sorted(images.items())]


def _decode(segmentation: Any, height: int, width: int) -> np.ndarray:
    """A bool (H, W) mask of a COCO segmentation: a list of polygons, or RLE with list or string counts."""
    if isinstance(segmentation, list):
        rle = coco_mask.merge(coco_mask.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), list):
        rle = coco_mask.frPyObjects(segmentation, height, width)
    else:
        rle = segmentation
    return coco_mask.decode(rle).astype(bool)


def class_map(image: CocoImage) -> np.ndarray:
    """uint8 (H, W): 0 background, class index + 1 for the instances (the largest painted first,
    so the smaller is on top where two overlap), 255 on crowd regions no instance covers."""
    mask = np.zeros((image.height, image.width), dtype=np.uint8)
    instances = sorted((a for a in image.annotations if not a.crowd), key=lambda a: -a.area)
    covered = np.zeros_like(mask, dtype=bool)
    for annotation in instances:
        region = _decode(annotation.segmentation, image.height, image.width)
        mask[region] = annotation.label + 1
        covered |= region
    for annotation in (a for a in image.annotations if a.crowd):
        mask[_decode(annotation.segmentation, image.height, image.width) & ~covered] = IGNORE
    return mask


def _write_class_map(image: CocoImage, path: Path, palette: np.ndarray) -> str:
    write_mask(path, class_map(image), palette)
    return image.id


def write_class_maps(images: Sequence[CocoImage], mask_dir: Path, palette: np.ndarray,
                     workers: int | None = None, progress: bool = True) -> int:
    """Write the class map of each image that has none yet in ``workers`` processes (None: one
    per CPU core); how many were written."""
    todo = [image for image in images if not (mask_dir / f"{image.id}{MASK_SUFFIX}").is_file()]
    mask_dir.mkdir(parents=True, exist_ok=True)
    workers = workers or os.cpu_count() or 1
    with (tqdm(total=len(todo), desc="coco masks", unit="img", disable=not progress) as bar,
          ProcessPoolExecutor(workers, initializer=ignore_interrupt) as pool):
        paths = [mask_dir / f"{image.id}{MASK_SUFFIX}" for image in todo]
        for _ in pool.map(partial(_write_class_map, palette=palette), todo, paths, chunksize=32):
            bar.update(1)
    return len(todo)


def link_images(images: Sequence[CocoImage], link_dir: Path) -> None:
    """A link ``link_dir/<file name>`` to each image file (which must exist), made where missing."""
    link_dir.mkdir(parents=True, exist_ok=True)
    for image in images:
        if not image.file.is_file():
            raise InputError(image.file, "image not found")
        link = link_dir / image.file.name
        if not link.is_symlink():
            link.symlink_to(image.file.resolve())


def _splits_present(coco_root: Path, year: str) -> Iterator[tuple[str, Path]]:
    for split in SPLITS:
        path = annotation_file(coco_root, split, year)
        if path.is_file():
            yield split, path


def build_coco(coco_root: Path, data_dir: Path, year: str = "2014", name: str = "coco", keep_empty: bool = False,
               rejects: Path | None = None, workers: int | None = None, progress: bool = True) -> Manifest:
    """The manifest ``name`` of the COCO splits found under ``coco_root``, with its class maps and
    image links written into ``data_dir`` (see the module's docstring)."""
    coco_root, data_dir = Path(coco_root), Path(data_dir)
    if year not in YEARS:
        raise InputError(coco_root, f"year {year!r} is not one of {', '.join(YEARS)}")
    found = dict(_splits_present(coco_root, year))
    if not found:
        expected = " or ".join(str(annotation_file(coco_root, split, year)) for split in SPLITS)
        raise InputError(coco_root, f"not a COCO {year} folder: no {expected}")
    classes: tuple[str, ...] | None = None
    images: dict[str, list[CocoImage]] = {}
    for split, path in found.items():
        names, kept = read_split(path, coco_root / f"{split}{year}")
        if classes is not None and names != classes:
            raise InputError(path, "its categories differ from those of the other split's annotation file")
        classes = names
        images[split] = [image for image in kept if image.annotations or keep_empty]
    assert classes is not None
    every = [image for split_images in images.values() for image in split_images]
    suffixes = {image.file.suffix for image in every} or {".jpg"}
    if len(suffixes) > 1:
        raise InputError(coco_root, f"images of several suffixes ({', '.join(sorted(suffixes))}): one is expected")
    link_images(every, data_dir / "images")
    palette = default_palette(len(classes) + 1)
    write_class_maps(every, data_dir / "masks", palette, workers, progress)
    manifest = Manifest(
        name=name,
        classes=classes,
        image_dir=data_dir / "images",
        image_suffix=suffixes.pop(),
        mask_dir=data_dir / "masks",
        mask_suffix=MASK_SUFFIX,
        palette=palette,
        splits={split: make_split(Item(image.id, image.labels, True) for image in split_images)
                for split, split_images in images.items()},
    )
    return screen_splits(manifest, manifest.splits, rejects)[0]
