"""Stage `supervised` (optional): the two-step network trained the same way (the `deeplab:` recipe)
on the training split's ground-truth masks and scored on val: the fully supervised reference by
which WSSS papers divide their two-step figure.

Off unless ``supervised.enabled`` is true; disabled, it writes only what DVC expects of it, as the
deeplab stage does (see :func:`pipeline.train.deeplab.write_disabled`).
"""

from __future__ import annotations

from pathlib import Path

from pipeline.core.params import load_params
from pipeline.core.registry import STAGES
from pipeline.core.stage import run
from pipeline.train.deeplab import SupervisedParams, ground_truth, run_deeplab


def main(params_path: Path, skip_bad: bool | None = None) -> None:
    """Run the stage; ``skip_bad`` (``--skip-bad``) overrides ``dataset.skip_bad``."""
    enabled = load_params(SupervisedParams, "supervised", params_path).enabled
    run_deeplab(params_path, STAGES["supervised"], enabled, lambda manifest, split, _: ground_truth(manifest, split),
                "ground truth", skip_bad)


if __name__ == "__main__":
    run(main, "skip_bad")
