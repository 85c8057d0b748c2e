"""The α/β search (`--auto`): the smallest component whose accuracy on held-out data of its task stays within a
budget of the source restricted to the task.

Fast by construction: every candidate's cut (which channels it keeps) comes from the profile and the model's
channel graph without touching the model, so its FLOPs are known before any forward pass; candidates that cut the
same channels are evaluated once; they are evaluated by increasing FLOPs and the walk stops at the first that
meets the target (which is then the answer the whole grid would give). The walk is the same for every model
kind; what a kind supplies is `Candidates` (how to plan a cut, count its FLOPs, score it and build it). For
images (`ImageCandidates`) a candidate is evaluated on one working copy of the source whose pruned channels are
masked (zeroed where they are read), not on a new copy pruned by torch-pruning, and, with reconstruction,
re-fitted in place against the source's layer outputs computed once for the search; the layers before the first
one the cut changes are left as they are."""

from __future__ import annotations

import copy
import dataclasses
import warnings
from dataclasses import dataclass, field
from typing import Protocol, Sequence

import torch
from torch import nn
from torch.utils.data import Dataset

from modellego.core.channels import ChannelGraph
from modellego.core.cut import Cut, disassemble_with_cut, plan_cut, zero_removed_inputs
from modellego.core.evaluate import count_flops, predict
from modellego.core.layers import example_batch, execution_order, parameter_layers
from modellego.core.locate import DEFAULT_FLATTEN, ComponentMasks, FlattenRule, Thresholds, locate_checked
from modellego.core.profile import Profile
from modellego.core.reconstruct import (
    RIDGE,
    LayerFit,
    Reconstruction,
    changed_layers,
    component_fits,
    in_memory,
    reconstruct,
    source_outputs_by_batch,
)
from modellego.core.samples import SampleSubset, resolve_classes, task_labels
from modellego.core.thresholds import GRID_STEP
from modellego.errors import ModellegoError
from modellego.progress import track

SEARCH_ALPHAS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6)
SEARCH_BETAS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5)
UNIT_TOP = 0.9  # a Transformer's α and β go this high: its stream is kept whole (docs/method.md, "Locating")
MIXING_NORMS = (nn.LayerNorm, nn.GroupNorm)  # normalise across channels: masking a channel is not removing it


def search_grid(step: float = GRID_STEP, alpha_top: float = 0.6,
                beta_top: float = 0.5) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The α and β values `--auto` tries: 0, step, 2·step, … up to `alpha_top` and `beta_top`; step 0.1 gives
    SEARCH_ALPHAS × SEARCH_BETAS. A finer step finds components between the coarse grid's points."""
    if not 0.01 <= step <= 0.5:
        raise ModellegoError(f"the grid step (--grid-step) must be between 0.01 and 0.5, got {step}")

    def values(top: float) -> tuple[float, ...]:
        return tuple(round(step * k, 4) for k in range(int(top / step + 1e-9) + 1))

    return values(alpha_top), values(beta_top)


@dataclass
class SearchResult:
    """The chosen component and thresholds, its validation accuracy, the accuracy it had to keep (`target`,
    from the restricted base on the same data), and every candidate evaluated (thresholds, accuracy, FLOPs);
    `skipped` counts the grid points not evaluated (same cut as another, or more FLOPs than the answer)."""

    component: nn.Module
    thresholds: Thresholds
    accuracy: float
    target: float
    restricted_base: float
    candidates: list[dict] = field(default_factory=list)
    validation_samples: int = 0
    masks: ComponentMasks | None = None
    reconstruction: Reconstruction | None = None
    skipped: int = 0
    grid: int = 0
    cut: Cut | None = None

    @property
    def met_target(self) -> bool:
        return self.accuracy >= self.target


class _FlopModel:
    """FLOPs of a cut without building it: the source's FLOPs minus what its Conv2d/Linear layers lose."""

    def __init__(self, model: nn.Module, shape: tuple[int, ...]) -> None:
        self.layers = parameter_layers(model)
        self.total = count_flops(model, shape)
        self.positions: dict[str, int] = {}

        def record(name: str):
            def hook(module, args, output) -> None:
                per_row = output[0, 0].numel() if isinstance(module, nn.Conv2d) else output[0].numel() // output.shape[-1]
                self.positions.setdefault(name, per_row)
            return hook

        handles = [layer.register_forward_hook(record(name)) for name, layer in self.layers.items()]
        try:
            with torch.no_grad():
                model.eval()(example_batch(model, shape))
        finally:
            for handle in handles:
                handle.remove()
        self.full = sum(self._layer(name, layer.weight.shape[0], None) for name, layer in self.layers.items())

    def _layer(self, name: str, outputs: int, inputs: int | None) -> int:
        layer = self.layers[name]
        if isinstance(layer, nn.Conv2d):
            per_group = layer.in_channels // layer.groups if layer.groups > 1 or inputs is None else inputs
            return 2 * outputs * per_group * layer.kernel_size[0] * layer.kernel_size[1] * self.positions.get(name, 0)
        return 2 * outputs * (layer.in_features if inputs is None else inputs) * self.positions.get(name, 0)

    def of(self, cut: Cut) -> int:
        kept = sum(self._layer(name, len(cut.outputs[name]), len(cut.inputs[name])) for name in self.layers)
        return self.total - self.full + kept


def _fits(model: nn.Module, cut: Cut, order: list[str]) -> dict[str, LayerFit]:
    """Masked-model fits: a layer's kept rows and kept input channels against the same source rows; grouped
    convs whole. The unchanged prefix is not re-fitted (as for the component, see `changed_layers`)."""
    layers = parameter_layers(model)
    fits = {}
    for name in changed_layers(cut, order):
        layer = layers[name]
        if isinstance(layer, nn.Conv2d) and layer.groups > 1:
            fits[name] = LayerFit(None, None, torch.arange(layer.out_channels))
        else:
            fits[name] = LayerFit(cut.outputs[name], cut.inputs[name], cut.outputs[name])
    return fits


def _relatives_once(profile: Profile) -> Profile:
    """A shallow copy of `profile` whose `relative` computes each layer's relative contributions once: the
    search locates from the same profile for every grid point."""
    relatives: dict[str, torch.Tensor] = {}

    def relative(layer: str) -> torch.Tensor:
        if layer not in relatives:
            relatives[layer] = profile.relative(layer)
        return relatives[layer]

    memoized = dataclasses.replace(profile)
    memoized.relative = relative
    return memoized


@dataclass
class Candidate:
    """One cut the grid gives: which channels it keeps, the masks it came from, the grid points that give it,
    and its FLOPs."""

    cut: Cut
    masks: ComponentMasks
    thresholds: list[Thresholds]
    flops: int


class Candidates(Protocol):
    """What the search needs of a model kind, for one source, task and set of validation samples."""

    layer_kinds: set[str]  # the kinds of layer ("conv", "linear") whose thresholds a candidate records

    def plan(self, thresholds: Thresholds) -> tuple[Cut, ComponentMasks]:
        """The cut these thresholds give, without touching the model."""

    def flops(self, cut: Cut) -> int:
        """FLOPs of the component the cut gives, without building it."""

    def scores(self, candidate: Candidate) -> torch.Tensor:
        """The candidate's logits over the task's classes (in task order) on the validation samples."""

    def component(self, candidate: Candidate) -> tuple[nn.Module, Cut, Reconstruction | None]:
        """The candidate as a standalone component (re-fitted where the search re-fits), its cut and re-fit."""


def check_max_drop(max_drop: float) -> None:
    """The accuracy points a search may give up: a number in [0, 100]."""
    if not 0 <= max_drop <= 100:
        raise ModellegoError(f"max_drop (--max-drop) must be between 0 and 100 accuracy points, got {max_drop}")


def check_auto_task(task: Sequence[int]) -> None:
    """Refuse `--auto` for one class: with one output every candidate is always right, so accuracy cannot judge
    α/β and the walk would take the smallest cut."""
    if len(task) < 2:
        raise ModellegoError("--auto judges α/β by accuracy among the task's classes, which one class cannot "
                             "give (every cut is always right); give two or more classes, or choose α/β yourself")


def grid_of(alphas: Sequence[float], betas: Sequence[float]) -> list[Thresholds]:
    """The grid's thresholds: conv layers (α, β); linear layers the paper's offsets α + 0.1, β + 0.1 (capped at 1)."""
    return [Thresholds(alpha, beta, round(min(1.0, alpha + 0.1), 4), round(min(1.0, beta + 0.1), 4))
            for alpha in alphas for beta in betas]


def unit_grid(alphas: Sequence[float], betas: Sequence[float]) -> list[Thresholds]:
    """A Transformer's grid: one (α, β) pair for all its units, which are all Linear layers' (docs/method.md)."""
    return [Thresholds(alpha, beta, alpha, beta) for alpha in alphas for beta in betas]


def restricted_base(logits: torch.Tensor, labels: torch.Tensor, task: Sequence[int],
                    num_classes: int) -> tuple[torch.Tensor, float]:
    """The validation labels renumbered to positions in the task, and the source's accuracy on them with its
    logits restricted to the task's classes."""
    labels = task_labels(labels, task, num_classes)
    if (labels < 0).any() or len(labels) == 0:
        raise ModellegoError("the validation data must hold samples of the task's classes only")
    accuracy = (logits[:, torch.tensor(list(task))].argmax(1) == labels).float().mean().item()
    return labels, accuracy


def search(candidates: Candidates, grid: Sequence[Thresholds], labels: torch.Tensor, restricted: float,
           max_drop: float = 1.0, progress: bool = False) -> SearchResult:
    """Search the `grid` for the smallest component (FLOPs) whose accuracy on the validation samples (`labels`:
    their positions in the task) stays within `max_drop` points of `restricted` (the source's restricted base on
    them); if none does, the most accurate, with a warning. Every kind's search is this walk."""
    check_max_drop(max_drop)
    target = restricted - max_drop / 100
    # 1. every grid point's cut and FLOPs, without a forward pass; equal cuts are one candidate
    unique: dict[tuple, Candidate] = {}
    for thresholds in grid:
        cut, masks = candidates.plan(thresholds)
        entry = unique.setdefault(cut.key(), Candidate(cut, masks, [], candidates.flops(cut)))
        entry.thresholds.append(thresholds)
    walk = sorted(unique.values(), key=lambda entry: entry.flops)
    # 2. evaluate by increasing FLOPs; stop at the first that meets the target
    evaluated, best = [], None
    for entry in track(walk, "searching α/β", len(walk), progress):
        accuracy = (candidates.scores(entry).argmax(1) == labels).float().mean().item()
        for thresholds in entry.thresholds:
            evaluated.append({**thresholds.settings(candidates.layer_kinds), "accuracy": accuracy,
                              "flops": entry.flops})
        key = (accuracy < target, entry.flops if accuracy >= target else -accuracy)
        if best is None or key < best[0]:
            best = (key, entry, accuracy)
        if accuracy >= target:
            break
    _, entry, accuracy = best
    if accuracy < target:
        warnings.warn(f"no α/β kept accuracy within {max_drop} points; chose the most accurate component",
                      stacklevel=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        component, cut, record = candidates.component(entry)
    return SearchResult(component, entry.thresholds[0], accuracy, target, restricted, evaluated, len(labels),
                        entry.masks, record, len(grid) - len(evaluated), len(grid), cut)


class ImageCandidates:
    """`Candidates` of a CNN: cuts from its ChannelGraph, FLOPs from the layer sizes, scores on a masked working
    copy of the source (re-fitted in place when reconstructing), or on the real cut for models whose norms mix
    channels."""

    layer_kinds = {"conv", "linear"}

    def __init__(self, model: nn.Module, profile: Profile, task: list[int], validation: Dataset,
                 graph: ChannelGraph, flatten: FlattenRule = DEFAULT_FLATTEN,
                 reconstruct_images: torch.Tensor | Dataset | None = None, ridge: float = RIDGE) -> None:
        shape = tuple(profile.input_shape)
        profile.check_model(model)  # once: every grid point locates on this model
        self.model, self.task, self.validation, self.graph, self.flatten = model, task, validation, graph, flatten
        self.profile = _relatives_once(profile)
        self.flops_of = _FlopModel(model, shape)
        if isinstance(reconstruct_images, Dataset):
            reconstruct_images = in_memory(reconstruct_images, shape)
        self.images, self.ridge = reconstruct_images, ridge
        self.exact_masking = not any(isinstance(module, MIXING_NORMS) for module in model.modules())
        self.order = execution_order(model, shape)
        # the working copy comes with its own graph, so that the chosen candidate, once masked and re-fitted, can
        # be cut out of it directly instead of being cut from the source and re-fitted a second time
        self.work, self.work_graph = copy.deepcopy((model, graph)) if self.exact_masking else (None, None)
        self.state = {key: value.clone() for key, value in model.state_dict().items()}
        self.cached = (source_outputs_by_batch(model, reconstruct_images, self.order)
                       if reconstruct_images is not None and self.exact_masking else None)
        self.last: tuple[Candidate, Reconstruction | None] | None = None  # what the working copy holds

    def plan(self, thresholds: Thresholds) -> tuple[Cut, ComponentMasks]:
        masks = locate_checked(self.model, self.profile, thresholds, graph=self.graph, flatten=self.flatten)
        return plan_cut(self.model, masks, self.task, self.graph), masks

    def flops(self, cut: Cut) -> int:
        return self.flops_of.of(cut)

    def scores(self, candidate: Candidate) -> torch.Tensor:
        cut = candidate.cut
        if self.exact_masking:
            self.work.load_state_dict(self.state)
            zero_removed_inputs(self.work, cut)
            record = None
            if self.images is not None:
                record = reconstruct(self.work, self.model, _fits(self.work, cut, self.order), self.images,
                                     self.ridge, source_outputs=self.cached)
            self.last = (candidate, record)
            return predict(self.work, self.validation)[0][:, cut.outputs[cut.classifier]]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            component, _ = disassemble_with_cut(self.model, candidate.masks, self.task, graph=self.graph)
        if self.images is not None:
            reconstruct(component, self.model, component_fits(cut, self.order), self.images, self.ridge)
        return predict(component, self.validation)[0]

    def component(self, candidate: Candidate) -> tuple[nn.Module, Cut, Reconstruction | None]:
        if self.last is not None and self.last[0] is candidate and self.images is not None:
            # the working copy holds this candidate re-fitted: its masked weights are exactly the ones the cut removes
            component, cut = disassemble_with_cut(self.work, candidate.masks, self.task, graph=self.work_graph)
            return component, cut, self.last[1]
        component, cut = disassemble_with_cut(self.model, candidate.masks, self.task, graph=self.graph)
        record = None
        if self.images is not None:
            record = reconstruct(component, self.model, component_fits(cut, self.order), self.images, self.ridge)
        return component, cut, record


def validation_target(model: nn.Module, profile: Profile, classes: str | Sequence[str | int], validation: Dataset,
                      max_drop: float) -> tuple[list[int], torch.Tensor, float]:
    """What a search judges on, for any model: the task (positions in the profile's classes, two or more), the
    validation labels as positions in it, and the source's restricted base on them."""
    check_max_drop(max_drop)
    task = resolve_classes(profile.classes, classes, "the model's classes")
    check_auto_task(task)
    model.eval()
    logits, labels = predict(model, validation)
    labels, restricted = restricted_base(logits, labels, task, len(profile.classes))
    return task, labels, restricted


def search_thresholds(model: nn.Module, profile: Profile, classes: str | Sequence[str | int], validation: Dataset,
                      max_drop: float = 1.0, alphas: Sequence[float] = SEARCH_ALPHAS,
                      betas: Sequence[float] = SEARCH_BETAS, progress: bool = False,
                      reconstruct_images: torch.Tensor | Dataset | None = None, ridge: float = RIDGE,
                      flatten: FlattenRule | str = DEFAULT_FLATTEN, graph: ChannelGraph | None = None) -> SearchResult:
    """Search α/β for the smallest component (FLOPs) of a CNN whose accuracy on `validation` (held-out *training*
    data of the task, labelled by the source model's outputs, see `validation_data`) stays within `max_drop`
    points of the restricted base on the same data; if none does, the most accurate, with a warning. Linear
    layers use the paper's offsets: α_fc = α + 0.1, β_fc = β + 0.1 (capped at 1). With `reconstruct_images`,
    every candidate is scored after reconstruction on them (as the component will be), and the result's
    component is re-fitted. `graph`: a ChannelGraph traced on `model`. (`modellego.search_thresholds` takes
    Transformers too: `core.api`.)"""
    task, labels, restricted = validation_target(model, profile, classes, validation, max_drop)
    graph = graph or ChannelGraph(model, tuple(profile.input_shape))
    candidates = ImageCandidates(model, profile, task, validation, graph, FlattenRule.parse(flatten),
                                 reconstruct_images, ridge)
    return search(candidates, grid_of(alphas, betas), labels, restricted, max_drop, progress)


def validation_data(train_data: Dataset, classes: str | Sequence[str | int], exclude: torch.Tensor,
                    fraction: float = 0.1, seed: int = 0) -> SampleSubset:
    """Held-out training samples of the task's classes for `search_thresholds`: `fraction` of each class, drawn
    with `seed`, never one of the positions in `exclude` (the profile's samples). Never test data."""
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
