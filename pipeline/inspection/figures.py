"""One image's panels side by side: the image, the CAM of each class it holds, every stage's masks
and the ground truth (``rrm show``, the overlays stage, ``rrm diff``'s figures)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.core.errors import InputError
from pipeline.core.params import check_range
from pipeline.core.store import ImageStore
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
    for src in (s for s in SOURCES if s.store.role == role):
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


