"""Helpers shared by the zoo's builders and by the conversions of torchvision's Transformers (models/vit.py,
models/swin.py, models/maxvit.py)."""

from __future__ import annotations

import torch
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


def relative_position_index(rows: int, columns: int) -> torch.Tensor:
    """For each pair of positions in a rows×columns window (flattened, [area · area]), the row of a relative
    position bias table (one row per offset, (2·rows − 1)·(2·columns − 1) of them) their offset reads."""
    grid = torch.stack(torch.meshgrid(torch.arange(rows), torch.arange(columns), indexing="ij")).flatten(1)
    offsets = (grid[:, :, None] - grid[:, None, :]).permute(1, 2, 0)
    return ((offsets[..., 0] + rows - 1) * (2 * columns - 1) + offsets[..., 1] + columns - 1).flatten()


def position_bias(table: torch.Tensor, index: torch.Tensor, area: int) -> torch.Tensor:
    """The bias [1, heads, area, area] each head adds to its scores, read from `table` [offsets, heads]."""
    return table[index.view(-1)].view(area, area, -1).permute(2, 0, 1).unsqueeze(0)
