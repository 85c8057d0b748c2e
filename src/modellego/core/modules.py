"""The modules the method builds around networks: a model's input normalisation, and the merge of components'
logits into an assembly's classes (side by side, or after a padded network)."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


class Normalize(nn.Module):
    """Per-channel `(x - mean) / std`, so that a model takes raw pixels in [0, 1].

    With k times as many statistics as input channels (a padded assembly of differently normalised
    components), the input is repeated k times and each copy gets its own normalisation."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(-1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(-1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        copies = self.mean.shape[0] // x.shape[1]
        if copies > 1:
            x = x.repeat(1, copies, 1, 1)
        return (x - self.mean) / self.std


class MergeOutputs(nn.Module):
    """Map concatenated component logits to an assembly's classes: raw output j feeds class `targets[j]`;
    a class that several components predict gets the max of their logits."""

    def __init__(self, targets: Sequence[int]) -> None:
        super().__init__()
        self.register_buffer("targets", torch.tensor(list(targets), dtype=torch.long))

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return self.merged(logits, int(self.targets.max()) + 1)

    def merged(self, logits: torch.Tensor, classes: int) -> torch.Tensor:
        """The `classes` merged logits: each class the max of the raw outputs that feed it."""
        merged = logits.new_full((logits.shape[0], classes), float("-inf"))
        return merged.scatter_reduce(1, self.targets.expand(logits.shape[0], -1), logits, "amax")


class Parallel(nn.Module):
    """Components side by side on the same input, logits concatenated then merged (parallel assembly)."""

    def __init__(self, members: Sequence[nn.Module], targets: Sequence[int]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)
        self.merge = MergeOutputs(targets)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.merge(torch.cat([member(x) for member in self.members], dim=1))
