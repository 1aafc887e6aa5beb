"""Stage `classifier`: train the multi-label classifier; write its weights, with the record of
what they were trained from beside them, and its validation mAP."""

from __future__ import annotations

from pathlib import Path

from pipeline.classifier import ClassifierParams, classifier_made_from, evaluate_classifier, train_classifier
from pipeline.metrics import write_metrics
from pipeline.params import load_params
from pipeline.provenance import forget, write_record
from pipeline.stage import run, screened_dataset, stopwatch
from pipeline.store import CLASSIFIER_WEIGHTS as WEIGHTS
from pipeline.store import StorageParams
from pipeline.training import default_device, init_distributed

STATE = Path("checkpoints/state/classifier.pt")
METRICS = Path("metrics/classifier.json")
"""Under ``storage.root``, as every file a stage writes."""


def main(params_path: Path, skip_bad: bool | None = None) -> None:
    """Run the stage; ``skip_bad`` (``--skip-bad``) overrides ``dataset.skip_bad``."""
    manifest, dataset, rejected = screened_dataset(params_path, "classifier", skip_bad)
    params = load_params(ClassifierParams, "classifier", params_path)
    storage = load_params(StorageParams, "storage", params_path)
    ctx = init_distributed()
    device = default_device(ctx)
    weights = storage.file(WEIGHTS)
    made = classifier_made_from(manifest, dataset.train_split, params)
    if ctx.is_main:
        forget(weights)
    with stopwatch() as timing:
        net = train_classifier(manifest, dataset.train_split, params, weights, storage.file(STATE), ctx, device)
    if ctx.is_main:
        write_record(weights, made)
        scores = evaluate_classifier(net, manifest, dataset.val_split, device, params.num_workers)
        write_metrics(storage.file(METRICS), {**scores, "rejected": rejected, **timing})


if __name__ == "__main__":
    run(main, "skip_bad")
