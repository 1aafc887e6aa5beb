"""Per-class statistics of every stage's masks, overall and per image.

Scores follow :class:`~pipeline.method.metrics.PartialLabelScore` for every stage's masks, against the
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

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.core.io import IGNORE
from pipeline.core.store import DamagedImageError, unreadable
from pipeline.data.manifest import Item
from pipeline.inspection.project import SOURCES, Project, Source
from pipeline.method.metrics import DIGITS, PartialLabelScore, iou_from_confusion, nanmean


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
        """The figures of :mod:`pipeline.inspection.project`'s docstring, overall and per label, for JSON."""
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


def split_items(project: Project, role: str, ids: Sequence[str] | None) -> tuple[Item, ...]:
    items = project.manifest.split(project.split(role))
    if ids is None:
        return items
    wanted = set(ids)
    return tuple(item for item in items if item.id in wanted)


def source_stats(project: Project, src: Source,
                 ids: Sequence[str] | None = None) -> tuple[MaskStats, dict[str, str]]:
    """The counts of one stage's masks over its split (or the images ``ids`` of it), read one at a
    time, and the images left out because their data is gone or damaged, with why."""
    store = project.store(src)
    stats = MaskStats(project.manifest.num_classes + 1)
    damaged = {}
    for item in split_items(project, src.store.role, ids):
        try:
            mask = store.read(item.id)[0]
        except DamagedImageError as error:
            damaged[item.id] = unreadable(error, item.id)
            continue
        stats.update(mask, item.labels, project.manifest.read_mask(item))
    return stats, damaged


def all_stats(project: Project, ids: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
    """Per stage: where its masks are and, if they can be read, their figures (else why not)."""
    report = {}
    for src in SOURCES:
        store = project.store(src)
        entry: dict[str, Any] = {"stage": src.store.stage, "store": str(store.path),
                                 "split": project.split(src.store.role)}
        problem = project.problem(store)
        if problem is None:
            stats, damaged = source_stats(project, src, ids)
            entry.update(status="ok", **stats.as_dict(project.manifest.label_names), damaged=damaged)
        else:
            entry["status"] = problem
        report[src.name] = entry
    return report


def percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


STAT_COLUMNS = ("labelled px", "unreliable", "precision", "coverage", "IoU")


def _stat_cells(figures: dict[str, Any], iou_key: str) -> tuple[str, ...]:
    return (str(figures["labelled_pixels"]), percent(figures["unreliable"]), percent(figures["precision"]),
            percent(figures["coverage"]), percent(figures[iou_key]))


def text_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
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
        blocks.append("\n".join([f"{title} ({counts})", *text_table(("class", *STAT_COLUMNS), rows),
                                 *damaged_lines(entry["damaged"], entry["stage"])]))
    return "\n\n".join(blocks)


def damaged_lines(damaged: dict[str, str], stage: str, shown: int = 5) -> list[str]:
    """What a table left out: how many images could not be read, the first ``shown`` of them with
    why, and what mends them."""
    if not damaged:
        return []
    lines = [f"left out {len(damaged)} image(s) that cannot be read (`rrm verify`, then rerun the {stage} stage):"]
    lines += [f"  {image_id}: {why}" for image_id, why in list(damaged.items())[:shown]]
    return lines + ([f"  ... and {len(damaged) - shown} more"] if len(damaged) > shown else [])


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


TRAINING_LABELS = ("reliable", "refined", "pseudo")
"""The sources of :data:`~pipeline.inspection.project.SOURCES` that label the training split,
which the plot of :func:`training_label_rows` sets beside the CAMs."""


def training_label_rows(report: dict[str, dict[str, Any]], cam_iou: dict[str, float] | None,
                        label_names: Sequence[str]) -> list[dict[str, Any]]:
    """Per class, the IoU of each labelling of the training split, for one DVC bar plot: the CAMs
    at their best background threshold (``cam_iou``, from the cams stage's metrics; None: not
    scored) and the :data:`TRAINING_LABELS` that ran (an unlabelled pixel counts as a miss).
    Rows ``{"class", "labels", "bar": "<class> / <labels>", "iou"}``, class by class."""
    found = {"CAM": cam_iou} if cam_iou else {}
    found |= {name: {label: figures["iou"] for label, figures in report[name]["per_class"].items()}
              for name in TRAINING_LABELS if report.get(name, {}).get("status") == "ok"}
    return [{"class": label, "labels": name, "bar": f"{label} / {name}", "iou": ious.get(label)}
            for label in label_names for name, ious in found.items()]
