"""One image's panels side by side: the image, the CAM of each class it holds, every stage's masks
and the ground truth (``rrm show``, the overlays stage, ``rrm diff``'s figures)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.core.errors import InputError
from pipeline.core.params import check_range
from pipeline.core.store import DamagedImageError, ImageStore, unreadable
from pipeline.inspection.panels import (
    Figure,
    Panel,
    cam_panel,
    compose,
    default_scale,
    enlarge,
    legend_entries,
    mask_panel,
)
from pipeline.inspection.project import SOURCES, Project


@dataclass(frozen=True)
class OverlayParams:
    """The `overlays:` section: ``samples`` images of each split drawn into ``plots/overlays/``
    (the first ones of the split, so the same images every run)."""

    samples: int = 3

    def __post_init__(self) -> None:
        check_range("samples", self.samples, 0)


def _read_mask(store: ImageStore, image_id: str) -> tuple[np.ndarray | None, str]:
    """The mask of ``image_id`` in ``store``, or None and why not (the store has none of it, or
    its data is gone or damaged)."""
    try:
        return store.read(image_id)[0], ""
    except InputError as error:
        return None, unreadable(error, image_id)


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
    panels = [Panel("image", big)]
    notes = []
    try:
        cams, attrs = project.cams().read(image_id)
        panels += [Panel(f"CAM {manifest.classes[c]}", cam_panel(big, enlarge(cam.astype(np.float32), scale)))
                   for c, cam in zip(attrs["classes"], cams)]
    except DamagedImageError as error:
        notes.append(f"CAMs: {error}")
    stale = project.problem(project.cams())
    if stale is not None:
        raise InputError(project.cams().path, stale)
    masks: list[tuple[str, np.ndarray]] = []
    for src in (s for s in SOURCES if s.store.role == role):
        store = project.store(src)
        problem = project.problem(store)
        mask, why = (None, problem) if problem is not None else _read_mask(store, image_id)
        if mask is None:
            notes.append(f"{src.name}: {store.path}: {why}")
            continue
        masks.append((src.title, mask))
        other = None if against is None else _read_mask(against.store(src), image_id)[0]
        if other is not None:
            masks.append((f"{src.title} ({against_label})", other))
    gt = manifest.read_mask(item)
    if gt is not None:
        masks.append(("ground truth", gt))
    panels += [Panel(title, mask_panel(big, enlarge(mask, scale), manifest.palette)) for title, mask in masks]
    values = {0, *(c + 1 for c in item.labels)}.union(*(np.unique(mask).tolist() for _, mask in masks))
    legend = legend_entries(sorted(values), manifest.label_names, manifest.palette)
    return compose(panels, legend), notes


