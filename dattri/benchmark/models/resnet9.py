"""ResNet-9 with BatchNorm (about 4.83M parameters for 10 classes).

Layout: a 3x3 stem conv (64 channels), then three residual stages with one basic
block each (128 channels at stride 1, 256 at stride 2, 512 at stride 2), global
average pooling and a linear head named ``linear``. Parameter names follow the
common ``conv1/bn1/layerK.0.{conv1,bn1,conv2,bn2,shortcut}`` convention so that
state dicts of the upstream benchmark checkpoints load.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["BasicBlock", "ResNet9", "create_resnet9_model"]


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN-ReLU layers with an identity or 1x1-conv shortcut.

    Args:
        in_channels: Input channels.
        out_channels: Output channels.
        stride: Stride of the first conv (and of the shortcut).
        dropout: Dropout probability after each conv-BN-ReLU (and shortcut).
    """

    def __init__(
        self, in_channels: int, out_channels: int, stride: int = 1, dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.dropout1 = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.dropout2 = nn.Dropout(dropout)
        if stride != 1 or in_channels != out_channels:
            self.shortcut: nn.Module = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
                nn.Dropout(dropout),
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block: ``relu(f(x) + shortcut(x))``.

        Args:
            x: Feature map ``(n, in_channels, h, w)``.

        Returns:
            Feature map ``(n, out_channels, h / stride, w / stride)``.
        """
        out = self.dropout1(F.relu(self.bn1(self.conv1(x))))
        out = self.dropout2(F.relu(self.bn2(self.conv2(out))))
        return F.relu(out + self.shortcut(x))


class ResNet9(nn.Module):
    """ResNet-9 for 32x32 images (works for any input size >= 4x4).

    Args:
        num_classes: Number of output logits.
        in_channels: Image channels.
        dropout: Dropout probability inside the blocks (upstream benchmark
            models use 0).

    Raises:
        ValueError: If ``num_classes`` or ``in_channels`` is not positive or
            ``dropout`` is outside ``[0, 1)``.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, dropout: float = 0.0) -> None:
        super().__init__()
        if num_classes < 1 or in_channels < 1:
            msg = f"`num_classes` and `in_channels` must be >= 1, got {num_classes}, {in_channels}."
            raise ValueError(msg)
        if not 0.0 <= dropout < 1.0:
            msg = f"`dropout` must be in [0, 1), got {dropout}."
            raise ValueError(msg)
        self.conv1 = nn.Conv2d(in_channels, 64, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.dropout1 = nn.Dropout(dropout)
        self.layer1 = nn.Sequential(BasicBlock(64, 128, 1, dropout))
        self.layer2 = nn.Sequential(BasicBlock(128, 256, 2, dropout))
        self.layer3 = nn.Sequential(BasicBlock(256, 512, 2, dropout))
        self.linear = nn.Linear(512, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features.

        Args:
            x: Images ``(n, in_channels, h, w)``.

        Returns:
            Pooled features ``(n, 512)``.
        """
        out = self.dropout1(F.relu(self.bn1(self.conv1(x))))
        out = self.layer3(self.layer2(self.layer1(out)))
        return F.adaptive_avg_pool2d(out, 1).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Compute logits.

        Args:
            x: Images ``(n, in_channels, h, w)``.

        Returns:
            Logits ``(n, num_classes)``.
        """
        return self.linear(self.features(x))


def create_resnet9_model(num_classes: int = 2, **kwargs: object) -> ResNet9:
    """Create a ResNet-9 (default 2 classes, the CIFAR-2 benchmark).

    Args:
        num_classes: Number of output logits.
        **kwargs: Other :class:`ResNet9` arguments (``in_channels``, ``dropout``).

    Returns:
        The model.
    """
    return ResNet9(num_classes=num_classes, **kwargs)  # type: ignore[arg-type]
