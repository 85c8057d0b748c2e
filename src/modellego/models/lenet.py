"""LeNet-5, the classic small CNN, for 1- or 3-channel 28×28 / 32×32 images."""

from __future__ import annotations

from torch import nn

from modellego.models.common import scaled

__all__ = ["LeNet5", "lenet5"]



class LeNet5(nn.Module):
    """Two 5×5 conv layers and three linear layers; sizes scale with ``width``."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10, width: float = 1.0) -> None:
        super().__init__()
        c1, c2 = scaled(6, width), scaled(16, width)
        f1, f2 = scaled(120, width), scaled(84, width)
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, kernel_size=5, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, kernel_size=5),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            # Identity on 28×28 inputs (5×5 already); 32×32 inputs give 6×6 here.
            nn.AdaptiveAvgPool2d(5),
        )
        self.flatten = nn.Flatten()
        self.classifier = nn.Sequential(
            nn.Linear(c2 * 25, f1),
            nn.ReLU(inplace=True),
            nn.Linear(f1, f2),
            nn.ReLU(inplace=True),
            nn.Linear(f2, num_classes),
        )

    def forward(self, x):
        return self.classifier(self.flatten(self.features(x)))


def lenet5(in_channels: int = 3, num_classes: int = 10, width: float = 1.0) -> nn.Module:
    """LeNet-5 (6-16 conv, 120-84 linear ×width): the smallest zoo model, for MNIST-like data."""
    return LeNet5(in_channels, num_classes, width)
