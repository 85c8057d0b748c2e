"""The commands on graph models (files, manifests, graphs by name, evaluation): what `modellego.pipeline` calls
when a command's model or data is a graph. Results have the image commands' types and keys, counting nodes
where those count images."""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modellego.data.subsets import resolve_classes
from modellego.data.task import data_root_hints
from modellego.errors import ModellegoError
from modellego.evaluate import baselines_of, count_params
from modellego.graphs import method, single_threaded
from modellego.graphs.data import Graph, load_graph
from modellego.graphs.model import DEFAULT_HIDDEN, GCN
from modellego.graphs.spec import GCN as GCN_BUILDER, GCN_PARALLEL, GRAPH_DATASETS
from modellego.masks import PAPER, Thresholds
from modellego.modelfile import Brick, ClassRef, Manifest, check_output_path, load, save, weights_hash
from modellego.models.common import scaled as scaled_width
from modellego.pipeline import AGREEMENT_GAP, DataOptions, Disassembled, FilePath, ProfileSampleCheck, Trained, \
    _union, pareto_front
from modellego.profiles import Profile
from modellego.search import SEARCH_ALPHAS, SEARCH_BETAS, SearchResult
from modellego.train import seed_everything, warn_about_weak_classes, warn_if_at_chance

WEIGHT_DECAY = 5e-4
DROPOUT = 0.5


# --- a model's graph and labels ---------------------------------------------------------------------------------

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


def logits_of(model: nn.Module, task: TaskGraph) -> Tensor:
    return method.logits_of(model, task.graph.x, task.graph.edge_index)


def report(model: nn.Module, manifest: Manifest, task: TaskGraph, split: str = "test") -> dict:
    """Accuracy (overall, per class) on the `split` nodes of the model's classes, params and FLOPs per node."""
    result = method.accuracy(logits_of(model, task), task.labels, task.nodes(split), task.classes)
    return {"accuracy": result.accuracy, "per_class": result.per_class, "samples": result.samples, "unit": "node",
            "params": count_params(model), "flops": method.count_flops(model, manifest.input),
            "data": task.graph.name}


# --- training ---------------------------------------------------------------------------------------------------

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
    result = method.accuracy(logits_of(model, task), task.labels, nodes, task.classes)
    labels = task.labels[nodes]
    chance = torch.bincount(labels).max().item() / len(labels)
    warn_if_at_chance(result.accuracy, chance, len(labels))
    warn_about_weak_classes(result.per_class, "node")
    return {"train_accuracy": result.accuracy, "train_accuracy_nodes": len(labels)}


@single_threaded
def train(builder: str, dataset: str, out: FilePath, epochs: int = 200, classes: str | None = None,
          width: float = 1.0, lr: float = 0.01, max_per_class: int | None = None, data: DataOptions | None = None,
          seed: int = 0) -> Trained:
    """Train a GCN on a graph's training nodes (full batch), evaluate it on the test nodes, save it to `out`."""
    if builder != GCN_BUILDER:
        raise ModellegoError(f"{dataset!r} is a graph; train --model {GCN_BUILDER} on it" if builder != GCN_PARALLEL
                             else f"{GCN_PARALLEL} models are made by `modellego assemble`; train --model {GCN_BUILDER}")
    if dataset not in GRAPH_DATASETS:
        raise ModellegoError(f"--model {builder} trains on graphs ({', '.join(GRAPH_DATASETS)}), not {dataset!r}")
    check_output_path(out)
    graph = load_graph(dataset, data.root if data is not None else None)
    positions = list(range(len(graph.classes))) if classes is None else resolve_classes(graph.classes, classes,
                                                                                       f"'{dataset}'")
    refs = [ClassRef(graph.classes[k], graph.name, k) for k in positions]
    relabel = torch.full((len(graph.classes),), -1, dtype=torch.long)
    relabel[torch.tensor(positions)] = torch.arange(len(positions))
    task = TaskGraph(graph, relabel[graph.y], [ref.name for ref in refs])
    nodes = task.nodes("train")
    if max_per_class is not None:
        order = torch.randperm(len(nodes), generator=torch.Generator().manual_seed(seed))
        nodes = torch.cat([nodes[order][task.labels[nodes[order]] == k][:max_per_class]
                           for k in range(len(positions))]).sort().values
    seed_everything(seed)
    model = GCN(graph.spec.features, [scaled_width(h, width) for h in DEFAULT_HIDDEN], len(positions), DROPOUT)
    losses = fit(model, task, nodes, epochs, lr, seed)
    settled = _settle(model, task, nodes)
    manifest = Manifest(architecture=model.architecture(), classes=refs, input=graph.spec,
                        provenance={"trained": {"dataset": graph.name, "nodes": len(nodes), "epochs": epochs,
                                                "lr": lr, "weight_decay": WEIGHT_DECAY, "seed": seed,
                                                "width": width, "final_loss": losses[-1],
                                                "data_root": graph.root, **settled}})
    metrics = report(model, manifest, task)
    manifest.metrics = {"test_accuracy": metrics["accuracy"], "params": metrics["params"], "flops": metrics["flops"]}
    save(model, out, manifest)
    return Trained(Brick(model, manifest), metrics, len(nodes))


@single_threaded
def finetune(path: FilePath, out: FilePath, epochs: int = 2, lr: float = 0.01, data: DataOptions | None = None,
             seed: int = 0) -> Brick:
    """Train a graph model file (an assembly: all its members) on the training nodes of all its classes."""
    check_output_path(out, inputs=[path])
    model, manifest = load(path)
    task = graph_of(manifest, data)
    nodes = task.nodes("train")
    losses = fit(model, task, nodes, epochs, lr, seed)
    manifest = copy.deepcopy(manifest)
    manifest.provenance.setdefault("finetuned", []).append(
        {"epochs": epochs, "lr": lr, "seed": seed, "nodes": len(nodes), "final_loss": losses[-1],
         **_settle(model, task, nodes)})
    manifest.metrics = {}
    save(model, out, manifest)
    return Brick(model, manifest)


# --- evaluation -------------------------------------------------------------------------------------------------

@single_threaded
def evaluate_file(path: FilePath, dataset: str | None = None, classes: str | None = None,
                  data: DataOptions | None = None) -> dict:
    """Accuracy of a graph model file on the test nodes of its classes (or of `classes`, labels unchanged)."""
    model, manifest = load(path)
    task = graph_of(manifest, data, dataset)
    if classes is not None:
        keep = torch.tensor(resolve_classes(manifest.class_names, classes, "this model's classes"))
        task.labels = torch.where(torch.isin(task.labels, keep), task.labels, -1)
    result = report(model, manifest, task)
    if manifest.kind == "assembly":
        from modellego.pipeline import assembly_base

        result["base"] = assembly_base(manifest)
    return result


def baselines(source: Brick, part_manifest: Manifest, task: TaskGraph, split: str = "test") -> dict:
    """Base (the source, argmax over all its classes) and Restricted base (its logits restricted to the
    component's classes) on the `split` nodes of the component's classes, overall and per class."""
    positions = []
    for ref in part_manifest.classes:
        if ref not in source.manifest.classes:
            raise ModellegoError(f"the source model does not predict class {ref.name!r} of {ref.dataset}, "
                                 "so it is not this component's source")
        positions.append(source.manifest.classes.index(ref))
    index = torch.tensor(positions)
    nodes = task.nodes(split)
    return baselines_of(logits_of(source.model, task)[nodes], task.labels[nodes], index, task.classes)


@single_threaded
def compare(component_path: FilePath, source_path: FilePath, data: DataOptions | None = None) -> dict:
    """A graph component against its source on the component's test nodes: Base, Restricted base, the component."""
    part, manifest = load(component_path)
    source = load(source_path)
    if not isinstance(source.manifest.input, type(manifest.input)):
        raise ModellegoError(f"{source_path} is not a graph model, so it is not this component's source")
    task = graph_of(manifest, data)
    result = report(part, manifest, task)
    return {**baselines(source, manifest, task), "accuracy": result["accuracy"], "per_class": result["per_class"],
            "params": result["params"], "flops": result["flops"], "source_params": count_params(source.model),
            "source_flops": method.count_flops(source.model, source.manifest.input), "samples": result["samples"],
            "unit": "node", "classes": manifest.class_names, "data": task.graph.name}


# --- profile, disassemble, assemble -----------------------------------------------------------------------------

@single_threaded
def profile(model_path: FilePath, out: FilePath, samples_per_class: int = 50, dataset: str | None = None,
            data: DataOptions | None = None) -> Profile:
    """Profile a graph model file on its graph's training nodes and save the profile."""
    check_output_path(out, inputs=[model_path])
    model, manifest = load(model_path)
    task = graph_of(manifest, data, dataset)
    graph = task.graph
    result = method.profile(model, graph.x, graph.edge_index, task.labels, task.nodes("train"), task.classes,
                            samples_per_class, graph.name)
    result.save(out)
    return result


def component(source: Brick, masks, classes: str | Sequence[str | int]) -> Brick:
    """The component of a GCN for `classes`, with a manifest recording its lineage (like `pipeline.component`)."""
    task = resolve_classes(masks.classes, classes, "the model's classes")
    model = method.disassemble(source.model, masks, task)
    provenance = {"disassembled": {
        "source_hash": weights_hash(source.model), "source_provenance": source.manifest.provenance,
        "task": [source.manifest.classes[k].name for k in task], "task_positions": task,
        "profile_hash": masks.profile_hash, **masks.settings}}
    return Brick(model, Manifest(architecture=model.architecture(), classes=[source.manifest.classes[k] for k in task],
                                 input=source.manifest.input, kind="component", provenance=provenance))


def _task_accuracy(model: nn.Module, source: nn.Module, task_positions: list[int], graph: TaskGraph,
                   nodes: Tensor) -> tuple[float, float, int]:
    """A component's accuracy and its source's restricted to the task, on `nodes` (labelled by the source)."""
    index = torch.tensor(task_positions)
    in_task = torch.full((len(graph.classes),), -1, dtype=torch.long)
    in_task[index] = torch.arange(len(index))
    labels = in_task[graph.labels[nodes]]
    nodes, labels = nodes[labels >= 0], labels[labels >= 0]
    if len(nodes) == 0:
        return float("nan"), float("nan"), 0
    own = (logits_of(model, graph)[nodes].argmax(1) == labels).float().mean().item()
    restricted = (logits_of(source, graph)[nodes][:, index].argmax(1) == labels).float().mean().item()
    return own, restricted, len(nodes)


def search(source: Brick, class_profile: Profile, task_positions: list[int], graph: TaskGraph,
           max_drop: float) -> SearchResult:
    """--auto on a graph: the α/β grid of the image path, judged on the validation nodes of the task (never the
    test nodes); the fewest FLOPs within `max_drop` points of the restricted base there, else the most accurate."""
    nodes = graph.nodes("val")
    _, restricted, count = _task_accuracy(source.model, source.model, task_positions, graph, nodes)
    if count == 0:
        raise ModellegoError("the graph has no validation node of the task's classes, so --auto cannot judge α/β")
    target = restricted - max_drop / 100
    candidates, best = [], None
    for alpha in SEARCH_ALPHAS:
        for beta in SEARCH_BETAS:
            masks = method.locate(source.model, class_profile, alpha, beta)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                part = method.disassemble(source.model, masks, task_positions)
            accuracy, _, _ = _task_accuracy(part, source.model, task_positions, graph, nodes)
            flops = method.count_flops(part, source.manifest.input)
            candidates.append({"alpha_conv": alpha, "beta_conv": beta, "accuracy": accuracy, "flops": flops})
            key = (accuracy < target, flops if accuracy >= target else -accuracy)
            if best is None or key < best[0]:
                best = (key, part, alpha, beta, accuracy)
    _, part, alpha, beta, accuracy = best
    if accuracy < target:
        warnings.warn(f"no α/β kept accuracy within {max_drop} points; chose the most accurate component",
                      stacklevel=2)
    return SearchResult(part, Thresholds(alpha, beta, PAPER.alpha_fc, PAPER.beta_fc), accuracy, target, restricted,
                        candidates, count)


@single_threaded
def disassemble(model_path: FilePath, profile_path: FilePath, classes: str | Sequence[str | int], out: FilePath,
                thresholds: Thresholds = PAPER, auto: bool = False, max_drop: float = 1.0, evaluate: bool = False,
                data: DataOptions | None = None) -> Disassembled:
    """Cut the component for `classes` out of a graph model file with its profile and save it. GCNConv layers
    use the conv pair of `thresholds` (α_conv, β_conv)."""
    check_output_path(out, inputs=[model_path, profile_path])
    source = load(model_path)
    class_profile = Profile.load(profile_path)
    method.check_profile(source.model, class_profile)
    task_positions = resolve_classes(class_profile.classes, classes, "the model's classes")
    graph = graph_of(source.manifest, data)
    found = None
    if auto:
        found = search(source, class_profile, task_positions, graph, max_drop)
        thresholds = found.thresholds
    masks = method.locate(source.model, class_profile, thresholds.alpha_conv, thresholds.beta_conv)
    part = component(source, masks, task_positions)
    if found is not None:
        part.manifest.provenance["disassembled"]["auto"] = {
            "max_drop": max_drop, "validation_nodes": found.validation_samples, "validation_accuracy": found.accuracy,
            "validation_restricted_base": found.restricted_base, "met_target": found.met_target,
            "pareto": pareto_front(found.candidates)}
    check = None
    if class_profile.dataset == graph.graph.name:
        own, restricted, count = _task_accuracy(part.model, source.model, task_positions, graph,
                                                class_profile.samples)
        check = ProfileSampleCheck(own, restricted, count)
        if own < restricted - AGREEMENT_GAP:
            warnings.warn(f"the component gets {100 * own:.2f}% of the task's {count} profile nodes right, "
                          f"{100 * (restricted - own):.1f} points below its source restricted to the task "
                          f"({100 * restricted:.2f}%): these α/β cut features the task needs; try --auto",
                          stacklevel=2)
    task = graph_of(part.manifest, data)
    result = report(part.model, part.manifest, task)
    metrics = {"params": result["params"], "flops": result["flops"]}
    if evaluate:
        metrics.update(baselines(source, part.manifest, task), test_accuracy=result["accuracy"])
    part.manifest.metrics = metrics
    save(part.model, out, part.manifest)
    return Disassembled(part, source, found, check, metrics)


@single_threaded
def assemble(paths: Sequence[FilePath], out: FilePath, mode: str = "parallel", scale_logits: bool = True,
             data: DataOptions | None = None) -> Brick:
    """Assemble graph component files side by side (parallel mode) into one model answering the union of their
    classes; each is first scaled on its own task's training nodes unless `scale_logits` is False."""
    check_output_path(out, inputs=list(paths))
    if len(paths) < 2:
        raise ModellegoError(f"assembling needs at least two components, got {len(paths)}")
    if mode != "parallel":
        raise ModellegoError(f"graph components assemble in --mode parallel (side by side), not {mode!r}")
    members = []
    for path in paths:
        brick = load(path)
        if brick.manifest.architecture.get("builder") != GCN_BUILDER:
            raise ModellegoError(f"{path} is not a GCN component (builder {brick.manifest.architecture.get('builder')!r}); "
                                 "assemble GCN components (of the same graph)")
        if scale_logits and "scaled" not in brick.manifest.provenance:
            task = graph_of(brick.manifest, data)
            model, factors = method.scale(brick.model, task.graph.x, task.graph.edge_index, task.labels,
                                          task.nodes("train"), task.classes)
            manifest = copy.deepcopy(brick.manifest)
            manifest.provenance["scaled"] = {"factors": factors, "nodes": len(task.nodes("train"))}
            brick = Brick(model, manifest)
        members.append(brick)
    if len({member.manifest.datasets[0] for member in members}) > 1:
        raise ModellegoError("graph components answer nodes of one graph; these come from different graphs")
    classes, targets = _union([member.manifest for member in members])
    model = method.assemble([member.model for member in members], targets)
    architecture = {"builder": GCN_PARALLEL, "num_classes": len(classes),
                    "members": [member.model.architecture() for member in members]}
    provenance = {"assembled": {"mode": mode, "scaled": scale_logits,
                                "components": [{"hash": weights_hash(m), "classes": mf.class_names,
                                                "provenance": mf.provenance, "metrics": mf.metrics}
                                               for m, mf in members]}}
    brick = Brick(model, Manifest(architecture=architecture, classes=classes, input=members[0].manifest.input,
                                  kind="assembly", provenance=provenance))
    save(brick.model, out, brick.manifest)
    return brick
