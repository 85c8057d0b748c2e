"""Assembling: components (even of models trained on different datasets) into one model, without training
(DESIGN.md, "Parameter scaling", "Alignment padding"). `padded` builds one dense network with block-diagonal
weights; `parallel` runs the components side by side. Both give the same logits before fine-tuning."""

from __future__ import annotations

import copy
import os
import warnings
from typing import Sequence

import torch
from torch import nn

from modellego.errors import ModellegoError
from modellego.evaluate import predict
from modellego.graph import ChannelGraph
from modellego.modelfile import ClassRef, Manifest, _conform, load, weights_hash
from modellego.models.classifier import MergeOutputs, Normalize, Parallel
from modellego.layers import CHANNELWISE, execution_order, is_grouped

MODES = ("padded", "parallel")
Member = tuple[nn.Module, Manifest]


def scale(model: nn.Module, manifest: Manifest, dataset, progress: bool = False) -> Member:
    """Parameter scaling: per class k, m_k = the mean top logit over the correctly classified samples of k in
    `dataset` (the component's own task, training split, labelled by its outputs); classifier row k (weight
    and bias) is multiplied by 1/m_k, so that different components' logits become comparable."""
    scaled = copy.deepcopy(model).eval()
    manifest = copy.deepcopy(manifest)
    logits, labels = predict(scaled, dataset, progress=progress)
    head = _classifier(scaled, manifest)
    factors = []
    for k, ref in enumerate(manifest.classes):
        chosen = (labels == k) & (logits.argmax(1) == k)
        mean_top = logits[chosen, k].mean().item() if chosen.any() else float("nan")
        if not mean_top > 0:
            warnings.warn(f"class {ref.name!r}: no positive mean top logit on correct samples; not scaled", stacklevel=2)
            factors.append(1.0)
        else:
            factors.append(1.0 / mean_top)
    factor = torch.tensor(factors, dtype=head.weight.dtype)
    with torch.no_grad():
        head.weight.mul_(factor[:, None])
        if head.bias is not None:
            head.bias.mul_(factor)
    manifest.provenance["scaled"] = {"factors": factors, "samples": len(dataset)}
    return scaled, manifest


def assemble(components: Sequence[Member | str | os.PathLike], mode: str = "padded", scale_logits: bool = True,
             data_root: str | os.PathLike | None = None, progress: bool = False) -> Member:
    """One model answering the union of the components' classes (in order; a class shared by two components
    from the same dataset gets one output, the max of their logits). With `scale_logits`, each component is
    first scaled on its own task's training data (skipped for components already scaled)."""
    from modellego.data.task import task_data

    if mode not in MODES:
        raise ModellegoError(f"unknown assembly mode {mode!r}; choose 'padded' or 'parallel'")
    members = [load(item) if isinstance(item, (str, os.PathLike)) else item for item in components]
    if len(members) < 2:
        raise ModellegoError("assembling needs at least two components")
    first = members[0][1].input
    for model, manifest in members[1:]:
        spec = manifest.input
        if (spec.channels, spec.size) != (first.channels, first.size):
            raise ModellegoError(f"components take different inputs ({first.describe()} and {spec.describe()}); "
                                 "assemble components of the same input size and channels")
    if scale_logits:
        members = [member if "scaled" in member[1].provenance
                   else scale(member[0], member[1], task_data(member[1], "train", root=data_root), progress)
                   for member in members]
    classes, targets = _union([manifest for _, manifest in members])
    model = _parallel(members, targets) if mode == "parallel" else _padded(members, targets)
    manifest = Manifest(
        architecture=_architecture(members, mode, len(classes)),
        classes=classes, input=first, kind="assembly",
        provenance={"assembled": {"mode": mode, "scaled": scale_logits,
                                  "components": [{"hash": weights_hash(m), "classes": mf.class_names,
                                                  "provenance": mf.provenance, "metrics": mf.metrics}
                                                 for m, mf in members]}},
    )
    return model.eval(), manifest


def _union(manifests: list[Manifest]) -> tuple[list[ClassRef], list[int]]:
    classes: list[ClassRef] = []
    targets: list[int] = []
    for manifest in manifests:
        for ref in manifest.classes:
            if ref not in classes:
                classes.append(ref)
            targets.append(classes.index(ref))
    return classes, targets


def _architecture(members: list[Member], mode: str, num_classes: int) -> dict:
    if mode == "parallel":
        return {"builder": "parallel", "num_classes": num_classes,
                "members": [dict(manifest.architecture, input=manifest.input.to_dict()) for _, manifest in members]}
    return dict(members[0][1].architecture, num_classes=num_classes, merge_outputs=True)


def _parallel(members: list[Member], targets: list[int]) -> nn.Module:
    return Parallel([copy.deepcopy(model) for model, _ in members], targets)


def _classifier(model: nn.Module, manifest: Manifest) -> nn.Linear:
    name = execution_order(model, (manifest.input.channels, *manifest.input.size))[-1]
    layer = dict(model.named_modules())[name]
    if not isinstance(layer, nn.Linear):
        raise ModellegoError(f"the last layer to run, {name}, is not a Linear classifier")
    return layer


def _check_topology(members: list[Member]) -> None:
    reference_model, reference = members[0]
    keys = set(reference_model.state_dict())
    if any("merge.targets" in model.state_dict() for model, _ in members):
        raise ModellegoError("padded mode takes components, not assemblies; use --mode parallel to combine assemblies")
    for name, module in reference_model.named_modules():
        if isinstance(module, (nn.LayerNorm, nn.GroupNorm)):
            raise ModellegoError(f"padded mode cannot merge {name}: {type(module).__name__} normalises across "
                                 "channels, so the components would mix; use --mode parallel")
    for model, manifest in members[1:]:
        same_builder = manifest.architecture.get("builder") == reference.architecture.get("builder")
        if not same_builder or set(model.state_dict()) != keys:
            raise ModellegoError(
                f"padded mode needs components of one topology, got {reference.architecture.get('builder')} and "
                f"{manifest.architecture.get('builder')}; use --mode parallel to assemble different architectures")


def _padded(members: list[Member], targets: list[int]) -> nn.Module:
    """Alignment padding: every layer holds all components' channels, weights block-diagonal (zero blocks are
    the empty kernels), the first layers stack outputs, BN/biases concatenate, concat layouts are tracked."""
    _check_topology(members)
    models = [model for model, _ in members]
    spec = members[0][1].input
    shape = (spec.channels, *spec.size)
    states = [model.state_dict() for model in models]
    graphs = [ChannelGraph(model, shape) for model in models]
    modules = [dict(model.named_modules()) for model in models]
    layers = [name for name, module in modules[0].items() if isinstance(module, (nn.Conv2d, nn.Linear))]
    shared_input = all(torch.equal(s["normalize.mean"], states[0]["normalize.mean"]) and
                       torch.equal(s["normalize.std"], states[0]["normalize.std"]) for s in states)
    image_layers = {name for name in layers if not graphs[0].feeds(name)}

    merged_shapes, groups = {}, {}
    for key, tensor in states[0].items():
        sizes = [state[key].shape for state in states]
        if key.startswith("normalize."):
            merged_shapes[key] = tensor.shape if shared_input else torch.Size([sum(s[0] for s in sizes), *tensor.shape[1:]])
        elif tensor.ndim == 0:
            merged_shapes[key] = tensor.shape
        else:
            merged_shapes[key] = torch.Size([sum(s[0] for s in sizes), *tensor.shape[1:]])
    for name in layers:
        module = modules[0][name]
        key = f"{name}.weight"
        if isinstance(module, nn.Conv2d) and module.groups > 1:
            # Stacked groups are block-diagonal already: the merged conv has every member's groups, same widths.
            widths = {(m[name].in_channels // m[name].groups, m[name].out_channels // m[name].groups) for m in modules}
            if len(widths) != 1:
                raise ModellegoError(f"{name}: the components' grouped convolutions have different group widths "
                                     f"{sorted(widths)}; use --mode parallel")
            groups[name] = {"groups": sum(m[name].groups for m in modules)}
            continue
        if name in image_layers:
            inputs = states[0][key].shape[1] * (1 if shared_input else len(states))
        else:
            inputs = sum(state[key].shape[1] for state in states)
        merged_shapes[key] = torch.Size([merged_shapes[key][0], inputs, *states[0][key].shape[2:]])

    merged = copy.deepcopy(models[0])
    _conform(merged, merged_shapes, groups)
    merged_graph = ChannelGraph(merged, shape)
    for name in groups:
        _check_stacked(name, merged_graph, graphs, modules)

    channelwise = {name for name, module in modules[0].items() if isinstance(module, CHANNELWISE)}
    values: dict[str, torch.Tensor] = {}
    for key in states[0]:
        owner_name = key.rsplit(".", 1)[0]
        if key.startswith("normalize.") and shared_input:
            values[key] = states[0][key]
        elif states[0][key].ndim == 0:
            values[key] = states[0][key]
        elif owner_name in channelwise and merged_graph.feeds(owner_name):
            # A BatchNorm after a concat sees the merged channels interleaved per concat slot, not member by member.
            owner, index = _input_layout(owner_name, merged_graph, graphs, modules, merged_shapes[key][0])
            values[key] = torch.empty(merged_shapes[key], dtype=states[0][key].dtype)
            for member, state in enumerate(states):
                positions = owner == member
                values[key][positions] = state[key][index[positions]]
        elif owner_name not in layers or key.endswith(".bias") or owner_name in groups:
            values[key] = torch.cat([state[key] for state in states])
    for name in layers:
        if name in groups:
            continue
        key = f"{name}.weight"
        outputs = [state[key].shape[0] for state in states]
        weight = torch.zeros(merged_shapes[key], dtype=states[0][key].dtype)
        if name in image_layers:
            channels = states[0][key].shape[1]
            for member, state in enumerate(states):
                rows = slice(sum(outputs[:member]), sum(outputs[:member + 1]))
                columns = slice(0, channels) if shared_input else slice(member * channels, (member + 1) * channels)
                weight[rows, columns] = state[key]
        else:
            owner, index = _input_layout(name, merged_graph, graphs, modules, weight.shape[1])
            for member, state in enumerate(states):
                rows = slice(sum(outputs[:member]), sum(outputs[:member + 1]))
                positions = torch.nonzero(owner == member).flatten()
                weight[rows, positions] = state[key][:, index[positions]]
        values[key] = weight
    merged.load_state_dict(values, strict=True)
    merged.add_module("merge", MergeOutputs(targets))
    return merged


def _check_stacked(layer: str, merged: ChannelGraph, graphs: list[ChannelGraph], modules: list[dict]) -> None:
    """A grouped conv merges by stacking its groups, which is right only if its inputs arrive member by member."""
    widths = [m[layer].in_channels for m in modules]
    owner, index = _input_layout(layer, merged, graphs, modules, sum(widths))
    expected_owner = torch.repeat_interleave(torch.arange(len(widths)), torch.tensor(widths))
    expected_index = torch.cat([torch.arange(width) for width in widths])
    if not (torch.equal(owner, expected_owner) and torch.equal(index, expected_index)):
        raise ModellegoError(f"{layer}: the inputs of this grouped convolution interleave the components' "
                             "channels, so its groups cannot be stacked; use --mode parallel")


def _input_layout(layer: str, merged: ChannelGraph, graphs: list[ChannelGraph], modules: list[dict],
                  size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For each input position of `layer` in the merged model: which component it belongs to and which input
    position of that component it is. Producers output their components' channels in order, so a merged
    producer channel tells its component; the component's own graph tells where that channel enters."""
    owner = torch.full((size,), -1, dtype=torch.long)
    index = torch.full((size,), -1, dtype=torch.long)
    for feed in merged.feeds(layer):
        widths = [_outputs(m[feed.producer]) for m in modules]
        offsets = torch.tensor([0, *widths]).cumsum(0)
        own = [{f.producer: f for f in graph.feeds(layer)}.get(feed.producer) for graph in graphs]
        for channel in feed.channels.unique().tolist():
            member = int(torch.searchsorted(offsets, channel, right=True)) - 1
            local = channel - int(offsets[member])
            positions = feed.inputs[feed.channels == channel].sort().values
            source = own[member]
            if source is None:
                continue
            local_positions = source.inputs[source.channels == local].sort().values
            if len(local_positions) != len(positions):
                raise ModellegoError(f"cannot align the inputs of {layer}; use --mode parallel")
            owner[positions] = member
            index[positions] = local_positions
    if (owner < 0).any():
        raise ModellegoError(f"cannot trace every input channel of {layer} to a component; use --mode parallel")
    return owner, index


def _outputs(layer: nn.Module) -> int:
    return layer.out_channels if isinstance(layer, nn.Conv2d) else layer.out_features
