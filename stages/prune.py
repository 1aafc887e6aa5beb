"""Stage `prune`: the reliable-region rule on the maps the crf stage kept of the training split's
CAMs and CRFs, into masks.zarr; scored.

Only the training split is pruned: its masks are what the segmentation stage learns from. The
validation split is judged on the segmentation predictions, against its full masks, by the
segment stage. The rule's thresholds (``cam_floor``, ``cam_quantile``, ``bg_threshold``,
``crf_confidence``) are all this stage adds to the kept CRFs, so editing one reruns it in seconds
(:func:`pipeline.method.mining.prune_split`).
"""

from __future__ import annotations

from pipeline.core.io import write_json
from pipeline.core.registry import CRF_MAPS, MASKS, PRUNE_PER_CLASS
from pipeline.core.stage import Context, run, stage_main, stopwatch
from pipeline.method.mining import per_class_rows, prune_split
from pipeline.method.prune import PruneParams


def body(ctx: Context) -> None:
    """Apply and score the rule; ``--skip-bad`` overrides ``dataset.skip_bad``."""
    maps = ctx.input(CRF_MAPS)
    with stopwatch() as timing:
        score = prune_split(ctx.manifest, ctx.dataset.train_split, maps, ctx.output(MASKS),
                            ctx.params(PruneParams, "prune"))
    metrics = {key: value for key, value in score.as_dict(ctx.manifest.label_names).items()
               if key not in ("crf", "cam_argmax")}  # the crf stage's scores
    ctx.write_metrics({**metrics, "rejected": ctx.rejected, **timing})
    write_json(ctx.file(PRUNE_PER_CLASS.path), per_class_rows(metrics))


main = stage_main("prune", body)

if __name__ == "__main__":
    run("prune", main)
