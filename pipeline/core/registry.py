"""The stages of the pipeline, each declared once: what it reads, which params sections change its
outputs, what it writes, what it reports. Everything else reads this table: the runner that
gives each stage's body its context and checks its inputs (:mod:`pipeline.core.stage`),
``dvc.yaml``, which is generated from it (``rrm dvc-yaml``, :mod:`pipeline.core.dvcfile`),
inspection and the report.

It holds data alone and imports nothing of the method: a store or a checkpoint names the
function that gives the record it must hold now (``module:function``, see
:mod:`pipeline.core.provenance`), which the runner imports only for a stage that reads it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DVC_ARTIFACTS = Path("artifacts")
"""The folder of the stores as dvc.yaml tracks them (its outs), relative to the project root:
the default ``storage.artifacts``, and where a revision's stores are read from."""

METRICS = Path("metrics")
SCORES = Path("scores")
"""The folders, under ``storage.root``, of each stage's scores: ``scores/<stage>.json`` holds all
of them (per class, per split, counts, seconds), what the report and the plots read;
``metrics/<stage>.json`` holds its headline (:attr:`Stage.headline`), DVC's metrics, short
enough for ``dvc exp show`` and ``dvc metrics diff`` to be read."""

ROLES = ("train", "val")
"""The two splits every stage knows: the dataset's training split and its validation split."""


@dataclass(frozen=True)
class Checkpoint:
    """A network a stage trains, under ``storage.root``, with its record beside it
    (``classifier.pth`` -> ``classifier.json``); ``record``: the function that gives the record
    it must hold now, for the stages that start from it."""

    path: Path
    stage: str
    record: str | None = None

    @property
    def outs(self) -> tuple[Path, ...]:
        """What DVC tracks of it: the weights and their record, or the folder of its own that a
        switched-off stage leaves empty (a DVC output must exist after every run)."""
        own_folder = self.path.parent.name == self.stage
        return (self.path.parent,) if own_folder else (self.path, self.path.with_suffix(".json"))


@dataclass(frozen=True)
class Store:
    """A zarr store of one array per image: its folder name in ``storage.artifacts``, the stage
    that writes it, the split it covers (a role of :data:`ROLES`, None for both), the params
    section its record of settings holds, and how inspection names it (``shown``, ``title``).

    ``record``: the function that gives the record a reader must find in it now; ``inputs``: the
    inputs that record names, by the names it gives them (what inspection looks up to hold a
    store to the current run). DVC keeps a copy of each version of every store in its cache:
    what a queued experiment's workspace gets its inputs from, so that a threshold tried in one
    computes no CAMs.
    """

    name: str
    stage: str
    role: str | None
    section: str
    record: str | None = None
    inputs: tuple[tuple[str, Checkpoint | Store], ...] = ()
    shown: str | None = None
    title: str | None = None


@dataclass(frozen=True)
class Labels:
    """Training-split labels a stage learns from, the store that ``setting`` names among
    ``choices`` (dvc.yaml reads ``artifacts/${setting}.zarr``)."""

    setting: str
    choices: tuple[Store, ...]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(label_name(store) for store in self.choices)


@dataclass(frozen=True)
class File:
    """A file a stage reads that no store or checkpoint stands for (under the project root)."""

    path: str


@dataclass(frozen=True)
class Plot:
    """A plot file a stage writes (JSON rows, or a folder of PNGs), with how DVC draws it."""

    path: Path
    options: dict[str, Any] = field(default_factory=dict, hash=False)


@dataclass(frozen=True)
class Score:
    """A report row: the value at ``key`` (a path of nested keys) in the stage's metrics file.

    ``settings``: keys of the metrics file whose values the row names beside its label, where the
    file has them (what the val predictions were restricted to, what the two-step learnt from);
    the label itself stays the same, so that a reader of ``--json`` finds a row by it.
    ``optional``: a row left out where the stage ran and its file lacks the key (a diagnostic of
    another setting).
    """

    label: str
    key: tuple[str, ...]
    settings: tuple[str, ...] = ()
    optional: bool = False


MANIFEST = File("${dataset.manifest}")

CLASSIFIER_WEIGHTS = Path("checkpoints/classifier.pth")
REFINE_WEIGHTS = Path("checkpoints/refine.pth")
SEGMENT_WEIGHTS = Path("checkpoints/segment.pth")
CLASSIFIER = Checkpoint(CLASSIFIER_WEIGHTS, "classifier", "pipeline.train.classifier:expected_classifier")
AFFINITY = Checkpoint(REFINE_WEIGHTS, "refine")
SEGNET = Checkpoint(SEGMENT_WEIGHTS, "segment")
DEEPLAB_NET = Checkpoint(Path("checkpoints/deeplab/model.pth"), "deeplab")
SUPERVISED_NET = Checkpoint(Path("checkpoints/supervised/model.pth"), "supervised")
"""The trained networks; the classifier is the one other stages start from and check."""

CAMS = Store("cams.zarr", "cams", None, "cams", "pipeline.method.cams:expected_cams",
             (("classifier", CLASSIFIER),))
CRF = Store("crf.zarr", "crf", "train", "prune", "pipeline.method.mining:expected_crf", (("cams.zarr", CAMS),))
CRF_MAPS = Store("crfmaps.zarr", "crf", "train", "prune", "pipeline.method.mining:expected_crf",
                 (("cams.zarr", CAMS),))
MASKS = Store("masks.zarr", "prune", "train", "prune", "pipeline.method.mining:expected_masks",
              (("crfmaps.zarr", CRF_MAPS),), "reliable", "reliable")
REFINED = Store("refined.zarr", "refine", "train", "refine", "pipeline.train.refine:expected_refined",
                (("weights", AFFINITY), ("cams.zarr", CAMS)), "refined", "refined")
PSEUDO = Store("pseudo.zarr", "segment", "train", "segment", "pipeline.train.segment:expected_pseudo",
               (("weights", SEGNET),), "pseudo", "segment")
SEGMENT = Store("segment.zarr", "segment", "val", "segment", None, (("weights", SEGNET),), "segment", "segment")
DEEPLAB = Store("deeplab.zarr", "deeplab", "val", "deeplab", None, (("weights", DEEPLAB_NET),), "deeplab", "deeplab")
SUPERVISED = Store("supervised.zarr", "supervised", "val", "deeplab", None, (("weights", SUPERVISED_NET),),
                   "supervised", "supervised")
"""The cams stage's CAMs (and each image's class scores), the crf stage's labels of the two CRFs
alone (before the confidence filters) and the maps the rule reads (see
:mod:`pipeline.method.mining`), the prune stage's reliable masks, the
refine stage's dense labels of the training split, the segment stage's training-split pseudo labels and val predictions,
DeepLab's val predictions, and those of the supervised reference (trained by the `deeplab:`
recipe, hence its section)."""

STORES = (CAMS, CRF, CRF_MAPS, MASKS, REFINED, PSEUDO, SEGMENT, DEEPLAB, SUPERVISED)

CRF_SETTINGS = tuple(f"prune.{key}" for key in (
    "la_alpha", "ha_alpha", "crf_iterations", "crf_gaussian_sxy", "crf_gaussian_compat", "crf_bilateral_sxy",
    "crf_bilateral_srgb", "crf_bilateral_compat", "crf_backend"))
"""The settings of the `prune:` section the two CRFs depend on (the crf stage's DVC params); the
others are the rule's thresholds, which only the prune stage reads."""

SHOWN = tuple(store for store in STORES if store.shown is not None)
"""Every store of masks that inspection shows, in pipeline order."""


def label_name(store: Store) -> str:
    """A store of training labels by its name in a setting: the store's own name (``masks``)."""
    return store.name.removesuffix(".zarr")


LABELS: dict[str, Store] = {label_name(store): store for store in (MASKS, CRF, REFINED, PSEUDO)}
"""The stores of training-split labels a network may learn from, by their name in a setting."""

REFINE_LABELS = Labels("refine.labels", (CRF, MASKS))
SEGMENT_LABELS = Labels("segment.labels", (MASKS, REFINED))
DEEPLAB_LABELS = Labels("deeplab.labels", (PSEUDO, REFINED, MASKS))
"""What each trained stage may learn from, the default first."""

CAMS_CURVE = Plot(Path("plots/cams_threshold.json"), {"cache": False, "x": "threshold", "y": "val"})
PRUNE_PER_CLASS = Plot(Path("plots/prune_per_class.json"), {
    "cache": False, "template": "bar_horizontal", "title": "Precision of the reliable pixels per class",
    "x": "precision", "y": "class"})
OVERLAYS = Plot(Path("plots/overlays"))
STATS_PER_CLASS = Plot(Path("plots/stats_per_class.json"))
TRAINING_LABELS = Plot(Path("plots/train_labels_per_class.json"))
SWEEP = Plot(Path("plots/sweep.json"))
SWEEP_CURRENT = Plot(Path("plots/sweep_current.json"))
"""The plot files the stages write, under ``storage.root``, and those of ``rrm sweep`` (every
point of its grid, and the params file's current setting alone, drawn in a colour of its own)."""

Read = Store | Checkpoint | Labels | File


@dataclass(frozen=True)
class Stage:
    """One DVC stage, run as ``python -m stages.<name>`` (its body, over the runner's context).

    ``params``: the params sections (or ``section.key``) that change its outputs, DVC's params;
    ``reads``: its inputs besides the code, each checked by the runner when the body asks for it
    (the function that checks it is part of the stage's code), unless ``checks`` is false (the
    overlays, which inspection reads as they are); ``stores``, ``checkpoint``, ``plots``, ``outs``:
    what it writes (``outs``, other paths as dvc.yaml names them); ``metrics``: whether it writes
    ``scores/<name>.json`` and ``metrics/<name>.json``; ``headline``: the keys (dotted paths) of its
    scores that its metrics file keeps (with ``enabled`` and ``seconds``, where the scores have
    them); ``options``: its command-line options (``skip_bad``, ``scheduler``); ``scores``: the
    report's rows read from its scores.
    """

    name: str
    params: tuple[str, ...] = ()
    reads: tuple[Read, ...] = ()
    stores: tuple[Store, ...] = ()
    checkpoint: Checkpoint | None = None
    plots: tuple[Plot, ...] = ()
    outs: tuple[str, ...] = ()
    metrics: bool = True
    headline: tuple[str, ...] = ()
    options: tuple[str, ...] = ("skip_bad",)
    checks: bool = True
    scores: tuple[Score, ...] = ()
    comment: str = ""

    @property
    def module(self) -> str:
        return f"stages.{self.name}"

    @property
    def script(self) -> Path:
        return Path("stages") / f"{self.name}.py"

    @property
    def weights(self) -> Path | None:
        return None if self.checkpoint is None else self.checkpoint.path

    @property
    def metrics_file(self) -> Path | None:
        return METRICS / f"{self.name}.json" if self.metrics else None

    @property
    def scores_file(self) -> Path | None:
        return SCORES / f"{self.name}.json" if self.metrics else None

    @property
    def state(self) -> Path | None:
        """Where a trained stage keeps its last training state, from which a killed run resumes."""
        return None if self.checkpoint is None else Path(f"checkpoints/state/{self.name}.pt")


STAGES = {stage.name: stage for stage in (
    Stage("data", params=("data",), outs=("${data.root}", "${data.manifest}"), options=(),
          headline=("images",),
          comment="the synthetic benchmark; a dataset of one's own starts at the classifier"),
    Stage("classifier", params=("dataset", "classifier"), reads=(MANIFEST,), checkpoint=CLASSIFIER, headline=("map",),
          scores=(Score("Classifier mAP (val)", ("map",)),)),
    Stage("cams", params=("dataset", "classifier.backbone", "classifier.output_stride", "cams"),
          reads=(MANIFEST, CLASSIFIER), stores=(CAMS,), plots=(CAMS_CURVE,), headline=("miou", "train.miou"),
          scores=(Score("CAM mIoU (val)", ("miou",)), Score("CAM mIoU (train)", ("train", "miou")))),
    Stage("crf", params=("dataset", *CRF_SETTINGS), reads=(MANIFEST, CAMS), stores=(CRF, CRF_MAPS),
          options=("scheduler", "skip_bad"), headline=("crf.precision", "crf.coverage"),
          comment="the two dense CRFs of each training image, kept for the prune stage's rule"),
    Stage("prune", params=("dataset", "prune"), reads=(MANIFEST, CRF_MAPS), stores=(MASKS,),
          plots=(PRUNE_PER_CLASS,), headline=("precision", "coverage"),
          scores=(Score("Reliable-region precision (train)", ("precision",)),
                  Score("Reliable-region coverage (train)", ("coverage",)))),
    Stage("refine", params=("dataset", "classifier.backbone", "classifier.output_stride", "refine"),
          reads=(MANIFEST, CLASSIFIER, CAMS, REFINE_LABELS), stores=(REFINED,), checkpoint=AFFINITY, headline=("miou",),
          scores=(Score("Refined-label mIoU (train)", ("miou",)),)),
    Stage("segment", params=("dataset", "classifier.backbone", "classifier.output_stride", "classifier.freeze_bn",
                             "prune", "segment"),
          reads=(MANIFEST, CLASSIFIER, CAMS, SEGMENT_LABELS), stores=(PSEUDO, SEGMENT), checkpoint=SEGNET,
          headline=("miou", "miou_no_crf", "pseudo.miou"),
          scores=(Score("One-step mIoU without CRF (val)", ("miou_no_crf",), ("test_tags",)),
                  Score("One-step mIoU (val)", ("miou",), ("test_tags", "labels")),
                  Score("One-step mIoU without CRF, every class (val)", ("miou_all_classes_no_crf",), optional=True),
                  Score("One-step mIoU without CRF, predicted tags (val)", ("miou_predicted_tags_no_crf",),
                        optional=True),
                  Score("Pseudo-label mIoU (train)", ("pseudo", "miou")))),
    Stage("deeplab", params=("dataset", "deeplab"), reads=(MANIFEST, CAMS, DEEPLAB_LABELS, File(str(SEGMENT_WEIGHTS))),
          stores=(DEEPLAB,), checkpoint=DEEPLAB_NET, headline=("miou", "miou_no_crf"),
          comment="the optional two-step; off (deeplab.enabled: false) it only writes {enabled: false}",
          scores=(Score("Two-step mIoU without CRF, DeepLab (val)", ("miou_no_crf",), ("test_tags",), optional=True),
                  Score("Two-step mIoU, DeepLab (val)", ("miou",), ("test_tags", "labels")),
                  Score("Two-step mIoU without CRF, every class (val)", ("miou_all_classes_no_crf",), optional=True),
                  Score("Two-step mIoU without CRF, predicted tags (val)", ("miou_predicted_tags_no_crf",),
                        optional=True))),
    Stage("supervised", params=("dataset", "deeplab", "supervised"), reads=(MANIFEST, CAMS, File(str(SEGMENT_WEIGHTS))),
          stores=(SUPERVISED,), checkpoint=SUPERVISED_NET, headline=("miou",),
          comment="the optional fully supervised reference: the deeplab recipe on the ground truth",
          scores=(Score("Supervised reference mIoU (val)", ("miou",)),)),
    Stage("overlays", params=("dataset", "cams", "prune", "refine", "segment", "deeplab", "overlays"),
          reads=(MANIFEST, File("scores/cams.json"), CAMS, *SHOWN), plots=(OVERLAYS, STATS_PER_CLASS, TRAINING_LABELS),
          metrics=False, options=(), checks=False,
          comment="pictures and per-class figures of every stage's masks, for `dvc plots show`"),
)}
"""The stages in pipeline order. deeplab and supervised read ``checkpoints/segment.pth`` as the
``deeplab.weights`` of the synthetic default and the MSRC preset."""

PLOTS = (
    ("CAM mIoU by background threshold", {"template": "linear", "x": "threshold",
                                           "y": {str(CAMS_CURVE.path): ["train", "val"]}}),
    ("Reliable-region coverage per class", {"template": "bar_horizontal", "x": "coverage",
                                            "y": {str(PRUNE_PER_CLASS.path): "class"}}),
    ("IoU per class and stage (unreliable pixels count as misses)", {
        "template": "bar_horizontal", "x": "iou", "y": {str(STATS_PER_CLASS.path): "bar"}}),
    ("IoU per class of the training-split labels (CAM, reliable, refined, one-step pseudo)", {
        "template": "bar_horizontal", "x": "iou", "y": {str(TRAINING_LABELS.path): "bar"}}),
    ("Precision per class and stage", {"template": "bar_horizontal", "x": "precision",
                                       "y": {str(STATS_PER_CLASS.path): "bar"}}),
    ("Reliable regions, precision against coverage by threshold (rrm sweep; the current setting apart)", {
        "template": "scatter", "x": "coverage",
        "y": {str(SWEEP.path): "precision", str(SWEEP_CURRENT.path): "precision"}}),
    (str(OVERLAYS.path), None),
)
"""dvc.yaml's plots: what ``dvc plots show`` draws, by title (the overlays: a folder of panels)."""
