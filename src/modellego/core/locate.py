"""Component locating: per layer and class, which channels matter (α/β on relative contributions), walked from
the classifier back to the input through the real channel graph (DESIGN.md, "Component locating")."""

from __future__ import annotations

from typing import Callable, Protocol

import torch
from torch import nn

from modellego.core.channels import ChannelGraph, Feed
from modellego.core.masks import ComponentMasks
from modellego.core.profile import Profile
from modellego.core.thresholds import DEFAULT_FLATTEN, PAPER, FlattenRule, Thresholds
from modellego.errors import ModellegoError


class Feeds(Protocol):
    """Which producer channels feed a layer's inputs: a ChannelGraph, or a model kind's own graph."""

    def feeds(self, layer: str) -> list[Feed]: ...


def minmax(values: torch.Tensor, dim: int) -> torch.Tensor:
    """(v − min) / (max − min + 1e-5) along `dim`, the normalisation DESIGN.md uses for R and for votes."""
    low = values.amin(dim=dim, keepdim=True)
    high = values.amax(dim=dim, keepdim=True)
    return (values - low) / (high - low + 1e-5)


def by_max(values: torch.Tensor, dim: int) -> torch.Tensor:
    """v / (max + 1e-5) along `dim` (values ≥ 0): the normalisation over a Transformer block's few heads, where
    minmax would send the least of them to 0 whatever its share (docs/method.md, "Locating")."""
    return values / (values.amax(dim=dim, keepdim=True) + 1e-5)


def input_mask(relative: torch.Tensor, output_mask: torch.Tensor, alpha: float, beta: float,
               normalise: Callable[[torch.Tensor, int], torch.Tensor] = minmax) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's step: relevant = R > α; votes[k,i] = Σ_o M[k,o]·relevant[k,o,i]; Min = normalise_i(votes) > β
    (`normalise`: DESIGN.md's minmax unless given). Returns (Min, normalise_i(votes)), both K×I."""
    relevant = (relative > alpha).float()
    votes = torch.einsum("ko,koi->ki", output_mask.float(), relevant)
    normalised = normalise(votes, 1)
    return normalised > beta, normalised


def walk(profile: Profile, graph: Feeds, thresholds: Thresholds, layer_kinds: dict[str, str],
         flatten: FlattenRule = DEFAULT_FLATTEN) -> ComponentMasks:
    """The masks of every class in every profiled layer, from the classifier (the profile's last layer, whose
    output k is class k) back to the input: each layer's input mask (its kind's α/β) becomes the output mask
    of the layers `graph` says produce those inputs (the OR over everything that reads a channel). The method
    itself, for any model kind: a kind gives the profile, the graph and each layer's kind."""
    order = profile.layers
    classifier = order[-1]
    num_classes = len(profile.classes)
    outputs = {name: profile.contributions[name].shape[1] for name in order}
    # Masks are kept as 0/1 floats during the walk so that scatter-max gives the OR over repeated channels.
    masks = {name: torch.zeros(num_classes, outputs[name]) for name in order}
    scores = {name: torch.zeros(num_classes, outputs[name]) for name in order}
    own = torch.zeros(num_classes, outputs[classifier])  # class k's output of the classifier, wherever it is
    own[torch.arange(num_classes), torch.tensor(profile.output_positions, dtype=torch.long)] = 1.0
    masks[classifier] = own
    scores[classifier] = own.clone()
    for name in reversed(order):
        alpha, beta = thresholds.pair(layer_kinds[name])
        kept, normalised = input_mask(profile.relative(name), masks[name] > 0, alpha, beta)
        for feed in graph.feeds(name):
            # A producer channel is kept if any input position it feeds is kept (flatten, concat, adds).
            index = feed.channels.expand(num_classes, -1)
            if flatten == FlattenRule.KEEP_ALL and len(feed.channels.unique()) < len(feed.channels):
                masks[feed.producer][:, feed.channels] = 1.0
                scores[feed.producer][:, feed.channels] = 1.0
                continue
            masks[feed.producer].scatter_reduce_(1, index, kept[:, feed.inputs].float(), "amax")
            scores[feed.producer].scatter_reduce_(1, index, normalised[:, feed.inputs], "amax")
    return ComponentMasks(masks={name: mask > 0 for name, mask in masks.items()}, scores=scores,
                          classes=list(profile.classes), classifier=classifier,
                          settings=thresholds.settings(set(layer_kinds.values())),
                          profile_hash=profile.digest(), input_shape=tuple(profile.input_shape),
                          positions=profile.positions)


def locate(model: nn.Module, profile: Profile, thresholds: Thresholds = PAPER, *,
           example_input: torch.Tensor | tuple[int, ...] | None = None, graph: ChannelGraph | None = None,
           flatten: FlattenRule | str = DEFAULT_FLATTEN) -> ComponentMasks:
    """Find every class's channels in every Conv2d/Linear layer of `model`, from `profile` (of this model), with
    `thresholds` (the paper's by default; conv layers use the conv pair, Linear layers the linear pair).

    `graph` (a ChannelGraph of this model) can be passed to reuse its traced graph across calls. `flatten`: where
    a conv's channels are flattened into a Linear layer's features (several features per channel),
    "any-feature" keeps a channel if any of its features is kept; "keep-all" keeps every channel there (what
    the paper's official code does in effect) and walks on from the conv as if all its outputs were kept."""
    profile.check_model(model)
    return locate_checked(model, profile, thresholds, example_input=example_input, graph=graph, flatten=flatten)


def locate_checked(model: nn.Module, profile: Profile, thresholds: Thresholds = PAPER, *,
                   example_input: torch.Tensor | tuple[int, ...] | None = None, graph: ChannelGraph | None = None,
                   flatten: FlattenRule | str = DEFAULT_FLATTEN) -> ComponentMasks:
    """`locate` for a model `profile` was checked against already (the α/β search asks at every grid point;
    the check hashes every weight)."""
    flatten = FlattenRule.parse(flatten)
    layers = {name: module for name, module in model.named_modules() if isinstance(module, (nn.Conv2d, nn.Linear))}
    classifier_name = profile.layers[-1]
    classifier = layers[classifier_name]
    if not isinstance(classifier, nn.Linear) or classifier.out_features != profile.outputs:
        raise ModellegoError(f"the last layer to run, {classifier_name}, is not a Linear classifier with "
                             f"{profile.outputs} outputs; modellego disassembles classifiers ending in nn.Linear")
    graph = graph or ChannelGraph(model, example_input if example_input is not None else profile.input_shape)
    layer_kinds = {name: "conv" if isinstance(layers[name], nn.Conv2d) else "linear" for name in profile.layers}
    return walk(profile, graph, thresholds, layer_kinds, flatten)
