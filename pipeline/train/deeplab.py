"""Stage 6, the optional two-step: DeepLabV3 retrained on the one-step predictions; and the same
network trained on the ground-truth masks, the fully supervised reference.

torchvision's DeepLabV3 head (ASPP with image pooling) on one of our dilated backbones, trained
with the one-step's balanced cross-entropy (background and foreground pixels averaged apart, see
:func:`pseudo_label_loss`) on the segment stage's pseudo labels for the training images (255
ignored), through the shared loop of :mod:`pipeline.train.loop` (polynomial decay, AMP on CUDA,
torchrun data parallel, resume). Inference averages the softmax over several scales and their
mirror images, then runs the optional dense CRF, through :func:`pipeline.train.predict.infer_split`.

The defaults follow the usual DeepLab recipe on VOC (ResNet-101 from ImageNet weights, 321
crops, batches of 10, 20k steps, scale jitter 0.5-1.5), with the new head at 10x the base rate as
in every trained stage here; the synthetic benchmark's ``params.yaml`` picks the small backbone.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from pipeline.core.distributed import Distributed
from pipeline.core.errors import InputError
from pipeline.core.io import digest_or_none
from pipeline.core.params import check_choice, check_scales
from pipeline.core.provenance import masks_identity, settings
from pipeline.core.registry import DEEPLAB_LABELS
from pipeline.core.run import DEFAULT_RUN, RunParams
from pipeline.core.store import ImageStore
from pipeline.data.datasets import SegmentationDataset
from pipeline.data.manifest import Manifest
from pipeline.method.cams import multiscale_cams
from pipeline.method.crf import BACKENDS
from pipeline.method.losses import reliable_counts, segmentation_ce
from pipeline.method.tags import TEST_TAGS
from pipeline.models import OnBackbone, build_backbone, fold_batch_norms, save_checkpoint
from pipeline.train.loop import (
    Checkpoint,
    TrainingParams,
    data_parallel,
    train,
    unwrap,
)
from pipeline.train.predict import ProbabilityFn
from pipeline.train.segment import training_key
from pipeline.train.segnet import upsample

ASPP_RATES_AT_STRIDE_8 = (12, 24, 36)
"""torchvision's ASPP dilations, for output stride 8; other strides scale them to the same field of view."""


@dataclass(frozen=True)
class DeepLabParams(TrainingParams):
    enabled: bool = False
    """Off by default: a plain ``dvc repro`` then only records ``{"enabled": false}``."""
    backbone: str = "resnet101"
    """small | resnet50 | resnet101 | mobilenet_v2 (a dilated backbone of :func:`pipeline.models.build_backbone`)."""
    weights: str | None = None
    """Backbone initialisation file: torchvision's ImageNet .pth, or a checkpoint of this pipeline
    whose backbone is taken (the segment stage's, where the backbones match: the one-step network's
    features, which DeepLab then refines on the pseudo-labels); None: from scratch."""
    output_stride: int = 8
    crop_size: int = 321
    scale_range: tuple[float, ...] = (0.5, 1.5)
    batch_size: int = 10
    steps: int = 20000
    lr: float = 0.001
    weight_decay: float = 1e-4
    scales: tuple[float, ...] = (1.0, 0.75, 1.25)
    """Inference scales whose softmax is averaged."""
    flip: bool = True
    """Training: random mirror crops; inference: the mirror images join the average."""
    crf: bool = True
    """Refine the val predictions with the dense CRF of the spec's inference settings."""
    crf_backend: str = "pydensecrf"
    """How that CRF is computed (:data:`pipeline.method.crf.BACKENDS`); torch on a GPU runs it there."""
    labels: str = "pseudo"
    """What the two-step learns from (:data:`~pipeline.core.registry.DEEPLAB_LABELS`): the segment stage's ``pseudo``
    labels, the refine stage's ``refined`` ones, or the prune stage's reliable ``masks``. The
    supervised reference learns from the ground truth whatever this says."""
    test_tags: str = "predicted"
    """How the val predictions are restricted (:data:`pipeline.method.tags.TEST_TAGS`): to the
    classes the classifier predicts for each image, or ``none``."""

    INFERENCE = ("scales", "crf", "crf_backend", "test_tags")
    """The fields that change only how the trained network predicts (see
    :func:`pipeline.train.segment.training_key`)."""
    TARGETS = ("labels",)
    """The fields that name what the network learns from: its record and its training state hold
    the fingerprint of those labels instead, so that the supervised reference, which learns the
    ground truth, keeps its network when they change."""

    def recipe(self) -> dict[str, Any]:
        """The recorded ``deeplab.*`` settings of a network trained by this recipe (less :attr:`TARGETS`)."""
        return {key: value for key, value in settings("deeplab", self).items()
                if key.removeprefix("deeplab.") not in self.TARGETS}

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("crf_backend", self.crf_backend, BACKENDS)
        check_choice("labels", self.labels, DEEPLAB_LABELS.names)
        check_choice("test_tags", self.test_tags, TEST_TAGS)
        check_scales("scales", self.scales)
        check_choice("output_stride", self.output_stride, (8, 16, 32))
        if self.batch_size < 2:
            raise ValueError("batch_size must be at least 2: the ASPP image-pooling branch normalises over the batch")


@dataclass(frozen=True)
class SupervisedParams:
    """The `supervised:` section: whether to train the fully supervised reference, the `deeplab:`
    recipe on the ground-truth masks (off by default: it needs every training image's mask)."""

    enabled: bool = False


class DeepLab(OnBackbone):
    """A backbone (its layers learn at the base rate) and DeepLabV3's head, whose batch norm
    always trains; ``freeze_bn`` keeps the backbone's at the statistics of its weights file."""

    def __init__(self, backbone: nn.Module, num_labels: int, output_stride: int, *, freeze_bn: bool) -> None:
        from torchvision.models.segmentation.deeplabv3 import DeepLabHead  # here: torchvision takes seconds to import

        super().__init__(backbone, freeze_bn=freeze_bn)
        rates = [rate * 8 // output_stride for rate in ASPP_RATES_AT_STRIDE_8]
        self.head = DeepLabHead(backbone.out_channels, num_labels, rates)

    def forward(self, images: Tensor) -> Tensor:
        """Logits (N, C + 1, h, w) of normalised images, at the output stride."""
        return self.head(self.backbone(images))


def build_deeplab(params: DeepLabParams, num_classes: int) -> DeepLab:
    """The network for ``num_classes`` foreground classes, its backbone from ``params.weights``
    (batch norm then frozen) or from PyTorch's default initialisation."""
    weights = Path(params.weights) if params.weights else None
    backbone = build_backbone(params.backbone, weights, params.output_stride)
    return DeepLab(backbone, num_classes + 1, params.output_stride, freeze_bn=weights is not None)


def pseudo_label_loss(logits: Tensor, labels: Tensor, counts: Tensor | None = None) -> Tensor:
    """The mean of the background pixels' mean cross-entropy and the foreground pixels' (255
    ignored; a group without pixels adds 0): half the one-step's :func:`segmentation_ce`, so that
    its scale is a plain average's. ``counts`` as there (data parallel training).

    Balanced as the one-step network was trained: with one average over all pixels, the
    background, most of every pseudo-label, outweighs the objects, and a class that fills a
    small part of few training images is learnt as background, the more so where the one-step's
    pseudo-labels already give part of those objects to the background (docs/method-notes.md, "Notes on the
    method's parameters").
    """
    return 0.5 * segmentation_ce(logits, labels, counts)


LabelReader = Callable[[str], np.ndarray]
"""Image id -> its uint8 (H, W) training mask (0 background, class index + 1, 255 ignored)."""


def pseudo_labels(store: ImageStore) -> tuple[LabelReader, str]:
    """The two-step's targets: a store of training labels (the stores of :data:`~pipeline.core.registry.LABELS`), and
    what identifies them (the store's fingerprint). The store must be complete."""
    store.require_complete()
    return (lambda image_id: store.read(image_id)[0]), str(store.fingerprint)


def ground_truth(manifest: Manifest, split: str) -> tuple[LabelReader, str]:
    """The supervised reference's targets: the ground-truth masks of ``split``, and what
    identifies them (:func:`masks_identity`; the images and tags key every record and training
    state already). Every image of the split must have one."""
    items = {item.id: item for item in manifest.split(split)}
    lacking = [image_id for image_id, item in items.items()
               if manifest.mask_path(image_id) is None or not item.has_mask]
    if lacking:
        raise InputError(manifest.source or manifest.name,
                         f"{len(lacking)} image(s) of split {split!r} have no ground-truth mask to train the "
                         f"supervised reference on, e.g. {lacking[0]!r}")
    return (lambda image_id: manifest.read_mask(items[image_id])), masks_identity(manifest, split)


def train_deeplab(manifest: Manifest, split: str, params: DeepLabParams, targets: tuple[LabelReader, str], out: Path,
                  state: Path, ctx: Distributed, device: torch.device, run: RunParams = DEFAULT_RUN,
                  progress: bool = True, stage: str = "deeplab") -> DeepLab:
    """Train (or resume training) on ``targets`` (:func:`pseudo_labels` or :func:`ground_truth`) of
    ``split`` for the stage ``stage`` (its progress bar's name, and whose code its state records);
    write the weights to ``out`` (rank 0)."""
    read_label, labels_key = targets
    torch.manual_seed(params.seed)
    net = build_deeplab(params, manifest.num_classes).to(device)
    dataset = SegmentationDataset(manifest, split, read_label, params.augmentation(), params.seed)
    loader = params.loader(dataset, ctx, device, run)
    model = data_parallel(net, ctx, device)
    optimizer = params.optimizer(net)

    def step(batch: dict[str, Any]) -> dict[str, Tensor]:
        labels = batch["label"].to(device)
        logits = upsample(model(batch["image"].to(device, non_blocking=True)), tuple(labels.shape[-2:]))
        return {"loss": pseudo_label_loss(logits, labels, ctx.average(reliable_counts(labels)))}

    recipe = {name: value for name, value in training_key(params).items() if name not in params.TARGETS}
    checkpoint = Checkpoint.of_stage(state, stage, manifest, split, recipe, labels_key, digest_or_none(params.weights))
    train(model, loader, step, optimizer, params.loop(stage, progress, run), checkpoint, ctx, device)
    if ctx.is_main:
        save_checkpoint(unwrap(net), out)
    return net


def deeplab_probabilities(net: DeepLab, scales: Sequence[float], flip: bool) -> ProbabilityFn:
    """The softmax averaged over ``scales`` (and mirror images), each upsampled to its input first,
    by a copy of ``net`` with its batch norms folded (see :func:`fold_batch_norms`); ``net`` stays
    as it is."""
    folded = fold_batch_norms(net)
    passes = len(scales) * (2 if flip else 1)

    def softmax(images: Tensor) -> Tensor:
        return upsample(folded(images), tuple(images.shape[-2:])).softmax(1)

    return lambda images: multiscale_cams(softmax, images, scales, flip) / passes
