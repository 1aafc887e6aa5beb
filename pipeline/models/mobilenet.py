"""torchvision's MobileNetV2 features as a dilated backbone (output stride 8, 16 or 32).

Built with ``weights=None``, so nothing is ever downloaded; ImageNet weights come from
torchvision's local state-dict file (``mobilenet_v2-b0353104.pth``). The module keeps
torchvision's name for the feature extractor, ``features`` (blocks 0-18, the last one the 1x1
convolution to 1280 channels), so that file loads once its ImageNet head is set aside (see
:data:`pipeline.models.backbones.IMAGENET_HEADS`).

Output stride 8 or 16 comes from dilating instead of striding, as torchvision builds its DeepLab
backbones: the block that used to halve the resolution runs its depthwise 3x3 convolution at
stride 1 (keeping the dilation it had), and every block after it doubles the dilation. This is
the "a trous" rule of torchvision's ``replace_stride_with_dilation`` for ResNets, under which
the dilated network's features at every (32 / output stride)-th position are exactly those of
the undilated one (zero padding included), so the ImageNet weights mean what they meant.
"""

from __future__ import annotations

from torch import Tensor, nn

DOWNSAMPLING_BLOCKS = (7, 14)
"""The blocks of ``features`` that halve the resolution from 1/8 to 1/16 and from 1/16 to 1/32."""

DILATED = {8: 2, 16: 1, 32: 0}
"""Output stride -> how many of :data:`DOWNSAMPLING_BLOCKS`, the last ones, dilate instead of striding."""


def _set_dilation(block: nn.Module, dilation: int) -> None:
    """The block's 3x3 (depthwise) convolution at stride 1, dilated by ``dilation``, padded to keep the size."""
    for conv in block.modules():
        if isinstance(conv, nn.Conv2d) and conv.kernel_size == (3, 3):
            conv.stride, conv.dilation, conv.padding = (1, 1), (dilation, dilation), (dilation, dilation)


def _dilate(features: nn.Sequential, downsampling: tuple[int, ...]) -> None:
    """Replace the stride of each block in ``downsampling`` (ascending) by dilation, a trous."""
    dilation = 1
    for index, block in enumerate(features):
        if index in downsampling:
            _set_dilation(block, dilation)
            dilation *= 2
        elif dilation > 1:
            _set_dilation(block, dilation)


class DilatedMobileNetV2(nn.Module):
    """MobileNetV2 without its pooling and classifier: image -> (N, 1280, H/s, W/s), ReLU6'd."""

    out_channels = 1280

    def __init__(self, output_stride: int = 8) -> None:
        super().__init__()
        if output_stride not in DILATED:
            raise ValueError(f"MobileNetV2 supports output stride {sorted(DILATED)}, not {output_stride}")
        from torchvision.models import mobilenet_v2  # here: torchvision takes seconds to import

        self.features = mobilenet_v2(weights=None).features
        _dilate(self.features, DOWNSAMPLING_BLOCKS[len(DOWNSAMPLING_BLOCKS) - DILATED[output_stride]:])

    def forward(self, x: Tensor) -> Tensor:
        return self.features(x)
