"""Stage `segment`: train the segmentation branch, predict val (scored) and train (the two-step
pseudo labels, scored where ground truth exists).

Staged, it learns from the prune stage's masks, refused unless they were made from the current
dataset, `prune:` settings and CAM store. It starts from the classifier stage's weights, refused
unless made from the current dataset and `classifier:` settings, or from `segment.checkpoint`;
with `steps: 0` it only predicts and scores that checkpoint.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.classifier import ClassifierParams, classifier_made_from
from pipeline.crf import INFERENCE_CRF
from pipeline.io import file_digest
from pipeline.metrics import write_metrics
from pipeline.mining import load_prune_params, masks_made_from
from pipeline.params import load_params
from pipeline.provenance import MadeFrom, check, check_checkpoint, forget, settings, start, write_record
from pipeline.segment import (
    SegmentParams,
    infer_split,
    predictions_made_from,
    segnet_probabilities,
    train_segmentation,
)
from pipeline.stage import run, screened_dataset, stopwatch
from pipeline.store import CAMS, MASKS, PSEUDO, SEGMENT, StorageParams
from pipeline.store import CLASSIFIER_WEIGHTS as INIT
from pipeline.store import SEGMENT_WEIGHTS as WEIGHTS
from pipeline.training import default_device, init_distributed

STATE = Path("checkpoints/state/segment.pt")
METRICS = Path("metrics/segment.json")
"""Under ``storage.root``, as every file a stage writes."""


def main(params_path: Path, skip_bad: bool | None = None) -> None:
    """Run the stage; ``skip_bad`` (``--skip-bad``) overrides ``dataset.skip_bad``."""
    manifest, dataset, rejected = screened_dataset(params_path, "segment", skip_bad)
    classifier = load_params(ClassifierParams, "classifier", params_path)
    params = load_params(SegmentParams, "segment", params_path)
    prune, _ = load_prune_params(params_path)
    storage = load_params(StorageParams, "storage", params_path)
    init, masks = storage.file(INIT), storage.store(MASKS, "prune")
    if params.checkpoint:
        start_from = {"checkpoint": file_digest(Path(params.checkpoint))}
    else:
        check_checkpoint(init, classifier_made_from(manifest, dataset.train_split, classifier), manifest,
                         "classifier")
        start_from = {"classifier": file_digest(init)}
    staged, mined = params.steps > 0 and params.mode == "staged", params.steps > 0 and params.mode == "end_to_end"
    if staged:
        masks.require_complete()
        check(masks, masks_made_from(manifest, dataset.train_split, prune, storage.store(CAMS, "cams")), manifest)
    made = MadeFrom.made(manifest, (dataset.train_split,), {**settings("segment", params),
                                                              **(settings("prune", prune) if mined else {})},
                         {**start_from, "masks.zarr": masks.fingerprint if staged else None})
    ctx = init_distributed()
    device = default_device(ctx)
    weights = storage.file(WEIGHTS)
    if ctx.is_main:
        forget(weights)
    with stopwatch() as training:
        net = train_segmentation(manifest, dataset.train_split, classifier, params, prune, init,
                                 masks, weights, storage.file(STATE), ctx, device)
    if not ctx.is_main:
        return
    write_record(weights, made)
    crf = INFERENCE_CRF if params.crf else None
    results = {}
    with stopwatch() as inference:
        probabilities = segnet_probabilities(net)
        # The training split's tags are known: its pseudo-labels hold only background and each image's
        # own classes. Val's are not (test time): every class competes there.
        for name, store, split, restricted in (("val", storage.store(SEGMENT, "segment"), dataset.val_split, False),
                                               ("pseudo", storage.store(PSEUDO, "segment"), dataset.train_split, True)):
            start(store, predictions_made_from(manifest, split, "segment", params, weights))
            results[name] = infer_split(probabilities, manifest, split, store, device, crf,
                                        params.crf_workers, params.crf_scheduler, restricted)
    write_metrics(storage.file(METRICS), {**results["val"], "mode": params.mode, "pseudo": results["pseudo"],
                                          "rejected": rejected, "train_seconds": training["seconds"],
                                          "infer_seconds": inference["seconds"],
                                          "seconds": training["seconds"] + inference["seconds"]})


if __name__ == "__main__":
    run(main, "skip_bad")
