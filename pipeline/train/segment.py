"""Stage 4 and 5: the segmentation branch trained, staged or end to end.

``staged``: the head learns from the reliable regions mined once by the prune stage.
``end_to_end`` (the paper): every step adds the classification loss, and the reliable regions
of the batch are re-mined from the CAMs of that step's own forward pass with those of the other
scales, as RRM's code does (see :class:`Miner`), the dense CRF work for the batch running in
parallel worker processes.

Both minimise the balanced cross-entropy on reliable pixels plus the gated dense energy on all
pixels (:mod:`pipeline.method.losses`). The network: :mod:`pipeline.train.segnet`; the miner:
:mod:`pipeline.train.miner`; its predictions: :mod:`pipeline.train.predict`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.core.distributed import Distributed
from pipeline.core.io import IGNORE, digest_or_none
from pipeline.core.params import check_choice, check_range, check_scales
from pipeline.core.provenance import MadeFrom, settings
from pipeline.core.registry import SEGMENT_LABELS, SEGMENT_WEIGHTS
from pipeline.core.run import DEFAULT_RUN, RunParams
from pipeline.core.store import ImageStore
from pipeline.data.datasets import SegmentationDataset
from pipeline.data.manifest import Manifest
from pipeline.method.cams import image_size
from pipeline.method.crf import BACKENDS
from pipeline.method.losses import (
    DENSE_ENERGY_WEIGHT,
    DenseEnergyLoss,
    check_method,
    crop_reach,
    crop_weight,
    reliable_counts,
    segmentation_ce,
)
from pipeline.method.prune import PruneParams
from pipeline.method.tags import TEST_TAGS
from pipeline.models import SegNet, save_checkpoint
from pipeline.train.classifier import ClassifierParams
from pipeline.train.loop import Checkpoint, TrainingParams, data_parallel, train, unwrap
from pipeline.train.miner import Miner
from pipeline.train.predict import predictions_made_from
from pipeline.train.segnet import build_segnet, tag_mask, upsample

if TYPE_CHECKING:
    from pipeline.core.stage import Context


@dataclass(frozen=True)
class SegmentParams(TrainingParams):
    scale_range: tuple[float, ...] = (0.7, 1.3)
    batch_size: int = 8
    lr: float = 0.001
    momentum: float = 0.0
    """The reference's optimiser: its SGD gets the weight decay (1e-5) as the momentum, practically
    none. A pretrained backbone keeps its features at its rate; 0.9 gives ten times the step."""
    weight_decay: float = 1e-5
    mode: str = "staged"
    """staged: learn from the stored training ``labels``; end_to_end: re-mine the reliable regions
    every step (the paper)."""
    labels: str = "masks"
    """staged only: what the head learns from: the prune stage's reliable ``masks`` (the paper) or
    the refine stage's dense ``refined`` labels
    (:data:`~pipeline.core.registry.SEGMENT_LABELS`)."""
    checkpoint: str | None = None
    """A trained segmentation network to start from instead of the classifier's weights: this
    project's ``checkpoints/segment.pth`` or RRM's released weights (its flat key names). With
    ``steps: 0`` the stage only predicts and scores it."""
    dense_weight: float = DENSE_ENERGY_WEIGHT
    """Weight of the dense energy at RRM's 321-pixel crops, with the exact kernel (5e-8 matches the
    paper's 1e-7, see :mod:`pipeline.method.losses`); other crop sizes get :func:`~pipeline.method.losses.crop_weight`
    of it, the same pull against the cross-entropy."""
    sigma_rgb: float = 15.0
    sigma_xy: float = 100.0
    """The energy kernel's spatial sigma at RRM's 321-pixel crops, in pixels; other crop sizes get
    :func:`~pipeline.method.losses.crop_reach` of it, the same share of the crop."""
    energy_scale: float = 0.5
    energy_method: str = "auto"
    energy_tags: bool = True
    """Count only background and each crop's tagged classes in the dense energy (see :func:`tag_mask`)."""
    cls_weight: float = 1.0
    """end_to_end only: weight of the classification loss."""
    mining_scales: tuple[float, ...] = (1.0, 0.5, 1.5, 2.0)
    """end_to_end only: scales of the CAMs the reliable regions are re-mined from; 1.0 is the
    training pass itself (see :class:`Miner`), so it must be one of them."""
    crf: bool = True
    """Refine val predictions and pseudo labels with the dense CRF of the spec's inference settings."""
    crf_backend: str = "pydensecrf"
    """How that CRF is computed (:data:`pipeline.method.crf.BACKENDS`); torch on a GPU runs it there."""
    test_tags: str = "predicted"
    """How the val predictions are restricted (:data:`pipeline.method.tags.TEST_TAGS`): to the
    classes the classifier predicts for each image, or ``none``."""

    INFERENCE = ("crf", "crf_backend", "test_tags")
    """The fields that change only how the trained network predicts: a change to them keeps its
    training (see :func:`training_key`)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("crf_backend", self.crf_backend, BACKENDS)
        check_choice("mode", self.mode, ("staged", "end_to_end"))
        check_choice("labels", self.labels, SEGMENT_LABELS.names)
        check_choice("test_tags", self.test_tags, TEST_TAGS)
        check_method(self.energy_method)
        for name in ("dense_weight", "cls_weight"):
            check_range(name, getattr(self, name), 0)
        check_range("energy_scale", self.energy_scale, 0.05, 1)
        check_scales("mining_scales", self.mining_scales)
        if 1.0 not in self.mining_scales:
            raise ValueError(f"mining_scales={tuple(self.mining_scales)!r} must hold 1.0, the training pass's own CAMs")

    def energy(self) -> DenseEnergyLoss:
        """The dense energy of these settings carried to ``crop_size``: its kernel's reach by
        :func:`crop_reach`, its weight by :func:`crop_weight`."""
        sigma_xy = crop_reach(self.sigma_xy, self.crop_size)
        weight = crop_weight(self.dense_weight, self.crop_size, self.energy_scale, sigma_xy)
        return DenseEnergyLoss(weight, self.sigma_rgb, sigma_xy, self.energy_scale, self.energy_method)


def training_key(params: Any) -> dict[str, Any]:
    """A stage's settings less those that change only how its trained network predicts (its
    ``INFERENCE`` fields): the identity of its training state, so that a change to the inference
    settings alone predicts again from the finished training instead of training anew."""
    return {name: value for name, value in asdict(params).items() if name not in params.INFERENCE}


def train_segmentation(manifest: Manifest, split: str, classifier: ClassifierParams, params: SegmentParams,
                       prune: PruneParams, init: Path, targets: ImageStore | None, out: Path, state: Path,
                       ctx: Distributed, device: torch.device, run: RunParams = DEFAULT_RUN,
                       progress: bool = True) -> SegNet:
    """Train the segmentation branch (either mode) from ``params.checkpoint`` or else the
    classifier's weights ``init``, write its weights to ``out`` (rank 0); returns the network.
    Staged, it learns from the labels of ``targets`` (a checked store of training labels). With
    ``steps: 0`` the checkpoint is written as it is."""
    torch.manual_seed(params.seed)
    checkpoint = Path(params.checkpoint) if params.checkpoint else None
    net = build_segnet(classifier, manifest.num_classes, init, checkpoint).to(device)
    if params.steps > 0:
        starts = [digest_or_none(init), digest_or_none(checkpoint)]
        _fit(net, manifest, split, classifier, params, prune, targets, starts, state, ctx, device, run, progress)
    if ctx.is_main:
        save_checkpoint(unwrap(net), out)
    return net


def _fit(net: SegNet, manifest: Manifest, split: str, classifier: ClassifierParams, params: SegmentParams,
         prune: PruneParams, targets: ImageStore | None, starts: list[str | None], state: Path, ctx: Distributed,
         device: torch.device, run: RunParams, progress: bool) -> None:
    """The training loop of :func:`train_segmentation`; ``starts``, the digests of the weights the
    network starts from, key its training state with the settings and the targets."""
    staged = params.mode == "staged"
    if staged:
        targets.require_complete()

        def read_label(image_id: str) -> np.ndarray:
            return targets.read(image_id)[0]
    else:
        def read_label(image_id: str) -> np.ndarray:  # mined anew at every step
            return np.full(image_size(manifest.image_path(image_id)), IGNORE, dtype=np.uint8)
    dataset = SegmentationDataset(manifest, split, read_label, params.augmentation(), params.seed)
    loader = params.loader(dataset, ctx, device, run)
    model = data_parallel(net, ctx, device, find_unused=staged)  # staged: the classification layer has no loss
    optimizer = params.optimizer(net)
    energy = params.energy()
    miner = None if staged else Miner(prune, params.mining_scales, run.local_workers(), device)

    def step(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        valid = batch["valid"].to(device)
        output = model(batch["image"].to(device, non_blocking=True))
        labels = (batch["label"] if miner is None else miner(net, batch, output.cams)).to(device)
        seg = upsample(output.seg, tuple(labels.shape[-2:]))
        probs = seg.softmax(1)
        if params.energy_tags:
            probs = probs * tag_mask(batch["labels"].to(device))[:, :, None, None]
        losses = {"ce": segmentation_ce(seg, labels, ctx.average(reliable_counts(labels))),
                  "energy": energy(batch["rgb"].to(device).float(), probs, valid, labels)}
        if miner is not None:
            losses["cls"] = params.cls_weight * F.multilabel_soft_margin_loss(output.logits.float(),
                                                                              batch["labels"].to(device))
        return {"loss": sum(losses.values()), **losses}

    settings = params.loop(f"segment {params.mode}", progress, run)
    checkpoint = Checkpoint.of_stage(state, "segment", manifest, split, training_key(params),
                                     asdict(prune) if miner else targets.fingerprint, asdict(classifier), starts)
    try:
        train(model, loader, step, optimizer, settings, checkpoint, ctx, device)
    finally:
        if miner is not None:
            miner.close()


def expected_pseudo(ctx: Context) -> MadeFrom:
    """The record a reader must find in the pseudo-labels now (registered in :mod:`pipeline.core.registry`)."""
    return predictions_made_from("segment", ctx.manifest, ctx.dataset.train_split,
                                 settings("segment", ctx.params(SegmentParams, "segment")), ctx.file(SEGMENT_WEIGHTS))
