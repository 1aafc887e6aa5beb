"""Stage `prune`: mine the reliable regions of the training split's CAMs (masks.zarr), keep the
labels of the two CRFs alone beside them (crf.zarr, what the refine stage learns from); score
both.

Only the training split is pruned: its masks are what the segmentation stage learns from, and
pruning is the costly part (two dense CRFs per image). The validation split is judged on the
segmentation predictions, against its full masks, by the segment stage. The CAM store is
refused unless it was made from the current dataset, `cams:` settings and classifier.

``python -m stages.prune [params.yaml] [--scheduler ADDRESS]``: the `prune:` section holds the rule's settings,
the `run:` section how to run it (``scheduler``, ``workers``, ``chunk_size``). With the torch CRF
backend on a GPU the stage mines in its own process; under ``torchrun`` every process mines its
share of the images on its GPU, and rank 0 marks the stores complete and scores them all (reading
the other ranks' masks back). Otherwise rank 0 alone mines, over the dask cluster.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from pipeline.core.distributed import default_device, init_distributed
from pipeline.core.io import write_json
from pipeline.core.params import load_params
from pipeline.core.provenance import check
from pipeline.core.registry import CAMS, CLASSIFIER_WEIGHTS, CRF, MASKS, STAGES
from pipeline.core.run import load_run
from pipeline.core.stage import run, screened_dataset, stopwatch
from pipeline.core.store import StorageParams
from pipeline.method.cams import CamParams, cams_made_from
from pipeline.method.metrics import write_metrics
from pipeline.method.mining import in_process, mine_split, per_class_rows, start_mining
from pipeline.method.prune import PruneParams

PLOT = Path("plots/prune_per_class.json")
"""Under ``storage.root``, as every file a stage writes."""


def main(params_path: Path, scheduler: str | None = None, skip_bad: bool | None = None) -> None:
    """Run the stage; ``scheduler`` (a dask scheduler address) overrides ``run.scheduler`` and
    ``skip_bad`` (``--skip-bad``) ``dataset.skip_bad``."""
    manifest, dataset, rejected = screened_dataset(params_path, "prune", skip_bad)
    params = load_params(PruneParams, "prune", params_path)
    run_params = load_run(params_path)
    if scheduler is not None:
        run_params = replace(run_params, scheduler=scheduler)
    storage = load_params(StorageParams, "storage", params_path)
    cams, masks, crf = storage.store(CAMS), storage.store(MASKS), storage.store(CRF)
    cams.require_complete()
    check(cams, cams_made_from(manifest, (dataset.train_split, dataset.val_split),
                               load_params(CamParams, "cams", params_path), storage.file(CLASSIFIER_WEIGHTS)), manifest)
    ctx = init_distributed()
    split = dataset.train_split
    with stopwatch() as timing:
        if in_process(params, run_params, ctx.enabled):
            device = default_device(ctx)
            if ctx.enabled:  # each rank mines its share; rank 0 then reads every mask back and scores it all
                if ctx.is_main:
                    start_mining(manifest, split, params, cams, masks, crf)
                ctx.barrier()
                mine_split(manifest, split, cams, masks, crf, params, run_params, ctx.is_main, device, ctx.rank,
                           ctx.world_size)
                ctx.barrier()
                if not ctx.is_main:
                    return
            score = mine_split(manifest, split, cams, masks, crf, params, run_params, device=device)
        elif ctx.is_main:
            score = mine_split(manifest, split, cams, masks, crf, params, run_params)
        else:
            return
    metrics = score.as_dict(manifest.label_names)
    write_metrics(storage.file(STAGES["prune"].metrics_file), {**metrics, "rejected": rejected, **timing})
    write_json(storage.file(PLOT), per_class_rows(metrics))


if __name__ == "__main__":
    run(main, "scheduler", "skip_bad")
