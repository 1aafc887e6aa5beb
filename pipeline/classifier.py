"""Stage 1: the multi-label classifier whose class activation maps seed everything else.

Backbone -> global average pooling -> bias-free 1x1 conv, trained with the multi-label
soft-margin loss; SGD with polynomial decay, 10x/20x rates for the new layer, batch norm frozen
for a pretrained backbone (PSA's and RRM's recipe).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from pipeline.data import ClassificationDataset, ImageDataset
from pipeline.io import fingerprint
from pipeline.manifest import Manifest
from pipeline.metrics import classification_scores
from pipeline.models import (
    CAMNet,
    build_backbone,
    load_checkpoint,
    param_groups,
    save_checkpoint,
)
from pipeline.params import check_range
from pipeline.training import (
    Checkpoint,
    Distributed,
    LoopSettings,
    data_parallel,
    make_loader,
    train,
    unwrap,
)


@dataclass(frozen=True)
class ClassifierParams:
    backbone: str = "small"
    """small | resnet38 | resnet50 | resnet101."""
    weights: str | None = None
    """Backbone initialisation file (ImageNet .params for resnet38, torchvision .pth); None: from scratch."""
    checkpoint: str | None = None
    """A whole trained classifier to start from (ours, or PSA's res38_cls.pth); with steps 0, used as is."""
    output_stride: int = 8
    freeze_bn: bool = False
    crop_size: int = 96
    scale_range: tuple[float, ...] = (0.9, 1.1)
    flip: bool = True
    batch_size: int = 16
    steps: int = 600
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    num_workers: int = 2
    seed: int = 0
    amp: bool = True
    checkpoint_every: int = 100

    def __post_init__(self) -> None:
        check_range("steps", self.steps, 0)
        check_range("batch_size", self.batch_size, 1)
        check_range("crop_size", self.crop_size, 8)
        check_range("lr", self.lr, 0)
        check_range("num_workers", self.num_workers, 0)
        check_range("checkpoint_every", self.checkpoint_every, 1)
        if len(self.scale_range) != 2 or not 0 < self.scale_range[0] <= self.scale_range[1]:
            raise ValueError(f"scale_range={list(self.scale_range)} must be [low, high] with 0 < low <= high")


def build_classifier(params: ClassifierParams, num_classes: int) -> CAMNet:
    """The network with its initial weights: a whole checkpoint if given, else the backbone's."""
    weights = Path(params.weights) if params.weights and not params.checkpoint else None
    net = CAMNet(build_backbone(params.backbone, weights, params.output_stride), num_classes,
                 freeze_bn=params.freeze_bn)
    if params.checkpoint:
        load_checkpoint(net, params.checkpoint)
    return net


def load_classifier(params: ClassifierParams, num_classes: int, weights: Path) -> CAMNet:
    """The trained classifier written by the classifier stage, for inference."""
    net = CAMNet(build_backbone(params.backbone, None, params.output_stride), num_classes, freeze_bn=False)
    load_checkpoint(net, weights)
    return net.eval()


def train_classifier(manifest: Manifest, split: str, params: ClassifierParams, out: Path, state: Path,
                     ctx: Distributed, device: torch.device, progress: bool = True) -> CAMNet:
    """Train (or resume training) and write the final weights to ``out`` (rank 0)."""
    torch.manual_seed(params.seed)
    net = build_classifier(params, manifest.num_classes).to(device)
    if params.steps > 0:
        dataset = ClassificationDataset(manifest, split, params.crop_size, params.scale_range, params.flip,
                                        params.seed)
        loader = make_loader(dataset, params.batch_size, params.num_workers, ctx, params.seed, device)
        model = data_parallel(net, ctx, device)
        optimizer = torch.optim.SGD(param_groups(net, params.lr, params.weight_decay), lr=params.lr,
                                    momentum=params.momentum)

        def step(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
            logits = model(batch["image"].to(device, non_blocking=True))
            return {"loss": F.multilabel_soft_margin_loss(logits.float(), batch["labels"].to(device))}

        settings = LoopSettings(params.steps, params.checkpoint_every, amp=params.amp, description="classifier",
                                progress=progress)
        key = fingerprint(asdict(params), manifest.name, split, len(dataset))
        train(model, loader, step, optimizer, settings, Checkpoint(state, key), ctx, device)
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
