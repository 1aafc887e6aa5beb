"""Stage `deeplab` (optional two-step): retrain DeepLabV3 on the training labels `deeplab.labels`
names (the segment stage's pseudo labels, the refine stage's refined labels or the prune stage's
reliable masks) and score it on val.

Off unless ``deeplab.enabled`` is true; disabled, it writes only what DVC expects of it, at once
(:func:`write_disabled`). The weights live in a folder, ``checkpoints/deeplab/``, for that
reason: a DVC output must exist after every run, and a disabled run trains no model. The
supervised stage runs the same body (:func:`two_step`) on the ground truth.
"""

from __future__ import annotations

from pipeline.core.io import digest_or_none
from pipeline.core.provenance import MadeFrom, forget, start, write_record
from pipeline.core.registry import CAMS, DEEPLAB_LABELS
from pipeline.core.stage import Context, run, stage_main, stopwatch
from pipeline.method.crf import inference_crf
from pipeline.method.tags import predicted_tags, val_restrictions
from pipeline.train.deeplab import DeepLabParams, LabelReader, deeplab_probabilities, pseudo_labels, train_deeplab
from pipeline.train.predict import infer_split, predictions_made_from

DISABLED = "disabled"
"""The fingerprint of the empty predictions store of a disabled run."""

DISABLED_NOTE = "disabled.txt"
"""The one file of a disabled run's weights folder: DVC warns of an empty output folder on every
`dvc repro`, and the note says why there is no model."""


def write_disabled(ctx: Context) -> None:
    """What DVC expects of a switched-off stage, at once: an empty predictions store marked
    complete, a weights folder holding only :data:`DISABLED_NOTE` and ``{"enabled": false}`` as
    its metrics. (A stage frozen in ``dvc.yaml`` would not do: ``dvc repro`` fails on a frozen
    stage whose outputs are missing.)"""
    store = ctx.output(ctx.stage.stores[0])
    store.reset_unless(DISABLED)
    store.mark_complete([])
    folder = ctx.file(ctx.stage.weights).parent
    folder.mkdir(parents=True, exist_ok=True)
    (folder / DISABLED_NOTE).write_text(f"No model: the stage is off ({ctx.stage.name}.enabled: false).\n")
    ctx.write_metrics({"enabled": False})


def two_step(ctx: Context, targets: tuple[LabelReader, str], trained_on: str) -> None:
    """Train the `deeplab:` recipe on ``targets`` of the training split (named ``trained_on`` in
    the metrics), predict and score val."""
    manifest, (train_split, val_split) = ctx.manifest, ctx.splits
    params = ctx.params(DeepLabParams, "deeplab")
    made = MadeFrom.made(ctx.stage.name, manifest, (train_split,), params.recipe(),
                         {"targets": targets[1], "init": digest_or_none(params.weights)})
    weights = ctx.file(ctx.stage.weights)
    if ctx.dist.is_main:
        forget(weights)
        (weights.parent / DISABLED_NOTE).unlink(missing_ok=True)
    with stopwatch() as training:
        net = train_deeplab(manifest, train_split, params, targets, weights, ctx.file(ctx.stage.state), ctx.dist,
                            ctx.device, ctx.run, stage=ctx.stage.name)
    if not ctx.dist.is_main:
        return
    write_record(weights, made)
    store = ctx.output(ctx.stage.stores[0])
    start(store, predictions_made_from(ctx.stage.name, manifest, val_split, params.recipe(), weights))
    threshold, predicted = predicted_tags(ctx.input(CAMS, checked=False), manifest, train_split, val_split)
    val_tags, others = val_restrictions(params.test_tags, predicted)
    with stopwatch() as inference:
        val = infer_split(deeplab_probabilities(net, params.scales, params.flip), manifest, val_split, store,
                          ctx.device, inference_crf(params.crf, params.crf_backend), ctx.run, val_tags, others)
    ctx.write_metrics({"enabled": True, **val, "backbone": params.backbone, "labels": trained_on,
                       "test_tags": params.test_tags, "tag_threshold": threshold, "rejected": ctx.rejected,
                       "train_seconds": training["seconds"], "infer_seconds": inference["seconds"],
                       "seconds": training["seconds"] + inference["seconds"]})


def body(ctx: Context) -> None:
    """Train and score the two-step on `deeplab.labels`; ``--skip-bad`` overrides ``dataset.skip_bad``."""
    params = ctx.params(DeepLabParams, "deeplab")
    if not params.enabled:
        write_disabled(ctx)
        return
    two_step(ctx, pseudo_labels(ctx.labels(DEEPLAB_LABELS, params.labels)), params.labels)


main = stage_main("deeplab", body)

if __name__ == "__main__":
    run("deeplab", main)
