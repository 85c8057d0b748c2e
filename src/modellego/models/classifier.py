"""A modellego model: the dataset's normalisation as first module, then the network."""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from modellego.core.modules import Normalize
from modellego.data.spec import InputSpec
from modellego.models import build


def classifier(builder: str, spec: InputSpec, num_classes: int, width: float = 1.0) -> nn.Sequential:
    """Build `builder` (a zoo name or `torchvision:<name>`) for inputs of `spec`, normalisation included."""
    network = build(builder, in_channels=spec.channels, num_classes=num_classes, width=width)
    return nn.Sequential(OrderedDict(normalize=Normalize(spec.mean, spec.std), net=network))
