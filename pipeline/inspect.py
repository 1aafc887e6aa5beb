"""Looking at the masks: one image's panels, per-class statistics, a gallery page, two versions compared.

Everything reads the stores one image at a time (an array and its ground truth, then the next),
so it runs on masks for any number of images in the memory of one.

Scores follow :class:`~pipeline.metrics.PartialLabelScore` for every stage's masks, against the
ground truth where it exists:

- ``precision``: labelled pixels that are right / labelled pixels;
- ``coverage``: pixels of the ground truth that got a label (1 for the dense predictions);
- ``iou``: ``TP / (TP + FP + FN)`` per label, an unlabelled (255) pixel counting as a miss, so for
  the dense predictions it is the usual IoU and for the reliable masks it is bounded by coverage;
- ``unreliable``: share of 255 pixels in the images that hold the label by their tags (every
  image for background): how much of a class's images the rule left unlabelled, with or without
  ground truth.

The numbers of one image are the numbers of :func:`source_stats` over that image alone, which
is how the gallery's figures are made.
"""

from __future__ import annotations

import base64
import html
import math
import os
import random
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import InputError
from pipeline.io import IGNORE, file_digest
from pipeline.manifest import Item, Manifest
from pipeline.metrics import DIGITS, PartialLabelScore, iou_from_confusion, nanmean
from pipeline.panels import (
    Figure,
    LegendEntry,
    Panel,
    cam_panel,
    compose,
    default_scale,
    enlarge,
    legend_entries,
    mask_panel,
    png_bytes,
    thumbnail,
)
from pipeline.params import check_range, load_params, read_params_file
from pipeline.provenance import dataset_identity, same_dataset, stated_difference
from pipeline.stage import DatasetParams, load_dataset
from pipeline.store import (
    CAMS,
    CLASSIFIER_WEIGHTS,
    DEEPLAB,
    DEEPLAB_WEIGHTS,
    MASKS,
    PSEUDO,
    SEGMENT,
    SEGMENT_WEIGHTS,
    SUPERVISED,
    SUPERVISED_WEIGHTS,
    ImageStore,
    StorageParams,
)

DVC_ARTIFACTS = Path("artifacts")
"""The folder of the stores as dvc.yaml tracks them (its outs), relative to the project root:
where a revision's stores are read from."""


ROLES = ("train", "val")
"""The two splits every stage knows: the dataset's training split and its validation split."""


@dataclass(frozen=True)
class Source:
    """One stage's masks: its store (a name in the artifacts folder), the stage that writes it,
    the split it covers (a role of :data:`ROLES`) and its panel title."""

    name: str
    store: str
    stage: str
    split: str
    title: str


SOURCES = (
    Source("reliable", MASKS, "prune", "train", "reliable"),
    Source("pseudo", PSEUDO, "segment", "train", "segment"),
    Source("segment", SEGMENT, "segment", "val", "segment"),
    Source("deeplab", DEEPLAB, "deeplab", "val", "deeplab"),
    Source("supervised", SUPERVISED, "supervised", "val", "supervised"),
)

GALLERY_SOURCES = {"train": ("reliable", "pseudo"), "val": (None, "segment")}
"""Per split role, the partial masks whose precision and coverage the gallery shows (None: none)
and the dense prediction whose IoU it shows."""


@dataclass(frozen=True)
class OverlayParams:
    """The `overlays:` section: ``samples`` images of each split drawn into ``plots/overlays/``
    (the first ones of the split, so the same images every run)."""

    samples: int = 3

    def __post_init__(self) -> None:
        check_range("samples", self.samples, 0)


@dataclass(frozen=True)
class Project:
    """Where to read: the manifest, the dataset's splits and the folder of stores; with
    ``params``, the sections of the params file whose settings each store must have been made
    with."""

    manifest: Manifest
    dataset: DatasetParams
    storage: StorageParams = field(default_factory=StorageParams)
    params: Mapping[str, Any] | None = None
    identities: dict[tuple[str, ...], str] = field(default_factory=dict, compare=False, repr=False)
    """A memo of :meth:`identity`: a command reads each image's head once, not once per store."""

    def store(self, source: Source) -> ImageStore:
        return self.storage.store(source.store, source.stage)

    def cams(self) -> ImageStore:
        return self.storage.store(CAMS, "cams")

    def with_artifacts(self, folder: str | Path) -> Project:
        """The same project reading the stores in another local folder: another version, made
        with other settings (no params file to hold them to), from the same images."""
        return replace(self, storage=StorageParams(artifacts=str(folder)), params=None)

    def identity(self, splits: tuple[str, ...]) -> str:
        """The :func:`~pipeline.provenance.dataset_identity` of ``splits``, computed once."""
        if splits not in self.identities:
            self.identities[splits] = dataset_identity(self.manifest, splits)
        return self.identities[splits]

    def problem(self, store: ImageStore) -> str | None:
        """Why ``store`` cannot be read as this project's (see :func:`store_problem`), or None.
        With a params file, a store's record is held to it as far as it states it (see
        :func:`~pipeline.provenance.stated_difference`)."""
        problem = store_problem(store, self.manifest, self.identity)
        if problem is not None or store.made_from is None or self.params is None:
            return problem
        section, inputs = RECORDED[store.path.name]
        given = self.params.get(section) or {}
        try:
            found = {name: make(self) for name, make in inputs.items()}
        except InputError as error:  # an input the record names is gone (e.g. the weights)
            return f"cannot be checked ({error})"
        differs = stated_difference(store.made_from, {f"{section}.{key}": value for key, value in given.items()},
                                    found)
        return None if differs is None else f"{differs} (rerun the {store.stage} stage)"

    def split(self, role: str) -> str:
        """The dataset's split name for a role, ``train`` or ``val``."""
        return self.dataset.train_split if role == "train" else self.dataset.val_split

    def find(self, image_id: str) -> tuple[str, Item]:
        """The role (``train`` or ``val``) and item of an image id; an unknown id names the manifest."""
        for role in ROLES:
            for item in self.manifest.split(self.split(role)):
                if item.id == image_id:
                    return role, item
        splits = f"{self.split('train')!r} or {self.split('val')!r}"
        raise InputError(self.manifest.source or self.manifest.name, f"no image id {image_id!r} in split {splits}")


def _digest(path: Path) -> Callable[[Project], str]:
    return lambda project: file_digest(project.storage.file(path))


RECORDED: dict[str, tuple[str, dict[str, Callable[[Project], str | None]]]] = {
    CAMS: ("cams", {"classifier": _digest(CLASSIFIER_WEIGHTS)}),
    MASKS: ("prune", {"cams.zarr": lambda project: project.cams().fingerprint}),
    PSEUDO: ("segment", {"weights": _digest(SEGMENT_WEIGHTS)}),
    SEGMENT: ("segment", {"weights": _digest(SEGMENT_WEIGHTS)}),
    DEEPLAB: ("deeplab", {"weights": _digest(DEEPLAB_WEIGHTS)}),
    SUPERVISED: ("deeplab", {"weights": _digest(SUPERVISED_WEIGHTS)}),
}
"""Per store: the params section its record's settings come from, and how to find now each input
it records (as the stage that writes it names them)."""


def open_project(params_path: str | Path, artifacts: str | Path | None = None) -> Project:
    """The project of a params file: its `dataset:` and `storage:` sections; ``artifacts``, a
    folder of stores, overrides ``storage.artifacts``."""
    manifest, dataset = load_dataset(Path(params_path))
    project = Project(manifest, dataset, load_params(StorageParams, "storage", params_path),
                      read_params_file(params_path))
    return project if artifacts is None else project.with_artifacts(artifacts)


def source(name: str) -> Source:
    return next(s for s in SOURCES if s.name == name)


def store_problem(store: ImageStore, manifest: Manifest,
                  identity: Callable[[tuple[str, ...]], str] | None = None) -> str | None:
    """Why a store cannot be read (not run, cut short, switched off, made from other images or
    tags than ``manifest`` lists), or None if it can. An image whose data is gone is an error
    when it is read."""
    if not store.exists():
        return f"not run (has the {store.stage} stage run?)"
    if not store.is_complete():
        return f"incomplete (rerun the {store.stage} stage)"
    if store.is_empty():
        return f"empty (the {store.stage} stage wrote no masks: is it switched off?)"
    other = same_dataset(store.made_from, manifest, identity)
    return None if other is None else f"{other} (rerun the {store.stage} stage)"


def _finite(value: float) -> float | None:
    """``value`` rounded for JSON, None for NaN."""
    return None if math.isnan(value) else round(float(value), DIGITS)


@dataclass
class MaskStats:
    """Counts of one stage's masks over some images, added image by image.

    ``score``: the masks against the ground truth (images that have one); ``labelled``: pixels
    given each label; ``tagged``: pixels of the images that hold each label by their tags (every
    image for background), ``tagged_unlabelled`` those of them left 255.
    """

    num_labels: int
    images: int = 0
    scored: int = 0
    score: PartialLabelScore = field(init=False)
    labelled: np.ndarray = field(init=False)
    tagged: np.ndarray = field(init=False)
    tagged_unlabelled: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.score = PartialLabelScore(self.num_labels)
        self.labelled = np.zeros(self.num_labels, dtype=np.int64)
        self.tagged = np.zeros(self.num_labels, dtype=np.int64)
        self.tagged_unlabelled = np.zeros(self.num_labels, dtype=np.int64)

    def update(self, mask: np.ndarray, tags: Sequence[int], gt: np.ndarray | None) -> None:
        """Add one image: its mask, its tags (0-based classes) and its ground truth (None: none)."""
        counts = np.bincount(mask.ravel(), minlength=256)
        self.labelled += counts[: self.num_labels]
        present = [0, *(c + 1 for c in tags)]
        self.tagged[present] += mask.size
        self.tagged_unlabelled[present] += counts[IGNORE]
        self.images += 1
        if gt is not None:
            self.score.update(gt, mask)
            self.scored += 1

    def iou(self) -> np.ndarray:
        """Per-label IoU with unlabelled pixels as misses: the partial counts as a square confusion
        matrix whose extra label, "unlabelled", occurs in no ground truth."""
        square = np.vstack([self.score.counts, np.zeros((1, self.num_labels + 1), dtype=np.int64)])
        return iou_from_confusion(square)[: self.num_labels]

    def unreliable(self) -> np.ndarray:
        """Per label, the share of 255 pixels in the images tagged with it (NaN: no such image)."""
        return self.tagged_unlabelled / np.where(self.tagged > 0, self.tagged, np.nan)

    def as_dict(self, label_names: Sequence[str]) -> dict[str, Any]:
        """The figures of :mod:`pipeline.inspect`'s docstring, overall and per label, for JSON."""
        iou, unreliable = self.iou(), self.unreliable()
        precision, coverage = self.score.class_precision(), self.score.class_coverage()
        return {
            "images": self.images,
            "scored_images": self.scored,
            "labelled_pixels": int(self.labelled.sum()),
            "unreliable": _finite(unreliable[0]),
            "precision": _finite(self.score.precision()),
            "coverage": _finite(self.score.coverage()),
            "miou": _finite(nanmean(iou)),
            "per_class": {
                name: {
                    "labelled_pixels": int(self.labelled[label]),
                    "unreliable": _finite(unreliable[label]),
                    "precision": _finite(precision[label]),
                    "coverage": _finite(coverage[label]),
                    "iou": _finite(iou[label]),
                }
                for label, name in enumerate(label_names)
            },
        }


def _items(project: Project, role: str, ids: Sequence[str] | None) -> tuple[Item, ...]:
    items = project.manifest.split(project.split(role))
    if ids is None:
        return items
    wanted = set(ids)
    return tuple(item for item in items if item.id in wanted)


def source_stats(project: Project, src: Source, ids: Sequence[str] | None = None) -> MaskStats:
    """The counts of one stage's masks over its split (or the images ``ids`` of it), read one at a time."""
    store = project.store(src)
    stats = MaskStats(project.manifest.num_classes + 1)
    for item in _items(project, src.split, ids):
        stats.update(store.read(item.id)[0], item.labels, project.manifest.read_mask(item))
    return stats


def all_stats(project: Project, ids: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
    """Per stage: where its masks are and, if they can be read, their figures (else why not)."""
    report = {}
    for src in SOURCES:
        store = project.store(src)
        entry: dict[str, Any] = {"stage": src.stage, "store": str(store.path), "split": project.split(src.split)}
        problem = project.problem(store)
        if problem is None:
            entry.update(status="ok", **source_stats(project, src, ids).as_dict(project.manifest.label_names))
        else:
            entry["status"] = problem
        report[src.name] = entry
    return report


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


STAT_COLUMNS = ("labelled px", "unreliable", "precision", "coverage", "IoU")


def _stat_cells(figures: dict[str, Any], iou_key: str) -> tuple[str, ...]:
    return (str(figures["labelled_pixels"]), _percent(figures["unreliable"]), _percent(figures["precision"]),
            _percent(figures["coverage"]), _percent(figures[iou_key]))


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """Aligned text rows: the first column left-aligned, the others right-aligned."""
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]

    def line(row: Sequence[str]) -> str:
        return "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))

    return [line(header), *(line(row) for row in rows)]


def format_stats(report: dict[str, dict[str, Any]]) -> str:
    """:func:`all_stats` as one table per stage (the overall figures as the row "all", mIoU as its IoU)."""
    blocks = []
    for name, entry in report.items():
        title = f"{name}: {entry['stage']} stage, {entry['store']}, split {entry['split']}"
        if entry["status"] != "ok":
            blocks.append(f"{title}: {entry['status']}")
            continue
        rows = [(label, *_stat_cells(figures, "iou")) for label, figures in entry["per_class"].items()]
        rows.append(("all", *_stat_cells(entry, "miou")))
        counts = f"{entry['images']} images, {entry['scored_images']} with ground truth"
        blocks.append("\n".join([f"{title} ({counts})", *_table(("class", *STAT_COLUMNS), rows)]))
    return "\n\n".join(blocks)


# One image: panels side by side.


def _mask_if_present(store: ImageStore, image_id: str) -> np.ndarray | None:
    return store.read(image_id)[0] if image_id in store else None


def image_figure(project: Project, image_id: str, scale: int | None = None,
                 against: Project | None = None, against_label: str = "before") -> tuple[Figure, list[str]]:
    """The panels of one image and the notes on what could not be shown (a stage not run yet).

    Panels: the image; the CAM of each class it holds (the cams store must exist); the masks of
    each stage for its split, each followed by the same mask in ``against`` (titled
    ``against_label``) when given; the ground truth where it exists. ``scale`` enlarges every
    panel (default: shorter side at least 192 pixels).
    """
    manifest = project.manifest
    role, item = project.find(image_id)
    image = manifest.read_image(image_id)
    scale = scale or default_scale(image.shape)
    big = enlarge(image, scale)
    cams, attrs = project.cams().read(image_id)
    stale = project.problem(project.cams())
    if stale is not None:
        raise InputError(project.cams().path, stale)
    panels = [Panel("image", big)]
    panels += [Panel(f"CAM {manifest.classes[c]}", cam_panel(big, enlarge(cam.astype(np.float32), scale)))
               for c, cam in zip(attrs["classes"], cams)]
    masks: list[tuple[str, np.ndarray]] = []
    notes = []
    for src in (s for s in SOURCES if s.split == role):
        store = project.store(src)
        problem = project.problem(store)
        mask = None if problem is not None else _mask_if_present(store, image_id)
        if mask is None:
            lost = problem is None and image_id in store.ids()
            problem = problem or (f"this image's data is gone (rerun the {store.stage} stage)" if lost
                                  else "no mask of this image")
            notes.append(f"{src.name}: {store.path}: {problem}")
            continue
        masks.append((src.title, mask))
        other = None if against is None else _mask_if_present(against.store(src), image_id)
        if other is not None:
            masks.append((f"{src.title} ({against_label})", other))
    gt = manifest.read_mask(item)
    if gt is not None:
        masks.append(("ground truth", gt))
    panels += [Panel(title, mask_panel(big, enlarge(mask, scale), manifest.palette)) for title, mask in masks]
    values = {0, *(c + 1 for c in item.labels)}.union(*(np.unique(mask).tolist() for _, mask in masks))
    legend = legend_entries(sorted(values), manifest.label_names, manifest.palette)
    return compose(panels, legend), notes


# The gallery: one row per image, worst first.


@dataclass(frozen=True)
class ImageRow:
    """One image's figures (NaN where there is nothing to score): precision and coverage of its
    partial mask, IoU (mean over the labels present) of its dense prediction."""

    id: str
    classes: tuple[str, ...]
    precision: float
    coverage: float
    iou: float


def _single(project: Project, store: ImageStore | None, item: Item, gt: np.ndarray | None) -> MaskStats | None:
    """The stats of one image's mask in ``store`` (None without a store or a ground truth)."""
    if store is None or gt is None:
        return None
    stats = MaskStats(project.manifest.num_classes + 1)
    stats.update(store.read(item.id)[0], item.labels, gt)
    return stats


def gallery_stores(project: Project, role: str) -> tuple[ImageStore | None, ImageStore | None]:
    """The stores of :data:`GALLERY_SOURCES` that can be read (None for the others); at least one
    must be, else the error says why the first cannot."""
    stores = [None if name is None else project.store(source(name)) for name in GALLERY_SOURCES[role]]
    problems = [None if store is None else project.problem(store) for store in stores]
    readable = [store if store is not None and problem is None else None for store, problem in zip(stores, problems)]
    if not any(readable):
        first = next(index for index, store in enumerate(stores) if store is not None)
        raise InputError(stores[first].path, str(problems[first]))
    return readable[0], readable[1]


def image_rows(project: Project, role: str, class_name: str | None = None) -> Iterator[ImageRow]:
    """The figures of every image of a split (only those tagged ``class_name`` if given), one at a time."""
    partial, dense = gallery_stores(project, role)
    wanted = None if class_name is None else project.manifest.class_index(class_name, "--class")
    for item in project.manifest.split(project.split(role)):
        if wanted is not None and wanted not in item.labels:
            continue
        gt = project.manifest.read_mask(item)
        mined, predicted = _single(project, partial, item, gt), _single(project, dense, item, gt)
        yield ImageRow(
            item.id,
            tuple(project.manifest.classes[c] for c in item.labels),
            mined.score.precision() if mined else math.nan,
            mined.score.coverage() if mined else math.nan,
            nanmean(predicted.iou()) if predicted else math.nan,
        )


def sort_rows(rows: Sequence[ImageRow], order: str, seed: int = 0) -> list[ImageRow]:
    """``worst`` (lowest IoU first, precision where there is no IoU), ``best`` or ``random`` (seeded);
    images with nothing to score last."""
    if order == "random":
        shuffled = list(rows)
        random.Random(seed).shuffle(shuffled)
        return shuffled
    sign = 1.0 if order == "worst" else -1.0

    def key(row: ImageRow) -> tuple[bool, float]:
        value = row.iou if not math.isnan(row.iou) else row.precision
        return math.isnan(value), sign * value

    return sorted(rows, key=key)


def _data_uri(pixels: np.ndarray) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(thumbnail(pixels))).decode()


def row_pictures(manifest: Manifest, item: Item, stores: Sequence[ImageStore | None]) -> list[np.ndarray | None]:
    """The gallery's pictures of one image (:data:`PICTURE_COLUMNS`): the image, its masks in the
    :func:`gallery_stores` ``stores`` and its ground truth; None for a mask it does not have."""
    image = manifest.read_image(item.id)
    masks = [None if store is None or item.id not in store else store.read(item.id)[0] for store in stores]
    masks.append(manifest.read_mask(item))
    return [image, *(None if mask is None else mask_panel(image, mask, manifest.palette) for mask in masks)]


_SORT_SCRIPT = """
document.querySelectorAll("th.sortable").forEach(th => th.addEventListener("click", () => {
  const body = document.querySelector("tbody"), column = th.cellIndex;
  const up = th.dataset.order !== "up"; th.dataset.order = up ? "up" : "down";
  const key = row => { const v = row.cells[column].dataset.v; return v === "" ? null : isNaN(v) ? v : +v; };
  const rows = [...body.rows].sort((a, b) => {
    const x = key(a), y = key(b);
    if (x === null || y === null) return (x === null) - (y === null);
    return (x < y ? -1 : x > y ? 1 : 0) * (up ? 1 : -1);
  });
  rows.forEach(row => body.appendChild(row));
}));
"""

_STYLE = """
body { font-family: sans-serif; margin: 1em; }
table { border-collapse: collapse; }
th, td { padding: 3px 8px; border-bottom: 1px solid #ddd; text-align: right; vertical-align: middle; }
th.sortable { cursor: pointer; background: #f0f0f0; }
td.id, td.classes { text-align: left; font-family: monospace; }
img { image-rendering: pixelated; display: block; }
.swatch { display: inline-block; width: 12px; height: 12px; margin: 0 4px 0 12px; border: 1px solid #888; }
"""

NUMBER_COLUMNS = ("precision", "coverage", "iou")
NO_GROUND_TRUTH = "No image of this split has a ground-truth mask"
PICTURE_COLUMNS = ("image", "reliable", "prediction", "ground truth")


def _text_cell(name: str, value: str, shown: str) -> str:
    return f'<td class="{name}" data-v="{html.escape(value)}">{html.escape(shown)}</td>'


def _number_cell(name: str, value: float) -> str:
    shown = "n/a" if math.isnan(value) else f"{100 * value:.1f}%"
    stored = "" if math.isnan(value) else repr(round(value, 6))
    return f'<td class="{name}" data-v="{stored}">{shown}</td>'


def _legend_html(entries: Sequence[LegendEntry]) -> str:
    def swatch(entry: LegendEntry) -> str:
        colour = "repeating-linear-gradient(45deg,#444 0 1px,#ddd 1px 5px)" if entry.colour is None \
            else "rgb({},{},{})".format(*entry.colour)
        return f'<span class="swatch" style="background:{colour}"></span>{html.escape(entry.name)}'

    return "<p>" + "".join(swatch(entry) for entry in entries) + "</p>"


def gallery_html(project: Project, role: str, rows: Sequence[ImageRow], title: str) -> str:
    """A self-contained page (thumbnails embedded as PNG data) with one table row per image."""
    stores = gallery_stores(project, role)
    items = {item.id: item for item in project.manifest.split(project.split(role))}
    header = "".join(f'<th class="sortable">{name}</th>' for name in ("rank", "id", "classes", *NUMBER_COLUMNS))
    header += "".join(f"<th>{name}</th>" for name in PICTURE_COLUMNS)
    lines = []
    for rank, row in enumerate(rows, start=1):
        cells = [f'<td data-v="{rank}">{rank}</td>', _text_cell("id", row.id, row.id),
                 _text_cell("classes", " ".join(row.classes), ", ".join(row.classes))]
        cells += [_number_cell(name, getattr(row, name)) for name in NUMBER_COLUMNS]
        for pixels in row_pictures(project.manifest, items[row.id], stores):
            cells.append("<td>n/a</td>" if pixels is None else f'<td><img src="{_data_uri(pixels)}" alt=""></td>')
        lines.append(f'<tr data-id="{html.escape(row.id)}">{"".join(cells)}</tr>')
    legend = legend_entries([*range(project.manifest.num_classes + 1), IGNORE], project.manifest.label_names,
                            project.manifest.palette)
    partial, dense = (None if name is None else source(name) for name in GALLERY_SOURCES[role])
    explanation = "" if partial is None else \
        f"Precision and coverage: the {partial.name} masks ({partial.stage} stage) against the ground truth. "
    explanation += (f"IoU: the {dense.stage} stage's predictions ({dense.store}) against it, mean over the labels "
                    "in either. Click a header to sort.")
    if not any(item.has_mask for item in items.values()):
        explanation = f"{NO_GROUND_TRUTH}: precision, coverage and IoU are not computed. " + explanation
    return "\n".join([
        "<!doctype html>", '<html><head><meta charset="utf-8">', f"<title>{html.escape(title)}</title>",
        f"<style>{_STYLE}</style></head><body>", f"<h1>{html.escape(title)}</h1>",
        f"<p>{html.escape(explanation)}</p>", _legend_html(legend),
        f"<table><thead><tr>{header}</tr></thead><tbody>", *lines, "</tbody></table>",
        f"<script>{_SORT_SCRIPT}</script>", "</body></html>",
    ])


# Two versions of the masks.


def revision_artifacts(rev: str, target: Path) -> Path:
    """Copy the mask stores of git revision or DVC experiment ``rev`` into ``target``, through DVC.

    Only stores that DVC cached at that revision can be read: the reliable masks must be there;
    another store that is not counts as not run.
    """
    from dvc.api import DVCFileSystem
    from dvc.exceptions import DvcException
    from dvc.scm import RevError

    fs = DVCFileSystem(url=".", rev=rev)
    for src in SOURCES:
        path = (DVC_ARTIFACTS / src.store).as_posix()
        try:
            fs.get(path, str(target / src.store), recursive=True)
        except RevError:
            raise InputError(rev, "not a git revision or DVC experiment of this repository") from None
        except DvcException as error:
            raise InputError(rev, f"cannot read it through DVC ({error})") from None
        except FileNotFoundError as error:
            shutil.rmtree(target / src.store, ignore_errors=True)  # a part-copied store would look run
            if src.name == "reliable":
                raise InputError(rev, f"no DVC-cached masks at this revision ({path}: {error})") from None
    return target


def against_artifacts(against: str, workdir: Path) -> Path:
    """The folder of stores that ``--against`` names: a folder of stores (a copy of artifacts/),
    one store named as its original (e.g. a copy of masks.zarr), or else a revision."""
    path = Path(against)
    if not path.exists():
        return revision_artifacts(against, workdir)
    if not (path / "zarr.json").is_file():
        return path
    names = [src.store for src in SOURCES]
    if path.name not in names:
        raise InputError(path, f"a single store must keep its name ({', '.join(names)}); or name its folder")
    os.symlink(path.resolve(), workdir / path.name)
    return workdir


def version_label(against: str) -> str:
    """A short name of the ``--against`` version for titles: a revision as given, else the name of
    the folder of stores (of the folder holding a single store)."""
    path = Path(against)
    if not path.exists():
        return against
    path = path.resolve()
    return path.parent.name if (path / "zarr.json").is_file() else path.name


def changed_share(a: np.ndarray, b: np.ndarray) -> float:
    """Share of pixels whose label differs (1 where the two masks differ in size)."""
    return 1.0 if a.shape != b.shape else float(np.mean(a != b))


def _difference(now: dict[str, Any], before: dict[str, Any]) -> dict[str, Any]:
    """``now - before`` for every number of two :meth:`MaskStats.as_dict` (None where either is None)."""
    out = {}
    for key, value in now.items():
        if isinstance(value, dict):
            out[key] = _difference(value, before[key])
        elif value is not None and before.get(key) is not None:
            out[key] = value - before[key] if isinstance(value, int) else round(value - before[key], DIGITS)
        else:
            out[key] = None
    return out


def _compare_source(project: Project, other: Project, src: Source) -> tuple[MaskStats, MaskStats, dict[str, float]]:
    """Both versions' stats over the images both hold, and each image's changed share; one pass."""
    mine, theirs = project.store(src), other.store(src)
    now, before = (MaskStats(project.manifest.num_classes + 1) for _ in range(2))
    shares = {}
    for item in _items(project, src.split, None):
        if item.id not in mine or item.id not in theirs:
            continue
        gt = project.manifest.read_mask(item)
        mask, old = mine.read(item.id)[0], theirs.read(item.id)[0]
        now.update(mask, item.labels, gt)
        before.update(old, item.labels, gt)
        shares[item.id] = changed_share(mask, old)
    return now, before, shares


def compare(project: Project, other: Project, top: int) -> dict[str, Any]:
    """Per stage: the figures of both versions over the images both hold and their difference, how
    many images changed; and the ``top`` images whose masks changed most (largest share of pixels)."""
    result: dict[str, Any] = {"stages": {}, "most_changed": []}
    changes: dict[str, tuple[float, str]] = {}
    names = project.manifest.label_names
    for src in SOURCES:
        problem = project.problem(project.store(src))
        if problem is None and other.problem(other.store(src)) is not None:
            problem = f"not in the other version ({other.store(src).path})"
        if problem is not None:
            result["stages"][src.name] = {"status": problem}
            continue
        now_stats, before_stats, shares = _compare_source(project, other, src)
        for image_id, share in shares.items():
            changes[image_id] = max(changes.get(image_id, (0.0, "")), (share, src.name))
        now, before = now_stats.as_dict(names), before_stats.as_dict(names)
        result["stages"][src.name] = {"status": "ok", "images": len(shares),
                                      "changed_images": sum(share > 0 for share in shares.values()),
                                      "now": now, "before": before, "difference": _difference(now, before)}
    ranked = sorted(((share, name, image_id) for image_id, (share, name) in changes.items() if share > 0), reverse=True)
    result["most_changed"] = [{"id": i, "stage": name, "changed": round(share, 6)} for share, name, i in ranked[:top]]
    return result


def format_comparison(result: dict[str, Any], label: str) -> str:
    """:func:`compare` as text: per stage, each class's figures before and now."""
    blocks = []
    for name, entry in result["stages"].items():
        if entry["status"] != "ok":
            blocks.append(f"{name}: {entry['status']}")
            continue
        rows = []
        for cls, figures in [*entry["now"]["per_class"].items(), ("all", entry["now"])]:
            old = entry["before"]["per_class"][cls] if cls != "all" else entry["before"]
            iou = "iou" if cls != "all" else "miou"
            rows.append((cls, *(f"{_percent(old[key])} -> {_percent(figures[key])}"
                                for key in ("unreliable", "precision", "coverage", iou))))
        head = f"{name}: {entry['changed_images']} of {entry['images']} images changed ({label} -> now)"
        blocks.append("\n".join([head, *_table(("class", "unreliable", "precision", "coverage", "IoU"), rows)]))
    changed = [f"  {row['id']}  {row['stage']}  {100 * row['changed']:.1f}% of pixels"
               for row in result["most_changed"]]
    blocks.append("\n".join(["most changed:", *changed]) if changed else "no mask changed")
    return "\n\n".join(blocks)


def write_comparison_figures(project: Project, other: Project, result: dict[str, Any], out: Path,
                             label: str) -> list[Path]:
    """The :func:`image_figure` of each most-changed image, the ``other`` version beside each mask."""
    paths = []
    for row in result["most_changed"]:
        figure, _ = image_figure(project, row["id"], against=other, against_label=label)
        path = out / f"{row['id']}.png"
        figure.save(path)
        paths.append(path)
    return paths


def per_class_rows(report: dict[str, dict[str, Any]], label_names: Sequence[str]) -> list[dict[str, Any]]:
    """:func:`all_stats`' per-class figures as one row per label and stage that ran, for DVC's bar
    plots (which take one value field): ``{"class", "stage", "bar": "<class> / <stage>", "precision",
    "coverage", "iou"}``, class by class."""
    return [
        {"class": label, "stage": name, "bar": f"{label} / {name}",
         **{key: entry["per_class"][label][key] for key in ("precision", "coverage", "iou")}}
        for label in label_names
        for name, entry in report.items()
        if entry["status"] == "ok"
    ]
