"""The training-split labels a network learns from, by the name a setting gives them: the prune
stage's reliable masks (``masks``) or the labels of its two CRFs alone (``crf``), the refine
stage's dense labels (``refined``) or the segment stage's pseudo-labels (``pseudo``), each the
store of :data:`~pipeline.core.registry.LABELS`. A store is refused unless it is complete and
made from the current dataset, settings and inputs.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from pipeline.core.params import load_params
from pipeline.core.provenance import MadeFrom, check, settings
from pipeline.core.registry import CAMS, LABELS, SEGMENT_WEIGHTS, STAGES
from pipeline.core.store import ImageStore, StorageParams
from pipeline.data.manifest import Manifest
from pipeline.method.mining import MADE_FROM
from pipeline.method.prune import PruneParams
from pipeline.train.refine import RefineParams, refined_made_from
from pipeline.train.segment import SegmentParams, predictions_made_from

Expected = Callable[[Manifest, str, StorageParams, Path], MadeFrom]


def _pruned(name: str) -> Expected:
    """The record a store of the prune stage (``masks`` or ``crf``) must hold now."""

    def expected(manifest: Manifest, split: str, storage: StorageParams, params_path: Path) -> MadeFrom:
        return MADE_FROM[name](manifest, split, load_params(PruneParams, "prune", params_path), storage.store(CAMS))
    return expected


def _refined(manifest: Manifest, split: str, storage: StorageParams, params_path: Path) -> MadeFrom:
    return refined_made_from(manifest, split, load_params(RefineParams, "refine", params_path),
                             storage.file(STAGES["refine"].weights), storage.store(CAMS))


def _pseudo(manifest: Manifest, split: str, storage: StorageParams, params_path: Path) -> MadeFrom:
    segment = load_params(SegmentParams, "segment", params_path)
    return predictions_made_from(manifest, split, settings("segment", segment), storage.file(SEGMENT_WEIGHTS))


EXPECTED: dict[str, Expected] = {**{name: _pruned(name) for name in MADE_FROM}, "refined": _refined,
                                 "pseudo": _pseudo}
"""What each store of labels must be made from now."""


def checked_labels(name: str, manifest: Manifest, split: str, storage: StorageParams,
                   params_path: Path) -> ImageStore:
    """The store of training labels ``name`` for ``split``, complete and made from what the params
    file says now (else one line naming it and the stage to rerun)."""
    store = storage.store(LABELS[name])
    store.require_complete()
    check(store, EXPECTED[name](manifest, split, storage, params_path), manifest)
    return store
