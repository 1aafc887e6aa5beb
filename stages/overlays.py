"""Stage `overlays`: sample pictures and per-class figures of every stage's masks, for `dvc plots`.

Draws the `rrm show` panels of the first ``overlays.samples`` images of the training and the
validation split into ``plots/overlays/<id>.png`` (DVC shows a folder of PNGs as image plots)
and writes ``plots/stats_per_class.json``, the per-class figures of `rrm stats`. Stages that
have not run, or are switched off (deeplab), leave their panels out and their figures null.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from pipeline.core.io import write_json
from pipeline.core.params import load_params
from pipeline.core.registry import ROLES
from pipeline.core.stage import load_dataset, run
from pipeline.core.store import StorageParams
from pipeline.inspection.figures import OverlayParams, image_figure
from pipeline.inspection.project import Project
from pipeline.inspection.stats import all_stats, per_class_rows

OVERLAYS = Path("plots/overlays")
PER_CLASS = Path("plots/stats_per_class.json")
"""Under ``storage.root``, as every file a stage writes."""


def main(params_path: Path) -> None:
    manifest, dataset = load_dataset(params_path)
    params = load_params(OverlayParams, "overlays", params_path)
    project = Project(manifest, dataset, load_params(StorageParams, "storage", params_path))
    overlays = project.storage.file(OVERLAYS)
    shutil.rmtree(overlays, ignore_errors=True)  # pictures of other samples would linger
    for role in ROLES:
        for item in manifest.split(project.split(role))[: params.samples]:
            image_figure(project, item.id)[0].save(overlays / f"{item.id}.png")
    write_json(project.storage.file(PER_CLASS), per_class_rows(all_stats(project), manifest.label_names))


if __name__ == "__main__":
    run(main)
