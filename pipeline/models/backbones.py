"""The backbones by name, and where their ImageNet weights come from."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from torch import Tensor, nn

from pipeline.core.errors import InputError
from pipeline.models.mobilenet import DilatedMobileNetV2
from pipeline.models.resnet import DilatedResNet
from pipeline.models.resnet38 import ResNet38, mxnet_to_psa
from pipeline.models.small import SmallNet
from pipeline.models.weights import BACKBONE, load_state, read_weights

IMAGENET_HEADS = ("fc", "classifier")
"""The top-level modules of torchvision's ImageNet files that hold the 1000-way classifier: ``fc``
(ResNets), ``classifier`` (MobileNetV2, its dropout and linear layer)."""


def _unchanged(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return dict(state)


def drop_imagenet_head(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A torchvision ImageNet state dict without its 1000-way classifier.

    The one rule for the unused ImageNet head: a backbone ends before global pooling, so the
    classifier's keys (those under :data:`IMAGENET_HEADS`) are set aside; every other key of the
    file must then fit the backbone exactly (the load is strict).
    """
    return {name: tensor for name, tensor in state.items() if name.split(".", 1)[0] not in IMAGENET_HEADS}


@dataclass(frozen=True)
class Backbone:
    """How to build one backbone and read its weights file."""

    make: Callable[[int], nn.Module]
    """Output stride -> module with ``out_channels``; ValueError for a stride it does not support."""
    weights: str
    """Which file to give as its weights, for the error when the file is missing."""
    adapt: Callable[[Mapping[str, Tensor]], dict[str, Tensor]] = _unchanged
    """The file's names -> the module's names (and what the backbone has no use for dropped)."""


def _torchvision(depth: int, v1: str, v2: str) -> Backbone:
    return Backbone(
        make=partial(DilatedResNet, depth),
        weights=f"torchvision's ImageNet state dict for ResNet-{depth}, {v1} (IMAGENET1K_V1) or {v2} "
        "(IMAGENET1K_V2), from https://download.pytorch.org/models/",
        adapt=drop_imagenet_head,
    )


BACKBONES = {
    "resnet38": Backbone(
        make=ResNet38,
        weights="the ImageNet ResNet-38 ilsvrc-cls_rna-a1_cls1000_ep-0001.params (MXNet, linked from "
        "PSA's README, github.com/jiwoon-ahn/psa) or a .pth state dict with PSA's resnet38d names",
        adapt=mxnet_to_psa,
    ),
    "resnet50": _torchvision(50, "resnet50-0676ba61.pth", "resnet50-11ad3fa6.pth"),
    "resnet101": _torchvision(101, "resnet101-63fe2227.pth", "resnet101-cd907fc2.pth"),
    "mobilenet_v2": Backbone(
        make=DilatedMobileNetV2,
        weights="torchvision's ImageNet state dict for MobileNetV2, mobilenet_v2-b0353104.pth (IMAGENET1K_V1), "
        "from https://download.pytorch.org/models/",
        adapt=drop_imagenet_head,
    ),
    "small": Backbone(
        make=SmallNet,
        weights="a .pth state dict of the small backbone (it trains from scratch: leave the weights out)",
    ),
}
"""A checkpoint of one of this pipeline's networks (e.g. ``checkpoints/classifier.pth``) also serves as
any backbone's weights file: its backbone part is taken (see :func:`backbone_part`)."""


def backbone_part(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The backbone's tensors of a checkpoint of our networks (keys ``backbone.*``, heads dropped), with
    the prefix removed; any other state (a backbone's own weights file) as it is.

    So a later stage can start from an earlier stage's backbone, as the two-step DeepLab starts from
    the segment stage's (``deeplab.weights: checkpoints/segment.pth``).
    """
    prefix = f"{BACKBONE}."
    if not any(key.startswith(prefix) for key in state):
        return dict(state)
    return {key.removeprefix(prefix): value for key, value in state.items() if key.startswith(prefix)}


def _spec(name: str) -> Backbone:
    if name not in BACKBONES:
        raise InputError(f"backbone {name!r}", f"unknown backbone (known: {', '.join(BACKBONES)})")
    return BACKBONES[name]


def _read_backbone_weights(name: str, weights: Path) -> dict[str, Tensor]:
    spec = _spec(name)
    return spec.adapt(backbone_part(read_weights(weights, f"put {spec.weights} at this path")))


def load_backbone_weights(backbone: nn.Module, name: str, weights: Path) -> None:
    """Load the weights file of backbone ``name`` (e.g. its ImageNet weights) into ``backbone``."""
    load_state(backbone, _read_backbone_weights(name, weights), weights, f"the {name} backbone")


def _make(name: str, output_stride: int) -> nn.Module:
    try:
        return _spec(name).make(output_stride)
    except ValueError as error:
        raise InputError(f"backbone {name!r}", str(error)) from None


def build_backbone(name: str, weights: Path | None = None, output_stride: int = 8) -> nn.Module:
    """The backbone ``name`` at ``output_stride``, from the weights file if one is given.

    Without weights the backbone starts from PyTorch's default initialisation. The file is read
    first, so that a missing or unreadable one fails before a large network is built.
    """
    if weights is None:
        return _make(name, output_stride)
    state = _read_backbone_weights(name, weights)
    backbone = _make(name, output_stride)
    load_state(backbone, state, weights, f"the {name} backbone")
    return backbone
