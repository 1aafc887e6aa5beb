"""A small backbone that trains from scratch on a CPU, for the synthetic benchmark.

Three stride-2 3x3 convolutions bring it to output stride 8 (96x96 images give 12x12 features),
with a residual block after the first two, then two residual blocks at 1/8 resolution. Its
receptive field is 103 pixels: a wider one (every feature of a 96x96 image seeing the whole
image) classifies better but spreads its CAMs over the background, which the reliable regions
then lose (docs/method-notes.md, "Measurements behind the design"). About 440k parameters; batch norm,
trained (never frozen: there are no pretrained statistics to keep).
"""

from __future__ import annotations

from torch import Tensor, nn

WIDTHS = (24, 48, 96)


def conv_bn_relu(in_channels: int, out_channels: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class ResidualBlock(nn.Module):
    """Two 3x3 conv-BN layers with dilation ``dilation``, an identity shortcut, ReLU."""

    def __init__(self, channels: int, dilation: int = 1) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=dilation, dilation=dilation, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 3, padding=dilation, dilation=dilation, bias=False),
            nn.BatchNorm2d(channels),
        )
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(x + self.body(x))


class SmallNet(nn.Module):
    """Image (N, 3, H, W) -> ReLU'd features (N, 96, H/8, W/8)."""

    out_channels = WIDTHS[-1]

    def __init__(self, output_stride: int = 8) -> None:
        super().__init__()
        if output_stride != 8:
            raise ValueError(f"the small backbone has output stride 8 only, not {output_stride}")
        first, second, third = WIDTHS
        self.layers = nn.Sequential(
            conv_bn_relu(3, first, stride=2),
            ResidualBlock(first),
            conv_bn_relu(first, second, stride=2),
            ResidualBlock(second),
            conv_bn_relu(second, third, stride=2),
            ResidualBlock(third),
            ResidualBlock(third),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)
