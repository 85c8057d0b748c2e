"""Disassembly: cut a standalone, physically smaller model for a task (some of the classes) out of a source
model, keeping the channels its classes route through (DESIGN.md, "Disassembly")."""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn
from torch.utils.data import Dataset

from modellego.core.channels import ChannelGraph
from modellego.core.layers import input_channels, is_depthwise, is_grouped, output_channels, parameter_layers
from modellego.core.masks import ComponentMasks
from modellego.core.reconstruct import RIDGE, reconstruct_component
from modellego.core.samples import resolve_classes
from modellego.core.shapes import resize_shape_attributes
from modellego.errors import ModellegoError


@dataclass
class Cut:
    """What a component keeps of its source, in the source's channel indices: per Conv2d/Linear layer, the output
    channels (`outputs`, sorted; the classifier's are the task's rows in the task's order) and the input
    channels or features (`inputs`, sorted). `plans` are torch-pruning's cuts (root module, handler, channels
    removed), applied in order by `disassemble`."""

    outputs: dict[str, torch.Tensor]
    inputs: dict[str, torch.Tensor]
    task: list[int]
    classifier: str
    plans: list[tuple[nn.Module, object, list[int]]] = field(default_factory=list, repr=False)
    empty: list[str] = field(default_factory=list)
    sizes: dict[str, tuple[int, int]] = field(default_factory=dict)  # the source layers' (outputs, inputs)

    def key(self) -> tuple:
        """Equal for two cuts that keep exactly the same channels (so give the same component)."""
        return tuple((name, tuple(self.outputs[name].tolist()), tuple(self.inputs[name].tolist()))
                     for name in sorted(self.outputs))

    def unchanged(self) -> set[str]:
        """The layers that keep every input and output channel of the source (the classifier never does)."""
        return {name for name, (outputs, inputs) in self.sizes.items() if name != self.classifier
                and len(self.outputs[name]) == outputs and len(self.inputs[name]) == inputs}


def plan_cut(model: nn.Module, masks: ComponentMasks, task: list[int], graph: ChannelGraph) -> Cut:
    """The channels the component of `model` for `task` (class positions) keeps, without changing `model`;
    `graph` is a ChannelGraph traced on `model`."""
    layers = parameter_layers(model)
    names = {module: name for name, module in layers.items()}
    if masks.classifier not in layers:
        raise ModellegoError(f"the masks name classifier {masks.classifier!r}, which this model does not have")
    head = layers[masks.classifier]
    dependency = graph.dependency
    removed_out = {name: torch.zeros(output_channels(layer), dtype=torch.bool) for name, layer in layers.items()}
    removed_in = {name: torch.zeros(input_channels(layer), dtype=torch.bool) for name, layer in layers.items()}
    plans, empty = [], []
    for group in graph.output_groups(head):
        root = group[0]
        if any(is_grouped(item.dep.target.module) for item in group.items):
            continue  # a grouped conv's groups must keep equal widths: its input and output channels stay whole
        count = len(root.idxs)
        kept = torch.zeros(count, dtype=torch.bool)
        relevance = torch.zeros(count)
        for item in group.items:
            target = item.dep.target.module
            if target not in names or not dependency.is_out_channel_pruning_fn(item.dep.handler):
                continue
            name = names[target]
            channels, roots = torch.tensor(item.idxs), torch.tensor(item.root_idxs)
            kept[roots] |= masks.task_channels(name, task)[channels]
            relevance[roots] = torch.maximum(relevance[roots], masks.scores[name][task].amax(0)[channels])
        if not kept.any():
            kept[relevance.argmax()] = True
            empty.append(names.get(root.dep.target.module, "?"))
        pruned = torch.nonzero(~kept).flatten().tolist()
        if not pruned:
            continue
        plans.append((root.dep.target.module, root.dep.handler, pruned))
        for item in group.items:
            target = item.dep.target.module
            if target not in names:
                continue
            channels, roots = torch.tensor(item.idxs), torch.tensor(item.root_idxs)
            gone = channels[~kept[roots]]
            if dependency.is_out_channel_pruning_fn(item.dep.handler):
                removed_out[names[target]][gone] = True
                if is_depthwise(target):  # torch-pruning cuts a depthwise conv's inputs with its outputs
                    removed_in[names[target]][gone] = True
            else:
                removed_in[names[target]][gone] = True
    outputs = {name: torch.nonzero(~gone).flatten() for name, gone in removed_out.items()}
    outputs[masks.classifier] = torch.tensor(masks.output_positions(task))
    inputs = {name: torch.nonzero(~gone).flatten() for name, gone in removed_in.items()}
    sizes = {name: (output_channels(layer), input_channels(layer)) for name, layer in layers.items()}
    return Cut(outputs, inputs, list(task), masks.classifier, plans, empty, sizes)


@torch.no_grad()
def zero_removed_inputs(model: nn.Module, cut: Cut) -> None:
    """Zero every weight that reads a channel the cut removes: the model then computes what the cut component
    computes on the channels it keeps (BatchNorm and activations act per channel)."""
    for name, layer in parameter_layers(model).items():
        if is_grouped(layer) or is_depthwise(layer):
            continue  # kept whole, or cut with its producer (whose removed channels its consumers no longer read)
        dropped = torch.ones(layer.weight.shape[1], dtype=torch.bool)
        dropped[cut.inputs[name]] = False
        layer.weight[:, dropped] = 0


def disassemble(model: nn.Module, masks: ComponentMasks, classes: str | Sequence[str | int],
                example_input: torch.Tensor | tuple[int, ...] | None = None,
                graph: ChannelGraph | None = None, images: torch.Tensor | Dataset | None = None,
                ridge: float = RIDGE) -> nn.Module:
    """The component of `model` for `classes` (names or output positions, in the order wanted): a standalone,
    smaller copy of `model` whose outputs are those classes. `example_input` (a batch, or its shape C, H, W)
    traces the graph; by default, the input shape the masks were located with. `graph`, a ChannelGraph already
    traced on `model` (the one `locate(..., graph=)` used), saves tracing it again; `model` is never changed.
    With `images` (the task's training images, e.g. the profile's), the component is reconstructed: its layers
    re-fitted without gradients to reproduce `model`'s outputs on them (`modellego.core.reconstruct`); without, it
    is the paper's pure method.

    Channels kept: those any task class routes through, united over everything coupled with them
    (residual adds, depthwise convs); grouped convs keep all their channels (their groups must stay equally
    wide); input channels stay; no layer is left empty (a warning says so); the classifier keeps exactly the
    task's rows, in the task's order.
    """
    component, cut = disassemble_with_cut(model, masks, classes, example_input, graph)
    if images is not None:
        reconstruct_component(component, model, cut, images, ridge)
    return component


def disassemble_with_cut(model: nn.Module, masks: ComponentMasks, classes: str | Sequence[str | int],
                         example_input: torch.Tensor | tuple[int, ...] | None = None,
                         graph: ChannelGraph | None = None) -> tuple[nn.Module, Cut]:
    """`disassemble`, also returning the `Cut` (which source channels each layer kept), which reconstruction
    needs to match the component's channels to the source's."""
    problem = masks.problem_with(model)
    if problem:
        raise ModellegoError(problem)
    task = resolve_classes(masks.classes, classes, "the model's classes")
    if graph is not None and graph.model is not model:
        raise ModellegoError("the graph was traced on another model; pass the ChannelGraph of this model")
    shared = graph
    graph = None
    if shared is not None:
        try:  # one deepcopy of both keeps the copied graph pointing at the copied modules (a shared memo)
            component, graph = copy.deepcopy((model, shared))
        except RecursionError:  # a deep model's traced graph nests deeper than Python recurses: trace the copy
            graph = None
    if graph is None:
        component = copy.deepcopy(model)
        graph = ChannelGraph(component, example_input if example_input is not None else masks.input_shape)
    component.eval()
    cut = plan_cut(component, masks, task, graph)
    for name in cut.empty:
        warnings.warn(f"no channel of {name} is relevant to the task; keeping its most relevant one", stacklevel=3)
    before = {name: tensor.shape for name, tensor in component.named_parameters()}
    for module, handler, pruned in cut.plans:
        graph.dependency.get_pruning_group(module, handler, pruned).prune()
    for name, module in component.named_modules():  # view shapes kept beside parameters follow them
        prefix = f"{name}." if name else ""
        for attribute, tensor in module.named_parameters(recurse=False):
            if tensor.ndim and prefix + attribute in before:
                resize_shape_attributes(module, before[prefix + attribute][0], tensor.shape[0])
    head = parameter_layers(component)[masks.classifier]
    rows = torch.tensor(masks.output_positions(task))
    head.weight = nn.Parameter(head.weight.detach()[rows].clone())
    if head.bias is not None:
        head.bias = nn.Parameter(head.bias.detach()[rows].clone())
    head.out_features = len(task)
    cut.plans = []  # they point at the pruned copy's modules
    return component, cut
