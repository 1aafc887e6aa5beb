"""Wide ResNet-38 (Wu, Shen and van den Hengel, 2016) as PSA and RRM use it.

Module and parameter names are those of PSA's ``network/resnet38d.py`` so that PSA's and RRM's
checkpoints load with ``strict=True``: ``conv1a``; pre-activation blocks ``b2, b2_1, b2_2, b3, ...,
b5_2`` with ``bn_branch2a, conv_branch2a, bn_branch2b1, conv_branch2b1`` and the projection
``conv_branch1``; bottleneck blocks ``b6, b7`` that add ``bn_branch2b2, conv_branch2b2``; the final
``bn7``. The stem has stride 1 and ``b2, b3, b4`` stride 2, so the output stride is 8 with
``b5`` dilated by 2 and ``b6, b7`` by 4; for output stride 16, ``b5`` has stride 2 and the
dilations halve. The parameters are the same either way.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch.nn.functional as F
from torch import Tensor, nn

WIDE_STAGES = (
    # stage, blocks, input, middle, output channels, stride of the first block
    (2, 3, 64, 128, 128, 2),
    (3, 3, 128, 256, 256, 2),
    (4, 6, 256, 512, 512, 2),
    (5, 3, 512, 512, 1024, 1),
)
"""The pre-activation stages; ``b6`` (1024 -> 2048) and ``b7`` (2048 -> 4096) follow."""

STAGE5_LAYOUT = {8: (1, 2, 4), 16: (2, 1, 2)}
"""Output stride -> (stride of ``b5``, dilation of stage 5, dilation of ``b6`` and ``b7``)."""


def _block_name(stage: int, index: int) -> str:
    """PSA's name for a block: ``b4`` for the first of stage 4, then ``b4_1``, ``b4_2``..."""
    return f"b{stage}" if index == 0 else f"b{stage}_{index}"


class ResBlock(nn.Module):
    """Pre-activation block: BN-ReLU, 3x3 conv, BN-ReLU, 3x3 conv, plus the shortcut.

    The projection shortcut (``conv_branch1``, 1x1) takes the first BN-ReLU's output, as in PSA.
    """

    def __init__(
        self,
        in_channels: int,
        mid_channels: int,
        out_channels: int,
        stride: int = 1,
        first_dilation: int = 1,
        dilation: int = 1,
    ) -> None:
        super().__init__()
        self.bn_branch2a = nn.BatchNorm2d(in_channels)
        self.conv_branch2a = nn.Conv2d(
            in_channels, mid_channels, 3, stride, padding=first_dilation, dilation=first_dilation, bias=False
        )
        self.bn_branch2b1 = nn.BatchNorm2d(mid_channels)
        self.conv_branch2b1 = nn.Conv2d(
            mid_channels, out_channels, 3, padding=dilation, dilation=dilation, bias=False
        )
        projects = in_channels != out_channels or stride != 1
        self.conv_branch1 = nn.Conv2d(in_channels, out_channels, 1, stride, bias=False) if projects else None

    def forward(self, x: Tensor) -> Tensor:
        activated = F.relu(self.bn_branch2a(x))
        shortcut = x if self.conv_branch1 is None else self.conv_branch1(activated)
        branch = self.conv_branch2a(activated)
        branch = self.conv_branch2b1(F.relu(self.bn_branch2b1(branch)))
        return shortcut + branch


class BottleneckBlock(nn.Module):
    """Pre-activation bottleneck: 1x1 to out/4, 3x3 to out/2, 1x1 to out, with channel dropout.

    The shortcut is always the 1x1 projection ``conv_branch1`` of the first BN-ReLU's output.
    """

    def __init__(self, in_channels: int, out_channels: int, dilation: int, dropout: float) -> None:
        super().__init__()
        quarter, half = out_channels // 4, out_channels // 2
        self.bn_branch2a = nn.BatchNorm2d(in_channels)
        self.conv_branch2a = nn.Conv2d(in_channels, quarter, 1, bias=False)
        self.bn_branch2b1 = nn.BatchNorm2d(quarter)
        self.dropout_2b1 = nn.Dropout2d(dropout)
        self.conv_branch2b1 = nn.Conv2d(quarter, half, 3, padding=dilation, dilation=dilation, bias=False)
        self.bn_branch2b2 = nn.BatchNorm2d(half)
        self.dropout_2b2 = nn.Dropout2d(dropout)
        self.conv_branch2b2 = nn.Conv2d(half, out_channels, 1, bias=False)
        self.conv_branch1 = nn.Conv2d(in_channels, out_channels, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        activated = F.relu(self.bn_branch2a(x))
        branch = self.conv_branch2a(activated)
        branch = self.conv_branch2b1(self.dropout_2b1(F.relu(self.bn_branch2b1(branch))))
        branch = self.conv_branch2b2(self.dropout_2b2(F.relu(self.bn_branch2b2(branch))))
        return self.conv_branch1(activated) + branch


class ResNet38(nn.Module):
    """The backbone: image (N, 3, H, W) -> ReLU'd features (N, 4096, H/8, W/8) at output stride 8."""

    out_channels = 4096

    def __init__(self, output_stride: int = 8) -> None:
        super().__init__()
        if output_stride not in STAGE5_LAYOUT:
            raise ValueError(f"ResNet-38 supports output stride {sorted(STAGE5_LAYOUT)}, not {output_stride}")
        stride5, dilation5, dilation67 = STAGE5_LAYOUT[output_stride]
        self.conv1a = nn.Conv2d(3, 64, 3, padding=1, bias=False)
        names = []
        for stage, count, in_channels, mid_channels, out_channels, stride in WIDE_STAGES:
            dilation = dilation5 if stage == 5 else 1
            for index in range(count):
                first = index == 0
                block = ResBlock(
                    in_channels if first else out_channels,
                    mid_channels,
                    out_channels,
                    stride=(stride5 if stage == 5 else stride) if first else 1,
                    first_dilation=1 if first else dilation,
                    dilation=dilation,
                )
                names.append(_block_name(stage, index))
                self.add_module(names[-1], block)
        self.b6 = BottleneckBlock(1024, 2048, dilation=dilation67, dropout=0.3)
        self.b7 = BottleneckBlock(2048, 4096, dilation=dilation67, dropout=0.5)
        self.bn7 = nn.BatchNorm2d(4096)
        self.block_names = (*names, "b6", "b7")

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv1a(x)
        for name in self.block_names:
            x = getattr(self, name)(x)
        return F.relu(self.bn7(x))


_MXNET_BLOCK = re.compile(
    r"(?P<kind>res|bn)(?P<stage>\d)(?:a|b(?P<index>\d+))_(?P<branch>branch\w+?)_(?P<param>\w+)"
)
_MXNET_BN = {"gamma": "weight", "beta": "bias", "moving_mean": "running_mean", "moving_var": "running_var"}
_MXNET_CLASSIFIER = re.compile(r"linear1000_\w+")


def _psa_name(mxnet_name: str) -> str | None:
    """PSA's name for one MXNet parameter name; None for the ImageNet classifier; unknown unchanged."""
    name = mxnet_name.removeprefix("arg:").removeprefix("aux:")
    if _MXNET_CLASSIFIER.fullmatch(name):
        return None
    if name == "conv1a_weight":
        return "conv1a.weight"
    if name.startswith("bn7_") and name[4:] in _MXNET_BN:
        return f"bn7.{_MXNET_BN[name[4:]]}"
    match = _MXNET_BLOCK.fullmatch(name)
    if match is None:
        return mxnet_name
    block = _block_name(int(match["stage"]), int(match["index"] or 0))
    if match["kind"] == "res" and match["param"] == "weight":
        return f"{block}.conv_{match['branch']}.weight"
    if match["kind"] == "bn" and match["param"] in _MXNET_BN:
        return f"{block}.bn_{match['branch']}.{_MXNET_BN[match['param']]}"
    return mxnet_name


def mxnet_to_psa(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename the ImageNet ResNet-38's MXNet parameters to PSA's names; drop its 1000-way classifier.

    MXNet names the blocks ``res2a, res2b1, res2b2, ..., res6a, res7a`` (convolutions,
    ``_weight``) and ``bn2a, ...`` (batch norms, ``_gamma, _beta, _moving_mean, _moving_var``),
    each followed by its branch (``_branch2a``, ``_branch1``...); ``conv1a_weight``, ``bn7_*``
    and the classifier ``linear1000_*``. Unit ``a`` is PSA's ``b<stage>``, unit ``b<k>`` is
    ``b<stage>_<k>``. Names that are neither (PSA names in a ``.pth``, or anything unknown) pass
    through unchanged, so the strict load reports what does not fit.
    """
    renamed = {}
    for name, tensor in state.items():
        new_name = _psa_name(name)
        if new_name is not None:
            renamed[new_name] = tensor
    return renamed

