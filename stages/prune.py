"""Stage `prune`: mine the reliable regions of the training split's CAMs; score them.

Only the training split is pruned: its masks are what the segmentation stage learns from, and
pruning is the costly part (two dense CRFs per image). The validation split is judged on the
segmentation predictions, against its full masks, by the segment stage. The CAM store is
refused unless it was made from the current dataset, `cams:` settings and classifier.

``python -m stages.prune [params.yaml] [--scheduler ADDRESS]``; the `prune:` section holds both the rule's settings
and how to run it (``scheduler``, ``workers``, ``chunk_size``, see ``ClusterParams``).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from pipeline.cams import CamParams, cams_made_from
from pipeline.io import write_json
from pipeline.metrics import write_metrics
from pipeline.mining import load_prune_params, mine_split, per_class_rows
from pipeline.params import load_params
from pipeline.provenance import check
from pipeline.stage import run, screened_dataset, stopwatch
from pipeline.store import CAMS, CLASSIFIER_WEIGHTS, MASKS, StorageParams

METRICS = Path("metrics/prune.json")
PLOT = Path("plots/prune_per_class.json")
"""Under ``storage.root``, as every file a stage writes."""


def main(params_path: Path, scheduler: str | None = None, skip_bad: bool | None = None) -> None:
    """Run the stage; ``scheduler`` (a dask scheduler address) overrides ``prune.scheduler`` and
    ``skip_bad`` (``--skip-bad``) ``dataset.skip_bad``."""
    manifest, dataset, rejected = screened_dataset(params_path, "prune", skip_bad)
    params, cluster = load_prune_params(params_path)
    if scheduler is not None:
        cluster = replace(cluster, scheduler=scheduler)
    storage = load_params(StorageParams, "storage", params_path)
    cams, masks = storage.store(CAMS, "cams"), storage.store(MASKS, "prune")
    cams.require_complete()
    check(cams, cams_made_from(manifest, (dataset.train_split, dataset.val_split),
                               load_params(CamParams, "cams", params_path), storage.file(CLASSIFIER_WEIGHTS)), manifest)
    with stopwatch() as timing:
        score = mine_split(manifest, dataset.train_split, cams, masks, params, cluster)
    metrics = score.as_dict(manifest.label_names)
    write_metrics(storage.file(METRICS), {**metrics, "rejected": rejected, **timing})
    write_json(storage.file(PLOT), per_class_rows(metrics))


if __name__ == "__main__":
    run(main, "scheduler", "skip_bad")
