"""CIFAR-style VGG with BatchNorm (torchvision's configurations 'A' and 'D')."""

from __future__ import annotations

from torch import nn

from modellego.models.common import scaled

__all__ = ["VGG", "vgg11", "vgg16"]

# "M" is a 2×2 max-pool; numbers are conv output channels at width 1.0.
_CFGS: dict[str, list[int | str]] = {
    "A": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "D": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
}


class VGG(nn.Module):
    """3×3 conv-BN-ReLU stacks and five ceil-mode max-pools (28×28 and 32×32 both reach 1×1), then a 2-layer head."""

    def __init__(
        self, cfg: list[int | str], in_channels: int = 3, num_classes: int = 10, width: float = 1.0
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2, ceil_mode=True))
            else:
                out = scaled(int(v), width)
                layers += [
                    nn.Conv2d(channels, out, kernel_size=3, padding=1),
                    nn.BatchNorm2d(out),
                    nn.ReLU(inplace=True),
                ]
                channels = out
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        hidden = scaled(512, width)
        self.classifier = nn.Sequential(
            nn.Linear(channels, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x):
        return self.classifier(self.flatten(self.avgpool(self.features(x))))


def vgg11(in_channels: int = 3, num_classes: int = 10, width: float = 1.0) -> nn.Module:
    """VGG-11 with BatchNorm (cfg 'A', 8 convs): a plain chain, the simplest graph for routes."""
    return VGG(_CFGS["A"], in_channels, num_classes, width)


def vgg16(in_channels: int = 3, num_classes: int = 10, width: float = 1.0) -> nn.Module:
    """VGG-16 with BatchNorm (cfg 'D', 13 convs): the paper's main plain-chain model."""
    return VGG(_CFGS["D"], in_channels, num_classes, width)
