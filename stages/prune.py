"""Stage `prune`: mine the reliable regions of the training split's CAMs (masks.zarr), keep the
labels of the two CRFs alone beside them (crf.zarr, what the refine stage learns from); score
both.

Only the training split is pruned: its masks are what the segmentation stage learns from, and
pruning is the costly part (two dense CRFs per image). The validation split is judged on the
segmentation predictions, against its full masks, by the segment stage.

``python -m stages.prune [params.yaml] [--scheduler ADDRESS]``: the `prune:` section holds the
rule's settings, the `run:` section how to run it (``scheduler``, ``workers``, ``chunk_size``);
:func:`pipeline.method.mining.mine_stage` decides where the CRFs run.
"""

from __future__ import annotations

from pipeline.core.io import write_json
from pipeline.core.registry import CAMS, CRF, MASKS, PRUNE_PER_CLASS
from pipeline.core.stage import Context, run, stage_main, stopwatch
from pipeline.method.mining import mine_stage, per_class_rows
from pipeline.method.prune import PruneParams


def body(ctx: Context) -> None:
    """Mine and score the reliable regions; ``--scheduler`` overrides ``run.scheduler`` and
    ``--skip-bad`` ``dataset.skip_bad``."""
    cams = ctx.input(CAMS)
    with stopwatch() as timing:
        score = mine_stage(ctx.manifest, ctx.dataset.train_split, cams, ctx.output(MASKS), ctx.output(CRF),
                           ctx.params(PruneParams, "prune"), ctx.run, ctx.dist, ctx.device)
    if score is None:
        return
    metrics = score.as_dict(ctx.manifest.label_names)
    ctx.write_metrics({**metrics, "rejected": ctx.rejected, **timing})
    write_json(ctx.file(PRUNE_PER_CLASS.path), per_class_rows(metrics))


main = stage_main("prune", body)

if __name__ == "__main__":
    run("prune", main)
