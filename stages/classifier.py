"""Stage `classifier`: train the multi-label classifier; write its weights, with the record of
what they were trained from beside them, and its validation mAP."""

from __future__ import annotations

from pathlib import Path

from pipeline.core.distributed import default_device, init_distributed
from pipeline.core.params import load_params
from pipeline.core.provenance import forget, write_record
from pipeline.core.registry import STAGES
from pipeline.core.run import load_run
from pipeline.core.stage import run, screened_dataset, stopwatch
from pipeline.core.store import StorageParams
from pipeline.method.metrics import write_metrics
from pipeline.train.classifier import ClassifierParams, classifier_made_from, evaluate_classifier, train_classifier

STAGE = STAGES["classifier"]


def main(params_path: Path, skip_bad: bool | None = None) -> None:
    """Run the stage; ``skip_bad`` (``--skip-bad``) overrides ``dataset.skip_bad``."""
    manifest, dataset, rejected = screened_dataset(params_path, "classifier", skip_bad)
    params = load_params(ClassifierParams, "classifier", params_path)
    storage = load_params(StorageParams, "storage", params_path)
    run = load_run(params_path)
    ctx = init_distributed()
    device = default_device(ctx)
    weights = storage.file(STAGE.weights)
    made = classifier_made_from(manifest, dataset.train_split, params)
    if ctx.is_main:
        forget(weights)
    with stopwatch() as timing:
        net = train_classifier(manifest, dataset.train_split, params, weights, storage.file(STAGE.state), ctx, device,
                               run)
    if ctx.is_main:
        write_record(weights, made)
        scores = evaluate_classifier(net, manifest, dataset.val_split, device, run.loader_processes(device))
        write_metrics(storage.file(STAGE.metrics_file), {**scores, "rejected": rejected, **timing})


if __name__ == "__main__":
    run(main, "skip_bad")
