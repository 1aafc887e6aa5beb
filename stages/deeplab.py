"""Stage `deeplab` (optional two-step): retrain DeepLabV3 on the training labels `deeplab.labels`
names (the segment stage's pseudo labels, the refine stage's refined labels or the prune stage's
reliable masks) and score it on val.

Off unless ``deeplab.enabled`` is true; disabled, it writes only what DVC expects of it, at once
(see :func:`pipeline.train.deeplab.write_disabled`). The weights live in a folder,
``checkpoints/deeplab/``, for that reason: a DVC output must exist after every run, and a
disabled run trains no model. The labels are refused unless they were made from the current
dataset, settings and inputs (see :mod:`pipeline.train.labels`).
"""

from __future__ import annotations

from pathlib import Path

from pipeline.core.params import load_params
from pipeline.core.registry import STAGES
from pipeline.core.stage import run
from pipeline.core.store import StorageParams
from pipeline.data.manifest import Manifest
from pipeline.train.deeplab import DeepLabParams, LabelReader, pseudo_labels, run_deeplab
from pipeline.train.labels import checked_labels


def main(params_path: Path, skip_bad: bool | None = None) -> None:
    """Run the stage; ``skip_bad`` (``--skip-bad``) overrides ``dataset.skip_bad``."""
    params = load_params(DeepLabParams, "deeplab", params_path)

    def labels(manifest: Manifest, split: str, storage: StorageParams) -> tuple[LabelReader, str]:
        return pseudo_labels(checked_labels(params.labels, manifest, split, storage, params_path))

    run_deeplab(params_path, STAGES["deeplab"], params.enabled, labels, params.labels, skip_bad)


if __name__ == "__main__":
    run(main, "skip_bad")
