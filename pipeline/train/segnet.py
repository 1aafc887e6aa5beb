"""The one-step network: the classifier's backbone with a segmentation head (:class:`~pipeline.models.SegNet`),
how its logits are brought to an image's size, and which labels an image may take."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from pipeline.models import SegNet, build_backbone, load_checkpoint, seg_dilation
from pipeline.train.classifier import ClassifierParams


def build_segnet(classifier: ClassifierParams, num_classes: int, init: Path | None,
                 checkpoint: Path | None = None) -> SegNet:
    """The joint network on the classifier's backbone: a whole segmentation ``checkpoint`` if
    given, else the classifier's trained weights ``init`` with a new segmentation head."""
    backbone = build_backbone(classifier.backbone, None, classifier.output_stride)
    dilation = seg_dilation(classifier.output_stride)
    net = SegNet(backbone, num_classes, freeze_bn=classifier.freeze_bn, dilation=dilation)
    if checkpoint is not None:
        load_checkpoint(net, checkpoint)
    elif init is not None:
        load_checkpoint(net, init, allow_missing=SegNet.seg_head)
    return net


def upsample(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Logits resized bilinearly (in float32) to ``size`` = (height, width)."""
    return F.interpolate(logits.float(), size=size, mode="bilinear", align_corners=False)


def tag_mask(tags: torch.Tensor) -> torch.Tensor:
    """(N, C + 1): 1 for background and each image's tagged classes, 0 for the others, from
    multi-hot ``tags`` (N, C).

    The dense energy rewards colour-alike pixels for agreeing on a label. Over all labels, it
    rewards a body for agreeing on whatever class the network leans to there, tagged or not,
    and spreads a wrong guess over the whole body. Multiplied by this mask, the probabilities
    it sees keep only the labels the image may hold: agreement counts on those alone, and mass
    on an untagged class is pushed into them. The training split's tags are known, so its
    predictions there may only take background and the tagged classes (as its pseudo-labels).
    """
    return torch.cat([torch.ones_like(tags[:, :1]), (tags > 0).to(tags.dtype)], dim=1)
