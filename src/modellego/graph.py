"""The model's real channel graph, from torch-pruning's DependencyGraph: which output channels of which layers
feed a layer's input channels, through flatten, concat, residual adds and depthwise convs."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch_pruning as tp
from torch import nn


@dataclass(frozen=True)
class Feed:
    """Output channels `channels` of layer `producer` feed input channels `inputs` of the consumer (pairwise)."""

    producer: str
    channels: torch.Tensor
    inputs: torch.Tensor


def dependency_graph(model: nn.Module, input_shape: tuple[int, ...]) -> tp.DependencyGraph:
    """Trace `model` on one zero input of `input_shape` (C, H, W) into a torch-pruning DependencyGraph."""
    device = next(model.parameters()).device
    example = torch.zeros(1, *input_shape, device=device)
    return tp.DependencyGraph().build_dependency(model, example_inputs=example)


class ChannelGraph:
    """A model's channel graph: the torch-pruning DependencyGraph plus cached `feeds` per layer."""

    def __init__(self, model: nn.Module, input_shape: tuple[int, ...]) -> None:
        self.model = model
        self.dependency = dependency_graph(model, input_shape)
        self._feeds: dict[str, list[Feed]] = {}

    def feeds(self, layer: str) -> list[Feed]:
        """Every (producer output channel → `layer` input channel) pair, for Conv2d/Linear producers."""
        if layer not in self._feeds:
            self._feeds[layer] = _feeds(self.dependency, self.model, layer)
        return self._feeds[layer]


def _feeds(graph: tp.DependencyGraph, model: nn.Module, layer: str) -> list[Feed]:
    modules = dict(model.named_modules())
    names = {module: name for name, module in modules.items()}
    consumer = modules[layer]
    count = consumer.in_channels if isinstance(consumer, nn.Conv2d) else consumer.in_features
    prune_in = tp.prune_conv_in_channels if isinstance(consumer, nn.Conv2d) else tp.prune_linear_in_channels
    group = graph.get_pruning_group(consumer, prune_in, list(range(count)))
    found: dict[str, tuple[list[int], list[int]]] = {}
    for item in group.items:
        target = item.dep.target.module
        if (target is consumer or not isinstance(target, (nn.Conv2d, nn.Linear))
                or not graph.is_out_channel_pruning_fn(item.dep.handler)):
            continue
        channels, inputs = found.setdefault(names[target], ([], []))
        channels.extend(int(i) for i in item.idxs)
        inputs.extend(int(i) for i in item.root_idxs)
    return [Feed(name, torch.tensor(channels), torch.tensor(inputs)) for name, (channels, inputs) in found.items()]
