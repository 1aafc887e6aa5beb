"""The gallery: a self-contained HTML page of one split's images, one row each with its figures
and thumbnails, worst first; its style and sorting script are the package files
``gallery.css`` and ``gallery.js``."""

from __future__ import annotations

import base64
import html
import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from importlib import resources

import numpy as np

from pipeline.core.errors import InputError
from pipeline.core.io import IGNORE
from pipeline.core.store import DamagedImageError, ImageStore
from pipeline.data.manifest import Item, Manifest
from pipeline.inspection.panels import (
    LegendEntry,
    legend_entries,
    mask_panel,
    png_bytes,
    thumbnail,
)
from pipeline.inspection.project import SOURCES, Project, Source
from pipeline.inspection.stats import MaskStats
from pipeline.method.metrics import nanmean

GALLERY_SOURCES = {"train": ("reliable", "pseudo", "refined"), "val": (None, "segment")}
"""Per split role, the partial masks whose precision and coverage the gallery shows (None: none),
the dense prediction whose IoU it shows and sorts by, and further dense labels whose IoU it
shows beside."""


def source(name: str) -> Source:
    return next(s for s in SOURCES if s.name == name)


@dataclass(frozen=True)
class ImageRow:
    """One image's figures (NaN where there is nothing to score): precision and coverage of its
    partial mask, IoU (mean over the labels present) of its dense prediction and of each further
    dense labelling of :data:`GALLERY_SOURCES`; ``damaged``: why each array of it that could not be
    read back (its figures NaN) cannot be."""

    id: str
    classes: tuple[str, ...]
    precision: float
    coverage: float
    iou: float
    more_iou: tuple[float, ...] = ()
    damaged: tuple[str, ...] = ()


def _single(project: Project, store: ImageStore | None, item: Item, gt: np.ndarray | None,
            damaged: list[str]) -> MaskStats | None:
    """The stats of one image's mask in ``store`` (None without a store or a ground truth, or
    where the mask cannot be read back: then why is added to ``damaged``)."""
    if store is None or gt is None:
        return None
    try:
        mask = store.read(item.id)[0]
    except DamagedImageError as error:
        damaged.append(str(error))
        return None
    stats = MaskStats(project.manifest.num_classes + 1)
    stats.update(mask, item.labels, gt)
    return stats


def gallery_stores(project: Project, role: str) -> list[ImageStore | None]:
    """The stores of :data:`GALLERY_SOURCES` that can be read (None for the others); at least one
    of the first two must be, else the error says why the first cannot."""
    stores = [None if name is None else project.store(source(name)) for name in GALLERY_SOURCES[role]]
    problems = [None if store is None else project.problem(store) for store in stores]
    readable = [store if store is not None and problem is None else None for store, problem in zip(stores, problems)]
    if not any(readable[:2]):
        first = next(index for index, store in enumerate(stores) if store is not None)
        raise InputError(stores[first].path, str(problems[first]))
    return readable


def image_rows(project: Project, role: str, class_name: str | None = None) -> Iterator[ImageRow]:
    """The figures of every image of a split (only those tagged ``class_name`` if given), one at a time."""
    partial, dense, *more = gallery_stores(project, role)
    wanted = None if class_name is None else project.manifest.class_index(class_name, "--class")
    for item in project.manifest.split(project.split(role)):
        if wanted is not None and wanted not in item.labels:
            continue
        gt = project.manifest.read_mask(item)
        damaged: list[str] = []
        mined = _single(project, partial, item, gt, damaged)
        predicted = [_single(project, store, item, gt, damaged) for store in (dense, *more)]
        ious = tuple(nanmean(stats.iou()) if stats else math.nan for stats in predicted)
        yield ImageRow(
            item.id,
            tuple(project.manifest.classes[c] for c in item.labels),
            mined.score.precision() if mined else math.nan,
            mined.score.coverage() if mined else math.nan,
            ious[0],
            ious[1:],
            tuple(damaged),
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
    """The gallery's pictures of one image (:func:`picture_columns`): the image, its masks in the
    :func:`gallery_stores` ``stores`` and its ground truth; None for a mask it does not have."""
    image = manifest.read_image(item.id)
    masks = [None if store is None or item.id not in store else store.read(item.id)[0] for store in stores]
    masks.append(manifest.read_mask(item))
    return [image, *(None if mask is None else mask_panel(image, mask, manifest.palette) for mask in masks)]




def _package_file(name: str) -> str:
    """A file of this package (the page's style and script), as text."""
    return resources.files(__package__).joinpath(name).read_text()


NUMBER_COLUMNS = ("precision", "coverage", "iou")
NO_GROUND_TRUTH = "No image of this split has a ground-truth mask"


def more_columns(role: str) -> tuple[str, ...]:
    """The names of the further IoU columns of a split role's gallery (``iou_refined``)."""
    return tuple(f"iou_{name}" for name in GALLERY_SOURCES[role][2:])


def picture_columns(role: str) -> tuple[str, ...]:
    """The headers of the picture columns of a split role's gallery (``reliable`` n/a on val)."""
    return ("image", "reliable", "prediction", *GALLERY_SOURCES[role][2:], "ground truth")


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
    numbers = (*NUMBER_COLUMNS, *more_columns(role))
    header = "".join(f'<th class="sortable">{name}</th>' for name in ("rank", "id", "classes", *numbers))
    header += "".join(f"<th>{name}</th>" for name in picture_columns(role))
    lines = []
    for rank, row in enumerate(rows, start=1):
        cells = [f'<td data-v="{rank}">{rank}</td>', _text_cell("id", row.id, row.id),
                 _text_cell("classes", " ".join(row.classes), ", ".join(row.classes))]
        cells += [_number_cell(name, getattr(row, name)) for name in NUMBER_COLUMNS]
        cells += [_number_cell(name, value) for name, value in zip(more_columns(role), row.more_iou)]
        for pixels in row_pictures(project.manifest, items[row.id], stores):
            cells.append("<td>n/a</td>" if pixels is None else f'<td><img src="{_data_uri(pixels)}" alt=""></td>')
        lines.append(f'<tr data-id="{html.escape(row.id)}">{"".join(cells)}</tr>')
    legend = legend_entries([*range(project.manifest.num_classes + 1), IGNORE], project.manifest.label_names,
                            project.manifest.palette)
    partial, dense, *more = (None if name is None else source(name) for name in GALLERY_SOURCES[role])
    explanation = "" if partial is None else \
        f"Precision and coverage: the {partial.name} masks ({partial.store.stage} stage) against the ground truth. "
    explanation += (f"IoU: the {dense.store.stage} stage's predictions ({dense.store.name}) against it, mean over "
                    "the labels in either")
    explanation += "".join(f"; iou_{other.name}: the {other.store.stage} stage's labels ({other.store.name}) alike"
                           for other in more)
    explanation += ". Click a header to sort."
    if not any(item.has_mask for item in items.values()):
        explanation = f"{NO_GROUND_TRUTH}: precision, coverage and IoU are not computed. " + explanation
    return "\n".join([
        "<!doctype html>", '<html><head><meta charset="utf-8">', f"<title>{html.escape(title)}</title>",
        f"<style>{_package_file('gallery.css')}</style></head><body>", f"<h1>{html.escape(title)}</h1>",
        f"<p>{html.escape(explanation)}</p>", _legend_html(legend),
        f"<table><thead><tr>{header}</tr></thead><tbody>", *lines, "</tbody></table>",
        f"<script>{_package_file('gallery.js')}</script>", "</body></html>",
    ])


