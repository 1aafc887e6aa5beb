"""Stage `crf`: the two dense CRFs (low and high alpha) of every training image's CAMs, kept as
what the prune stage's rule needs of them: their labels (crf.zarr, which the refine stage also
learns from) and the maps the rule reads (crfmaps.zarr: the labels, the CRFs' confidence, the
CAM argmax and its score); the CRF labels and the CAM argmax scored.

The CRFs depend on the CAMs, the alphas and the CRF settings of the `prune:` section alone, and
cost almost all of the pruning's time: a threshold of the rule reruns the prune stage, never
this one. ``python -m stages.crf [params.yaml] [--scheduler ADDRESS]``: the `run:` section says
how to run them (``scheduler``, ``workers``, ``chunk_size``); :func:`pipeline.method.mining.mine_stage`
decides where.
"""

from __future__ import annotations

from pipeline.core.registry import CAMS, CRF, CRF_MAPS
from pipeline.core.stage import Context, run, stage_main, stopwatch
from pipeline.method.mining import mine_stage
from pipeline.method.prune import PruneParams


def body(ctx: Context) -> None:
    """Run and score the CRFs; ``--scheduler`` overrides ``run.scheduler`` and ``--skip-bad``
    ``dataset.skip_bad``."""
    with stopwatch() as timing:
        score = mine_stage(ctx.manifest, ctx.dataset.train_split, ctx.input(CAMS), ctx.output(CRF),
                           ctx.output(CRF_MAPS), ctx.params(PruneParams, "prune"), ctx.run, ctx.dist, ctx.device)
    if score is None:
        return
    scores = score.as_dict(ctx.manifest.label_names)
    ctx.write_metrics({**{key: scores[key] for key in ("crf", "cam_argmax", "images", "scored_images")},
                       "rejected": ctx.rejected, **timing})


main = stage_main("crf", body)

if __name__ == "__main__":
    run("crf", main)
