"""The stages of the pipeline and what each one writes: the one table of names and paths that the
stage scripts, the command line, inspection and the tests read.

DVC reads its own copy of these facts, ``dvc.yaml``; ``tests/test_registry.py`` holds the two to
each other (the same stages in the same order, each writing the outputs listed here).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DVC_ARTIFACTS = Path("artifacts")
"""The folder of the stores as dvc.yaml tracks them (its outs), relative to the project root:
the default ``storage.artifacts``, and where a revision's stores are read from."""

METRICS = Path("metrics")
"""The folder of the stages' metrics files, ``<stage>.json``, under ``storage.root``."""

ROLES = ("train", "val")
"""The two splits every stage knows: the dataset's training split and its validation split."""


@dataclass(frozen=True)
class Store:
    """A zarr store of one array per image: its folder name in ``storage.artifacts``, the stage
    that writes it, the split it covers (a role of :data:`ROLES`, None for both), and the params
    section whose settings its record of what it was made from holds (see
    :mod:`pipeline.core.provenance`)."""

    name: str
    stage: str
    role: str | None
    section: str


CAMS = Store("cams.zarr", "cams", None, "cams")
MASKS = Store("masks.zarr", "prune", "train", "prune")
CRF = Store("crf.zarr", "prune", "train", "prune")
REFINED = Store("refined.zarr", "refine", "train", "refine")
PSEUDO = Store("pseudo.zarr", "segment", "train", "segment")
SEGMENT = Store("segment.zarr", "segment", "val", "segment")
DEEPLAB = Store("deeplab.zarr", "deeplab", "val", "deeplab")
SUPERVISED = Store("supervised.zarr", "supervised", "val", "deeplab")
"""The cams stage's CAMs, the prune stage's reliable masks and the labels of its two CRFs alone
(before the confidence filters), the refine stage's dense labels of the training split, the
segment stage's training-split pseudo labels and val predictions, DeepLab's val predictions, and
those of the supervised reference (trained by the `deeplab:` recipe, hence its section)."""

STORES = (CAMS, MASKS, CRF, REFINED, PSEUDO, SEGMENT, DEEPLAB, SUPERVISED)

LABELS: dict[str, Store] = {store.name.removesuffix(".zarr"): store for store in (MASKS, CRF, REFINED, PSEUDO)}
"""The stores of training-split labels a network may learn from, by their name in a setting
(``segment.labels``, ``deeplab.labels``, ``refine.labels``): the store's own name, so that
dvc.yaml names the one a stage reads as ``artifacts/${segment.labels}.zarr``."""


@dataclass(frozen=True)
class Stage:
    """One DVC stage, run as ``python -m stages.<name>``: the stores it writes and, under
    ``storage.root``, its trained network (``weights``, beside which its record is written), its
    resumable training state, its metrics."""

    name: str
    stores: tuple[Store, ...] = ()
    weights: Path | None = None
    metrics: bool = True

    @property
    def module(self) -> str:
        return f"stages.{self.name}"

    @property
    def metrics_file(self) -> Path | None:
        return METRICS / f"{self.name}.json" if self.metrics else None

    @property
    def state(self) -> Path | None:
        """Where a trained stage keeps its last training state, from which a killed run resumes."""
        return None if self.weights is None else Path(f"checkpoints/state/{self.name}.pt")


STAGES = {stage.name: stage for stage in (
    Stage("data"),
    Stage("classifier", weights=Path("checkpoints/classifier.pth")),
    Stage("cams", (CAMS,)),
    Stage("prune", (MASKS, CRF)),
    Stage("refine", (REFINED,), weights=Path("checkpoints/refine.pth")),
    Stage("segment", (PSEUDO, SEGMENT), weights=Path("checkpoints/segment.pth")),
    Stage("deeplab", (DEEPLAB,), weights=Path("checkpoints/deeplab/model.pth")),
    Stage("supervised", (SUPERVISED,), weights=Path("checkpoints/supervised/model.pth")),
    Stage("overlays", metrics=False),
)}
"""The stages in pipeline order. The weights of deeplab and supervised live in a folder of their
own, which a disabled stage leaves empty (a DVC output must exist after every run)."""

CLASSIFIER_WEIGHTS = STAGES["classifier"].weights
SEGMENT_WEIGHTS = STAGES["segment"].weights
"""The networks other stages start from or check their inputs against."""
