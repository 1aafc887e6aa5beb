"""Stage `supervised` (optional): the two-step network trained the same way (the `deeplab:` recipe)
on the training split's ground-truth masks and scored on val: the fully supervised reference by
which WSSS papers divide their two-step figure.

Off unless ``supervised.enabled`` is true; disabled, it writes only what DVC expects of it, as the
deeplab stage does.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.deeplab import SupervisedParams, ground_truth
from pipeline.params import load_params
from pipeline.stage import run
from pipeline.store import SUPERVISED, SUPERVISED_WEIGHTS
from stages.deeplab import Outputs, run_deeplab

OUTPUTS = Outputs(SUPERVISED, SUPERVISED_WEIGHTS, Path("checkpoints/state/supervised.pt"),
                  Path("metrics/supervised.json"))


def main(params_path: Path, skip_bad: bool | None = None) -> None:
    """Run the stage; ``skip_bad`` (``--skip-bad``) overrides ``dataset.skip_bad``."""
    enabled = load_params(SupervisedParams, "supervised", params_path).enabled
    run_deeplab(params_path, "supervised", enabled, lambda manifest, split, _: ground_truth(manifest, split),
                OUTPUTS, skip_bad)


if __name__ == "__main__":
    run(main, "skip_bad")
