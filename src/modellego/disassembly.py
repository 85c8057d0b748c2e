"""Disassembly: cut a standalone, physically smaller model for a task (some of the classes) out of a source
model, keeping the channels its classes route through (DESIGN.md, "Disassembly")."""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from modellego.data.subsets import resolve_classes
from modellego.errors import ModellegoError
from modellego.graph import ChannelGraph, dependency_graph
from modellego.masks import ComponentMasks
from modellego.modelfile import Manifest, weights_hash
from modellego.layers import is_grouped, parameter_layers


@dataclass
class Component:
    """A disassembled model and its manifest (save it with `modellego.save(c.model, path, c.manifest)`)."""

    model: nn.Module
    manifest: Manifest
    warnings: list[str]


def disassemble(model: nn.Module, masks: ComponentMasks, classes: str | Sequence[str | int],
                manifest: Manifest, input_shape: tuple[int, ...] | None = None) -> Component:
    """The component of `model` for `classes` (names or output positions, in the order wanted).

    Channels kept: those any task class routes through, united over everything coupled with them
    (residual adds, depthwise convs); grouped convs keep all their channels (their groups must stay equally
    wide); input channels stay; no layer is left empty; the classifier keeps
    exactly the task's rows, in the task's order. `manifest` is the source's; the component's derives from it.
    """
    task = resolve_classes(masks.classes, classes, "the model's classes")
    component = copy.deepcopy(model).eval()
    layers = parameter_layers(component)
    names = {module: name for name, module in layers.items()}
    head = layers[masks.classifier]
    graph = dependency_graph(component, input_shape or (manifest.input.channels, *manifest.input.size))
    notes: list[str] = []
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
            note = (f"no channel of {names.get(root.dep.target.module, '?')} is relevant to the task; "
                    "keeping its most relevant one")
            notes.append(note)
            warnings.warn(note, stacklevel=2)
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
    return Component(component, _component_manifest(manifest, masks, task, model), notes)


def _component_manifest(source: Manifest, masks: ComponentMasks, task: list[int], model: nn.Module) -> Manifest:
    if [ref.name for ref in source.classes] != masks.classes:
        raise ModellegoError("the masks were located for a model with other classes than this manifest describes")
    architecture = dict(source.architecture, num_classes=len(task))
    provenance = {
        "disassembled": {
            "source_hash": weights_hash(model),
            "source_provenance": source.provenance,
            "task": [source.classes[k].name for k in task],
            "task_positions": task,
            "profile_hash": masks.profile_hash,
            **masks.settings,
        }
    }
    return Manifest(architecture=architecture, classes=[source.classes[k] for k in task], input=source.input,
                    kind="component", provenance=provenance)


SEARCH_ALPHAS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6)
SEARCH_BETAS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5)


@dataclass
class SearchResult:
    """The chosen component, the validation accuracy it must keep, and every candidate tried."""

    component: Component
    target: float
    restricted_base: float
    candidates: list[dict]


def auto_disassemble(model: nn.Module, profile, classes: str | Sequence[str | int], manifest: Manifest,
                     validation, max_drop: float = 1.0, alphas: Sequence[float] = SEARCH_ALPHAS,
                     betas: Sequence[float] = SEARCH_BETAS, progress: bool = False) -> SearchResult:
    """Search α/β for the smallest component (FLOPs) whose accuracy on `validation` (held-out *training*
    data of the task, labelled by the source model's outputs, see `validation_data`) stays within
    `max_drop` points of the restricted base on the same data. Linear layers use the paper's offsets: α_fc = α + 0.1, β_fc = β + 0.1 (capped at 1)."""
    from modellego.evaluate import count_flops, predict
    from modellego.masks import locate
    from modellego.progress import track

    if not 0 <= max_drop <= 100:
        raise ModellegoError(f"--max-drop is in accuracy points and must be between 0 and 100, got {max_drop}")
    task = resolve_classes(profile.classes, classes, "the model's classes")
    logits, labels = predict(model, validation)
    in_task = torch.full((len(profile.classes),), -1, dtype=torch.long)
    in_task[torch.tensor(task)] = torch.arange(len(task))
    labels = in_task[labels]
    if (labels < 0).any() or len(labels) == 0:
        raise ModellegoError("the validation data must hold samples of the task's classes only")
    restricted = (logits[:, torch.tensor(task)].argmax(1) == labels).float().mean().item()
    target = restricted - max_drop / 100
    input_shape = (manifest.input.channels, *manifest.input.size)
    graph = ChannelGraph(model, input_shape)
    candidates, best = [], None
    grid = [(alpha, beta) for alpha in alphas for beta in betas]
    for alpha, beta in track(grid, "searching α/β", len(grid), progress):
        masks = locate(model, profile, alpha, beta, round(min(1.0, alpha + 0.1), 4), round(min(1.0, beta + 0.1), 4),
                       graph=graph)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            component = disassemble(model, masks, task, manifest, input_shape)
        accuracy = (predict(component.model, validation)[0].argmax(1) == labels).float().mean().item()
        flops = count_flops(component.model, manifest.input)
        candidates.append({**masks.settings, "accuracy": accuracy, "flops": flops})
        key = (accuracy < target, flops if accuracy >= target else -accuracy)
        if best is None or key < best[0]:
            best = (key, component, accuracy)
    chosen = best[1]
    chosen.manifest.provenance["disassembled"]["auto"] = {
        "max_drop": max_drop, "validation_samples": len(validation), "validation_accuracy": best[2],
        "validation_restricted_base": restricted, "met_target": best[2] >= target}
    if best[2] < target:
        chosen.warnings.append(f"no α/β kept accuracy within {max_drop} points; chose the most accurate component")
    return SearchResult(chosen, target, restricted, candidates)


def validation_data(train_data, classes: str | Sequence[str | int], exclude: torch.Tensor, fraction: float = 0.1,
                    seed: int = 0):
    """Held-out training samples of the task's classes for `auto_disassemble`: `fraction` of each class,
    drawn with `seed`, never one of the positions in `exclude` (the profile's samples). Never test data."""
    from modellego.data.subsets import SampleSubset

    task = resolve_classes(train_data.classes, classes, "the model's classes")
    generator = torch.Generator().manual_seed(seed)
    allowed = torch.ones(len(train_data), dtype=torch.bool)
    allowed[exclude.long()] = False
    chosen = []
    for label in task:
        members = torch.nonzero((train_data.targets == label) & allowed).flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        chosen.append(members[: max(1, round(len(members) * fraction))])
    return SampleSubset(train_data, torch.cat(chosen).sort().values)
