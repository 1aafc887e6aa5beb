"""Stage 7 (beyond the paper): the refine stage's settings and the records of what it makes.

What the stage does is in :mod:`pipeline.train.affinity`. A stage that may learn from the
refined labels runs the record function here (:func:`expected_refined`) to check them, and so
depends on this module, not on the training and the walk: an edit of those reruns the refine
stage alone, and the stages that learn from its labels only where the labels change.

Defaults are the published ones where a measurement did not pick another (sources in the
fields' notes; the measurements in ``docs/results/refine.md``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from pipeline.core.io import file_digest
from pipeline.core.params import check_choice, check_range
from pipeline.core.provenance import MadeFrom, settings
from pipeline.core.registry import CAMS, LABELS, REFINE_LABELS, REFINE_WEIGHTS
from pipeline.core.store import ImageStore
from pipeline.data.manifest import Manifest
from pipeline.method.affinity import AFFINITIES
from pipeline.method.crf import BACKENDS, CRFParams, inference_crf
from pipeline.train.loop import TrainingParams

if TYPE_CHECKING:
    from pipeline.core.stage import Context

BACKGROUNDS = ("threshold", "power")
AUTO = "auto"
BACKGROUND_CANDIDATES = tuple(round(0.05 * step, 2) for step in range(1, 8))
"""The background thresholds ``bg_threshold: auto`` chooses among, 0.05 to 0.35: it gives objects
more of the walk where the CAMs cover little of them, never less than 0.35 does (a higher one,
chosen on MSRC's photos, cost its two-step; docs/results/refine.md)."""
TIED = 0.01
"""How near the weakest mean affinity across the labels' edges, relative to it, a candidate's must
be to count as tied with it; ``auto`` takes the highest tied candidate. Where the affinities barely
tell two thresholds apart (a flat curve, where one CPU model's rounding against another's moved
the minimum), the background keeps the most that the evidence allows."""
KEEPS = ("foreground", "none")


@dataclass(frozen=True)
class RefineParams(TrainingParams):
    crop_size: int = 512
    scale_range: tuple[float, ...] = (0.5, 1.5)
    batch_size: int = 32
    steps: int = 1000
    """IRN: 3 epochs of VOC's 10,582 train_aug images in batches of 32."""
    lr: float = 0.001
    """Adam's rate for the new layers (see :meth:`optimizer`); the backbone does not learn."""
    momentum: float = 0.9
    """Adam's first-moment decay (its beta1)."""
    weight_decay: float = 0.0
    labels: str = "crf"
    """What the affinities are learnt from (:data:`~pipeline.core.registry.LABELS`): the labels of
    the prune stage's two CRFs alone (``crf``, PSA's and IRN's affinity labels) or its reliable
    ``masks``."""
    affinity: str = "feature"
    """How the network scores a pair of cells (:data:`pipeline.method.affinity.AFFINITIES`): PSA's
    ``feature`` distance or IRN's class ``boundary`` on the line between them."""
    stride: int = 4
    """Pixels per cell of the grid the affinities are learnt and walked on (IRN's 4; PSA's 8)."""
    radius: int = 5
    """Neighbours within this many cells (PSA's and IRN's 5)."""
    beta: float = 10.0
    """Power of the affinities in the transition matrix (IRN's 10; PSA's 8)."""
    log_steps: int = 8
    """The walk takes ``2 ** log_steps`` steps (PSA's ``logt`` 8, IRN's ``exp_times`` 8) on a grid
    of ``walk_diagonal`` cells across and more."""
    walk_diagonal: float = 96.0
    """The grid diagonal, in cells, from which the walk takes all its ``2 ** log_steps`` steps; a
    smaller grid takes fewer, in proportion to its area (:meth:`steps_on`). 0: all of them on
    every grid, as PSA and IRN, whose images are VOC's."""
    background: str = "threshold"
    """How background competes with the walked CAMs: IRN's ``threshold`` (the tagged classes'
    CAMs walk alone, are divided by their largest value in the image, and background scores
    ``bg_threshold`` everywhere) or PSA's ``power`` (the score ``(1 - max_k cam_k) ** bg_power``
    walks beside them)."""
    bg_threshold: float | str = AUTO
    """The score background competes with (``background: threshold``): ``auto`` chooses it on the
    training split, without its ground truth, as the one of :data:`BACKGROUND_CANDIDATES` whose
    labels part neighbouring cells across the weakest learnt affinities
    (:func:`~pipeline.method.affinity.boundary_affinity`); or a fixed value (IRN's
    ``sem_seg_bg_thres`` is 0.25). How much of an object its CAM covers, and so where its walked
    scores cross a fixed threshold, differs between data sets (docs/results/refine.md, "The
    background threshold"). Unused with PSA's ``power`` background."""
    bg_power: float = 16.0
    """PSA's alpha in ``infer_aff.py``."""
    keep: str = "foreground"
    """What of the affinity labels (``labels``) the refined labels keep: ``foreground``, each of
    their regions of one class to which the walk gives that class on ``keep_share`` of its pixels
    or more keeps it whole and the walk labels the rest (:func:`keep_foreground`), or ``none``,
    the walk labels every pixel (PSA, IRN). The walk starts from the CAMs, coarser than the CRFs
    that made these labels: it leaves the far parts of an object to background, and where a
    neighbour's affinities are strong it carries that neighbour's class over the object. The
    labels' background is kept out of the rule, being where they are least sure of an object's
    extent, which is what the walk adds."""
    keep_share: float = 0.25
    """The least share of a region of the affinity labels the walk must give its class for the
    region to be kept (``keep: foreground``): a region the walk hardly touches is most often a
    CRF's stray patch, a smooth background painted as an object around a faint CAM
    (docs/results/refine.md)."""
    crf: bool = True
    """A dense CRF over the labels last (the inference CRF, :data:`~pipeline.method.crf.INFERENCE_CRF`,
    over background and the image's tags), as the random walk's successors do before training on
    its labels (Puzzle-CAM's and SPML's label scripts): the walk decides on the affinity grid, four
    pixels a cell, and the CRF moves its edges onto the image's."""
    crf_score: float = 0.9
    """The score each pixel's label gives its own class in that CRF's unary, the rest shared by
    the image's other labels: how firmly the CRF holds the walk's labels (docs/results/refine.md)."""
    crf_backend: str = "pydensecrf"
    """How that CRF is computed (:data:`pipeline.method.crf.BACKENDS`); torch on a GPU runs it there."""
    WALK = ("beta", "log_steps", "walk_diagonal", "background", "bg_threshold", "bg_power", "keep", "keep_share",
            "crf", "crf_score", "crf_backend")
    """The settings of the walk and of what follows it: the affinity network does not depend on
    them, so a change to one walks again without training again (:meth:`training_settings`)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("labels", self.labels, REFINE_LABELS.names)
        check_choice("affinity", self.affinity, tuple(AFFINITIES))
        check_choice("background", self.background, BACKGROUNDS)
        check_choice("keep", self.keep, KEEPS)
        check_range("keep_share", self.keep_share, 0, 1)
        check_range("stride", self.stride, 1)
        check_range("radius", self.radius, 2)
        check_range("beta", self.beta, 0)
        check_range("log_steps", self.log_steps, 0, 16)
        check_range("walk_diagonal", self.walk_diagonal, 0)
        if isinstance(self.bg_threshold, str):
            check_choice("bg_threshold", self.bg_threshold, (AUTO,))
        else:
            check_range("bg_threshold", self.bg_threshold, 0, 1)
        check_range("bg_power", self.bg_power, 0)
        check_range("crf_score", self.crf_score, 0.5, 1)
        check_choice("crf_backend", self.crf_backend, BACKENDS)

    def training_settings(self) -> RefineParams:
        """These settings with every :data:`WALK` setting at its default: what the affinity
        network is trained and recorded with."""
        defaults = RefineParams()
        return replace(self, **{name: getattr(defaults, name) for name in self.WALK})

    def crf_params(self) -> CRFParams | None:
        """The CRF over the labels (:attr:`crf`), or None when it is off."""
        return inference_crf(self.crf, self.crf_backend)

    @property
    def chooses_threshold(self) -> bool:
        """Whether the stage chooses the background threshold (``bg_threshold: auto`` against IRN's threshold)."""
        return self.background == "threshold" and self.bg_threshold == AUTO

    @property
    def walk_steps(self) -> int:
        return 2**self.log_steps

    def steps_on(self, grid: tuple[int, int]) -> int:
        """The walk's steps on a grid of ``grid`` cells: :attr:`walk_steps` times the grid's
        squared diagonal over ``walk_diagonal``'s, at most 1, at least one step.

        How far a walk carries the CAMs grows as the square root of its steps, so a fixed count
        carries them over a larger part of a smaller image: the published 256 steps, set on VOC's
        500x375 images (a grid of 125x94 at stride 4), spread the CAMs of neighbouring objects
        over each other on small images. Scaling the steps by the grid's area keeps the part of
        the image a walk reaches."""
        if self.walk_diagonal == 0:
            return self.walk_steps
        share = (grid[0] ** 2 + grid[1] ** 2) / self.walk_diagonal**2
        return max(1, round(self.walk_steps * min(1.0, share)))

    def optimizer(self, net: torch.nn.Module) -> torch.optim.Optimizer:
        """Adam over the new layers, not PSA's and IRN's SGD: at IRN's rate (0.1, no momentum) the
        feature distances of the new layers had barely moved after a few hundred steps, and their
        gradients are as small as one over the feature width (docs/results/refine.md)."""
        trainable = [parameter for parameter in net.parameters() if parameter.requires_grad]
        return torch.optim.Adam(trainable, lr=self.lr, betas=(self.momentum, 0.999), weight_decay=self.weight_decay)


def affinity_made_from(manifest: Manifest, split: str, params: RefineParams, classifier: Path,
                       labels: ImageStore) -> MadeFrom:
    """What the affinity network is made from: the images and tags of ``split``, the `refine:`
    settings it is trained with (:meth:`RefineParams.training_settings`), the classifier's weights
    and the labels it learns from."""
    return MadeFrom.made("refine", manifest, (split,), settings("refine", params.training_settings()),
                         {"classifier": file_digest(classifier), "labels": labels.fingerprint})


def refined_made_from(manifest: Manifest, split: str, params: RefineParams, weights: Path, cams: ImageStore,
                      labels: ImageStore) -> MadeFrom:
    """What the refined labels are made from: the images and tags of ``split``, the `refine:`
    settings, the affinity network, the CAMs it walks and, where they keep some of them
    (``params.keep``), the affinity labels ``labels``."""
    inputs = {"weights": file_digest(weights), "cams.zarr": cams.fingerprint}
    if params.keep != "none":
        inputs["labels"] = labels.fingerprint
    return MadeFrom.made("refine", manifest, (split,), settings("refine", params), inputs)


def expected_refined(ctx: Context) -> MadeFrom:
    """The record a reader must find in the refined labels now (registered in :mod:`pipeline.core.registry`)."""
    params = ctx.params(RefineParams, "refine")
    return refined_made_from(ctx.manifest, ctx.dataset.train_split, params, ctx.file(REFINE_WEIGHTS),
                             ctx.storage.store(CAMS), ctx.storage.store(LABELS[params.labels]))
