"""The networks on a backbone: the classifier with its CAMs, and RRM's joint segmentation network.

Heads carry PSA's and RRM's names (``dropout7``, ``fc8``, ``fc8_seg_conv1``, ``fc8_seg_conv2``)
and the backbone is the child ``backbone``; ``pipeline.models.weights.nest_backbone_keys`` maps
their flat checkpoints onto this layout.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple, Self

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.models.weights import BACKBONE

SEG_HIDDEN = 512
SEG_DILATION = 12
"""RRM's dilation of the segmentation head, at output stride 8."""

REFERENCE_CROP = 321
"""RRM's training crop."""


def seg_dilation(output_stride: int) -> int:
    """The head's dilation at ``output_stride``: RRM's 12 at stride 8, scaled to reach as far in
    the image at others (6 at 16), as torchvision scales DeepLab's ASPP rates."""
    return max(1, SEG_DILATION * 8 // output_stride)


def _zero_outer_taps(conv: nn.Conv2d) -> None:
    """Zero every tap of a 3x3 convolution but the centre."""
    with torch.no_grad():
        centre = conv.weight[:, :, 1, 1].clone()
        conv.weight.zero_()
        conv.weight[:, :, 1, 1] = centre


def freeze_batchnorm(module: nn.Module) -> None:
    """Put every batch norm in ``module`` in eval mode and stop its parameters' gradients.

    PSA and RRM train this way: the ImageNet statistics are used as they are, since batches of
    a few crops would estimate them badly. ``.train()`` puts batch norm back in training mode,
    so the networks built with ``freeze_bn=True`` call this again from their ``train``.
    """
    for layer in module.modules():
        if isinstance(layer, nn.modules.batchnorm._BatchNorm):
            layer.eval()
            for parameter in layer.parameters(recurse=False):
                parameter.requires_grad_(False)


def backbone_modules(backbone: nn.Module, names: Sequence[str]) -> list[nn.Module]:
    """The modules of ``backbone`` that ``names`` give by their dotted paths (``b2_1``,
    ``features.0``); an unknown name is a ValueError that lists the top-level modules."""
    known = dict(backbone.named_modules())
    unknown = [name for name in names if name not in known or not name]
    if unknown:
        top = ", ".join(name for name, _ in backbone.named_children())
        raise ValueError(f"no module {unknown[0]!r} in the {type(backbone).__name__} backbone (its modules: {top})")
    return [known[name] for name in names]


class OnBackbone(nn.Module):
    """A network on the child ``backbone`` (the name the weights loaders and the learning-rate
    groups rely on), whose batch norm and first modules can stay frozen.

    ``freeze_bn``: keep the backbone's batch norm frozen (see ``freeze_batchnorm``), as PSA and
    RRM do with a pretrained backbone; a backbone trained from scratch (``small``, or any without
    weights) has no statistics worth keeping and must not freeze.
    ``frozen``: backbone modules (see :func:`backbone_modules`) that do not train at all, as PSA
    keeps ResNet-38's first blocks: no gradient (so no update and no weight decay, see
    :func:`param_groups`), and in eval mode through ``train()``.
    """

    def __init__(self, backbone: nn.Module, *, freeze_bn: bool, frozen: Sequence[str] = ()) -> None:
        super().__init__()
        self.backbone = backbone
        self.freeze_bn = freeze_bn
        self.frozen = tuple(frozen)
        for module in backbone_modules(backbone, self.frozen):
            module.requires_grad_(False)
        self.train(self.training)

    def train(self, mode: bool = True) -> Self:
        super().train(mode)
        if self.freeze_bn:
            freeze_batchnorm(self.backbone)
        for module in backbone_modules(self.backbone, self.frozen):
            module.eval()
        return self


class _Classifier(OnBackbone):
    """Backbone -> global average pooling -> bias-free 1x1 conv ``fc8`` to one logit per class."""

    def __init__(
        self, backbone: nn.Module, num_classes: int, *, freeze_bn: bool, frozen: Sequence[str] = (),
        dropout: float = 0.5,
    ) -> None:
        super().__init__(backbone, freeze_bn=freeze_bn, frozen=frozen)
        self.dropout7 = nn.Dropout2d(dropout)
        self.fc8 = nn.Conv2d(backbone.out_channels, num_classes, 1, bias=False)
        nn.init.xavier_uniform_(self.fc8.weight)

    def logits_from(self, features: Tensor) -> Tensor:
        """(N, C) class logits; dropout (training only) before pooling, as in PSA."""
        pooled = self.dropout7(features).mean(dim=(2, 3), keepdim=True)
        return self.fc8(pooled).flatten(1)

    def cams_from(self, features: Tensor) -> Tensor:
        """(N, C, h, w) class activation maps: ReLU of ``fc8`` on the unpooled features."""
        return F.relu(self.fc8(features))

    def cams(self, images: Tensor) -> Tensor:
        """Class activation maps of normalised images, at the backbone's output stride."""
        return self.cams_from(self.backbone(images))


class CAMNet(_Classifier):
    """The classifier of stage 1: ``forward`` gives logits, ``cams`` the class activation maps."""

    def forward(self, images: Tensor) -> Tensor:
        return self.logits_from(self.backbone(images))


class JointOutput(NamedTuple):
    logits: Tensor
    """(N, C) classification logits."""
    cams: Tensor
    """(N, C, h, w) class activation maps, not normalised."""
    seg: Tensor
    """(N, C + 1, h, w) segmentation logits, background first."""


class SegNet(_Classifier):
    """RRM's network: the classifier plus a segmentation head on the same backbone features.

    The head is two 3x3 convolutions dilated by ``dilation`` (RRM's 12 at output stride 8, see
    :func:`seg_dilation`), backbone -> 512 -> C + 1, with a ReLU between. ``forward`` gives
    logits, CAMs and segmentation logits from one backbone pass, as end-to-end training needs;
    ``segment`` gives only the segmentation logits. To start from a classifier checkpoint, load it
    with ``load_checkpoint(net, path, allow_missing=SegNet.seg_head)``.

    The head starts as RRM's (Xavier-uniform weights) but for the eight outer taps of each
    convolution, which start at zero. A tap learns only where it falls inside the feature map:
    on crops narrower than the dilation's reach (96-pixel crops give 12x12 features at stride 8,
    where every outer tap of a 12-dilated kernel falls outside at every position) it never does,
    and a random start would then add the same noise to every prediction on a larger image,
    where those taps fall inside. Started at zero, an untrained tap adds nothing; on crops large
    enough it learns as any other.
    """

    seg_head = ("fc8_seg_conv1", "fc8_seg_conv2")

    def __init__(
        self, backbone: nn.Module, num_classes: int, *, freeze_bn: bool, dropout: float = 0.5,
        dilation: int = SEG_DILATION,
    ) -> None:
        super().__init__(backbone, num_classes, freeze_bn=freeze_bn, dropout=dropout)
        dilated = {"padding": dilation, "dilation": dilation}
        self.fc8_seg_conv1 = nn.Conv2d(backbone.out_channels, SEG_HIDDEN, 3, **dilated)
        self.fc8_seg_conv2 = nn.Conv2d(SEG_HIDDEN, num_classes + 1, 3, **dilated)
        for conv in (self.fc8_seg_conv1, self.fc8_seg_conv2):
            nn.init.xavier_uniform_(conv.weight)
            _zero_outer_taps(conv)

    def seg_from(self, features: Tensor) -> Tensor:
        return self.fc8_seg_conv2(F.relu(self.fc8_seg_conv1(features)))

    def segment(self, images: Tensor) -> Tensor:
        """Segmentation logits (N, C + 1, h, w) of normalised images, at the output stride."""
        return self.seg_from(self.backbone(images))

    def forward(self, images: Tensor) -> JointOutput:
        features = self.backbone(images)
        return JointOutput(self.logits_from(features), self.cams_from(features), self.seg_from(features))


def param_groups(
    net: nn.Module, lr: float, weight_decay: float, new_lr_mult: float = 10.0
) -> list[dict[str, Any]]:
    """The four SGD parameter groups of PSA and RRM, for ``torch.optim.SGD``.

    Backbone weights learn at ``lr``, its biases at 2x; the new layers (everything beside the
    backbone: ``fc8`` and the segmentation head) at ``new_lr_mult`` x, 2x that for biases.
    Weight decay applies to weights only. Frozen parameters (``requires_grad`` off, e.g. frozen
    batch norm) are left out. PSA trains only convolutions; trainable normalisation scales and
    shifts (the small backbone's) join the bias groups: no decay, as usual for them. Every group
    is present, even when empty, and named by ``"name"``.
    """
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {
        (new, bias): [] for new in (False, True) for bias in (False, True)
    }
    for name, parameter in net.named_parameters():
        if parameter.requires_grad:
            groups[name.split(".", 1)[0] != BACKBONE, parameter.ndim == 1].append(parameter)
    return [
        {
            "name": f"{'new' if new else 'backbone'} {'biases' if bias else 'weights'}",
            "params": params,
            "lr": lr * (new_lr_mult if new else 1.0) * (2.0 if bias else 1.0),
            "weight_decay": 0.0 if bias else weight_decay,
        }
        for (new, bias), params in groups.items()
    ]
