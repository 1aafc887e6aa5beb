"""The affinity network: a frozen backbone's features at several depths, mapped onto one grid and
into one feature vector per cell, whose distances give the inter-pixel affinities
(:mod:`pipeline.method.affinity`).

PSA's AffinityNet reads three depths of ResNet-38 at stride 8; IRN reads five depths of
ResNet-50 at stride 4 and keeps the backbone as the classifier left it, training only the new
layers on its detached features. This network does the latter on any backbone of
:data:`pipeline.models.BACKBONES`: the depths it reads are the modules of :data:`LEVELS`, each
brought to ``width`` channels by a 1x1 convolution, group norm and ReLU, resized to the grid
(average pooling from finer levels, bilinear from coarser ones), concatenated and mixed by a last
1x1 convolution into ``dim`` channels.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.models.nets import backbone_modules

LEVELS = {
    "small": ("layers.1", "layers.3", "layers.6"),
    "mobilenet_v2": ("features.3", "features.6", "features.13", "features.18"),
    "resnet50": ("relu", "layer1", "layer2", "layer3", "layer4"),
    "resnet101": ("relu", "layer1", "layer2", "layer3", "layer4"),
    "resnet38": ("b2_2", "b3_2", "b4_5", "b5_2", "b7"),
}
"""The backbone modules whose outputs the affinity network reads, shallow to deep (strides 2 or
4 to the output stride): the ends of the backbone's stages, as IRN reads ResNet-50's."""

WIDTH = 64
"""Channels of each level after its 1x1 convolution."""

DIM = 256
"""Channels of the feature vector of a cell."""

GROUPS = 8
"""Groups of the group norms (the new layers train on batches of a few crops, as IRN's)."""


def _level(in_channels: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, WIDTH, 1, bias=False), nn.GroupNorm(GROUPS, WIDTH),
                         nn.ReLU(inplace=True))


def to_grid(features: Tensor, size: tuple[int, int]) -> Tensor:
    """``features`` (N, C, h', w') on a grid of ``size``: averaged over cells from a finer map,
    interpolated bilinearly from a coarser one."""
    if tuple(features.shape[-2:]) == size:
        return features
    if features.shape[-2] >= size[0] and features.shape[-1] >= size[1]:
        return F.adaptive_avg_pool2d(features, size)
    return F.interpolate(features, size=size, mode="bilinear", align_corners=False)


def _stem() -> nn.Sequential:
    """The head's own view of the pixels: two 3x3 convolutions of stride 2 on the image."""
    half = WIDTH // 2
    return nn.Sequential(nn.Conv2d(3, half, 3, 2, 1, bias=False), nn.GroupNorm(GROUPS, half), nn.ReLU(inplace=True),
                         nn.Conv2d(half, WIDTH, 3, 2, 1, bias=False), nn.GroupNorm(GROUPS, WIDTH),
                         nn.ReLU(inplace=True))


class AffinityHead(nn.Module):
    """The new layers: one 1x1 convolution, group norm and ReLU per level of ``channels``, and a
    small convolutional stem of its own on the image (:func:`_stem`), all on one grid,
    concatenated, and a last 1x1 convolution to ``out_channels``.

    The stem sees colours and edges at the grid's resolution whatever the backbone learnt: a
    classifier trained from scratch on a few hundred images keeps of its early features what
    tells the classes apart, not always where one object ends and the next begins.
    """

    def __init__(self, channels: Sequence[int], out_channels: int = DIM) -> None:
        super().__init__()
        self.stem = _stem()
        self.levels = nn.ModuleList(_level(count) for count in channels)
        self.mix = nn.Conv2d(WIDTH * (len(channels) + 1), out_channels, 1)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight)

    def forward(self, images: Tensor, levels: Sequence[Tensor], size: tuple[int, int]) -> Tensor:
        mapped = [to_grid(self.stem(images.float()), size)]
        mapped += [to_grid(head(level.float()), size) for head, level in zip(self.levels, levels)]
        return self.mix(torch.cat(mapped, dim=1))


class AffinityNet(nn.Module):
    """``backbone`` (kept as it is: eval mode, no gradient) and an :class:`AffinityHead` on the
    outputs of its modules ``levels``. ``forward`` gives (N, DIM, ceil(H / stride),
    ceil(W / stride)) features of normalised images (N, 3, H, W)."""

    def __init__(self, backbone: nn.Module, levels: Sequence[str], stride: int, out_channels: int = DIM) -> None:
        super().__init__()
        self.backbone = backbone.eval().requires_grad_(False)
        self.stride = stride
        self._taps = backbone_modules(backbone, levels)
        with torch.no_grad():
            channels = [level.shape[1] for level in self._read(torch.zeros(1, 3, 32, 32))]
        self.head = AffinityHead(channels, out_channels)

    def train(self, mode: bool = True) -> AffinityNet:
        super().train(mode)
        self.backbone.eval()
        return self

    def _read(self, images: Tensor) -> list[Tensor]:
        """The outputs of the tapped modules for ``images``, shallow to deep."""
        found: dict[int, Tensor] = {}
        hooks = [tap.register_forward_hook(lambda _, __, output, index=index: found.__setitem__(index, output))
                 for index, tap in enumerate(self._taps)]
        try:
            self.backbone(images)
        finally:
            for hook in hooks:
                hook.remove()
        return [found[index] for index in range(len(self._taps))]

    def forward(self, images: Tensor) -> Tensor:
        with torch.no_grad():
            levels = self._read(images)
        return self.head(images, levels, (-(-images.shape[-2] // self.stride), -(-images.shape[-1] // self.stride)))
