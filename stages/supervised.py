"""Stage `supervised` (optional): the two-step network trained the same way (the `deeplab:` recipe)
on the training split's ground-truth masks and scored on val: the fully supervised reference by
which WSSS papers divide their two-step figure.

Off unless ``supervised.enabled`` is true; disabled, it writes only what DVC expects of it, as the
deeplab stage does (see :func:`stages.deeplab.write_disabled`).
"""

from __future__ import annotations

from pipeline.core.stage import Context, run, stage_main
from pipeline.train.deeplab import SupervisedParams, ground_truth
from stages.deeplab import two_step, write_disabled


def body(ctx: Context) -> None:
    """Train and score the deeplab recipe on the ground truth; ``--skip-bad`` overrides ``dataset.skip_bad``."""
    if not ctx.params(SupervisedParams, "supervised").enabled:
        write_disabled(ctx)
        return
    two_step(ctx, ground_truth(ctx.manifest, ctx.dataset.train_split), "ground truth")


main = stage_main("supervised", body)

if __name__ == "__main__":
    run("supervised", main)
