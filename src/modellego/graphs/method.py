"""The method on GCNs (DESIGN.md, "The method"), with a node as the sample unit.

A GCNConv computes `Â (X Wᵀ) + b = (Â X) Wᵀ + b`, Â being its normalised adjacency (self loops, symmetric degree
normalisation). So it is a linear map applied to the propagated features ÂX, and the contribution of input
feature i to output feature o on node n is `C[n,o,i] = (ÂX)[n,i] · W[o,i]`; its positive part is summed over each
class's selected nodes exactly as for an nn.Linear (the same `contributions.class_sums`). Locating uses the same
α/β step (`masks.input_mask`); a GCN is a chain, so layer l's input features are layer l−1's outputs, one to one.
A component is a smaller GCN: the hidden features no task class routes through are cut, the last layer keeps the
task's classes, in the task's order.
"""

from __future__ import annotations

import copy
import warnings
from typing import Sequence

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from modellego.contributions import class_sums
from modellego.data.subsets import resolve_classes
from modellego.errors import ModellegoError
from modellego.evaluate import Accuracy, accuracy_of
from modellego.graphs import require, single_threaded
from modellego.graphs.model import GCN, GraphParallel
from modellego.graphs.spec import GraphSpec
from modellego.masks import PAPER, ComponentMasks, check_thresholds, input_mask
from modellego.modelfile import weights_hash
from modellego.profiles import Profile

require()
from torch_geometric.nn import GCNConv  # noqa: E402
from torch_geometric.nn.conv.gcn_conv import gcn_norm  # noqa: E402


def gcn_layers(model: nn.Module) -> dict[str, GCNConv]:
    """The model's GCNConv layers by qualified name, in definition order (which is execution order in a GCN)."""
    layers = {name: module for name, module in model.named_modules() if isinstance(module, GCNConv)}
    if not layers:
        raise ModellegoError("the model has no GCNConv layer, so it has nothing to profile or disassemble")
    return layers


@torch.no_grad()
def propagated(conv: GCNConv, x: Tensor, edge_index: Tensor) -> Tensor:
    """ÂX: the features `conv` mixes over the graph before its linear map, normalised as `conv` normalises."""
    edge_weight = None
    if conv.normalize:
        edge_index, edge_weight = gcn_norm(edge_index, None, x.size(0), conv.improved, conv.add_self_loops,
                                           conv.flow, x.dtype)
    return conv.propagate(edge_index, x=x, edge_weight=edge_weight)


def _as_linear(conv: GCNConv) -> nn.Linear:
    """conv's weight as an nn.Linear (no copy), so that its contributions use the image path's Linear kernels."""
    out_features, in_features = conv.lin.weight.shape
    linear = nn.Linear(in_features, out_features, bias=False, device="meta")
    linear.weight = conv.lin.weight
    return linear


@torch.no_grad()
@single_threaded
def gcn_contributions(conv: GCNConv, x: Tensor, edge_index: Tensor) -> Tensor:
    """C⁺[n,o,i] = max((ÂX)[n,i] · W[o,i], 0) for every node n, shape [N, O, I] (for tests and small graphs;
    profiles sum over classes without building it)."""
    mixed = propagated(conv, x, edge_index)
    weight = conv.lin.weight.detach().to(mixed.dtype)
    return (weight.unsqueeze(0) * mixed.unsqueeze(1)).clamp(min=0)


@torch.no_grad()
@single_threaded
def gcn_class_sums(conv: GCNConv, x: Tensor, edge_index: Tensor, nodes: Tensor, labels: Tensor,
                   num_classes: int) -> Tensor:
    """Σ over each class's `nodes` (labelled by `labels`) of C⁺, shape [K, O, I] in float64."""
    mixed = propagated(conv, x, edge_index)[nodes.to(x.device)]
    return class_sums(_as_linear(conv), mixed, labels, num_classes)


@torch.no_grad()
@single_threaded
def logits_of(model: nn.Module, x: Tensor, edge_index: Tensor) -> Tensor:
    """The model's logits for every node, in eval mode, as float on the CPU."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        return model(x.to(device), edge_index.to(device)).float().cpu()
    finally:
        model.train(was_training)


def select_nodes(logits: Tensor, labels: Tensor, candidates: Tensor, samples_per_class: int,
                 classes: Sequence[str]) -> tuple[Tensor, Tensor, list[str]]:
    """Per class, the `samples_per_class` correctly classified `candidates` (training nodes) with the highest
    softmax confidence on their class (ties to the lower node index). `labels` are output positions, −1 for
    nodes of no class of the model. Returns (nodes, their labels, notes on classes with fewer)."""
    if samples_per_class < 1:
        raise ModellegoError(f"samples per class must be at least 1, got {samples_per_class}")
    candidates = candidates[labels[candidates] >= 0]
    own = labels[candidates]
    confidence = logits[candidates].softmax(1).gather(1, own[:, None]).squeeze(1)
    correct = logits[candidates].argmax(1) == own
    chosen, chosen_labels, notes = [], [], []
    for label, name in enumerate(classes):
        members = correct & (own == label)
        if not members.any():
            raise ModellegoError(f"class {name!r} has no correctly classified training node, so it cannot be "
                                 "profiled (train the model longer)")
        order = confidence[members].argsort(descending=True, stable=True)[:samples_per_class]
        picked = candidates[members][order]
        if len(picked) < samples_per_class:
            notes.append(f"class {name!r} has only {len(picked)} correctly classified training nodes "
                         f"(asked for {samples_per_class}); using those")
        chosen.append(picked)
        chosen_labels.append(torch.full((len(picked),), label, dtype=torch.long))
    return torch.cat(chosen), torch.cat(chosen_labels), notes


@torch.no_grad()
@single_threaded
def profile(model: nn.Module, x: Tensor, edge_index: Tensor, labels: Tensor, train_nodes: Tensor,
            classes: Sequence[str], samples_per_class: int = 50, dataset: str = "") -> Profile:
    """Profile a GCN on a graph: select each class's most confident correct training nodes, then sum the
    positive contributions of every GCNConv over them per class. `labels` are the model's output positions per
    node (−1: none of its classes); `train_nodes` the nodes it may select from (the training mask)."""
    model.eval()
    layers = gcn_layers(model)
    logits = logits_of(model, x, edge_index)
    if logits.shape[1] != len(classes):
        raise ModellegoError(f"the model has {logits.shape[1]} outputs but {len(classes)} classes were given")
    nodes, node_labels, notes = select_nodes(logits, labels, train_nodes, samples_per_class, classes)
    for note in notes:
        warnings.warn(note, stacklevel=2)
    sums: dict[str, Tensor] = {}
    order: list[str] = []

    def accumulate(name: str):
        def hook(module: GCNConv, inputs: tuple) -> None:
            order.append(name)
            sums[name] = gcn_class_sums(module, inputs[0], inputs[1], nodes, node_labels, len(classes)).cpu()
        return hook

    handles = [module.register_forward_pre_hook(accumulate(name)) for name, module in layers.items()]
    try:
        logits_of(model, x, edge_index)
    finally:
        for handle in handles:
            handle.remove()
    return Profile(contributions={name: sums[name].float() for name in order}, layers=order, classes=list(classes),
                   counts=torch.bincount(node_labels, minlength=len(classes)), samples=nodes,
                   sample_labels=node_labels, model_hash=weights_hash(model), input_shape=(int(x.shape[1]),),
                   dataset=dataset, samples_per_class=samples_per_class, notes=notes)


def check_profile(model: nn.Module, class_profile: Profile) -> None:
    """Refuse a profile of another model, or one whose layers and sums do not fit this GCN's layers."""
    if weights_hash(model) != class_profile.model_hash:
        raise ModellegoError("this profile was computed on a different model; run `modellego profile` on this model")
    layers = gcn_layers(model)
    if list(layers) != class_profile.layers:
        raise ModellegoError(f"this profile's layers {class_profile.layers[:3]} are not the model's GCNConv layers "
                             f"{list(layers)[:3]}; run `modellego profile` on this model again")
    for name, conv in layers.items():
        expected = (len(class_profile.classes), *conv.lin.weight.shape)
        if tuple(class_profile.contributions[name].shape) != expected:
            raise ModellegoError(f"this profile's sums for layer {name} have shape "
                                 f"{list(class_profile.contributions[name].shape)}, the model needs {list(expected)}")


def locate(model: nn.Module, class_profile: Profile, alpha: float = PAPER.alpha_conv,
           beta: float = PAPER.beta_conv) -> ComponentMasks:
    """Every class's features in every GCNConv, walked from the classifier (the last GCNConv) back to the input
    with the α/β step of the image path (the conv pair: a GCNConv is a graph convolution)."""
    check_thresholds({"alpha": alpha, "beta": beta})
    check_profile(model, class_profile)
    order = class_profile.layers
    num_classes = len(class_profile.classes)
    layers = gcn_layers(model)
    masks = {name: torch.zeros(num_classes, layers[name].lin.weight.shape[0]) for name in order}
    scores = {name: torch.zeros_like(masks[name]) for name in order}
    masks[order[-1]] = torch.eye(num_classes)
    scores[order[-1]] = torch.eye(num_classes)
    for position in range(len(order) - 1, 0, -1):
        name, producer = order[position], order[position - 1]
        kept, normalised = input_mask(class_profile.relative(name), masks[name] > 0, alpha, beta)
        masks[producer] = kept.float()  # a chain: input feature i of layer l is output feature i of layer l−1
        scores[producer] = normalised
    settings = {"alpha_conv": alpha, "beta_conv": beta}
    return ComponentMasks(masks={name: mask > 0 for name, mask in masks.items()}, scores=scores,
                          classes=list(class_profile.classes), classifier=order[-1], settings=settings,
                          profile_hash=class_profile.digest(), input_shape=tuple(class_profile.input_shape))


@torch.no_grad()
def disassemble(model: GCN, masks: ComponentMasks, classes: str | Sequence[str | int]) -> GCN:
    """The component of a GCN for `classes` (names or output positions, in the order wanted): a standalone,
    smaller GCN keeping the hidden features any task class routes through (never none: the most relevant one
    stays, with a warning), all input features, and exactly the task's outputs in the task's order."""
    task = resolve_classes(masks.classes, classes, "the model's classes")
    layers = list(gcn_layers(model).items())
    if masks.classifier != layers[-1][0] or set(masks.masks) != {name for name, _ in layers}:
        raise ModellegoError("these masks were located on another model's layers; locate them on this model")
    kept_outputs = []
    for name, conv in layers[:-1]:
        kept = masks.task_channels(name, task)
        if not kept.any():
            kept = torch.zeros_like(kept)
            kept[masks.scores[name][task].amax(0).argmax()] = True
            warnings.warn(f"no feature of {name} is relevant to the task; keeping its most relevant one", stacklevel=2)
        kept_outputs.append(torch.nonzero(kept).flatten())
    kept_outputs.append(torch.tensor(task))
    component = GCN(layers[0][1].lin.weight.shape[1], [len(k) for k in kept_outputs[:-1]], len(task),
                    model.dropout).to(layers[0][1].lin.weight.device)
    inputs = torch.arange(layers[0][1].lin.weight.shape[1])
    for (_, conv), target, outputs in zip(layers, component.convs, kept_outputs):
        target.lin.weight.copy_(conv.lin.weight[outputs][:, inputs])
        if conv.bias is not None:
            target.bias.copy_(conv.bias[outputs])
        inputs = outputs
    return component.eval()


@torch.no_grad()
@single_threaded
def scale(model: GCN, x: Tensor, edge_index: Tensor, labels: Tensor, nodes: Tensor,
          classes: Sequence[str]) -> tuple[GCN, list[float]]:
    """Parameter scaling: per class k, m_k = the mean top logit over the correctly classified `nodes` of k
    (`labels` = output positions); a copy whose last layer's row k (weight and bias) is multiplied by 1/m_k."""
    scaled = copy.deepcopy(model).eval()
    logits = logits_of(scaled, x, edge_index)[nodes]
    own = labels[nodes]
    factors = []
    for k, name in enumerate(classes):
        chosen = (own == k) & (logits.argmax(1) == k)
        mean_top = logits[chosen, k].mean().item() if chosen.any() else float("nan")
        if not mean_top > 0:
            warnings.warn(f"class {name!r}: no positive mean top logit on correct nodes; not scaled", stacklevel=2)
            factors.append(1.0)
        else:
            factors.append(1.0 / mean_top)
    head = scaled.convs[-1]
    factor = torch.tensor(factors, dtype=head.lin.weight.dtype, device=head.lin.weight.device)
    head.lin.weight.mul_(factor[:, None])
    if head.bias is not None:
        head.bias.mul_(factor)
    return scaled, factors


def assemble(members: Sequence[GCN], targets: Sequence[int] | None = None) -> GraphParallel:
    """GCN components side by side (parallel mode): concatenated logits, output j feeding class `targets[j]`
    (default: every output its own class)."""
    if len(members) < 2:
        raise ModellegoError("assembling needs at least two components")
    features = {member.convs[0].lin.weight.shape[1] for member in members}
    if len(features) > 1:
        raise ModellegoError(f"the components take different node features ({sorted(features)}); assemble "
                             "components of models trained on the same graph features")
    total = sum(member.convs[-1].lin.weight.shape[0] for member in members)
    return GraphParallel([copy.deepcopy(member).eval() for member in members],
                         list(range(total)) if targets is None else list(targets))


def accuracy(logits: Tensor, labels: Tensor, nodes: Tensor, classes: Sequence[str]) -> Accuracy:
    """Accuracy of argmax over all outputs on `nodes` with a label (≥ 0), overall and per class."""
    nodes = nodes[labels[nodes] >= 0]
    return accuracy_of(logits[nodes].argmax(1), labels[nodes], list(classes))


@torch.no_grad()
@single_threaded
def count_flops(model: nn.Module, spec: GraphSpec) -> int:
    """FLOPs of one forward pass on a one-node graph (the per-node cost of the feature transforms; the
    propagation's sparse sums, which grow with a node's degree, are not counted), by torch.utils.flop_counter."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    with counter:
        model(torch.zeros(1, spec.features, device=device), torch.zeros(2, 0, dtype=torch.long, device=device))
    model.train(was_training)
    return int(counter.get_total_flops())
