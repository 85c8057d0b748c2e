"""A modellego model: the dataset's normalisation as first module, then the network."""

from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import torch
from torch import nn

from modellego.data.spec import InputSpec


class Normalize(nn.Module):
    """Per-channel `(x - mean) / std`, so that a model takes raw pixels in [0, 1]."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(-1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(-1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def classifier(builder: str, spec: InputSpec, num_classes: int, width: float = 1.0) -> nn.Sequential:
    """Build `builder` (a zoo name or `torchvision:<name>`) for inputs of `spec`, normalisation included."""
    from modellego.models import build

    network = build(builder, in_channels=spec.channels, num_classes=num_classes, width=width)
    return nn.Sequential(OrderedDict(normalize=Normalize(spec.mean, spec.std), net=network))
