"""Stage `segment`: train the segmentation branch, predict val (scored) and train (the two-step
pseudo labels, scored where ground truth exists)."""

from __future__ import annotations

from pathlib import Path

from pipeline.classifier import ClassifierParams
from pipeline.crf import INFERENCE_CRF
from pipeline.io import file_digest, fingerprint
from pipeline.metrics import write_metrics
from pipeline.mining import load_prune_params
from pipeline.params import load_params
from pipeline.segment import SegmentParams, infer_split, segnet_probabilities, train_segmentation
from pipeline.stage import run, screened_dataset, stopwatch
from pipeline.store import MASKS, PSEUDO, SEGMENT, StorageParams
from pipeline.training import default_device, init_distributed

INIT = Path("checkpoints/classifier.pth")
WEIGHTS = Path("checkpoints/segment.pth")
STATE = Path("checkpoints/state/segment.pt")
METRICS = Path("metrics/segment.json")


def main(params_path: Path, skip_bad: bool | None = None) -> None:
    """Run the stage; ``skip_bad`` (``--skip-bad``) overrides ``dataset.skip_bad``."""
    manifest, dataset, rejected = screened_dataset(params_path, "segment", skip_bad)
    classifier = load_params(ClassifierParams, "classifier", params_path)
    params = load_params(SegmentParams, "segment", params_path)
    prune, _ = load_prune_params(params_path)
    storage = load_params(StorageParams, "storage", params_path)
    ctx = init_distributed()
    device = default_device(ctx)
    with stopwatch() as training:
        net = train_segmentation(manifest, dataset.train_split, classifier, params, prune, INIT,
                                 storage.store(MASKS, "prune"), WEIGHTS, STATE, ctx, device)
    if not ctx.is_main:
        return
    crf = INFERENCE_CRF if params.crf else None
    weights = file_digest(WEIGHTS)
    results = {}
    with stopwatch() as inference:
        probabilities = segnet_probabilities(net)
        # The training split's tags are known: its pseudo-labels hold only background and each image's
        # own classes. Val's are not (test time): every class competes there.
        for name, store, split, restricted in (("val", storage.store(SEGMENT, "segment"), dataset.val_split, False),
                                               ("pseudo", storage.store(PSEUDO, "segment"), dataset.train_split, True)):
            store.reset_unless(fingerprint(weights, params.crf, split, restricted))
            results[name] = infer_split(probabilities, manifest, split, store, device, crf,
                                        params.crf_workers, params.crf_scheduler, restricted)
    write_metrics(METRICS, {**results["val"], "mode": params.mode, "pseudo": results["pseudo"], "rejected": rejected,
                            "train_seconds": training["seconds"], "infer_seconds": inference["seconds"],
                            "seconds": training["seconds"] + inference["seconds"]})


if __name__ == "__main__":
    run(main, "skip_bad")
