"""Stage `overlays`: sample pictures and per-class figures of every stage's masks, for `dvc plots`.

Draws the `rrm show` panels of the first ``overlays.samples`` images of the training and the
validation split into ``plots/overlays/<id>.png`` (DVC shows a folder of PNGs as image plots)
and writes ``plots/stats_per_class.json``, the per-class figures of `rrm stats`, and
``plots/train_labels_per_class.json``, the IoU per class of every labelling of the training
split (CAMs, reliable masks, refined labels, one-step pseudo-labels). Stages that have not run,
or are switched off (deeplab), leave their panels out and their figures null.
"""

from __future__ import annotations

import shutil

from pipeline.core.io import read_json_object, write_json
from pipeline.core.registry import OVERLAYS, ROLES, STAGES, STATS_PER_CLASS, TRAINING_LABELS
from pipeline.core.stage import Context, run, stage_main
from pipeline.inspection.figures import OverlayParams, image_figure
from pipeline.inspection.project import Project
from pipeline.inspection.stats import all_stats, per_class_rows, training_label_rows


def body(ctx: Context) -> None:
    """Draw the sample panels and write the per-class figures."""
    manifest, params = ctx.manifest, ctx.params(OverlayParams, "overlays")
    project = Project(manifest, ctx.dataset, ctx.storage)
    overlays = ctx.file(OVERLAYS.path)
    shutil.rmtree(overlays, ignore_errors=True)  # pictures of other samples would linger
    for role in ROLES:
        for item in manifest.split(project.split(role))[: params.samples]:
            image_figure(project, item.id)[0].save(overlays / f"{item.id}.png")
    report = all_stats(project)
    write_json(ctx.file(STATS_PER_CLASS.path), per_class_rows(report, manifest.label_names))
    cams = ctx.file(STAGES["cams"].scores_file)
    cam_iou = read_json_object(cams, "scores file").get("train", {}).get("iou") if cams.is_file() else None
    write_json(ctx.file(TRAINING_LABELS.path), training_label_rows(report, cam_iou, manifest.label_names))


main = stage_main("overlays", body)

if __name__ == "__main__":
    run("overlays", main)
