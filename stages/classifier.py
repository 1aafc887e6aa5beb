"""Stage `classifier`: train the multi-label classifier; write its weights and validation mAP."""

from __future__ import annotations

from pathlib import Path

from pipeline.classifier import ClassifierParams, evaluate_classifier, train_classifier
from pipeline.metrics import write_metrics
from pipeline.params import load_params
from pipeline.stage import run, screened_dataset, stopwatch
from pipeline.training import default_device, init_distributed

WEIGHTS = Path("checkpoints/classifier.pth")
STATE = Path("checkpoints/state/classifier.pt")
METRICS = Path("metrics/classifier.json")


def main(params_path: Path, skip_bad: bool | None = None) -> None:
    """Run the stage; ``skip_bad`` (``--skip-bad``) overrides ``dataset.skip_bad``."""
    manifest, dataset, rejected = screened_dataset(params_path, "classifier", skip_bad)
    params = load_params(ClassifierParams, "classifier", params_path)
    ctx = init_distributed()
    device = default_device(ctx)
    with stopwatch() as timing:
        net = train_classifier(manifest, dataset.train_split, params, WEIGHTS, STATE, ctx, device)
    if ctx.is_main:
        scores = evaluate_classifier(net, manifest, dataset.val_split, device, params.num_workers)
        write_metrics(METRICS, {**scores, "rejected": rejected, **timing})


if __name__ == "__main__":
    run(main, "skip_bad")
