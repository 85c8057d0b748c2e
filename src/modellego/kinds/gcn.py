"""Graph convolutional networks for node classification (torch_geometric's GCNConv), disassembled and assembled
with the same method as CNNs: the sample unit is a node, a component is a smaller GCN.

A GCNConv computes `Â (X Wᵀ) + b = (Â X) Wᵀ + b`, Â being its normalised adjacency (self loops, symmetric degree
normalisation). So it is a linear map applied to the propagated features ÂX, and the contribution of input
feature i to output feature o on node n is `C[n,o,i] = (ÂX)[n,i] · W[o,i]`; its positive part is summed over each
class's selected nodes exactly as for an nn.Linear (the core's `class_sums`). A GCN is a chain, so layer l's
input features are layer l−1's outputs, one to one (`ChainGraph`); locating is the core's walk over that chain
with the conv pair of thresholds (a GCNConv is a graph convolution). A component keeps the hidden features any
task class routes through, every input feature, and the task's classes as outputs; re-fitting is the core's
ridge least squares on the propagated features (ÂX of the kept inputs, as the component computes them).

Needs the optional extra `modellego[graph]` (torch_geometric); importing this module does not import it, so that
graph manifests can be read and checked without it.
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from modellego import runtime
from modellego.core.assemble import AssemblyMode, check_members, scale_factors, scale_rows
from modellego.core.channels import Feed
from modellego.core.contributions import class_sums
from modellego.core.cut import Cut
from modellego.core.evaluate import accuracy_of, count_params
from modellego.core.gates import Calibration
from modellego.core.hashing import weights_hash
from modellego.core.locate import ComponentMasks, FlattenRule, Thresholds, walk
from modellego.core.profile import Profile, keep_candidates, selection_of
from modellego.core.reconstruct import NormalEquations, Reconstruction, changed_layers
from modellego.core.samples import resolve_classes
from modellego.core.search import SearchResult, restricted_base, search
from modellego.data.graphs import GRAPH_DATASETS, Graph, load_graph, require, single_threaded
from modellego.data.spec import GraphSpec
from modellego.data.task import DataOptions, data_root_hints
from modellego.errors import ModellegoError
from modellego.io.fields import Invalid, integer, mapping, number, sequence, show, string
from modellego.io.manifest import Brick, ClassRef, Manifest
from modellego.kinds.base import ExportInputs, ModelKind, Trained, TrainOptions
from modellego.models.common import scaled as scaled_width
from modellego.models.gcn import (
    DEFAULT_HIDDEN,
    GCN_BUILDER,
    GCN_PARALLEL,
    GRAPH_BUILDERS,
    GraphParallel,
    is_graph_architecture,
)
from modellego.models.gcn import GCN as GCNModel
from modellego.models.gcn import build as build_gcn
from modellego.train import seed_everything, warn_about_weak_classes, warn_if_at_chance

WEIGHT_DECAY = 5e-4
DROPOUT = 0.5
MAX_FEATURES = 1 << 20
MAX_HIDDEN_LAYERS = 64
MAX_HIDDEN = 1 << 16
MAX_MEMBERS = 256


# --- a model's graph and its nodes --------------------------------------------------------------------------------

@dataclass
class TaskGraph:
    """A graph with every node labelled by a model's output position (−1: none of its classes)."""

    graph: Graph
    labels: Tensor
    classes: list[str]

    def nodes(self, split: str) -> Tensor:
        """The `split` nodes of the model's classes."""
        nodes = self.graph.nodes(split)
        return nodes[self.labels[nodes] >= 0]


@dataclass
class Nodes:
    """Some nodes of a task graph (`index`: node ids) with their labels: the GCN kind's samples."""

    task: TaskGraph
    index: Tensor
    targets: Tensor

    def __len__(self) -> int:
        return len(self.index)

    @property
    def classes(self) -> list[str]:
        return self.task.classes

    @property
    def name(self) -> str:
        return self.task.graph.name


def graph_of(manifest: Manifest, data: DataOptions | None = None, dataset: str | None = None) -> TaskGraph:
    """The graph a model was trained on (or `dataset`, whose class names must match), its nodes labelled by the
    model's outputs. The folder: --data-root, then the one recorded at training, then the default."""
    names = manifest.datasets
    if len(names) != 1:
        raise ModellegoError(f"this graph model's classes come from several graphs ({', '.join(names)}); "
                             "graph models answer the classes of one graph")
    source = dataset or names[0]
    if source not in GRAPH_DATASETS:
        raise ModellegoError(f"{source!r} is not a graph dataset; a graph model reads one of {', '.join(GRAPH_DATASETS)}")
    root = (data.root if data is not None else None) or data_root_hints(manifest.provenance).get(source)
    graph = load_graph(source, root)
    if graph.spec.features != manifest.input.features:
        raise ModellegoError(f"graph {source!r} has {graph.spec.features} node features but the model takes "
                             f"{manifest.input.features}; it is not the graph this model was trained on")
    relabel = torch.full((len(graph.classes),), -1, dtype=torch.long)
    for position, ref in enumerate(manifest.classes):
        index = ref.index if dataset is None else next(
            (i for i, name in enumerate(graph.classes) if name.lower() == ref.name.lower()), -1)
        if not 0 <= index < len(graph.classes):
            raise ModellegoError(f"graph {source!r} has no class {ref.name!r}, which this model predicts")
        relabel[index] = position
    return TaskGraph(graph, relabel[graph.y], manifest.class_names)


def nodes_of(task: TaskGraph, split: str) -> Nodes:
    index = task.nodes(split)
    return Nodes(task, index, task.labels[index])


# --- the method on GCNConv layers ---------------------------------------------------------------------------------

def gcn_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The model's GCNConv layers by qualified name, in definition order (which is execution order in a GCN)."""
    require()
    from torch_geometric.nn import GCNConv

    layers = {name: module for name, module in model.named_modules() if isinstance(module, GCNConv)}
    if not layers:
        raise ModellegoError("the model has no GCNConv layer, so it has nothing to profile or disassemble")
    return layers


@torch.no_grad()
def propagated(conv: nn.Module, x: Tensor, edge_index: Tensor) -> Tensor:
    """ÂX: the features `conv` mixes over the graph before its linear map, normalised as `conv` normalises."""
    from torch_geometric.nn.conv.gcn_conv import gcn_norm

    edge_weight = None
    edge_index = edge_index.to(x.device)
    if conv.normalize:
        edge_index, edge_weight = gcn_norm(edge_index, None, x.size(0), conv.improved, conv.add_self_loops,
                                           conv.flow, x.dtype)
    return conv.propagate(edge_index, x=x, edge_weight=edge_weight)


def _as_linear(conv: nn.Module) -> nn.Linear:
    """conv's weight as an nn.Linear (no copy), so that its contributions use the image path's Linear kernels."""
    out_features, in_features = conv.lin.weight.shape
    linear = nn.Linear(in_features, out_features, bias=False, device="meta")
    linear.weight = conv.lin.weight
    return linear


@torch.no_grad()
@single_threaded
def gcn_contributions(conv: nn.Module, x: Tensor, edge_index: Tensor) -> Tensor:
    """C⁺[n,o,i] = max((ÂX)[n,i] · W[o,i], 0) for every node n, shape [N, O, I] (for tests and small graphs;
    profiles sum over classes without building it)."""
    mixed = propagated(conv, x, edge_index)
    weight = conv.lin.weight.detach().to(mixed.dtype)
    return (weight.unsqueeze(0) * mixed.unsqueeze(1)).clamp(min=0)


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


def _layer_inputs(model: nn.Module, x: Tensor, edge_index: Tensor, want: str) -> dict[str, Tensor]:
    """Every GCNConv's input (`want="input"`) or output on the whole graph, in one forward pass in eval mode."""
    found: dict[str, Tensor] = {}
    layers = gcn_layers(model)

    def keep(name: str):
        def before(module: nn.Module, args: tuple) -> None:
            found.setdefault(name, args[0].detach())

        def after(module: nn.Module, args: tuple, output: Tensor) -> None:
            found.setdefault(name, output.detach().clone())
        return before if want == "input" else after

    handles = [layer.register_forward_pre_hook(keep(name)) if want == "input"
               else layer.register_forward_hook(keep(name)) for name, layer in layers.items()]
    try:
        logits_of(model, x, edge_index)
    finally:
        for handle in handles:
            handle.remove()
    return found


class ChainGraph:
    """A GCN's channel graph: layer l's input feature i is layer l−1's output feature i."""

    def __init__(self, layers: Sequence[str], sizes: dict[str, tuple[int, int]]) -> None:
        self.order = list(layers)
        self.sizes = sizes

    def feeds(self, layer: str) -> list[Feed]:
        position = self.order.index(layer)
        if position == 0:
            return []
        channels = torch.arange(self.sizes[layer][1])
        return [Feed(self.order[position - 1], channels, channels)]


def plan_cut(model: nn.Module, masks: ComponentMasks, task: list[int]) -> tuple[Cut, list[str]]:
    """What the component of a GCN for `task` keeps, without building it: the hidden features any task class
    routes through (never none: the most relevant one, and the layer is named in the returned list), every input
    feature, and the task's classes as outputs."""
    layers = list(gcn_layers(model).items())
    if masks.classifier != layers[-1][0] or set(masks.masks) != {name for name, _ in layers}:
        raise ModellegoError("these masks were located on another model's layers; locate them on this model")
    outputs, inputs, empty = {}, {}, []
    kept_inputs = torch.arange(layers[0][1].lin.weight.shape[1])
    for name, conv in layers:
        inputs[name] = kept_inputs
        if name == masks.classifier:
            outputs[name] = torch.tensor(masks.output_positions(task))
            break
        kept = masks.task_channels(name, task)
        if not kept.any():
            kept = torch.zeros_like(kept)
            kept[masks.scores[name][task].amax(0).argmax()] = True
            empty.append(name)
        outputs[name] = kept_inputs = torch.nonzero(kept).flatten()
    sizes = {name: tuple(conv.lin.weight.shape) for name, conv in layers}
    return Cut(outputs, inputs, list(task), masks.classifier, sizes=sizes), empty


@torch.no_grad()
def build_component(model: nn.Module, cut: Cut) -> nn.Module:
    """The smaller GCN a cut describes, its weights copied from `model`."""
    layers = list(gcn_layers(model).items())
    component = GCNModel(layers[0][1].lin.weight.shape[1], [len(cut.outputs[name]) for name, _ in layers[:-1]],
                         len(cut.task), model.dropout).to(layers[0][1].lin.weight.device)
    for (name, conv), target in zip(layers, component.convs):
        target.lin.weight.copy_(conv.lin.weight[cut.outputs[name]][:, cut.inputs[name]])
        if conv.bias is not None:
            target.bias.copy_(conv.bias[cut.outputs[name]])
    return component.eval()


def disassemble(model: nn.Module, masks: ComponentMasks, classes: str | Sequence[str | int]) -> nn.Module:
    """The component of a GCN for `classes` (names or output positions, in the order wanted): a standalone,
    smaller GCN (see `plan_cut`); a layer left with no relevant feature keeps its most relevant one, with a
    warning."""
    task = resolve_classes(masks.classes, classes, "the model's classes")
    cut, empty = plan_cut(model, masks, task)
    for name in empty:
        warnings.warn(f"no feature of {name} is relevant to the task; keeping its most relevant one", stacklevel=2)
    return build_component(model, cut)


@torch.no_grad()
@single_threaded
def reconstruct(component: nn.Module, source: nn.Module, cut: Cut, nodes: Nodes, ridge: float) -> Reconstruction:
    """Re-fit the component's GCNConv layers, in order, from the first one the cut changes: each by ridge least
    squares (the core's normal equations, pulled towards its current weights) on its propagated inputs ÂX as the
    re-fitted component computes them, so that its outputs (bias included) match the source's outputs of the
    features it kept, on `nodes`. Closed form, no gradients."""
    if not ridge > 0:
        raise ModellegoError(f"the ridge must be positive, got {ridge}")
    if len(nodes) == 0:
        raise ModellegoError("reconstruction needs at least one node")
    graph = nodes.task.graph
    x, edge_index, index = graph.x, graph.edge_index, nodes.index
    source_outputs = _layer_inputs(source, x, edge_index, "output")
    layers = gcn_layers(component)
    order = list(layers)
    refitted = changed_layers(cut, order)
    for name in refitted:
        conv = layers[name]
        inputs = _layer_inputs(component, x, edge_index, "input")[name]
        mixed = propagated(conv, inputs, edge_index)[index].double()
        targets = source_outputs[name][index][:, cut.outputs[name]].double()
        design = torch.cat([mixed, mixed.new_ones(len(index), 1)], 1)
        equations = NormalEquations(1, design.shape[1], targets.shape[1])
        equations.add(design[None], targets[None])
        bias = conv.bias if conv.bias is not None else conv.lin.weight.new_zeros(conv.lin.weight.shape[0])
        prior = torch.cat([conv.lin.weight.detach().T, bias.detach()[None]], 0).double()
        solution = equations.cpu().solve(prior[None], ridge)[0]
        conv.lin.weight.copy_(solution[:-1].T.to(conv.lin.weight.dtype))
        if conv.bias is not None:
            conv.bias.copy_(solution[-1].to(conv.bias.dtype))
    return Reconstruction(len(index), ridge, len(refitted), 0)


class GraphCandidates:
    """`Candidates` of a GCN for the α/β search: cuts planned from the masks, FLOPs from the layer sizes (2·O·I
    per layer and node), each candidate built (small) and scored on the validation nodes."""

    layer_kinds = {"conv"}

    def __init__(self, model: nn.Module, profile: Profile, task: list[int], validation: Nodes, graph: ChainGraph,
                 samples: Nodes | None, ridge: float) -> None:
        self.model, self.profile, self.task, self.validation, self.graph = model, profile, task, validation, graph
        self.samples, self.ridge = samples, ridge

    def plan(self, thresholds: Thresholds) -> tuple[Cut, ComponentMasks]:
        masks = walk(self.profile, self.graph, thresholds, {name: "conv" for name in self.profile.layers})
        return plan_cut(self.model, masks, self.task)[0], masks

    def flops(self, cut: Cut) -> int:
        return sum(2 * len(cut.outputs[name]) * len(cut.inputs[name]) for name in cut.outputs)

    def component(self, candidate) -> tuple[nn.Module, Cut, Reconstruction | None]:
        part = build_component(self.model, candidate.cut)
        record = None
        if self.samples is not None:
            record = reconstruct(part, self.model, candidate.cut, self.samples, self.ridge)
        return part, candidate.cut, record

    def scores(self, candidate) -> Tensor:
        part, _, _ = self.component(candidate)
        graph = self.validation.task.graph
        return logits_of(part, graph.x, graph.edge_index)[self.validation.index]


# --- the kind ---------------------------------------------------------------------------------------------------

class GCN(ModelKind):
    name = "gcn"
    unit = "node"
    default_mode = AssemblyMode.PARALLEL
    modes = (AssemblyMode.PARALLEL,)
    calibrations = (Calibration.NONE, Calibration.SCALE)
    default_epochs = 200
    default_lr = 0.01
    unsupported = {
        "--flatten": "a GCN flattens nothing: its layers read the previous layer's features one to one",
        "--alpha-fc": "GCNConv layers use the conv pair, --alpha-conv and --beta-conv",
        "--beta-fc": "GCNConv layers use the conv pair, --alpha-conv and --beta-conv",
        "--batch-size": "graphs are trained and run full-batch, all nodes at once",
        "--auto-batch": "graphs are trained and run full-batch, all nodes at once",
        "--image-size": "graphs have nodes, not images",
        "--no-verify": "only CIFAR folders have checksums",
        "--precision": "a graph's passes are full-batch and small; they run in float32",
        "--workers": "a graph is held in memory as one tensor; there is nothing to decode",
    }

    # --- manifests -------------------------------------------------------------------------------------------------

    def owns(self, architecture: Any) -> bool:
        return is_graph_architecture(architecture)

    def handles(self, builder: str, dataset: str) -> bool:
        return builder in GRAPH_BUILDERS or dataset in GRAPH_DATASETS

    def check_input(self, value: Any, field: str) -> GraphSpec:
        data = mapping(value, field)
        if data.get("kind") != "graph":
            raise Invalid(f"{field}.kind must be 'graph' for a graph model, got {show(data.get('kind'))}")
        return GraphSpec(integer(data.get("features"), f"{field}.features", 1, MAX_FEATURES))

    def check_architecture(self, value: Any, field: str, spec: GraphSpec, level: int = 0) -> dict[str, Any]:
        """A GCN (in_features, hidden sizes, classes, dropout) or GCNs side by side (a parallel assembly)."""
        data = mapping(value, field)
        builder = string(data.get("builder"), f"{field}.builder", 100)
        integer(data.get("num_classes"), f"{field}.num_classes", 1, 100_000)
        if builder == GCN_PARALLEL:
            if level > 0:
                raise Invalid(f"{field} nests parallel graph assemblies; assemble the components themselves")
            members = sequence(data.get("members"), f"{field}.members", 2, MAX_MEMBERS)
            for i, member in enumerate(members):
                self.check_architecture(member, f"{field}.members[{i}]", spec, level + 1)
            return data
        if builder != GCN_BUILDER:
            raise Invalid(f"{field}.builder {show(builder)} is not a graph model")
        features = integer(data.get("in_features"), f"{field}.in_features", 1, MAX_FEATURES)
        if features != spec.features:
            raise Invalid(f"{field}.in_features is {features} but the input has {spec.features} features")
        for i, size in enumerate(sequence(data.get("hidden"), f"{field}.hidden", 0, MAX_HIDDEN_LAYERS)):
            integer(size, f"{field}.hidden[{i}]", 1, MAX_HIDDEN)
        number(data.get("dropout", 0.0), f"{field}.dropout", 0.0, 1.0)
        return data

    def build(self, architecture: dict[str, Any], spec: GraphSpec) -> nn.Module:
        return build_gcn(architecture)

    def structure_error(self, model: nn.Module, manifest: Manifest) -> str | None:
        return model.structure_error(len(manifest.classes))

    # --- data ------------------------------------------------------------------------------------------------------

    def data(self, manifest: Manifest, split: str, options: DataOptions | None = None, dataset: str | None = None,
             only: str | Sequence[str | int] | None = None) -> Nodes:
        task = graph_of(manifest, options, dataset)
        if only is not None:
            keep = torch.tensor(resolve_classes(manifest.class_names, only, "this model's classes"))
            task.labels = torch.where(torch.isin(task.labels, keep), task.labels, -1)
        return nodes_of(task, split)

    def subset(self, samples: Nodes, positions: Tensor, labels: Tensor | None = None) -> Nodes:
        positions = positions.long()
        return Nodes(samples.task, positions, samples.task.labels[positions] if labels is None else labels.long())

    def union(self, parts: Sequence[Nodes], labels: Tensor) -> Nodes:
        return Nodes(parts[0].task, torch.cat([part.index for part in parts]), labels)

    def check_profile_samples(self, profile: Profile, train: Nodes) -> None:
        profile.check_samples(int(train.task.graph.x.shape[0]))  # a graph profile's samples are node ids

    def positions(self, samples: Nodes, rows: Tensor) -> Tensor:
        return samples.index[rows]

    def predict(self, model: nn.Module, samples: Nodes, batch_size: int = 256,
                progress: bool = False) -> tuple[Tensor, Tensor]:
        graph = samples.task.graph
        return logits_of(model, graph.x, graph.edge_index)[samples.index], samples.targets

    def export_inputs(self, samples: Nodes, count: int) -> ExportInputs:
        """The whole graph the nodes belong to (a GCN reads its neighbours): its features and edges, both of any
        number; `count` does not apply."""
        graph = samples.task.graph
        return ExportInputs((graph.x.float(), graph.edge_index.long()), ("x", "edge_index"),
                            ({0: "nodes"}, {1: "edges"}))

    @torch.no_grad()
    @single_threaded
    def count_flops(self, model: nn.Module, spec: GraphSpec) -> int:
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

    # --- training --------------------------------------------------------------------------------------------------

    @single_threaded
    def train(self, builder: str, dataset: str, options: TrainOptions, data: DataOptions,
              progress: bool = True) -> Trained:
        """A GCN on a graph's training nodes (full batch), evaluated on the test nodes."""
        if builder != GCN_BUILDER:
            raise ModellegoError(f"{dataset!r} is a graph; train --model {GCN_BUILDER} on it"
                                 if builder != GCN_PARALLEL else
                                 f"{GCN_PARALLEL} models are made by `modellego assemble`; train --model {GCN_BUILDER}")
        if dataset not in GRAPH_DATASETS:
            raise ModellegoError(f"--model {builder} trains on graphs ({', '.join(GRAPH_DATASETS)}), not {dataset!r}")
        graph = load_graph(dataset, data.root)
        positions = (list(range(len(graph.classes))) if options.classes is None
                     else resolve_classes(graph.classes, options.classes, f"'{dataset}'"))
        refs = [ClassRef(graph.classes[k], graph.name, k) for k in positions]
        relabel = torch.full((len(graph.classes),), -1, dtype=torch.long)
        relabel[torch.tensor(positions)] = torch.arange(len(positions))
        task = TaskGraph(graph, relabel[graph.y], [ref.name for ref in refs])
        nodes = task.nodes("train")
        seed = options.seed
        if options.max_per_class is not None:
            order = torch.randperm(len(nodes), generator=torch.Generator().manual_seed(seed))
            nodes = torch.cat([nodes[order][task.labels[nodes[order]] == k][:options.max_per_class]
                               for k in range(len(positions))]).sort().values
        epochs, lr = options.epochs or self.default_epochs, options.lr or self.default_lr
        seed_everything(seed)
        model = GCNModel(graph.spec.features, [scaled_width(h, options.width) for h in DEFAULT_HIDDEN],
                         len(positions), DROPOUT).to(options.device)
        losses = fit(model, task, nodes, epochs, lr, seed)
        settled = _settle(model, task, nodes)
        manifest = Manifest(architecture=model.architecture(), classes=refs, input=graph.spec,
                            provenance={"trained": {"dataset": graph.name, "nodes": len(nodes), "epochs": epochs,
                                                    "lr": lr, "weight_decay": WEIGHT_DECAY, "seed": seed,
                                                    "width": options.width, "final_loss": losses[-1],
                                                    "data_root": graph.root, **settled}})
        test = nodes_of(task, "test")
        logits, labels = self.predict(model, test)
        result = accuracy_of(logits.argmax(1), labels, task.classes)
        metrics = {"accuracy": result.accuracy, "per_class": result.per_class, "samples": result.samples,
                   "params": count_params(model), "flops": self.count_flops(model, graph.spec)}
        manifest.metrics = {"test_accuracy": metrics["accuracy"], "params": metrics["params"],
                            "flops": metrics["flops"]}
        return Trained(Brick(model, manifest), metrics, len(nodes), self.unit)

    def finetune(self, brick: Brick, samples: Nodes, epochs: int, lr: float | None, batch_size: int | None,
                 seed: int, progress: bool = True, auto_batch: bool = False) -> Brick:
        lr = lr or self.default_lr
        model = brick.model
        losses = fit(model, samples.task, samples.index, epochs, lr, seed)
        manifest = copy.deepcopy(brick.manifest)
        manifest.provenance.setdefault("finetuned", []).append(
            {"epochs": epochs, "lr": lr, "seed": seed, "nodes": len(samples), "final_loss": losses[-1],
             **_settle(model, samples.task, samples.index)})
        manifest.metrics = {}
        return Brick(model, manifest)

    # --- the method ------------------------------------------------------------------------------------------------

    @torch.no_grad()
    @single_threaded
    def profile(self, model: nn.Module, samples: Nodes, samples_per_class: int = 50, batch_size: int = 64,
                progress: bool = False, classes: Sequence[str | int] | None = None) -> Profile:
        """Per class (of `classes`, default all), the most confident correctly classified nodes of `samples`
        (the training nodes), then the positive contributions of every GCNConv summed over them."""
        if samples_per_class < 1:
            raise ModellegoError(f"samples per class must be at least 1, got {samples_per_class}")
        model.eval()
        layers = gcn_layers(model)
        graph = samples.task.graph
        logits = logits_of(model, graph.x, graph.edge_index)
        names = samples.classes
        if logits.shape[1] != len(names):
            raise ModellegoError(f"the model has {logits.shape[1]} outputs but {len(names)} classes were given")
        wanted = None if classes is None else resolve_classes(names, classes, "the model's classes")
        kept: dict = {}
        candidates = samples.index[samples.targets >= 0]
        if wanted is not None:
            candidates = candidates[torch.isin(samples.task.labels[candidates], torch.tensor(wanted))]
        keep_candidates(kept, logits[candidates], samples.task.labels[candidates], candidates, samples_per_class)
        selection = selection_of(kept, names, samples_per_class, unit="node", wanted=wanted)
        for note in selection.notes:
            warnings.warn(note, stacklevel=2)
        nodes, labels = selection.positions, selection.labels
        sums: dict[str, Tensor] = {}
        order: list[str] = []

        def accumulate(name: str):
            def hook(module: nn.Module, inputs: tuple) -> None:
                order.append(name)
                mixed = propagated(module, inputs[0], inputs[1])[nodes.to(inputs[0].device)]
                sums[name] = class_sums(_as_linear(module), mixed, labels, len(selection.classes)).cpu()
            return hook

        handles = [module.register_forward_pre_hook(accumulate(name)) for name, module in layers.items()]
        try:
            logits_of(model, graph.x, graph.edge_index)
        finally:
            for handle in handles:
                handle.remove()
        return Profile(contributions={name: sums[name].float() for name in order}, layers=order,
                       classes=list(selection.classes), counts=torch.bincount(labels, minlength=len(selection.classes)),
                       samples=nodes, sample_labels=labels, model_hash=weights_hash(model),
                       input_shape=(int(graph.x.shape[1]),), dataset=graph.name, samples_per_class=samples_per_class,
                       notes=selection.notes, kinds={name: "conv" for name in order}, positions=wanted,
                       num_outputs=None if wanted is None else len(names))

    def pairs(self, model: nn.Module) -> int:
        return sum(conv.lin.weight.numel() for conv in gcn_layers(model).values())

    def check_profile(self, model: nn.Module, profile: Profile, spec: GraphSpec | None = None) -> None:
        sizes = {name: tuple(conv.lin.weight.shape) for name, conv in gcn_layers(model).items()}
        profile.check_fits(weights_hash(model), sizes, "GCNConv")

    def channels(self, model: nn.Module, spec: GraphSpec) -> ChainGraph:
        layers = gcn_layers(model)
        return ChainGraph(list(layers), {name: tuple(conv.lin.weight.shape) for name, conv in layers.items()})

    def locate(self, model: nn.Module, profile: Profile, thresholds: Thresholds, graph: ChainGraph,
               flatten: FlattenRule) -> ComponentMasks:
        self.check_profile(model, profile)
        return walk(profile, graph, thresholds, {name: "conv" for name in profile.layers})

    def cut(self, model: nn.Module, masks: ComponentMasks, task: list[int], graph: ChainGraph | None,
            spec: GraphSpec) -> tuple[nn.Module, Cut]:
        cut, empty = plan_cut(model, masks, task)
        for name in empty:
            warnings.warn(f"no feature of {name} is relevant to the task; keeping its most relevant one",
                          stacklevel=3)
        return build_component(model, cut), cut

    def component_architecture(self, source: Manifest, component: nn.Module, task: list[int]) -> dict[str, Any]:
        return component.architecture()

    def reconstruct(self, component: nn.Module, source: nn.Module, cut: Cut, samples: Nodes,
                    ridge: float) -> Reconstruction:
        return reconstruct(component, source, cut, samples, ridge)

    def validation(self, train: Nodes, positions: list[int], profile: Profile, seed: int = 0) -> Nodes:
        """The task's validation nodes (the graph's own split: never test nodes, never the profile's)."""
        validation = nodes_of(train.task, "val")
        chosen = torch.isin(validation.targets, torch.tensor(positions))
        if not chosen.any():
            raise ModellegoError("the graph has no validation node of the task's classes, so --auto cannot judge α/β")
        return self.subset(train, validation.index[chosen])

    def search(self, model: nn.Module, profile: Profile, task: list[int], validation: Nodes, max_drop: float,
               grid: Sequence[Thresholds], samples: Nodes | None, ridge: float, flatten: FlattenRule,
               graph: ChainGraph, progress: bool = False) -> SearchResult:
        logits, labels = self.predict(model, validation)
        labels, restricted = restricted_base(logits, labels, [profile.output_positions[k] for k in task],
                                             profile.outputs)
        candidates = GraphCandidates(model, profile, task, validation, graph, samples, ridge)
        return single_threaded(search)(candidates, grid, labels, restricted, max_drop, progress)

    @torch.no_grad()
    def scale(self, model: nn.Module, samples: Nodes, spec: GraphSpec,
              progress: bool = False) -> tuple[nn.Module, list[float]]:
        scaled = copy.deepcopy(model).eval()
        logits, labels = self.predict(scaled, samples)
        factors = scale_factors(logits, labels, samples.classes)
        head = scaled.convs[-1]
        scale_rows(head.lin.weight, head.bias, factors)
        return scaled, factors

    def fit_gate(self, calibration: Calibration, model: nn.Module, samples: Nodes, spec: GraphSpec) -> dict:
        raise ModellegoError(f"graph assemblies are calibrated by the paper's scaling only, not {calibration.value!r}")

    def assemble(self, models: Sequence[nn.Module], spec: GraphSpec, mode: AssemblyMode, targets: Sequence[int],
                 calibration: Calibration, stats: Sequence[dict[str, Tensor]] | None,
                 temperature: float) -> nn.Module:
        """GCN components side by side (parallel mode): concatenated logits, output j feeding class `targets[j]`."""
        check_members(len(models))
        self.check_mode(mode)
        features = {member.convs[0].lin.weight.shape[1] for member in models}
        if len(features) > 1:
            raise ModellegoError(f"the components take different node features ({sorted(features)}); assemble "
                                 "components of models trained on the same graph features")
        device = runtime.device_of(models[0])
        return GraphParallel([copy.deepcopy(member).eval() for member in models], list(targets)).to(device)

    def assembly_architecture(self, members: Sequence[Brick], mode: AssemblyMode, model: nn.Module,
                              num_classes: int) -> dict[str, Any]:
        for member in members:
            if member.manifest.architecture.get("builder") != GCN_BUILDER:
                raise ModellegoError(f"a {member.manifest.architecture.get('builder')!r} model is not a GCN "
                                     "component; assemble GCN components (of the same graph)")
        if len({member.manifest.datasets[0] for member in members}) > 1:
            raise ModellegoError("graph components answer nodes of one graph; these come from different graphs")
        return {"builder": GCN_PARALLEL, "num_classes": num_classes,
                "members": [member.model.architecture() for member in members]}


@single_threaded
def fit(model: nn.Module, task: TaskGraph, nodes: Tensor, epochs: int, lr: float, seed: int,
        weight_decay: float = WEIGHT_DECAY) -> list[float]:
    """Full-batch training on `nodes` (cross-entropy on the model's outputs, Adam with weight decay)."""
    seed_everything(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    device = next(model.parameters()).device
    x, edge_index = task.graph.x.to(device), task.graph.edge_index.to(device)
    labels = task.labels[nodes].to(device)
    losses = []
    model.train()
    for epoch in range(epochs):
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x, edge_index)[nodes.to(device)], labels)
        loss.backward()
        optimizer.step()
        if not math.isfinite(loss.item()):
            raise ModellegoError(f"training diverged (the loss became {loss.item()}) in epoch {epoch + 1}; "
                                 "lower the learning rate (--lr)")
        losses.append(loss.item())
    model.eval()
    return losses


def _settle(model: nn.Module, task: TaskGraph, nodes: Tensor) -> dict:
    """After training: the model's accuracy on its own training nodes, warnings when it is at chance or a class
    is right on fewer than half of its nodes; the facts for provenance."""
    labels = task.labels[nodes]
    result = accuracy_of(logits_of(model, task.graph.x, task.graph.edge_index)[nodes].argmax(1), labels, task.classes)
    chance = torch.bincount(labels).max().item() / len(labels)
    warn_if_at_chance(result.accuracy, chance, len(labels))
    warn_about_weak_classes(result.per_class, "node")
    return {"train_accuracy": result.accuracy, "train_accuracy_nodes": len(labels)}
