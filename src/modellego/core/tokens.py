"""The method on Transformer blocks (docs/method.md): locating the units a component keeps — attention heads and
MLP neurons (core.blocks) — with α/β votes over contributions summed over tokens (core.contributions'
`TokenLinear`), and cutting them exactly. The residual stream is kept whole."""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn
from torch.utils.data import Dataset

from modellego.core.blocks import StreamConv2d, StreamLinear, Unit, shrink, sliced_linear, unit_rows, units
from modellego.core.contributions import TokenLinear
from modellego.core.cut import Cut
from modellego.core.evaluate import predict
from modellego.core.layers import execution_order, input_channels, output_channels, parameter_layers
from modellego.core.locate import by_max, input_mask, minmax
from modellego.core.masks import ComponentMasks
from modellego.core.profile import Profile
from modellego.core.reconstruct import RIDGE, Reconstruction, component_fits, in_memory, reconstruct
from modellego.core.search import Candidate, _FlopModel
from modellego.core.thresholds import PAPER, Thresholds
from modellego.errors import ModellegoError


def head_contributions(profile: Profile, unit: Unit) -> torch.Tensor:
    """The writer's class contributions over units [K, O, size]: a head's summed over its columns."""
    totals = profile.contributions[unit.writer]
    if unit.group == 1:
        return totals
    return totals.reshape(*totals.shape[:2], unit.size, unit.group).sum(-1)


def locate_units(model: nn.Module, profile: Profile, thresholds: Thresholds = PAPER) -> ComponentMasks:
    """Every class's heads and MLP neurons (docs/method.md, "Locating"): the head votes the stream features each
    class relies on (S); every block's writer (proj, fc2) votes over its units with S as its output mask. The
    masks are output-channel masks (those of the readers, qkv and fc1; the stream's writers keep every feature;
    the classifier the class's row), so that they cut, save and load as any model's."""
    layers = parameter_layers(model)
    classifier = profile.layers[-1]
    if not isinstance(layers.get(classifier), nn.Linear) or isinstance(layers[classifier], TokenLinear):
        raise ModellegoError(f"the last layer to run, {classifier}, is not the Transformer's classifier head")
    count = len(profile.classes)
    own = torch.zeros(count, profile.outputs)
    own[torch.arange(count), torch.tensor(profile.output_positions, dtype=torch.long)] = 1.0
    alpha, beta = thresholds.pair("linear")
    head = profile.relative(classifier)
    stream, _ = input_mask(head, own > 0, alpha, beta)
    reliance = torch.einsum("ko,koi->ki", own, head)  # how much class k's logit draws on each stream feature
    masks = {name: torch.ones(count, output_channels(layer), dtype=torch.bool) for name, layer in layers.items()}
    scores = {name: torch.ones(count, output_channels(layer)) for name, layer in layers.items()}
    masks[classifier], scores[classifier] = own > 0, own.clone()
    for step in reversed(_stream_order(model)):  # from the head back, as the stream's width changes
        if isinstance(step, tuple):  # a stream layer: the features it reads, per class, by the same votes
            name, fold = step
            relative = profile.relative(name)
            wide, _ = input_mask(relative, stream, alpha, beta)
            stream = wide.reshape(count, fold, -1).any(dim=1)
            reliance = torch.einsum("ko,koi->ki", reliance, relative).reshape(count, fold, -1).sum(dim=1)
            continue
        unit = step
        normalise = by_max if unit.kind == "heads" else minmax
        relative = normalise(head_contributions(profile, unit), 2)
        if relative.shape[1] != stream.shape[1]:
            raise ModellegoError(f"{unit.writer} writes {relative.shape[1]} stream features where the stream after it "
                                 f"has {stream.shape[1]}; modellego follows the stream's width only through "
                                 "the stream layers it knows (Swin's PatchMerging, MaxViT's stage shortcuts)")
        kept, normalised = input_mask(relative, stream, alpha, beta, normalise)
        # below the votes' resolution, each unit's contributions weighted by the class's reliance on each stream
        # feature: where no unit has a vote (α ≥ 1), a block still keeps its most relevant unit, not its first
        strength = by_max(torch.einsum("ko,kou->ku", reliance, relative), 1)
        masks[unit.reader], scores[unit.reader] = unit_rows(unit, kept), unit_rows(unit, normalised + 1e-4 * strength)
    return ComponentMasks(masks=masks, scores=scores, classes=list(profile.classes), classifier=classifier,
                          settings={"alpha_fc": alpha, "beta_fc": beta}, profile_hash=profile.digest(),
                          input_shape=tuple(profile.input_shape), positions=profile.positions)


def _stream_order(model: nn.Module) -> list[Unit | tuple[str, int]]:
    """The model's units and its stream layers (`StreamLinear`, `StreamConv2d`, as (name, fold)) in module
    order: the order they run in, for the Transformers modellego knows, whose blocks are registered in sequence."""
    found: list[Unit | tuple[str, int]] = []
    block_units = {unit.module: unit for unit in units(model)}
    for name, module in model.named_modules():
        if name in block_units:
            found.append(block_units[name])
        elif isinstance(module, (StreamLinear, StreamConv2d)):
            found.append((name, module.fold))
    return found


def kept_units(unit: Unit, masks: ComponentMasks, task: list[int]) -> torch.Tensor:
    """The indices of `unit`'s units the task keeps (at least its most relevant one, with a warning)."""
    rows = masks.masks[unit.reader][task].any(dim=0)
    scores = masks.scores[unit.reader][task].amax(dim=0)
    per_unit = rows[: unit.size * unit.group].reshape(unit.size, unit.group).any(dim=1)
    unit_scores = scores[: unit.size * unit.group].reshape(unit.size, unit.group).amax(dim=1)
    if not per_unit.any():
        per_unit[int(unit_scores.argmax())] = True
        warnings.warn(f"{unit.module} would keep no {unit.kind[:-1]} for this task; it keeps its most relevant "
                      f"one", stacklevel=3)
    return torch.nonzero(per_unit).flatten()


def plan_units(model: nn.Module, masks: ComponentMasks, task: list[int]) -> tuple[Cut, dict[str, torch.Tensor]]:
    """What the component for `task` (rows of the masks) keeps, without building it: the `Cut` in the source's
    indices (every layer's kept outputs and inputs: the stream whole, the kept heads' and neurons' rows and
    columns, the classifier's task rows in task order) and the kept units per block."""
    layers = parameter_layers(model)
    sizes = {name: (output_channels(layer), input_channels(layer)) for name, layer in layers.items()}
    outputs = {name: torch.arange(size[0]) for name, size in sizes.items()}
    inputs = {name: torch.arange(size[1]) for name, size in sizes.items()}
    kept = {}
    for unit in units(model):
        indices = kept_units(unit, masks, task)
        kept[unit.module] = indices
        rows = unit_rows(unit, torch.zeros(unit.size, dtype=torch.bool).index_fill_(0, indices, True))
        outputs[unit.reader] = torch.nonzero(rows).flatten()
        inputs[unit.writer] = torch.nonzero(rows[: unit.size * unit.group]).flatten()
    outputs[masks.classifier] = torch.tensor(masks.output_positions(task), dtype=torch.long)
    return Cut(outputs=outputs, inputs=inputs, task=list(task), classifier=masks.classifier, sizes=sizes), kept


def build_cut(model: nn.Module, cut: Cut, kept: dict[str, torch.Tensor]) -> nn.Module:
    """A copy of `model` keeping `kept` units per block and the classifier's rows of `cut`."""
    component = copy.deepcopy(model)
    shrink(component, kept)
    modules = dict(component.named_modules())
    parent, _, attribute = cut.classifier.rpartition(".")
    setattr(modules[parent] if parent else component, attribute,
            sliced_linear(parameter_layers(model)[cut.classifier], cut.outputs[cut.classifier], None))
    return component


def cut_units(model: nn.Module, masks: ComponentMasks, task: list[int]) -> tuple[nn.Module, Cut]:
    """The component for `task` (rows of the masks): a copy of `model` keeping the task's heads and neurons, the
    stream whole and the classifier's task rows in task order (docs/method.md, "Cutting"); and its `Cut`."""
    cut, kept = plan_units(model, masks, task)
    return build_cut(model, cut, kept), cut


class TokenCandidates:
    """`Candidates` of a Transformer for the α/β search (core.search): cuts from the located units, FLOPs from
    the layer sizes and the kept heads, scores on the real component (cut and, with reconstruction, re-fitted)."""

    layer_kinds = {"linear"}

    def __init__(self, model: nn.Module, profile: Profile, task: list[int], validation: Dataset,
                 reconstruct_images: torch.Tensor | Dataset | None = None, ridge: float = RIDGE) -> None:
        shape = tuple(profile.input_shape)
        profile.check_model(model)
        self.model, self.profile, self.task, self.validation, self.ridge = model, profile, task, validation, ridge
        if isinstance(reconstruct_images, Dataset):
            reconstruct_images = in_memory(reconstruct_images, shape)
        self.images = reconstruct_images
        self.order = execution_order(model, shape)
        self.flops_of = _FlopModel(model, shape)
        # a head's attention itself, over its block's tokens (HeadAttention.head_flops)
        modules = dict(model.named_modules())
        self.per_head = {unit.module: modules[unit.module].head_flops(self.flops_of.positions.get(unit.reader, 0))
                         for unit in units(model) if unit.kind == "heads"}
        attention = sum(self.per_head[unit.module] * unit.size for unit in units(model) if unit.kind == "heads")
        self.rest = self.flops_of.total - self.flops_of.full - attention  # what no cut changes
        self.kept: dict[int, dict[str, torch.Tensor]] = {}
        self.last: tuple[Candidate, nn.Module, Reconstruction | None] | None = None

    def plan(self, thresholds: Thresholds) -> tuple[Cut, ComponentMasks]:
        masks = locate_units(self.model, self.profile, thresholds)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cut, kept = plan_units(self.model, masks, self.task)
        self.kept[id(cut)] = kept
        return cut, masks

    def flops(self, cut: Cut) -> int:
        kept = self.kept[id(cut)]
        attention = sum(self.per_head[name] * len(indices) for name, indices in kept.items() if name in self.per_head)
        linear = sum(self.flops_of._layer(name, len(cut.outputs[name]), len(cut.inputs[name]))
                     for name in self.flops_of.layers)
        return int(linear + attention + self.rest)

    def _built(self, candidate: Candidate) -> tuple[nn.Module, Reconstruction | None]:
        if self.last is not None and self.last[0] is candidate:
            return self.last[1], self.last[2]
        component = build_cut(self.model, candidate.cut, self.kept[id(candidate.cut)])
        record = None
        if self.images is not None:
            record = reconstruct(component, self.model, component_fits(candidate.cut, self.order), self.images,
                                 self.ridge)
        self.last = (candidate, component, record)
        return component, record

    def scores(self, candidate: Candidate) -> torch.Tensor:
        return predict(self._built(candidate)[0], self.validation)[0]

    def component(self, candidate: Candidate) -> tuple[nn.Module, Cut, Reconstruction | None]:
        component, record = self._built(candidate)
        return component, candidate.cut, record
