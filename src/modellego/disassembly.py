"""Disassembly: cut a standalone, physically smaller model for a task (some of the classes) out of a source
model, keeping the channels its classes route through (DESIGN.md, "Disassembly")."""

from __future__ import annotations

import copy
import warnings
from typing import Sequence

import torch
from torch import nn

from modellego.data.subsets import resolve_classes
from modellego.errors import ModellegoError
from modellego.graph import dependency_graph
from modellego.masks import ComponentMasks
from modellego.layers import is_grouped, parameter_layers


def disassemble(model: nn.Module, masks: ComponentMasks, classes: str | Sequence[str | int],
                example_input: torch.Tensor | tuple[int, ...] | None = None) -> nn.Module:
    """The component of `model` for `classes` (names or output positions, in the order wanted): a standalone,
    smaller copy of `model` whose outputs are those classes. `example_input` (a batch, or its shape C, H, W)
    traces the graph; by default, the input shape the masks were located with.

    Channels kept: those any task class routes through, united over everything coupled with them
    (residual adds, depthwise convs); grouped convs keep all their channels (their groups must stay equally
    wide); input channels stay; no layer is left empty (a warning says so); the classifier keeps exactly the
    task's rows, in the task's order.
    """
    task = resolve_classes(masks.classes, classes, "the model's classes")
    component = copy.deepcopy(model).eval()
    layers = parameter_layers(component)
    names = {module: name for name, module in layers.items()}
    if masks.classifier not in layers:
        raise ModellegoError(f"the masks name classifier {masks.classifier!r}, which this model does not have")
    head = layers[masks.classifier]
    graph = dependency_graph(component, example_input if example_input is not None else masks.input_shape)
    plans = []
    for group in graph.get_all_groups(ignored_layers=[head], root_module_types=(nn.Conv2d, nn.Linear)):
        root = group[0]
        if any(is_grouped(item.dep.target.module) for item in group.items):
            continue  # a grouped conv's groups must keep equal widths: its input and output channels stay whole
        count = len(root.idxs)
        kept = torch.zeros(count, dtype=torch.bool)
        relevance = torch.zeros(count)
        for item in group.items:
            target = item.dep.target.module
            if target not in names or not graph.is_out_channel_pruning_fn(item.dep.handler):
                continue
            name = names[target]
            channels, roots = torch.tensor(item.idxs), torch.tensor(item.root_idxs)
            kept[roots] |= masks.task_channels(name, task)[channels]
            relevance[roots] = torch.maximum(relevance[roots], masks.scores[name][task].amax(0)[channels])
        if not kept.any():
            kept[relevance.argmax()] = True
            warnings.warn(f"no channel of {names.get(root.dep.target.module, '?')} is relevant to the task; "
                          "keeping its most relevant one", stacklevel=2)
        pruned = torch.nonzero(~kept).flatten().tolist()
        if pruned:
            plans.append((root.dep.target.module, root.dep.handler, pruned))
    for module, handler, pruned in plans:
        graph.get_pruning_group(module, handler, pruned).prune()
    rows = torch.tensor(task)
    head.weight = nn.Parameter(head.weight.detach()[rows].clone())
    if head.bias is not None:
        head.bias = nn.Parameter(head.bias.detach()[rows].clone())
    head.out_features = len(task)
    return component
