"""Stage `deeplab` (optional two-step): retrain DeepLabV3 on the segment stage's pseudo labels and
score it on val.

Off unless ``deeplab.enabled`` is true; disabled, it writes only what DVC expects of it, at once
(see :func:`pipeline.train.deeplab.write_disabled`). The weights live in a folder,
``checkpoints/deeplab/``, for that reason: a DVC output must exist after every run, and a
disabled run trains no model. The pseudo labels are refused unless they were made from the
current dataset, `segment:` settings and segmentation network.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.core.params import load_params
from pipeline.core.provenance import check
from pipeline.core.registry import PSEUDO, SEGMENT_WEIGHTS, STAGES
from pipeline.core.stage import run
from pipeline.core.store import StorageParams
from pipeline.data.manifest import Manifest
from pipeline.train.deeplab import DeepLabParams, LabelReader, pseudo_labels, run_deeplab
from pipeline.train.segment import SegmentParams, predictions_made_from


def main(params_path: Path, skip_bad: bool | None = None) -> None:
    """Run the stage; ``skip_bad`` (``--skip-bad``) overrides ``dataset.skip_bad``."""
    enabled = load_params(DeepLabParams, "deeplab", params_path).enabled
    segment = load_params(SegmentParams, "segment", params_path)

    def checked_pseudo_labels(manifest: Manifest, split: str, storage: StorageParams) -> tuple[LabelReader, str]:
        pseudo = storage.store(PSEUDO)
        pseudo.require_complete()
        check(pseudo, predictions_made_from(manifest, split, "segment", segment, storage.file(SEGMENT_WEIGHTS)),
              manifest)
        return pseudo_labels(pseudo)

    run_deeplab(params_path, STAGES["deeplab"], enabled, checked_pseudo_labels, skip_bad)


if __name__ == "__main__":
    run(main, "skip_bad")
