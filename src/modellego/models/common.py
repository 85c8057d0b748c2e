"""Helpers shared by the zoo's builders and by the conversions of torchvision's Transformers (models/vit.py,
models/swin.py)."""

from __future__ import annotations

from torch import nn

from modellego.core.blocks import TokenMLP, sliced_linear
from modellego.core.contributions import TokenLinear


def scaled(channels: int, width: float) -> int:
    """A layer's channel count under the width multiplier: `max(1, round(channels * width))`."""
    return max(1, round(channels * width))


class TorchvisionMLP(TokenMLP):
    """torchvision's MLP of a ViT or Swin block (Linear, GELU, Dropout, Linear, Dropout) as neurons; its dropout
    is 0 in every builder. torchvision's weight names load through `legacy_names`."""

    legacy_names = {"0.weight": "fc1.weight", "0.bias": "fc1.bias", "3.weight": "fc2.weight", "3.bias": "fc2.bias"}


def torchvision_neurons(mlp: nn.Module) -> TorchvisionMLP:
    """torchvision's MLP `mlp` as a TorchvisionMLP with the same weights."""
    neurons = TorchvisionMLP(mlp[0].in_features, mlp[0].out_features)
    neurons.fc1, neurons.fc2 = (sliced_linear(mlp[0], None, None, TokenLinear),
                                sliced_linear(mlp[3], None, None, TokenLinear))
    return neurons
