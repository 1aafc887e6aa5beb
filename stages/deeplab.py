"""Stage `deeplab` (optional two-step): retrain DeepLabV3 on the segment stage's pseudo labels and
score it on val.

Off unless ``deeplab.enabled`` is true. Disabled, it writes only what DVC expects of it, at once:
``{"enabled": false}`` as its metrics, an empty predictions store marked complete and an empty
weights folder. (A stage frozen in ``dvc.yaml`` would not do: ``dvc repro`` fails on a frozen
stage whose outputs are missing.) The weights live in a folder, ``checkpoints/deeplab/``, for
that reason: a DVC output must exist after every run, and a disabled run trains no model.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.crf import INFERENCE_CRF
from pipeline.deeplab import DeepLabParams, deeplab_probabilities, train_deeplab
from pipeline.io import file_digest, fingerprint
from pipeline.metrics import write_metrics
from pipeline.params import load_params
from pipeline.segment import infer_split
from pipeline.stage import run, screened_dataset, stopwatch
from pipeline.store import DEEPLAB, PSEUDO, ImageStore, StorageParams
from pipeline.training import default_device, init_distributed

WEIGHTS = Path("checkpoints/deeplab/model.pth")
STATE = Path("checkpoints/state/deeplab.pt")
METRICS = Path("metrics/deeplab.json")
DISABLED = "disabled"
"""The fingerprint of the empty predictions store of a disabled run."""


def write_disabled(store: ImageStore) -> None:
    store.reset_unless(DISABLED)
    store.mark_complete([])
    WEIGHTS.parent.mkdir(parents=True, exist_ok=True)
    write_metrics(METRICS, {"enabled": False})


def main(params_path: Path, skip_bad: bool | None = None) -> None:
    """Run the stage; ``skip_bad`` (``--skip-bad``) overrides ``dataset.skip_bad``."""
    params = load_params(DeepLabParams, "deeplab", params_path)
    storage = load_params(StorageParams, "storage", params_path)
    store = storage.store(DEEPLAB, "deeplab")
    if not params.enabled:
        write_disabled(store)
        return
    manifest, dataset, rejected = screened_dataset(params_path, "deeplab", skip_bad)
    ctx = init_distributed()
    device = default_device(ctx)
    with stopwatch() as training:
        net = train_deeplab(manifest, dataset.train_split, params, storage.store(PSEUDO, "segment"), WEIGHTS,
                            STATE, ctx, device)
    if not ctx.is_main:
        return
    store.reset_unless(fingerprint(file_digest(WEIGHTS), params.scales, params.flip, params.crf, dataset.val_split))
    with stopwatch() as inference:
        val = infer_split(deeplab_probabilities(net, params.scales, params.flip), manifest, dataset.val_split, store,
                          device, INFERENCE_CRF if params.crf else None, params.crf_workers,
                          params.crf_scheduler)
    write_metrics(METRICS, {"enabled": True, "miou": val["miou"], "miou_no_crf": val["miou_no_crf"],
                            "iou": val["iou"], "backbone": params.backbone, "rejected": rejected,
                            "train_seconds": training["seconds"], "infer_seconds": inference["seconds"],
                            "seconds": training["seconds"] + inference["seconds"]})


if __name__ == "__main__":
    run(main, "skip_bad")
