"""CIFAR-style GoogLeNet: Inception blocks whose four branches are concatenated."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from modellego.models.common import scaled

__all__ = ["Inception", "GoogLeNet", "googlenet"]


def _conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int) -> list[nn.Module]:
    return [
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    ]


class Inception(nn.Module):
    """Branches 1×1; 1×1→3×3; 1×1→3×3→3×3 (the 5×5 stand-in); 3×3 max-pool→1×1; concatenated on channels."""

    def __init__(
        self, in_planes: int, n1x1: int, n3x3red: int, n3x3: int, n5x5red: int, n5x5: int, pool_planes: int
    ) -> None:
        super().__init__()
        self.b1 = nn.Sequential(*_conv_bn_relu(in_planes, n1x1, 1))
        self.b2 = nn.Sequential(*_conv_bn_relu(in_planes, n3x3red, 1), *_conv_bn_relu(n3x3red, n3x3, 3))
        self.b3 = nn.Sequential(
            *_conv_bn_relu(in_planes, n5x5red, 1),
            *_conv_bn_relu(n5x5red, n5x5, 3),
            *_conv_bn_relu(n5x5, n5x5, 3),
        )
        self.b4 = nn.Sequential(nn.MaxPool2d(3, stride=1, padding=1), *_conv_bn_relu(in_planes, pool_planes, 1))
        self.out_channels = n1x1 + n3x3 + n5x5 + pool_planes

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.b1(x), self.b2(x), self.b3(x), self.b4(x)], 1)


# Branch widths at width 1.0: (1×1, 3×3 reduce, 3×3, "5×5" reduce, "5×5", pool projection).
_BLOCKS: dict[str, tuple[int, int, int, int, int, int]] = {
    "a3": (64, 96, 128, 16, 32, 32),
    "b3": (128, 128, 192, 32, 96, 64),
    "a4": (192, 96, 208, 16, 48, 64),
    "b4": (160, 112, 224, 24, 64, 64),
    "c4": (128, 128, 256, 24, 64, 64),
    "d4": (112, 144, 288, 32, 64, 64),
    "e4": (256, 160, 320, 32, 128, 128),
    "a5": (256, 160, 320, 32, 128, 128),
    "b5": (384, 192, 384, 48, 128, 128),
}


class GoogLeNet(nn.Module):
    """3×3 pre-layer (192), Inception a3-b3, pool, a4-e4, pool, a5-b5, global average pool, linear head."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10, width: float = 1.0) -> None:
        super().__init__()
        pre = scaled(192, width)
        self.pre_layers = nn.Sequential(*_conv_bn_relu(in_channels, pre, 3))
        channels = pre
        for name, widths in _BLOCKS.items():
            block = Inception(channels, *(scaled(c, width) for c in widths))
            setattr(self, name, block)
            channels = block.out_channels
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pre_layers(x)
        x = self.b3(self.a3(x))
        x = self.maxpool(x)
        x = self.e4(self.d4(self.c4(self.b4(self.a4(x)))))
        x = self.maxpool(x)
        x = self.b5(self.a5(x))
        x = torch.flatten(self.avgpool(x), 1)
        return self.linear(x)


def googlenet(in_channels: int = 3, num_classes: int = 10, width: float = 1.0) -> nn.Module:
    """CIFAR GoogLeNet (9 Inception blocks, 1024·width features): concat-coupled channels for the locator."""
    return GoogLeNet(in_channels, num_classes, width)
