"""Component masks: per parameter layer and class, the output channels the class routes through — what locating
finds and what a cut keeps."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class ComponentMasks:
    """Per parameter layer, `masks[layer][k, o]`: class k routes through output channel o; `scores` are the
    normalised votes behind the masks (how relevant each channel is, used to break ties and avoid empty layers)."""

    masks: dict[str, torch.Tensor]
    scores: dict[str, torch.Tensor]
    classes: list[str]
    classifier: str
    settings: dict[str, float] = field(default_factory=dict)
    profile_hash: str = ""
    input_shape: tuple[int, ...] = ()
    positions: list[int] | None = None  # the model output of each row (None: row k is output k)

    def output_positions(self, rows: list[int]) -> list[int]:
        """The model outputs (classifier rows) of the masks' rows `rows`."""
        return list(rows) if self.positions is None else [self.positions[row] for row in rows]

    def task_channels(self, layer: str, task: list[int]) -> torch.Tensor:
        """Output channels of `layer` kept for task `task` (class positions): the union over its classes."""
        return self.masks[layer][task].any(dim=0)

    def kept_fraction(self, task: list[int]) -> dict[str, float]:
        """Per layer, the fraction of output channels the task keeps (before coupling)."""
        return {name: self.task_channels(name, task).float().mean().item() for name in self.masks}
