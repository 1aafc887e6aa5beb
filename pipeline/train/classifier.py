"""Stage 1: the multi-label classifier whose class activation maps seed everything else.

Backbone -> global average pooling -> bias-free 1x1 conv, trained with the multi-label
soft-margin loss; SGD with polynomial decay, 10x/20x rates for the new layer, batch norm frozen
for a pretrained backbone (PSA's and RRM's recipe).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from pipeline.core.distributed import Distributed
from pipeline.core.io import digest_or_none
from pipeline.core.provenance import MadeFrom, settings
from pipeline.core.run import DEFAULT_RUN, RunParams
from pipeline.data.datasets import Augmentation, ClassificationDataset, ImageDataset
from pipeline.data.manifest import Manifest
from pipeline.method.metrics import classification_scores
from pipeline.models import (
    CAMNet,
    SegNet,
    backbone_modules,
    build_backbone,
    load_checkpoint,
    save_checkpoint,
)
from pipeline.train.loop import (
    Checkpoint,
    TrainingParams,
    data_parallel,
    train,
    unwrap,
)

if TYPE_CHECKING:
    from pipeline.core.stage import Context


@dataclass(frozen=True)
class ClassifierParams(TrainingParams):
    backbone: str = "small"
    """small | resnet38 | resnet50 | resnet101 | mobilenet_v2 (the names of :data:`pipeline.models.BACKBONES`)."""
    weights: str | None = None
    """Backbone initialisation file (ImageNet .params for resnet38, torchvision .pth); None: from scratch."""
    checkpoint: str | None = None
    """A whole trained classifier to start from (ours, or PSA's res38_cls.pth), or the classifier
    part of a segmentation network (ours, or RRM's released weights); with steps 0, used as is."""
    output_stride: int = 8
    freeze_bn: bool = False
    frozen: tuple[str, ...] = ()
    """Backbone modules that do not train (PSA: ``[conv1a, b2, b2_1, b2_2]`` of ResNet-38): no
    gradient, no weight decay, in eval mode (see :class:`~pipeline.models.OnBackbone`)."""
    resize_long: tuple[int, ...] | None = None
    """PSA's rescaling: the long side resized to a random length in ``[low, high]`` pixels, so that
    objects come at one scale whatever the photo's resolution; ``scale_range`` must then be
    ``[1.0, 1.0]`` (one rescaling at a time). None: ``scale_range`` alone."""
    color_jitter: tuple[float, ...] | None = None
    """``[brightness, contrast, saturation, hue]`` of torchvision's colour jitter (PSA: ``[0.3, 0.3,
    0.3, 0.1]``, see :func:`~pipeline.data.datasets.jitter_colours`). None: the colours as they are."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.resize_long is not None and tuple(self.scale_range) != (1.0, 1.0):
            raise ValueError(f"resize_long={tuple(self.resize_long)!r} and scale_range={tuple(self.scale_range)!r} "
                             "both rescale the image: with resize_long, set scale_range: [1.0, 1.0]")
        self.augmentation()
        if self.frozen:
            with torch.device("meta"):
                backbone_modules(build_backbone(self.backbone, None, self.output_stride), self.frozen)

    def augmentation(self) -> Augmentation:
        return Augmentation(self.crop_size, tuple(self.scale_range), self.flip, self.resize_long, self.color_jitter)


def starting_weights(params: ClassifierParams) -> dict[str, str | None]:
    """The digests of the files the classifier starts from (None for a setting left empty)."""
    return {"weights": digest_or_none(params.weights), "checkpoint": digest_or_none(params.checkpoint)}


def classifier_made_from(manifest: Manifest, split: str, params: ClassifierParams) -> MadeFrom:
    """What the classifier stage's network is made from: the images and tags of ``split``, the
    `classifier:` settings and the files it starts from (see :mod:`pipeline.core.provenance`)."""
    return MadeFrom.made("classifier", manifest, (split,), settings("classifier", params), starting_weights(params))


def expected_classifier(ctx: Context) -> MadeFrom:
    """The record the classifier's weights must have now (registered in :mod:`pipeline.core.registry`)."""
    return classifier_made_from(ctx.manifest, ctx.dataset.train_split, ctx.params(ClassifierParams, "classifier"))


def build_classifier(params: ClassifierParams, num_classes: int) -> CAMNet:
    """The network with its initial weights: a whole checkpoint if given, else the backbone's."""
    weights = Path(params.weights) if params.weights and not params.checkpoint else None
    net = CAMNet(build_backbone(params.backbone, weights, params.output_stride), num_classes,
                 freeze_bn=params.freeze_bn, frozen=params.frozen)
    if params.checkpoint:
        load_checkpoint(net, params.checkpoint, set_aside=SegNet.seg_head)
    return net


def load_classifier(params: ClassifierParams, num_classes: int, weights: Path) -> CAMNet:
    """The trained classifier written by the classifier stage, for inference."""
    net = CAMNet(build_backbone(params.backbone, None, params.output_stride), num_classes, freeze_bn=False)
    load_checkpoint(net, weights)
    return net.eval()


def train_classifier(manifest: Manifest, split: str, params: ClassifierParams, out: Path, state: Path,
                     ctx: Distributed, device: torch.device, run: RunParams = DEFAULT_RUN,
                     progress: bool = True) -> CAMNet:
    """Train (or resume training) and write the final weights to ``out`` (rank 0)."""
    torch.manual_seed(params.seed)
    net = build_classifier(params, manifest.num_classes).to(device)
    if params.steps > 0:
        dataset = ClassificationDataset(manifest, split, params.augmentation(), params.seed)
        loader = params.loader(dataset, ctx, device, run)
        model = data_parallel(net, ctx, device)
        optimizer = params.optimizer(net)

        def step(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
            logits = model(batch["image"].to(device, non_blocking=True))
            return {"loss": F.multilabel_soft_margin_loss(logits.float(), batch["labels"].to(device))}

        settings = params.loop("classifier", progress, run)
        checkpoint = Checkpoint.of_stage(state, "classifier", manifest, split, asdict(params), starting_weights(params))
        train(model, loader, step, optimizer, settings, checkpoint, ctx, device)
    if ctx.is_main:
        save_checkpoint(unwrap(net), out)
    return net


@torch.inference_mode()
def evaluate_classifier(net: CAMNet, manifest: Manifest, split: str, device: torch.device,
                        num_workers: int = 0) -> dict[str, Any]:
    """mAP of the image-level predictions on whole images of ``split``."""
    net.eval()
    loader = DataLoader(ImageDataset(manifest, split), batch_size=1, num_workers=num_workers)
    scores, targets = [], []
    for sample in loader:
        scores.append(torch.sigmoid(net(sample["image"].to(device)).float()).cpu().numpy())
        targets.append(sample["labels"].numpy())
    return classification_scores(np.concatenate(scores), np.concatenate(targets), manifest.classes)
