"""A joint head: the assembly's decision re-fitted in closed form on the components' own training images.

Components cut from models trained on different class sets never saw each other's classes, so each one's
logits are confident on images that are not its own; scaling and the gates (gates.py) only weigh the components'
answers against each other. The joint head instead answers from every component's features at once:

    logits = W · [f_1(x); f_2(x); …] + b

where f_c(x) is component c's inputs to its Linear layers (its classifier's input and, within a feature budget,
the earlier Linear layers' inputs: the flattened convolutional features and the hidden activations), and W, b
are the ridge least-squares fit, without gradients, from those features (standardised) to the one-hot labels of
the union of the components' own training images (each labelled by its class in the assembly):

    W = (ZᵀZ + λ·n·I)⁻¹ Zᵀ(T − t̄),     Z = (X − μ) / σ,     then folded back: weight = W/σ, b = t̄ − μ·weight

the same kind of training-free fit as the components' reconstruction (reconstruct.py), applied to the assembly.
The sums ZᵀZ and ZᵀT are accumulated batch by batch (float64), so the images are never held, and the file holds
only W and b (K × D numbers): no training image and no per-image row. The head reads its features through hooks,
placed where each component's layers sit (padded: its input positions of the merged layers; parallel: its own
layers), so padded and parallel assemblies give the same answer.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor, nn
from torch.utils.data import BatchSampler, Dataset, SequentialSampler

from modellego import distributed, runtime
from modellego.core.channels import ChannelGraph
from modellego.core.gates import MAX_STATISTIC, Tap, flat_features, outside
from modellego.core.layers import example_batch, execution_order, parameter_layers, recorded_inputs
from modellego.errors import ModellegoError

JOINT = "joint"
JOINT_RIDGE = 1e-2          # λ, relative to the number of images, on standardised features (measured: 1e-4…1e-1 agree
                            # within half a point on LeNet-5; docs/results.md, "Calibrated assembly")
JOINT_MAX_FEATURES = 8192   # all components' features together: the float64 Gram matrix stays within 512 MiB
SPREAD_FLOOR = 1e-6         # a feature whose standard deviation is below this is constant: it gets no weight


def joint_layers(model: nn.Module, example_input: Tensor | tuple[int, ...], budget: int) -> list[str]:
    """The Linear layers of one component whose inputs the head reads, in execution order: its classifier's,
    then earlier Linear layers that read other layers (last first) while the widths add up to at most
    `budget`. The classifier's input is always read, whatever its width."""
    example = example_batch(model, example_input)
    with torch.enable_grad():  # torch-pruning traces through autograd
        graph = ChannelGraph(model, example)
    layers = parameter_layers(model)
    order = [name for name in execution_order(model, example) if isinstance(layers[name], nn.Linear)]
    if not order:
        raise ModellegoError("the joint head reads a component's Linear layers; this model has none")
    widths = _input_widths(model, example, order)
    chosen, used = [order[-1]], widths[order[-1]]
    for name in reversed(order[:-1]):
        if not graph.feeds(name) or used + widths[name] > budget:
            break
        chosen.insert(0, name)
        used += widths[name]
    return chosen


@torch.no_grad()
def _input_widths(model: nn.Module, example: Tensor, names: Sequence[str]) -> dict[str, int]:
    with recorded_inputs(model, names) as inputs:
        model.eval()(example[:1])
    return {name: inputs[name][:1].numel() for name in names}


def features_at(inputs: dict[str, Tensor], taps: Sequence[Tap]) -> Tensor:
    """One component's features: the inputs recorded at its taps, flattened, its own columns only, joined."""
    return torch.cat([flat_features(inputs[tap.layer], tap.columns) for tap in taps], 1)


@torch.no_grad()
def observe(model: nn.Module, images: Tensor, layers: Sequence[str]) -> Tensor:
    """Run one component on `images`; its features at `layers` (every column its own)."""
    with recorded_inputs(model, layers) as inputs:
        model(images)
    return features_at(inputs, [Tap(name) for name in layers])


@torch.no_grad()
def fit(models: Sequence[nn.Module], data: Sequence[Dataset], targets: Sequence[int],
        example_input: Tensor | tuple[int, ...] | None = None, ridge: float = JOINT_RIDGE,
        batch_size: int = 256, layers: Sequence[Sequence[str]] | None = None) -> dict[str, Any]:
    """The joint head of `models` from their own training images: `data[c]` is component c's, labelled by its
    outputs; output j of the concatenation answers class `targets[j]`. Returns the head's `weight` (K × D) and
    `bias` (K), on raw (unstandardised) features, and the `layers` each component is read at (by default
    `joint_layers`'; given, those Linear layers' inputs)."""
    if len(models) != len(data):
        raise ModellegoError("the joint head needs each component's own training data (one dataset per component)")
    if any(len(own) == 0 for own in data):
        raise ModellegoError("a component's training data is empty; the joint head needs its own images")
    if not ridge > 0:
        raise ModellegoError(f"the joint head's ridge must be positive, got {ridge}")
    models = [model.eval() for model in models]
    example = example_input if example_input is not None else tuple(data[0][0][0].shape)
    budget = max(1, JOINT_MAX_FEATURES // len(models))
    if layers is None:
        layers = [joint_layers(model, example, budget) for model in models]
    layers = [list(names) for names in layers]
    classes = int(max(targets)) + 1
    offsets = [0]
    for model in models:
        offsets.append(offsets[-1] + _outputs(model, example))
    width = sum(sum(_input_widths(model, example_batch(model, example), names).values())
                for model, names in zip(models, layers))
    device = runtime.device_of(models[0])
    mapping = torch.tensor(list(targets))
    count = 0
    total, hits = torch.zeros(width, dtype=torch.float64), torch.zeros(classes, dtype=torch.float64)
    gram = torch.zeros(width, width, dtype=torch.float64)
    cross = torch.zeros(width, classes, dtype=torch.float64)
    for c, own in enumerate(data):
        batches = list(BatchSampler(SequentialSampler(range(len(own))), batch_size, drop_last=False))
        # under torchrun each process sums its share of the batches; the sums are added up below
        loader = runtime.loader(own, device, batch_sampler=distributed.own(batches))
        for images, labels in loader:
            images = images.to(device)
            with runtime.ranking(device):
                features = torch.cat([observe(model, images, names).double().cpu()
                                      for model, names in zip(models, layers)], 1)
            onehot = nn.functional.one_hot(mapping[offsets[c] + torch.as_tensor(labels)], classes).double()
            count += len(features)
            total += features.sum(0)
            gram.addmm_(features.T, features)  # in place: no second D × D matrix per batch
            cross.addmm_(features.T, onehot)
            hits += onehot.sum(0)
    count_tensor = torch.tensor([float(count)], dtype=torch.float64)
    for tensor in (count_tensor, total, gram, cross, hits):
        distributed.sum_(tensor)
    weight, bias = solve(gram, cross, total, hits, int(count_tensor.item()), ridge)
    return {"weight": weight.float(), "bias": bias.float(), "layers": layers}


def solve(gram: Tensor, cross: Tensor, total: Tensor, hits: Tensor, count: int,
          ridge: float = JOINT_RIDGE) -> tuple[Tensor, Tensor]:
    """Ridge least squares from the sums of n = `count` images (XᵀX, XᵀT, ΣX, ΣT): the features standardised,
    an unpenalised intercept, λ = ridge·n; returned folded back onto raw features: weight (K × D), bias (K)."""
    mean = total / count
    target_mean = hits / count
    spread = (gram.diagonal() / count - mean ** 2).clamp(min=0).sqrt()
    live = spread > SPREAD_FLOOR
    spread = torch.where(live, spread, torch.ones_like(spread))
    centred = (gram - count * torch.outer(mean, mean)) / torch.outer(spread, spread)
    centred_cross = (cross - count * torch.outer(mean, target_mean)) / spread[:, None]
    centred = centred * torch.outer(live, live)  # a constant feature is rounding noise: it gets no weight
    centred_cross = centred_cross * live[:, None]
    system = centred + ridge * count * torch.eye(len(centred), dtype=centred.dtype)
    standardised = torch.linalg.solve(system, centred_cross)                     # D × K
    raw = standardised / spread[:, None]
    return raw.T.contiguous(), target_mean - mean @ raw


def _outputs(model: nn.Module, example: Tensor | tuple[int, ...]) -> int:
    with torch.no_grad():
        return int(model.eval()(example_batch(model, example)).shape[1])


class JointHead(nn.Module):
    """The head: one Linear from every component's features (read at its taps) to the assembly's classes.
    `config` (JSON) says, per component, the layers it is read at and whether its columns are a subset (padded
    assemblies); the column indices are buffers."""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        self.config = config
        self.linear = nn.Linear(int(config["features"]), int(config["classes"]))
        for c, component in enumerate(config["components"]):
            for t, tap in enumerate(component):
                if tap.get("columns"):
                    self.register_buffer(f"c{c}_t{t}_columns", torch.zeros(1, dtype=torch.long))

    @classmethod
    def build(cls, taps: Sequence[Sequence[Tap]], weight: Tensor, bias: Tensor) -> "JointHead":
        """A head from where each component's layers sit in the assembly and the fitted weight and bias."""
        config = {"method": JOINT, "features": int(weight.shape[1]), "classes": int(weight.shape[0]),
                  "components": [[{"layer": tap.layer, "columns": tap.columns is not None} for tap in component]
                                 for component in taps]}
        joint = cls(config)
        with torch.no_grad():
            joint.linear.weight.copy_(weight)
            joint.linear.bias.copy_(bias)
        for c, component in enumerate(taps):
            for t, tap in enumerate(component):
                if tap.columns is not None:
                    setattr(joint, f"c{c}_t{t}_columns", tap.columns.clone().long())
        return joint

    def problem(self, assembly: nn.Module) -> str | None:
        """What makes this head (read from a file) unfit for `assembly`, the model it sits on, or None: it reads
        Linear layers of it, at positions inside them, with weights bounded like a gate's statistics (fitted ones
        stay below 1e7: features' deviations are floored at 1e-6)."""
        layers = dict(assembly.named_modules())
        for component in self.taps():
            for tap in component:
                layer = layers.get(tap.layer)
                if not isinstance(layer, nn.Linear):
                    return f"reads {tap.layer!r}, which is not a Linear layer of the assembly"
                if outside(tap.columns, layer.in_features):
                    return f"reads positions of {tap.layer} outside its {layer.in_features} inputs"
        for tensor in (self.linear.weight, self.linear.bias):
            if not (torch.isfinite(tensor).all() and tensor.abs().max() <= MAX_STATISTIC):
                return f"holds weights that are not finite or beyond {MAX_STATISTIC:g} in magnitude"
        return None

    def taps(self) -> list[list[Tap]]:
        return [[Tap(tap["layer"], None, getattr(self, f"c{c}_t{t}_columns") if tap.get("columns") else None)
                 for t, tap in enumerate(component)] for c, component in enumerate(self.config["components"])]

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        return self.linear(torch.cat(list(features), 1))


class Joint(nn.Module):
    """An assembly (`assembly`, ending in its MergeOutputs) answered by its joint `head`: running it records the
    components' features through hooks that live only during the forward pass, and the head's logits replace
    the merged ones."""

    def __init__(self, assembly: nn.Module, head: JointHead) -> None:
        super().__init__()
        self.assembly = assembly
        self.head = head

    def forward(self, x: Tensor) -> Tensor:
        taps = self.head.taps()
        with recorded_inputs(self.assembly, (tap.layer for component in taps for tap in component)) as inputs:

            def answered(module: nn.Module, args: tuple, output: Tensor) -> Tensor:
                return self.head([features_at(inputs, component) for component in taps])

            handle = self.assembly.merge.register_forward_hook(answered)
            try:
                return self.assembly(x)
            finally:
                handle.remove()
