"""Stage `segment`: train the segmentation branch, predict val (scored) and train (the two-step
pseudo labels, scored where ground truth exists).

Staged, it learns from the training labels `segment.labels` names (the prune stage's masks or
the refine stage's refined labels), refused unless made from the current dataset and settings.
It starts from the classifier stage's weights, refused unless made from the current dataset and
`classifier:` settings, or from `segment.checkpoint`; with `steps: 0` it only predicts and scores
that checkpoint. Val images, whose tags are unknown at test time, are restricted to the classes
the classifier predicts for them (`segment.test_tags`), from the CAM store's class scores; with
a checkpoint and no classifier weights (released weights alone) the CAM store is taken as it is.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.core.distributed import default_device, init_distributed
from pipeline.core.io import file_digest
from pipeline.core.params import load_params
from pipeline.core.provenance import MadeFrom, check, check_checkpoint, forget, settings, start, write_record
from pipeline.core.registry import CAMS, CLASSIFIER_WEIGHTS, PSEUDO, SEGMENT, STAGES
from pipeline.core.run import load_run
from pipeline.core.stage import run, screened_dataset, stopwatch
from pipeline.core.store import StorageParams
from pipeline.method.cams import CamParams, cams_made_from, warn_of_coarse_scales
from pipeline.method.crf import inference_crf
from pipeline.method.metrics import write_metrics
from pipeline.method.prune import PruneParams
from pipeline.method.tags import given_tags, predicted_tags, val_restrictions
from pipeline.train.classifier import ClassifierParams, classifier_made_from
from pipeline.train.labels import checked_labels
from pipeline.train.segment import (
    SegmentParams,
    infer_split,
    predictions_made_from,
    segnet_probabilities,
    train_segmentation,
)

STAGE = STAGES["segment"]


def main(params_path: Path, skip_bad: bool | None = None) -> None:
    """Run the stage; ``skip_bad`` (``--skip-bad``) overrides ``dataset.skip_bad``."""
    manifest, dataset, rejected = screened_dataset(params_path, "segment", skip_bad)
    classifier = load_params(ClassifierParams, "classifier", params_path)
    params = load_params(SegmentParams, "segment", params_path)
    prune = load_params(PruneParams, "prune", params_path)
    run_params = load_run(params_path)
    storage = load_params(StorageParams, "storage", params_path)
    train_split, val_split = dataset.train_split, dataset.val_split
    init, cams = storage.file(CLASSIFIER_WEIGHTS), storage.store(CAMS)
    if params.checkpoint:
        start_from = {"checkpoint": file_digest(Path(params.checkpoint))}
    else:
        check_checkpoint(init, classifier_made_from(manifest, train_split, classifier), manifest, "classifier")
        start_from = {"classifier": file_digest(init)}
    cams.require_complete()
    if not (params.checkpoint and not init.exists()):  # released weights alone: their CAM store taken as it is
        check(cams, cams_made_from(manifest, (train_split, val_split), load_params(CamParams, "cams", params_path),
                                   init), manifest)
    staged, mined = params.steps > 0 and params.mode == "staged", params.steps > 0 and params.mode == "end_to_end"
    targets = checked_labels(params.labels, manifest, train_split, storage, params_path) if staged else None
    made = MadeFrom.made(manifest, (train_split,), {**settings("segment", params),
                                                    **(settings("prune", prune) if mined else {})},
                         {**start_from, "labels": targets.fingerprint if targets else None})
    ctx = init_distributed()
    if mined and ctx.is_main:
        warn_of_coarse_scales("segment.mining_scales", manifest, train_split, params.mining_scales,
                              classifier.output_stride)
    device = default_device(ctx)
    weights = storage.file(STAGE.weights)
    if ctx.is_main:
        forget(weights)
    with stopwatch() as training:
        net = train_segmentation(manifest, train_split, classifier, params, prune, init,
                                 targets, weights, storage.file(STAGE.state), ctx, device, run_params)
    if not ctx.is_main:
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
                ("val", storage.store(SEGMENT), val_split, val_tags, others),
                ("pseudo", storage.store(PSEUDO), train_split, given_tags(manifest, train_split), {})):
            start(store, predictions_made_from(manifest, split, settings("segment", params), weights))
            results[name] = infer_split(probabilities, manifest, split, store, device, crf, run_params, tags, also)
    write_metrics(storage.file(STAGE.metrics_file), {**results["val"], "mode": params.mode, "labels": params.labels,
                                                     "test_tags": params.test_tags, "tag_threshold": threshold,
                                                     "pseudo": results["pseudo"], "rejected": rejected,
                                                     "train_seconds": training["seconds"],
                                                     "infer_seconds": inference["seconds"],
                                                     "seconds": training["seconds"] + inference["seconds"]})


if __name__ == "__main__":
    run(main, "skip_bad")
