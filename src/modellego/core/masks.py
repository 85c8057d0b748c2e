"""Component masks: per parameter layer and class, the output channels the class routes through — what locating
finds and what a cut keeps."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from modellego.core.layers import output_channels, parameter_layers


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

    def problem_with(self, model: nn.Module) -> str | None:
        """Why these masks do not fit `model`, or None: every masked layer is one of its Conv2d/Linear layers, with
        one mask and one score row per class, as wide as the layer's outputs, and the classifier is its layer
        with as many outputs as the rows it maps classes to."""
        layers = parameter_layers(model)
        if self.classifier not in layers:
            return f"the masks' classifier {self.classifier!r} is not a layer of the model"
        for name, mask in self.masks.items():
            layer = layers.get(name)
            if layer is None:
                return f"the masks name layer {name!r}, which the model does not have"
            expected = (len(self.classes), output_channels(layer))
            score = self.scores.get(name)
            if tuple(mask.shape) != expected or score is None or tuple(score.shape) != expected:
                return (f"the masks of {name} are {list(mask.shape)}, not classes × outputs {list(expected)}: "
                        "they were located on another model")
        outputs = output_channels(layers[self.classifier])
        if max(self.output_positions(list(range(len(self.classes)))), default=-1) >= outputs:
            return f"the masks map classes to outputs beyond the model's {outputs}: they were located on another model"
        return None

    def kept_fraction(self, task: list[int]) -> dict[str, float]:
        """Per layer, the fraction of output channels the task keeps (before coupling)."""
        return {name: self.task_channels(name, task).float().mean().item() for name in self.masks}
