"""Stage `cams`: multi-scale CAMs of the train and val splits into cams.zarr (in `storage.artifacts`), and their score.

Under ``torchrun`` every process writes its own share of the images into the one store; rank 0
alone shows progress (its share), marks the store complete and writes the metrics.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.core.distributed import default_device, init_distributed
from pipeline.core.io import write_json
from pipeline.core.params import load_params
from pipeline.core.provenance import check_checkpoint, start
from pipeline.core.registry import CAMS, CLASSIFIER_WEIGHTS, STAGES
from pipeline.core.run import load_run
from pipeline.core.stage import run, screened_dataset, stopwatch
from pipeline.core.store import StorageParams
from pipeline.method.cams import (
    CamParams,
    cams_made_from,
    extract_cams,
    score_cams,
    warn_of_coarse_scales,
)
from pipeline.method.metrics import write_metrics
from pipeline.models import fold_batch_norms
from pipeline.train.classifier import ClassifierParams, classifier_made_from, load_classifier

CURVE = Path("plots/cams_threshold.json")
"""Under ``storage.root``, as every file a stage writes."""


def main(params_path: Path, skip_bad: bool | None = None) -> None:
    """Run the stage; ``skip_bad`` (``--skip-bad``) overrides ``dataset.skip_bad``."""
    manifest, dataset, rejected = screened_dataset(params_path, "cams", skip_bad)
    classifier = load_params(ClassifierParams, "classifier", params_path)
    params = load_params(CamParams, "cams", params_path)
    storage = load_params(StorageParams, "storage", params_path)
    run = load_run(params_path)
    ctx = init_distributed()
    device = default_device(ctx)
    weights = storage.file(CLASSIFIER_WEIGHTS)
    check_checkpoint(weights, classifier_made_from(manifest, dataset.train_split, classifier), manifest, "classifier")
    net = fold_batch_norms(load_classifier(classifier, manifest.num_classes, weights)).to(device)
    store = storage.store(CAMS)
    splits = (dataset.train_split, dataset.val_split)
    if ctx.is_main:
        start(store, cams_made_from(manifest, splits, params, weights))
        warn_of_coarse_scales("cams.scales", manifest, dataset.train_split, params.scales, classifier.output_stride)
    ctx.barrier()
    with stopwatch() as timing:
        for split in splits:
            extract_cams(net.cams, manifest, split, store, params, device, ctx.rank, ctx.world_size,
                         run, progress=ctx.is_main, score_fn=net)
    ctx.barrier()
    if not ctx.is_main:
        return
    store.mark_complete(item.id for split in splits for item in manifest.split(split))
    val = score_cams(store, manifest, dataset.val_split, params.score_thresholds)
    train = score_cams(store, manifest, dataset.train_split, params.score_thresholds)
    scores = ("miou", "threshold", "iou", "scored_images")
    write_metrics(storage.file(STAGES["cams"].metrics_file), {**{k: val[k] for k in scores}, "rejected": rejected,
                                          "train": {k: train[k] for k in scores}, **timing})
    write_json(storage.file(CURVE), [{"threshold": p["threshold"], "val": p["miou"], "train": t["miou"]}
                                     for p, t in zip(val["curve"], train["curve"], strict=True)])


if __name__ == "__main__":
    run(main, "skip_bad")
