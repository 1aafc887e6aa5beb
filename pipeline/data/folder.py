"""A manifest for any folder of images with a CSV of image-level labels.

The CSV has a header row and these columns (others are ignored)::

    image,labels,split
    0001.jpg,cat dog,train
    0002,person;bicycle,val
    0003.jpg,,train

- ``image``: a file name in the image folder, or its id (the file name without its suffix).
- ``labels``: the class names present, separated by spaces, ``,``, ``;`` or ``|`` (a quoted
  cell ``"bee,dog"`` is two classes); empty means background only. Names match regardless of
  case: ``CAT`` and ``cat`` are one class, spelt as the class list gives it, else as the CSV
  spells it most often.
- ``split`` (optional): the split the image belongs to; ``train`` where absent or empty.

Classes are the list given to :func:`build_folder` (its order is the class index), else the
sorted set of names the CSV uses (one spelling per name). Ground-truth masks, used only for scoring, are optional:
``<masks>/<id>.png`` (palette or greyscale, values 0..C and 255). Every image and mask is
decoded once when the manifest is built (see :mod:`pipeline.data.screen`). The manifest names
images as ``<id><suffix>``, so when the listed images do not all share one suffix (``.jpg``
and ``.png`` mixed) the suffix is empty, the id is the whole file name, and masks are named
``<file name>.png`` (``0001.jpg.png``).
"""

from __future__ import annotations

import csv
import os
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pipeline.core.errors import InputError
from pipeline.data.manifest import Item, Manifest, make_split
from pipeline.data.screen import screen_splits

LABEL_SEPARATORS = re.compile(r"[\s,;|]+")
REQUIRED_COLUMNS = ("image", "labels")
DEFAULT_SPLIT = "train"
MASK_SUFFIX = ".png"


@dataclass(frozen=True)
class LabelRow:
    """One data row of the labels CSV, with its line number for error messages."""

    line: int
    image: str
    labels: tuple[str, ...]
    split: str


def split_labels(text: str) -> tuple[str, ...]:
    """Class names of a ``labels`` cell: separated by whitespace, ``,``, ``;`` or ``|``."""
    return tuple(name for name in LABEL_SEPARATORS.split(text) if name)


def read_label_rows(path: Path) -> list[LabelRow]:
    """The data rows of a labels CSV; a missing file or column is an error naming the file."""
    if not path.is_file():
        raise InputError(path, "labels CSV not found")
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle)
            header = [column.strip() for column in next(reader, [])]
            missing = [column for column in REQUIRED_COLUMNS if column not in header]
            if missing:
                found = ", ".join(header) or "nothing"
                raise InputError(path, f"missing column {missing[0]!r} (the header names {found})")
            columns = {name: header.index(name) for name in (*REQUIRED_COLUMNS, "split") if name in header}
            return [
                _parse_row(path, reader.line_num, row, columns)
                for row in reader
                if any(cell.strip() for cell in row)
            ]
    except (csv.Error, UnicodeDecodeError) as error:
        raise InputError(path, f"cannot read CSV ({error})") from None


def _parse_row(path: Path, line: int, row: list[str], columns: dict[str, int]) -> LabelRow:
    needed = max(columns.values()) + 1
    if len(row) < needed:
        raise InputError(path, f"line {line}: expected at least {needed} columns, got {len(row)}")
    image = row[columns["image"]].strip()
    if not image:
        raise InputError(path, f"line {line}: empty 'image'")
    split = row[columns["split"]].strip() if "split" in columns else ""
    return LabelRow(line, image, split_labels(row[columns["labels"]]), split or DEFAULT_SPLIT)


def _resolve_images(rows: Sequence[LabelRow], images: Path, labels_csv: Path) -> list[str]:
    """The file name each row names, in row order; unknown, ambiguous or repeated files are errors."""
    if not images.is_dir():
        raise InputError(images, "image folder not found")
    with os.scandir(images) as entries:
        names = {entry.name for entry in entries if entry.is_file()}
    by_id: dict[str, list[str]] = {}
    for file in sorted(names):
        by_id.setdefault(Path(file).stem, []).append(file)
    first_line: dict[str, int] = {}
    files = []
    for row in rows:
        candidates = [row.image] if row.image in names else by_id.get(row.image, [])
        if not candidates:
            raise InputError(labels_csv, f"line {row.line}: no image {row.image!r} in {images}")
        if len(candidates) > 1:
            matches = ", ".join(candidates)
            raise InputError(labels_csv, f"line {row.line}: {row.image!r} matches {matches}; name the file")
        file = candidates[0]
        if file in first_line:
            raise InputError(
                labels_csv, f"line {row.line}: image {file!r} already listed on line {first_line[file]}"
            )
        first_line[file] = row.line
        files.append(file)
    return files


def _check_classes(classes: Sequence[str]) -> tuple[str, ...]:
    names = tuple(classes)
    if not names:
        raise InputError("classes", "the class list is empty")
    bad = [name for name in names if split_labels(name) != (name,)]
    if bad:
        raise InputError("classes", f"class name {bad[0]!r} is empty or contains a space, ',', ';' or '|'")
    folded = [name.casefold() for name in names]
    repeated = [name for name, key in zip(names, folded) if folded.count(key) > 1]
    if repeated:
        raise InputError("classes", f"class {repeated[0]!r} is listed twice (names match regardless of case)")
    return names


def _csv_classes(rows: Sequence[LabelRow], labels_csv: Path) -> tuple[str, ...]:
    """The names the CSV uses, sorted regardless of case, one per case-folded name: its most frequent spelling (the
    first seen among equals)."""
    spellings: dict[str, Counter[str]] = {}
    for row in rows:
        for name in row.labels:
            spellings.setdefault(name.casefold(), Counter())[name] += 1
    if not spellings:
        raise InputError(labels_csv, "no class names in column 'labels' (give the class list)")
    return tuple(sorted((counts.most_common(1)[0][0] for counts in spellings.values()), key=str.casefold))


def _common_suffix(files: Sequence[str]) -> str:
    """The suffix every file shares, or ``""`` when they differ (ids are then whole file names)."""
    suffixes = {Path(file).suffix for file in files}
    return suffixes.pop() if len(suffixes) == 1 else ""


def _class_indices(row: LabelRow, classes: Sequence[str], labels_csv: Path) -> tuple[int, ...]:
    """The row's class indices; names match the class list regardless of case."""
    index = {name.casefold(): position for position, name in enumerate(classes)}
    unknown = [label for label in row.labels if label.casefold() not in index]
    if unknown:
        known = ", ".join(classes)
        raise InputError(labels_csv, f"line {row.line}: unknown class {unknown[0]!r} (known: {known})")
    return tuple(sorted({index[label.casefold()] for label in row.labels}))


def build_folder(
    images: Path,
    labels_csv: Path,
    masks: Path | None = None,
    classes: Sequence[str] | None = None,
    name: str = "custom",
    rejects: Path | None = None,
) -> Manifest:
    """Manifest of the images a labels CSV lists (format in the module docstring).

    Every listed image must exist in ``images`` and decode, and so must every mask present in
    ``masks``; with ``rejects`` the items that do not decode are left out and listed there
    instead. Splits are those the CSV names (``train`` by default).
    """
    images, labels_csv = Path(images), Path(labels_csv)
    rows = read_label_rows(labels_csv)
    if not rows:
        raise InputError(labels_csv, "lists no images")
    files = _resolve_images(rows, images, labels_csv)
    class_names = _check_classes(classes) if classes is not None else _csv_classes(rows, labels_csv)
    if masks is not None:
        masks = Path(masks)
        if not masks.is_dir():
            raise InputError(masks, "mask folder not found")
    suffix = _common_suffix(files)

    splits: dict[str, list[Item]] = {}
    for row, file in zip(rows, files):
        image_id = file[: len(file) - len(suffix)]
        labels = _class_indices(row, class_names, labels_csv)
        has_mask = masks is not None and (masks / f"{image_id}{MASK_SUFFIX}").is_file()
        splits.setdefault(row.split, []).append(Item(image_id, labels, has_mask))

    manifest = Manifest(
        name=name,
        classes=class_names,
        image_dir=images,
        image_suffix=suffix,
        mask_dir=masks,
        mask_suffix=MASK_SUFFIX,
        splits={split: make_split(items) for split, items in sorted(splits.items())},
    )
    return screen_splits(manifest, manifest.splits, rejects)[0]
