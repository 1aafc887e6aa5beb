"""Stage `segment`: train the segmentation branch, predict val (scored) and train (the two-step
pseudo labels, scored where ground truth exists).

Staged, it learns from the training labels `segment.labels` names (the prune stage's masks or
the refine stage's refined labels). It starts from the classifier stage's weights or from
`segment.checkpoint`; with `steps: 0` it only predicts and scores that checkpoint. Val images,
whose tags are unknown at test time, are restricted to the classes the classifier predicts for
them (`segment.test_tags`), from the CAM store's class scores; with a checkpoint and no
classifier weights (released weights alone) the CAM store is taken as it is.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.core.io import file_digest
from pipeline.core.provenance import MadeFrom, forget, settings, start, write_record
from pipeline.core.registry import CAMS, CLASSIFIER, PSEUDO, SEGMENT, SEGMENT_LABELS
from pipeline.core.stage import Context, run, stage_main, stopwatch
from pipeline.method.cams import warn_of_coarse_scales
from pipeline.method.crf import inference_crf
from pipeline.method.prune import PruneParams
from pipeline.method.tags import given_tags, predicted_tags, val_restrictions
from pipeline.train.classifier import ClassifierParams
from pipeline.train.predict import infer_split, predictions_made_from, segnet_probabilities
from pipeline.train.segment import SegmentParams, train_segmentation


def body(ctx: Context) -> None:
    """Train the one-step network, predict and score both splits; ``--skip-bad`` overrides
    ``dataset.skip_bad``."""
    manifest, (train_split, val_split) = ctx.manifest, ctx.splits
    classifier = ctx.params(ClassifierParams, "classifier")
    params, prune = ctx.params(SegmentParams, "segment"), ctx.params(PruneParams, "prune")
    init = ctx.input(CLASSIFIER, checked=not params.checkpoint)
    start_from = ({"checkpoint": file_digest(Path(params.checkpoint))} if params.checkpoint
                  else {"classifier": file_digest(init)})
    cams = ctx.input(CAMS, checked=not (params.checkpoint and not init.exists()))
    staged, mined = params.steps > 0 and params.mode == "staged", params.steps > 0 and params.mode == "end_to_end"
    targets = ctx.labels(SEGMENT_LABELS, params.labels) if staged else None
    made = MadeFrom.made("segment", manifest, (train_split,), {**settings("segment", params),
                                                               **(settings("prune", prune) if mined else {})},
                         {**start_from, "labels": targets.fingerprint if targets else None})
    if mined and ctx.dist.is_main:
        warn_of_coarse_scales("segment.mining_scales", manifest, train_split, params.mining_scales,
                              classifier.output_stride)
    weights = ctx.file(ctx.stage.weights)
    if ctx.dist.is_main:
        forget(weights)
    with stopwatch() as training:
        net = train_segmentation(manifest, train_split, classifier, params, prune, init, targets, weights,
                                 ctx.file(ctx.stage.state), ctx.dist, ctx.device, ctx.run)
    if not ctx.dist.is_main:
        return
    write_record(weights, made)
    crf = inference_crf(params.crf, params.crf_backend)
    threshold, predicted = predicted_tags(cams, manifest, train_split, val_split)
    val_tags, others = val_restrictions(params.test_tags, predicted)
    results = {}
    with stopwatch() as inference:
        probabilities = segnet_probabilities(net)
        # The training split's tags are known: its pseudo-labels hold only background and each image's
        # own classes. Val's are not (test time): the classifier's predicted tags stand in, or none.
        for name, store, split, tags, also in (
                ("val", ctx.output(SEGMENT), val_split, val_tags, others),
                ("pseudo", ctx.output(PSEUDO), train_split, given_tags(manifest, train_split), {})):
            start(store, predictions_made_from("segment", manifest, split, settings("segment", params), weights))
            results[name] = infer_split(probabilities, manifest, split, store, ctx.device, crf, ctx.run, tags, also)
    ctx.write_metrics({**results["val"], "mode": params.mode, "labels": params.labels, "test_tags": params.test_tags,
                       "tag_threshold": threshold, "pseudo": results["pseudo"], "rejected": ctx.rejected,
                       "train_seconds": training["seconds"], "infer_seconds": inference["seconds"],
                       "seconds": training["seconds"] + inference["seconds"]})


main = stage_main("segment", body)

if __name__ == "__main__":
    run("segment", main)
