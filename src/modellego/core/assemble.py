"""Assembling: components (even of models trained on different datasets) into one model, without training
(DESIGN.md, "Parameter scaling", "Alignment padding"). `padded` builds one dense network with block-diagonal
weights; `parallel` runs the components side by side. Both give the same logits before fine-tuning."""

from __future__ import annotations

import copy
import warnings
from collections import OrderedDict
from typing import Sequence

import torch
from torch import nn
from torch.utils.data import Dataset

from modellego import runtime
from modellego.core.channels import ChannelGraph
from modellego.core.choice import Choice
from modellego.core.evaluate import predict
from modellego.core.gates import (
    DEFAULT_TEMPERATURE,
    GATES,
    Calibrated,
    Calibration,
    ComponentTaps,
    Gate,
    Tap,
    component_taps,
)
from modellego.core.gates import fit as fit_gate
from modellego.core.joint import JOINT, Joint, JointHead
from modellego.core.joint import fit as fit_joint
from modellego.core.layers import CHANNELWISE, example_batch, head, output_channels, parameter_layers
from modellego.core.modules import MergeOutputs, Normalize, Parallel
from modellego.core.profile import class_names
from modellego.core.shapes import conform
from modellego.errors import ModellegoError


class AssemblyMode(Choice):
    """`padded`: one dense network with block-diagonal weights (the paper's alignment padding); `parallel`: the
    components side by side. Both give the same logits before fine-tuning."""

    PADDED = "padded"
    PARALLEL = "parallel"

    @classmethod
    def label(cls) -> str:
        return "assembly mode (--mode)"


MODES = tuple(mode.value for mode in AssemblyMode)


def check_members(count: int) -> None:
    """An assembly has at least two components."""
    if count < 2:
        raise ModellegoError(f"assembling needs at least two components, got {count}")


def scale_factors(logits: torch.Tensor, labels: torch.Tensor, names: Sequence[str]) -> list[float]:
    """Parameter scaling's factors: per class k, 1/m_k with m_k the mean top logit over the correctly classified
    samples of k (`logits` of a component on its own task's samples, `labels` its output positions); 1, with a
    warning, where a class has no positive mean top logit."""
    factors = []
    for k in range(logits.shape[1]):
        chosen = (labels == k) & (logits.argmax(1) == k)
        mean_top = logits[chosen, k].mean().item() if chosen.any() else float("nan")
        if not mean_top > 0:
            warnings.warn(f"class {names[k]!r}: no positive mean top logit on correct samples; not scaled",
                          stacklevel=3)
            factors.append(1.0)
        else:
            factors.append(1.0 / mean_top)
    return factors


@torch.no_grad()
def scale_rows(weight: torch.Tensor, bias: torch.Tensor | None, factors: Sequence[float]) -> None:
    """Multiply a classifier's row k (weight and bias) by `factors[k]`, in place."""
    factor = torch.tensor(list(factors), dtype=weight.dtype, device=weight.device)
    weight.mul_(factor[:, None])
    if bias is not None:
        bias.mul_(factor)


@torch.no_grad()
def scale(model: nn.Module, data: Dataset, example_input: torch.Tensor | tuple[int, ...] | None = None,
          progress: bool = False) -> tuple[nn.Module, list[float]]:
    """Parameter scaling: per class k, m_k = the mean top logit over the correctly classified samples of k in
    `data` (the component's own task, training split, labelled by its outputs); a copy of the model whose
    classifier row k (weight and bias) is multiplied by 1/m_k, so that different components' logits become
    comparable. Returns the copy and the factors (1 where a class has no positive mean top logit)."""
    scaled = copy.deepcopy(model).eval()
    logits, labels = predict(scaled, data, progress=progress, precision="fp32")  # the factors become weights
    example = example_input if example_input is not None else tuple(data[0][0].shape)
    _, classifier = head(scaled, example)
    factors = scale_factors(logits, labels, class_names(data, logits.shape[1]))
    scale_rows(classifier.weight, classifier.bias, factors)
    return scaled, factors


def assemble(models: Sequence[nn.Module], example_input: torch.Tensor | tuple[int, ...] | None = None,
             mode: str = "padded", targets: Sequence[int] | None = None, calibration: str | None = None,
             data: Sequence[Dataset] | None = None, stats: Sequence[dict[str, torch.Tensor]] | dict | None = None,
             temperature: float = DEFAULT_TEMPERATURE) -> nn.Module:
    """One model answering the union of `models`' outputs, without training. Output j of the concatenated logits
    goes to class `targets[j]` (default: every output its own class; a class several outputs map to gets the
    max of their logits). `padded` builds one dense network with block-diagonal weights (models of one topology;
    `example_input`, a batch or a shape C, H, W, traces their channels); `parallel` runs the models side by side.
    Both give the same logits.

    `calibration` (gates.py): None / "none" assembles the models as they are; "scale" is the paper's parameter
    scaling; a gate ("msp", "energy", "mahalanobis", "knn", "pattern") wraps the assembly in a `Calibrated` model
    whose gate weighs each (scaled) component's answer by how typical the input is of its own images; "joint"
    wraps it in a `Joint` model answered by a head fitted in closed form on all components' features (joint.py).
    They need each model's own training data, `data[c]` (labelled by its outputs); a gate given its fitted
    `stats[c]` instead takes the models as they are (scaled already, as the statistics were fitted), and "joint"
    given its fitted head (`stats`: joint.fit's record) uses it."""
    mode = AssemblyMode.parse(mode)
    check_members(len(models))
    calibration = Calibration.parse(calibration or "none")
    if calibration == Calibration.AUTO:
        raise ModellegoError("calibration 'auto' chooses among calibrations with held-out data; the pipeline's "
                             "`assemble` does that (modellego.commands.assemble)")
    needs_data = calibration == "scale" or (calibration in (*GATES, JOINT) and stats is None)
    if needs_data and (data is None or len(data) != len(models)):
        raise ModellegoError(f"calibration {calibration!r} needs each model's own training data (one dataset per model)")
    example = example_batch(models[0], example_input)
    if calibration == "scale" or (calibration in GATES and stats is None):
        # A gate weighs scaled components: scaling fixes each component's own bias between its classes.
        models = [scale(model, own, example)[0] for model, own in zip(models, data)]
    if calibration in GATES and stats is None:
        stats = [fit_gate(calibration, model, own, example) for model, own in zip(models, data)]
    widths = [output_channels(layer) for layer in (_last_layer(model) for model in models)]
    if targets is None:
        targets = list(range(sum(widths)))
    if calibration == JOINT and stats is None:
        stats = fit_joint(models, data, targets, example)
    # The structure is built on the CPU (weight copies, cheap) from copies of the members, then moved where the
    # members are: scaling and gates above ran on their device.
    device = runtime.device_of(models[0])
    if device.type != "cpu":
        models = [copy.deepcopy(model).cpu() for model in models]
        example = example.cpu()
    if mode == "parallel":
        assembled = Parallel([copy.deepcopy(model) for model in models], targets).eval()
        layouts: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    else:
        assembled, layouts = _padded(list(models), list(targets), example)
    if calibration == JOINT:
        taps = _joint_taps(stats["layers"], mode, layouts)
        head = JointHead.build(taps, stats["weight"].cpu(), stats["bias"].cpu())
        return Joint(assembled, head).eval().to(device)
    if calibration not in GATES:
        return assembled.eval().to(device)
    taps = _taps(list(models), example, mode, layouts, widths)
    gates = Gate.build(calibration, taps, [{key: value.cpu() for key, value in own.items()} for own in stats],
                       temperature)
    return Calibrated(assembled, gates).eval().to(device)


def _joint_taps(layers: Sequence[Sequence[str]], mode: str,
                layouts: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> list[list[Tap]]:
    """Where the joint head reads each component: in parallel mode its own layers; in padded mode its input
    positions of the merged layers, in its own order."""
    if mode == "parallel":
        return [[Tap(f"members.{member}.{name}") for name in names] for member, names in enumerate(layers)]
    for name in {name for names in layers for name in names}:
        if name not in layouts:
            raise ModellegoError(f"the joint head reads {name}, which reads the image itself; padded mode cannot "
                                 "separate the components there: use --mode parallel")
    return [[_placed(layouts, member, name) for name in names] for member, names in enumerate(layers)]


def _placed(layouts: dict[str, tuple[torch.Tensor, torch.Tensor]], member: int, layer: str) -> Tap:
    """Component `member`'s input positions of the merged `layer`, in the order of its own inputs."""
    owner, index = layouts[layer]
    positions = torch.nonzero(owner == member).flatten()
    return Tap(layer, None, positions[index[positions].argsort()])


def _taps(models: list[nn.Module], example: torch.Tensor, mode: str,
          layouts: dict[str, tuple[torch.Tensor, torch.Tensor]], widths: list[int]) -> list[ComponentTaps]:
    """Where each component's logits, classifier input and pattern layers sit in the assembly: in parallel mode
    its own layers; in padded mode its rows (outputs stack in order) and its input positions of merged layers."""
    taps = []
    offsets = [0, *torch.tensor(widths).cumsum(0).tolist()]
    for member, model in enumerate(models):
        own = component_taps(model, example, offsets[member])
        if mode == "parallel":
            prefix = f"members.{member}."
            taps.append(ComponentTaps(own.start, own.stop, Tap(prefix + own.features.layer),
                                      [Tap(prefix + tap.layer) for tap in own.pattern]))
            continue
        modules = [dict(m.named_modules()) for m in models]

        def placed(layer: str, with_rows: bool) -> Tap:
            columns = _placed(layouts, member, layer).columns
            rows = None
            if with_rows:
                outputs = [output_channels(m[layer]) for m in modules]
                rows = torch.arange(sum(outputs[:member]), sum(outputs[:member + 1]))
            return Tap(layer, rows, columns)

        taps.append(ComponentTaps(own.start, own.stop, placed(own.features.layer, False),
                                  [placed(tap.layer, True) for tap in own.pattern]))
    return taps


def _last_layer(model: nn.Module) -> nn.Module:
    return list(parameter_layers(model).values())[-1]


def _check_topology(models: list[nn.Module]) -> None:
    reference = models[0]
    if any(isinstance(module, MergeOutputs) for model in models for module in model.modules()):
        raise ModellegoError("padded mode takes components, not assemblies; use --mode parallel to combine assemblies")
    for name, module in reference.named_modules():
        if isinstance(module, (nn.LayerNorm, nn.GroupNorm)):
            raise ModellegoError(f"padded mode cannot merge {name}: {type(module).__name__} normalises across "
                                 "channels, so the components would mix; use --mode parallel")
    structure = [(name, type(module)) for name, module in reference.named_modules()]
    for model in models[1:]:
        if [(name, type(module)) for name, module in model.named_modules()] != structure or \
                set(model.state_dict()) != set(reference.state_dict()):
            raise ModellegoError("padded mode needs components of one topology (the same architecture); "
                                 "use --mode parallel to assemble different architectures")


def _padded(models: list[nn.Module], targets: list[int], example: torch.Tensor
            ) -> tuple[nn.Module, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Alignment padding: every layer holds all components' channels, weights block-diagonal (zero blocks are
    the empty kernels), the first layers stack outputs, BN/biases concatenate, concat layouts are tracked.
    Inputs normalised differently (modellego's Normalize) are stacked, each component reading its own copy.
    Returns the model and, per merged layer that reads other layers, the owner and own index of its inputs."""
    _check_topology(models)
    shape = example
    states = [model.state_dict() for model in models]
    graphs = [ChannelGraph(model, shape) for model in models]
    modules = [dict(model.named_modules()) for model in models]
    layers = [name for name, module in modules[0].items() if isinstance(module, (nn.Conv2d, nn.Linear))]
    normalizers = {f"{name}.{buffer}" for name, module in modules[0].items() if isinstance(module, Normalize)
                   for buffer in ("mean", "std")}
    shared_input = all(torch.equal(state[key], states[0][key]) for state in states for key in normalizers)
    image_layers = {name for name in layers if not graphs[0].feeds(name)}

    # One-element tensors of modules that are neither layers nor per-channel (timm's LearnableAffineBlock scale
    # and bias): scalars every member shares, never stacked.
    plain = {name for name, module in modules[0].items()
             if name not in layers and not isinstance(module, (*CHANNELWISE, Normalize))}
    scalars = {key for key, tensor in states[0].items()
               if tensor.ndim <= 1 and tensor.numel() == 1 and key.rsplit(".", 1)[0] in plain}
    for key in scalars:
        if any(state[key].shape != states[0][key].shape or not torch.equal(state[key], states[0][key])
               for state in states):
            raise ModellegoError(f"padded mode cannot merge {key}: a scalar the components do not share; "
                                 "use --mode parallel")

    merged_shapes, groups = {}, {}
    for key, tensor in states[0].items():
        sizes = [state[key].shape for state in states]
        if key in normalizers:
            merged_shapes[key] = tensor.shape if shared_input else torch.Size([sum(s[0] for s in sizes), *tensor.shape[1:]])
        elif tensor.ndim == 0 or key in scalars:
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
    conform(merged, merged_shapes, groups)
    merged_graph = ChannelGraph(merged, shape)
    for name in groups:
        _check_stacked(name, merged_graph, graphs, modules)

    channelwise = {name for name, module in modules[0].items() if isinstance(module, CHANNELWISE)}
    values: dict[str, torch.Tensor] = {}
    for key in states[0]:
        owner_name = key.rsplit(".", 1)[0]
        if key in normalizers and shared_input:
            values[key] = states[0][key]
        elif states[0][key].ndim == 0 or key in scalars:
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
    layouts: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
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
            layouts[name] = (owner, index)
            for member, state in enumerate(states):
                rows = slice(sum(outputs[:member]), sum(outputs[:member + 1]))
                positions = torch.nonzero(owner == member).flatten()
                weight[rows, positions] = state[key][:, index[positions]]
        values[key] = weight
    state = OrderedDict(values)
    state._metadata = getattr(states[0], "_metadata", None)  # module versions (torchvision's MNASNet checks them)
    merged.load_state_dict(state, strict=True)
    merged.add_module("merge", MergeOutputs(targets))
    return merged.eval(), layouts


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
        widths = [output_channels(m[feed.producer]) for m in modules]
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
