"""ResNet-18 in plain torch (no torchvision), with torchvision's parameter names.

Layout (He et al. 2016): a 7x7 stride-2 stem conv (64 channels), BatchNorm, ReLU,
3x3 stride-2 max pooling, four stages of two basic blocks (64, 128, 256, 512
channels; stages 2-4 start with stride 2 and a 1x1-conv ``downsample``), global
average pooling and a linear head ``fc``. Names (``conv1``, ``bn1``,
``layerK.B.{conv1,bn1,conv2,bn2,downsample.0,downsample.1}``, ``fc``) and the
initialisation follow ``torchvision.models.resnet18``, so state dicts of upstream's
ImageNet checkpoints load (11,689,512 parameters for 1000 classes).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ResNet18", "ResNet18Block", "create_resnet18_model"]


class ResNet18Block(nn.Module):
    """Basic residual block: two 3x3 conv-BN layers and an identity or 1x1 shortcut.

    Args:
        in_channels: Input channels.
        out_channels: Output channels.
        stride: Stride of the first conv (and of the shortcut).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block.

        Args:
            x: Feature map ``(n, in_channels, h, w)``.

        Returns:
            Feature map ``(n, out_channels, ceil(h / stride), ceil(w / stride))``.
        """
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet18(nn.Module):
    """ResNet-18 for ImageNet-sized images (any input of at least 32x32 works).

    Args:
        num_classes: Number of output logits.
        in_channels: Image channels.

    Raises:
        ValueError: If ``num_classes`` or ``in_channels`` is not positive.
    """

    def __init__(self, num_classes: int = 1000, in_channels: int = 3) -> None:
        super().__init__()
        if num_classes < 1 or in_channels < 1:
            msg = f"`num_classes` and `in_channels` must be >= 1, got {num_classes}, {in_channels}."
            raise ValueError(msg)
        self.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        widths = (64, 128, 256, 512)
        in_ch = 64
        for k, width in enumerate(widths, start=1):
            stride = 1 if k == 1 else 2
            stage = nn.Sequential(
                ResNet18Block(in_ch, width, stride), ResNet18Block(width, width, 1)
            )
            self.add_module(f"layer{k}", stage)
            in_ch = width
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Compute logits.

        Args:
            x: Images ``(n, in_channels, h, w)``.

        Returns:
            Logits ``(n, num_classes)``.
        """
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def create_resnet18_model(num_classes: int = 1000) -> ResNet18:
    """Create a randomly initialised ResNet-18 (upstream's ImageNet benchmark model).

    Args:
        num_classes: Number of output logits (1000 for ImageNet).

    Returns:
        The model.
    """
    return ResNet18(num_classes=num_classes)
