"""The method's public verbs for any model (`modellego.locate`, `disassemble`, `search_thresholds`): a Transformer
whose blocks modellego knows is taken apart over its units, attention heads and MLP neurons (`core.tokens`), any
other model over its channels (`core.locate`, `core.cut`, `core.search`). They sit above both because
`core.tokens` builds on the channel modules."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.utils.data import Dataset

from modellego.core import cut as channels_cut
from modellego.core import locate as channels_locate
from modellego.core import search as channels_search
from modellego.core.blocks import is_transformer
from modellego.core.channels import ChannelGraph
from modellego.core.masks import ComponentMasks
from modellego.core.profile import Profile
from modellego.core.reconstruct import RIDGE, reconstruct_component
from modellego.core.samples import resolve_classes
from modellego.core.search import GRID_STEP, UNIT_TOP, SearchResult, search, search_grid, unit_grid
from modellego.core.thresholds import DEFAULT_FLATTEN, PAPER, FlattenRule, Thresholds
from modellego.core.tokens import TokenCandidates, cut_units, locate_units
from modellego.errors import ModellegoError


def _no_channel_options(flatten: FlattenRule | str, graph: ChannelGraph | None) -> None:
    if FlattenRule.parse(flatten) != DEFAULT_FLATTEN or graph is not None:
        raise ModellegoError("a Transformer takes no flatten rule or channel graph (its units are heads and MLP "
                             "neurons, and its head reads the class token); drop flatten and graph")


def locate(model: nn.Module, profile: Profile, thresholds: Thresholds = PAPER, *,
           example_input: torch.Tensor | tuple[int, ...] | None = None, graph: ChannelGraph | None = None,
           flatten: FlattenRule | str = DEFAULT_FLATTEN) -> ComponentMasks:
    """Every class's channels in every Conv2d/Linear layer of `model`, from `profile` (of this model), with
    `thresholds` (see `core.locate.locate` for `example_input`, `graph` and `flatten`). A Transformer's are its
    heads and MLP neurons, located with the linear pair (docs/method.md, "Locating")."""
    if not is_transformer(model):
        return channels_locate.locate(model, profile, thresholds, example_input=example_input, graph=graph,
                                      flatten=flatten)
    _no_channel_options(flatten, graph)
    profile.check_model(model)
    return locate_units(model, profile, thresholds)


def disassemble(model: nn.Module, masks: ComponentMasks, classes: str | Sequence[str | int],
                example_input: torch.Tensor | tuple[int, ...] | None = None,
                graph: ChannelGraph | None = None, images: torch.Tensor | Dataset | None = None,
                ridge: float = RIDGE) -> nn.Module:
    """The component of `model` for `classes` (names or output positions, in the order wanted), re-fitted on
    `images` when given (see `core.cut.disassemble`). A Transformer's keeps the task's heads and MLP neurons and
    its residual stream whole (docs/method.md, "Cutting")."""
    if not is_transformer(model):
        return channels_cut.disassemble(model, masks, classes, example_input, graph, images, ridge)
    _no_channel_options(DEFAULT_FLATTEN, graph)
    problem = masks.problem_with(model)
    if problem:
        raise ModellegoError(problem)
    component, cut = cut_units(model, masks, resolve_classes(masks.classes, classes, "the model's classes"))
    if images is not None:
        reconstruct_component(component, model, cut, images, ridge)
    return component


def search_thresholds(model: nn.Module, profile: Profile, classes: str | Sequence[str | int], validation: Dataset,
                      max_drop: float = 1.0, alphas: Sequence[float] | None = None,
                      betas: Sequence[float] | None = None, progress: bool = False,
                      reconstruct_images: torch.Tensor | Dataset | None = None, ridge: float = RIDGE,
                      flatten: FlattenRule | str = DEFAULT_FLATTEN, graph: ChannelGraph | None = None) -> SearchResult:
    """`--auto` in the library: the smallest component within `max_drop` points of the restricted base on
    `validation` (see `core.search.search_thresholds`). `alphas`/`betas` default to the CNN grid
    (SEARCH_ALPHAS × SEARCH_BETAS, linear layers +0.1); a Transformer's to one (α, β) pair for all its units,
    each from 0 to UNIT_TOP."""
    if not is_transformer(model):
        return channels_search.search_thresholds(
            model, profile, classes, validation, max_drop,
            channels_search.SEARCH_ALPHAS if alphas is None else alphas,
            channels_search.SEARCH_BETAS if betas is None else betas, progress, reconstruct_images, ridge, flatten,
            graph)
    _no_channel_options(flatten, graph)
    task, labels, restricted = channels_search.validation_target(model, profile, classes, validation, max_drop)
    top_alphas, top_betas = search_grid(GRID_STEP, UNIT_TOP, UNIT_TOP)
    grid = unit_grid(top_alphas if alphas is None else alphas, top_betas if betas is None else betas)
    candidates = TokenCandidates(model, profile, task, validation, reconstruct_images, ridge)
    return search(candidates, grid, labels, restricted, max_drop, progress)
