"""Stage `data`: generate the synthetic benchmark (images, masks, manifest) and its statistics."""

from __future__ import annotations

from pipeline.core.stage import Context, run, stage_main, stopwatch
from pipeline.data.synth import generate, read_data_params


def body(ctx: Context) -> None:
    """Generate the images, masks and manifest the `data:` section describes."""
    params, root, manifest_path = read_data_params(ctx.params_path)
    with stopwatch() as timing:
        _, stats = generate(params, root, manifest_path)
    ctx.write_metrics({**stats, **timing})


main = stage_main("data", body)

if __name__ == "__main__":
    run("data", main)
