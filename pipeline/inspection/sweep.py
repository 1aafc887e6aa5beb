"""What the rule's thresholds do, before any retraining: the precision and coverage of the
reliable regions at every value of one or two thresholds, from the CRFs the crf stage kept.

The rule (:func:`~pipeline.method.prune.apply_rule`) is applied to the maps the crf stage kept
of each sampled training image once per point of the grid, exactly as the prune stage would apply it
with those settings, and scored against the ground truth: precision and coverage over all
labelled pixels and per class. Without ground truth there is nothing to be right about: a point
then gives its coverage of all pixels and each class's share of the labelled ones. Nothing of
the run is written: the stores are only read.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from pipeline.core.errors import InputError
from pipeline.core.io import IGNORE
from pipeline.core.store import ImageStore
from pipeline.data.manifest import Item, Manifest
from pipeline.inspection.panels import font
from pipeline.method.metrics import PartialLabelScore
from pipeline.method.prune import CrfOutputs, PruneParams, apply_rule

THRESHOLDS = ("cam_floor", "cam_quantile", "bg_threshold", "crf_confidence")
"""The rule's settings: what a sweep may vary (the others change the CRFs, which are kept as made)."""

SAMPLE = 1000
"""Images a sweep reads by default: every image of a smaller split, else this many evenly spaced
(the first, then every n-th), which puts the figures within about a point of the whole split's."""

Axis = tuple[str, tuple[float, ...]]
"""A threshold's name (as the `prune:` section names it) and the values to try."""


def parse_axes(tokens: Sequence[str]) -> list[Axis]:
    """``["prune.cam_quantile", "0.4", "0.5", "crf_confidence", "0.7", "0.9"]`` -> one or two axes;
    a bad token is an error in one line."""
    axes: list[tuple[str, list[float]]] = []
    for token in tokens:
        try:
            value = float(token)
        except ValueError:
            name = token.removeprefix("prune.")
            if name not in THRESHOLDS:
                changes = ("changes the CRFs, which are kept as made: rerun the crf stage for it"
                           if name in PruneParams.__dataclass_fields__ else "is no setting of the prune section")
                raise InputError("rrm sweep", f"{token!r} {changes}; sweep one of "
                                              f"{', '.join(f'prune.{t}' for t in THRESHOLDS)}") from None
            axes.append((name, []))
            continue
        if not axes:
            raise InputError("rrm sweep", f"value {token} comes before any setting (e.g. prune.cam_quantile 0.5 0.6)")
        axes[-1][1].append(value)
    if not axes or len(axes) > 2 or any(not values for _, values in axes):
        raise InputError("rrm sweep", "give one or two settings, each followed by its values")
    return [(name, tuple(values)) for name, values in axes]


def grid(params: PruneParams, axes: Sequence[Axis]) -> list[PruneParams]:
    """``params`` at every point of the axes' grid (the first axis slowest); an out-of-range value
    is an error in one line."""
    points = []
    for values in itertools.product(*(values for _, values in axes)):
        changes = {name: value for (name, _), value in zip(axes, values, strict=True)}
        try:
            points.append(replace(params, **changes))
        except ValueError as error:
            raise InputError("rrm sweep", f"prune.{error}") from None
    return points


def sample(items: Sequence[Item], count: int) -> list[Item]:
    """Every item of a split of at most ``count``, else ``count`` evenly spaced ones (see :data:`SAMPLE`)."""
    if len(items) <= count:
        return list(items)
    return [items[index * len(items) // count] for index in range(count)]


@dataclass
class Point:
    """One point of the grid: its settings and its counts over the sample."""

    params: PruneParams
    score: PartialLabelScore
    labelled: np.ndarray
    """Labelled pixels per label (with or without ground truth)."""
    pixels: int = 0
    scored: int = 0

    def row(self, axes: Sequence[Axis], label_names: Sequence[str], current: PruneParams) -> dict[str, Any]:
        """The point as a row of the table and the plot."""
        settings = {f"prune.{name}": getattr(self.params, name) for name, _ in axes}
        labelled = int(self.labelled.sum())
        row: dict[str, Any] = {**settings, "current": all(getattr(self.params, name) == getattr(current, name)
                                                          for name, _ in axes)}
        if self.scored:
            row |= {"precision": self.score.precision(), "coverage": self.score.coverage(),
                    "per_class": {name: {"precision": _plain(precision), "coverage": _plain(coverage)}
                                  for name, precision, coverage in zip(label_names, self.score.class_precision(),
                                                                       self.score.class_coverage(), strict=True)}}
        else:
            row |= {"precision": None, "coverage": labelled / self.pixels if self.pixels else None,
                    "per_class": {name: {"share": int(count) / labelled if labelled else None}
                                  for name, count in zip(label_names, self.labelled, strict=True)}}
        return row


def _plain(value: float) -> float | None:
    return None if np.isnan(value) else float(value)


CHUNK = 16
"""Images whose stores are read together (:meth:`ImageStore.read_many`)."""


def _chunk_points(manifest: Manifest, maps: ImageStore, items: Sequence[Item],
                  points: Sequence[PruneParams]) -> list[tuple[list[np.ndarray], np.ndarray | None]]:
    """The masks of each image of ``items`` at every point, with its ground truth."""
    found = []
    for item, (planes, attrs) in zip(items, maps.read_many([item.id for item in items]), strict=True):
        kept = CrfOutputs.from_planes(planes, attrs["present"])
        found.append(([apply_rule(kept, params) for params in points], manifest.read_mask(item)))
    return found


def sweep(manifest: Manifest, items: Sequence[Item], maps: ImageStore, points: Sequence[PruneParams],
          workers: int = 1, progress: bool = True) -> list[Point]:
    """Score the rule at every point over ``items`` from the crf stage's maps (a complete store)."""
    labels = manifest.num_classes + 1
    found = [Point(params, PartialLabelScore(labels), np.zeros(labels, dtype=np.int64)) for params in points]

    def chunk(start: int) -> list[tuple[list[np.ndarray], np.ndarray | None]]:
        return _chunk_points(manifest, maps, items[start : start + CHUNK], points)

    with ThreadPoolExecutor(workers) as pool, tqdm(total=len(items), desc="sweep", unit="img",
                                                   disable=not progress) as bar:
        for images in pool.map(chunk, range(0, len(items), CHUNK)):
            for masks, gt in images:
                for point, mask in zip(found, masks, strict=True):
                    point.labelled += np.bincount(mask[mask != IGNORE].ravel(), minlength=labels)[:labels]
                    point.pixels += mask.size
                    if gt is not None:
                        point.score.update(gt, mask)
                        point.scored += 1
            bar.update(len(images))
    return found


def format_table(rows: Sequence[dict[str, Any]], axes: Sequence[Axis]) -> str:
    """The rows as a text table, the current setting marked with ``*``."""
    names = [f"prune.{name}" for name, _ in axes]
    scored = any(row["precision"] is not None for row in rows)
    header = [*names, "precision", "coverage"] if scored else [*names, "coverage (no ground truth)"]
    lines = [[*header, ""]]
    for row in rows:
        figures = [f"{100 * row['precision']:.1f} %"] if scored else []
        coverage = "n/a" if row["coverage"] is None else f"{100 * row['coverage']:.1f} %"
        lines.append([*(f"{row[name]:g}" for name in names), *figures, coverage, "*" if row["current"] else ""])
    widths = [max(len(line[column]) for line in lines) for column in range(len(lines[0]))]
    return "\n".join("  ".join(cell.rjust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
                     for line in lines)


def plot_rows(rows: Sequence[dict[str, Any]], axes: Sequence[Axis]) -> Iterator[dict[str, Any]]:
    """The rows as DVC plots them: the settings, precision and coverage in percent."""
    for row in rows:
        yield {**{f"prune.{name}": row[f"prune.{name}"] for name, _ in axes},
               "precision": None if row["precision"] is None else round(100 * row["precision"], 2),
               "coverage": None if row["coverage"] is None else round(100 * row["coverage"], 2)}


def draw(rows: Sequence[dict[str, Any]], axes: Sequence[Axis], size: tuple[int, int] = (640, 480)) -> Image.Image:
    """Precision against coverage, one point per setting (labelled with its values), joined in
    grid order, the current setting ringed."""
    width, height = size
    left, right, top, bottom = 70, 20, 30, 50
    canvas = Image.new("RGB", size, "white")
    pen = ImageDraw.Draw(canvas)
    typeface = font()
    shown = [row for row in rows if row["precision"] is not None and row["coverage"] is not None]
    xs = [100 * row["coverage"] for row in shown] or [0.0, 100.0]
    ys = [100 * row["precision"] for row in shown] or [0.0, 100.0]
    x_range = (min(xs) - 2, max(xs) + 2)
    y_range = (min(ys) - 2, max(ys) + 2)

    def at(x: float, y: float) -> tuple[float, float]:
        return (left + (x - x_range[0]) / (x_range[1] - x_range[0]) * (width - left - right),
                height - bottom - (y - y_range[0]) / (y_range[1] - y_range[0]) * (height - top - bottom))

    pen.rectangle([left, top, width - right, height - bottom], outline="black")
    pen.text((left, height - bottom + 20), f"coverage % ({x_range[0]:.0f}-{x_range[1]:.0f})", fill="black",
             font=typeface)
    pen.text((5, top - 20), f"precision % ({y_range[0]:.0f}-{y_range[1]:.0f})", fill="black", font=typeface)
    points = [at(x, y) for x, y in zip(xs, ys, strict=True)] if shown else []
    if len(points) > 1:
        pen.line(points, fill="grey", width=1)
    for row, (x, y) in zip(shown, points, strict=True):
        pen.ellipse([x - 3, y - 3, x + 3, y + 3], fill="black")
        if row["current"]:
            pen.ellipse([x - 8, y - 8, x + 8, y + 8], outline="red", width=2)
        label = ", ".join(f"{row[f'prune.{name}']:g}" for name, _ in axes)
        pen.text((x + 6, y - 14), label, fill="black", font=typeface)
    if not shown:
        pen.text((left + 10, top + 10), "no ground truth: nothing to be precise about", fill="black", font=typeface)
    return canvas
