"""Stage `deeplab` (optional two-step): retrain DeepLabV3 on the segment stage's pseudo labels and
score it on val.

Off unless ``deeplab.enabled`` is true. Disabled, it writes only what DVC expects of it, at once:
``{"enabled": false}`` as its metrics, an empty predictions store marked complete and an empty
weights folder. (A stage frozen in ``dvc.yaml`` would not do: ``dvc repro`` fails on a frozen
stage whose outputs are missing.) The weights live in a folder, ``checkpoints/deeplab/``, for
that reason: a DVC output must exist after every run, and a disabled run trains no model.
The pseudo labels are refused unless they were made from the current dataset, `segment:`
settings and segmentation network. The `supervised` stage trains the same network on the
ground truth through :func:`run_deeplab`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pipeline.crf import INFERENCE_CRF
from pipeline.deeplab import DeepLabParams, LabelReader, deeplab_probabilities, pseudo_labels, train_deeplab
from pipeline.io import file_digest
from pipeline.manifest import Manifest
from pipeline.metrics import write_metrics
from pipeline.params import load_params
from pipeline.provenance import MadeFrom, check, forget, settings, start, write_record
from pipeline.segment import SegmentParams, infer_split, predictions_made_from
from pipeline.stage import run, screened_dataset, stopwatch
from pipeline.store import DEEPLAB, DEEPLAB_WEIGHTS, PSEUDO, SEGMENT_WEIGHTS, ImageStore, StorageParams
from pipeline.training import default_device, init_distributed

DISABLED = "disabled"
"""The fingerprint of the empty predictions store of a disabled run."""


@dataclass(frozen=True)
class Outputs:
    """What a DeepLab stage writes: its store's name (in ``storage.artifacts``), and under
    ``storage.root`` its weights, training state and metrics."""

    store: str
    weights: Path
    state: Path
    metrics: Path


OUTPUTS = Outputs(DEEPLAB, DEEPLAB_WEIGHTS, Path("checkpoints/state/deeplab.pt"),
                  Path("metrics/deeplab.json"))

Targets = Callable[[Manifest, str, StorageParams], tuple[LabelReader, str]]
"""(manifest, training split, storage) -> what to train on (see :func:`pipeline.deeplab.train_deeplab`)."""


def write_disabled(store: ImageStore, storage: StorageParams, outputs: Outputs) -> None:
    store.reset_unless(DISABLED)
    store.mark_complete([])
    storage.file(outputs.weights).parent.mkdir(parents=True, exist_ok=True)
    write_metrics(storage.file(outputs.metrics), {"enabled": False})


def run_deeplab(params_path: Path, stage: str, enabled: bool, targets: Targets, outputs: Outputs,
                skip_bad: bool | None) -> None:
    """Train the `deeplab:` recipe on ``targets`` of the training split, predict and score val."""
    params = load_params(DeepLabParams, "deeplab", params_path)
    storage = load_params(StorageParams, "storage", params_path)
    store = storage.store(outputs.store, stage)
    if not enabled:
        write_disabled(store, storage, outputs)
        return
    manifest, dataset, rejected = screened_dataset(params_path, stage, skip_bad)
    labels = targets(manifest, dataset.train_split, storage)
    made = MadeFrom.made(manifest, (dataset.train_split,), settings("deeplab", params),
                         {"targets": labels[1], "init": file_digest(params.weights) if params.weights else None})
    ctx = init_distributed()
    device = default_device(ctx)
    weights = storage.file(outputs.weights)
    if ctx.is_main:
        forget(weights)
    with stopwatch() as training:
        net = train_deeplab(manifest, dataset.train_split, params, labels, weights, storage.file(outputs.state), ctx,
                            device, description=stage)
    if not ctx.is_main:
        return
    write_record(weights, made)
    start(store, predictions_made_from(manifest, dataset.val_split, "deeplab", params, weights))
    with stopwatch() as inference:
        val = infer_split(deeplab_probabilities(net, params.scales, params.flip), manifest, dataset.val_split, store,
                          device, INFERENCE_CRF if params.crf else None, params.crf_workers,
                          params.crf_scheduler)
    write_metrics(storage.file(outputs.metrics), {"enabled": True, **val, "backbone": params.backbone,
                                                  "rejected": rejected, "train_seconds": training["seconds"],
                                                  "infer_seconds": inference["seconds"],
                                                  "seconds": training["seconds"] + inference["seconds"]})


def main(params_path: Path, skip_bad: bool | None = None) -> None:
    """Run the stage; ``skip_bad`` (``--skip-bad``) overrides ``dataset.skip_bad``."""
    enabled = load_params(DeepLabParams, "deeplab", params_path).enabled
    segment = load_params(SegmentParams, "segment", params_path)

    def checked_pseudo_labels(manifest: Manifest, split: str, storage: StorageParams) -> tuple[LabelReader, str]:
        pseudo = storage.store(PSEUDO, "segment")
        pseudo.require_complete()
        check(pseudo, predictions_made_from(manifest, split, "segment", segment, storage.file(SEGMENT_WEIGHTS)),
              manifest)
        return pseudo_labels(pseudo)

    run_deeplab(params_path, "deeplab", enabled, checked_pseudo_labels, OUTPUTS, skip_bad)


if __name__ == "__main__":
    run(main, "skip_bad")
