"""The dataset manifest: the one description of a dataset that every stage reads.

A manifest is a single JSON file (``manifests/<name>.json``)::

    {
      "format": 1,
      "name": "synth",
      "classes": ["cat", "dog", ...],            # foreground classes; class index = position
      "palette": [[0, 0, 0], [128, 0, 0], ...],  # colour of label value v = row v (0 = background)
      "images": {"dir": "../data/synth/JPEGImages", "suffix": ".jpg"},
      "masks": {"dir": "../data/synth/SegmentationClass", "suffix": ".png"},   # or null
      "splits": {
        "train": [{"id": "s000001", "labels": [0, 3], "mask": true}, ...],
        "val": [...]
      }
    }

``labels`` are the 0-based indices of the classes present in the image (the image-level tags);
in label masks class ``c`` is stored as ``c + 1``, background as 0 and "no label" as 255.
``mask`` says whether a ground-truth mask exists for the image (it is used only for scoring).
Relative directories are resolved against the manifest file's own folder, so a project and its
manifests can be moved together. Image ``id`` is the file name without its suffix.

A directory may also be an fsspec URL (``"dir": "s3://bucket/voc/JPEGImages"``), and the manifest
file itself may live at one (``load_manifest("s3://bucket/manifests/voc.json")``, its relative
directories then resolved in the bucket): the images are then read through fsspec, with
credentials from the environment or the ``storage_options`` given (see
:func:`pipeline.core.io.location`). Paths are then :class:`upath.UPath`, which pickle with their
options for DataLoader and dask workers.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from upath import UPath

from pipeline.core.errors import InputError
from pipeline.core.io import IGNORE, atomic_open, detached, location, read_image, read_mask

FORMAT_VERSION = 1


def default_palette(num_labels: int) -> np.ndarray:
    """The PASCAL VOC colour map: label value ``v`` gets the colour built from the bits of ``v``.

    Returns (num_labels, 3) uint8. Used for every dataset whose manifest names no palette.
    """
    palette = np.zeros((num_labels, 3), dtype=np.uint8)
    for value in range(num_labels):
        code, r, g, b = value, 0, 0, 0
        for shift in range(7, -1, -1):
            r |= (code & 1) << shift
            g |= ((code >> 1) & 1) << shift
            b |= ((code >> 2) & 1) << shift
            code >>= 3
        palette[value] = (r, g, b)
    return palette


@dataclass(frozen=True)
class Item:
    """One image of a split: its id, the 0-based indices of its classes, whether it has a mask."""

    id: str
    labels: tuple[int, ...]
    has_mask: bool = False


@dataclass(frozen=True)
class Manifest:
    """A dataset: class names, palette, where images and masks live, and the splits."""

    name: str
    classes: tuple[str, ...]
    image_dir: Path | UPath
    image_suffix: str
    splits: Mapping[str, tuple[Item, ...]]
    mask_dir: Path | UPath | None = None
    mask_suffix: str = ".png"
    palette: np.ndarray = field(default=None)  # type: ignore[assignment]
    source: Path | UPath | None = None

    def __post_init__(self) -> None:
        # Forked DataLoader workers read through the manifest: see pipeline.core.io.detached.
        object.__setattr__(self, "image_dir", detached(self.image_dir))
        if self.mask_dir is not None:
            object.__setattr__(self, "mask_dir", detached(self.mask_dir))
        if self.palette is None:
            object.__setattr__(self, "palette", default_palette(self.num_classes + 1))

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def label_names(self) -> tuple[str, ...]:
        """Names of the label values 0..C: background first, then the classes."""
        return ("background", *self.classes)

    def split(self, name: str) -> tuple[Item, ...]:
        if name not in self.splits:
            raise InputError(self.source or self.name, f"no split {name!r} (has {sorted(self.splits)})")
        return self.splits[name]

    def item(self, split: str, image_id: str) -> Item:
        for item in self.split(split):
            if item.id == image_id:
                return item
        raise InputError(self.source or self.name, f"no image id {image_id!r} in split {split!r}")

    def image_path(self, image_id: str) -> Path | UPath:
        return self.image_dir / f"{image_id}{self.image_suffix}"

    def mask_path(self, image_id: str) -> Path | UPath | None:
        if self.mask_dir is None:
            return None
        return self.mask_dir / f"{image_id}{self.mask_suffix}"

    def read_image(self, image_id: str) -> np.ndarray:
        """uint8 (H, W, 3) RGB."""
        return read_image(self.image_path(image_id))

    def read_mask(self, item: Item) -> np.ndarray | None:
        """The ground-truth mask as uint8 (H, W), or None where the image has none."""
        path = self.mask_path(item.id)
        if not item.has_mask or path is None:
            return None
        return read_mask(path, self.num_classes)

    def label_vector(self, item: Item) -> np.ndarray:
        """Multi-hot float32 (C,) of the image-level labels."""
        vector = np.zeros(self.num_classes, dtype=np.float32)
        vector[list(item.labels)] = 1.0
        return vector

    def class_index(self, name: str, where: str | Path | None = None) -> int:
        """0-based index of a class name; an unknown name is an error naming ``where``."""
        try:
            return self.classes.index(name)
        except ValueError:
            raise InputError(
                where or self.source or self.name,
                f"unknown class {name!r} (known: {', '.join(self.classes)})",
            ) from None

    def images_per_class(self) -> dict[str, int]:
        """How many images of all splits are tagged with each class, in class order."""
        counts = np.bincount([c for items in self.splits.values() for item in items for c in item.labels],
                             minlength=self.num_classes)
        return dict(zip(self.classes, counts.tolist()))

    def missing_images(self, split: str) -> list[str]:
        """Ids of the split whose image file does not exist."""
        return [item.id for item in self.split(split) if not self.image_path(item.id).is_file()]

    def to_json(self, relative_to: Path) -> dict[str, Any]:
        def rel(path: Path | UPath) -> str:
            if isinstance(path, UPath):
                return str(path)
            try:
                return Path(_relpath(path, relative_to)).as_posix()
            except ValueError:
                return str(path)

        return {
            "format": FORMAT_VERSION,
            "name": self.name,
            "classes": list(self.classes),
            "palette": np.asarray(self.palette).tolist(),
            "images": {"dir": rel(self.image_dir), "suffix": self.image_suffix},
            "masks": None
            if self.mask_dir is None
            else {"dir": rel(self.mask_dir), "suffix": self.mask_suffix},
            "splits": {
                name: [{"id": i.id, "labels": list(i.labels), "mask": i.has_mask} for i in items]
                for name, items in self.splits.items()
            },
        }

    def save(self, path: str | Path) -> None:
        """Write the manifest atomically: an interrupted build never leaves half a manifest."""
        path = Path(path)
        data = self.to_json(path.parent.resolve())
        with atomic_open(path) as handle:
            json.dump(data, handle, indent=1)
            handle.write("\n")


def _relpath(path: Path, start: Path) -> str:
    return os.path.relpath(Path(path).resolve(), start)


def _resolve(base: Path | UPath, directory: str, storage_options: Mapping[str, Any] | None) -> Path | UPath:
    """A manifest's directory: a URL as it is, else relative to ``base`` (the manifest's folder), '..' folded."""
    target = location(directory, storage_options)
    if isinstance(target, UPath):
        return target
    if isinstance(base, UPath):
        return (base / target.as_posix()).resolve()
    return Path(os.path.normpath(base / target))


def _require(condition: bool, path: Path | UPath, problem: str) -> None:
    if not condition:
        raise InputError(path, problem)


def load_manifest(path: str | Path | UPath, storage_options: Mapping[str, Any] | None = None) -> Manifest:
    """Read and validate a manifest file; every problem is one line naming the file.

    ``path`` and the directories it names may be fsspec URLs, reached with ``storage_options``.
    """
    path = location(path, storage_options)
    if not path.is_file():
        raise InputError(path, "manifest not found (build one with `rrm manifest` or `rrm synth`)")
    try:
        data = json.loads(path.read_text(), object_pairs_hook=partial(_unique_keys, path))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InputError(path, f"not valid JSON ({error})") from None
    _require(isinstance(data, dict), path, "manifest must be a JSON object")
    _require(data.get("format") == FORMAT_VERSION, path, f"unsupported manifest format {data.get('format')!r}")
    for key in ("name", "classes", "images", "splits"):
        _require(key in data, path, f"missing key {key!r}")
    classes = data["classes"]
    _require(
        isinstance(classes, list) and classes and all(isinstance(c, str) and c for c in classes),
        path,
        "'classes' must be a non-empty list of names",
    )
    _require(len(set(classes)) == len(classes), path, "'classes' has duplicate names")
    base = path.parent.resolve()
    images = data["images"]
    masks = data.get("masks")
    palette = data.get("palette")
    if palette is not None:
        palette = np.asarray(palette, dtype=np.int64)
        _require(
            palette.shape == (len(classes) + 1, 3) and palette.min() >= 0 and palette.max() <= 255,
            path,
            f"'palette' must be {len(classes) + 1} RGB triples in 0..255",
        )
        palette = palette.astype(np.uint8)
    splits = {name: _parse_split(path, name, items, len(classes)) for name, items in data["splits"].items()}
    return Manifest(
        name=str(data["name"]),
        classes=tuple(classes),
        image_dir=_resolve(base, images["dir"], storage_options),
        image_suffix=images.get("suffix", ".jpg"),
        mask_dir=None if masks is None else _resolve(base, masks["dir"], storage_options),
        mask_suffix=".png" if masks is None else masks.get("suffix", ".png"),
        palette=palette,
        splits=splits,
        source=path,
    )


def _unique_keys(path: Path | UPath, pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object as a dict; a key given twice (two ``train`` splits) is an error, not the last one kept."""
    seen: set[str] = set()
    for key, _ in pairs:
        _require(key not in seen, path, f"key {key!r} appears twice in one object")
        seen.add(key)
    return dict(pairs)


def _parse_split(path: Path | UPath, name: str, items: Any, num_classes: int) -> tuple[Item, ...]:
    _require(isinstance(items, list), path, f"split {name!r} must be a list")
    parsed = []
    seen: set[str] = set()
    for entry in items:
        image_id = entry.get("id") if isinstance(entry, dict) else None
        _require(isinstance(image_id, str) and image_id != "", path, f"split {name!r}: entry without an id")
        _require(image_id not in seen, path, f"split {name!r}: duplicate image id {image_id!r}")
        seen.add(image_id)
        labels = entry.get("labels", [])
        _require(
            isinstance(labels, list) and all(isinstance(c, int) and 0 <= c < num_classes for c in labels),
            path,
            f"split {name!r}, image {image_id!r}: labels must be class indices in 0..{num_classes - 1}",
        )
        parsed.append(Item(image_id, tuple(sorted(set(labels))), bool(entry.get("mask", False))))
    return tuple(parsed)


def labels_from_mask(mask: np.ndarray, num_classes: int) -> tuple[int, ...]:
    """0-based class indices present in a label mask (background and 255 excluded)."""
    values = np.unique(mask)
    return tuple(int(v) - 1 for v in values if 1 <= v <= num_classes and v != IGNORE)


def make_split(items: Iterable[Item]) -> tuple[Item, ...]:
    """Items sorted by id, so that a builder's output does not depend on directory order."""
    return tuple(sorted(items, key=lambda item: item.id))


def check_disjoint(manifest: Manifest, first: str, second: str) -> None:
    """Raise naming an image id that both splits list: an image trained on must not be scored on."""
    shared = sorted({item.id for item in manifest.split(first)} & {item.id for item in manifest.split(second)})
    if shared:
        more = f" ({len(shared) - 1} more)" if len(shared) > 1 else ""
        raise InputError(
            manifest.source or manifest.name, f"image id {shared[0]!r} is in both split {first!r} and {second!r}{more}"
        )


def check_images_exist(manifest: Manifest, splits: Sequence[str] | None = None) -> None:
    """Raise naming the first image file a split lists but the disk lacks."""
    for split in splits or list(manifest.splits):
        missing = manifest.missing_images(split)
        if missing:
            raise InputError(
                manifest.image_path(missing[0]),
                f"image of id {missing[0]!r} in split {split!r} not found"
                + (f" ({len(missing) - 1} more missing)" if len(missing) > 1 else ""),
            )
