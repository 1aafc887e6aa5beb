"""torchvision's ResNet-50 and ResNet-101 as dilated backbones (output stride 8 or 16).

Built with ``weights=None``, so nothing is ever downloaded; ImageNet weights come from a local
torchvision state-dict file. The modules keep torchvision's names (``conv1, bn1, layer1..4``) so
such a file loads once its 1000-way classifier (``fc.*``) is set aside (see
:func:`pipeline.models.backbones.drop_imagenet_head`).
"""

from __future__ import annotations

from torch import Tensor, nn

DILATED_LAYERS = {8: [False, True, True], 16: [False, False, True]}
"""Output stride -> torchvision's ``replace_stride_with_dilation`` for layer2, layer3, layer4."""


class DilatedResNet(nn.Module):
    """A torchvision ResNet without its pooling and classifier: image -> (N, 2048, H/s, W/s)."""

    out_channels = 2048

    def __init__(self, depth: int, output_stride: int = 8) -> None:
        super().__init__()
        if output_stride not in DILATED_LAYERS:
            strides = sorted(DILATED_LAYERS)
            raise ValueError(f"ResNet-{depth} supports output stride {strides}, not {output_stride}")
        from torchvision.models import resnet50, resnet101  # here: torchvision takes seconds to import

        constructor = {50: resnet50, 101: resnet101}[depth]
        net = constructor(weights=None, replace_stride_with_dilation=DILATED_LAYERS[output_stride])
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

