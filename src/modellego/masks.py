"""Component locating: per layer and class, which channels matter (α/β on relative contributions), walked from
the classifier back to the input through the real channel graph (DESIGN.md, "Component locating")."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from modellego.errors import ModellegoError
from modellego.graph import ChannelGraph
from modellego.layers import parameter_layers
from modellego.profiles import Profile

PAPER_DEFAULTS = {"alpha_conv": 0.3, "beta_conv": 0.2, "alpha_fc": 0.4, "beta_fc": 0.3}


@dataclass
class ComponentMasks:
    """Per parameter layer, `masks[layer][k, o]`: class k routes through output channel o; `scores` are the
    normalised votes behind the masks (how relevant each channel is, used to break ties and avoid empty layers)."""

    masks: dict[str, torch.Tensor]
    scores: dict[str, torch.Tensor]
    classes: list[str]
    classifier: str
    settings: dict[str, float] = field(default_factory=dict)
    profile_hash: str = ""

    def task_channels(self, layer: str, task: list[int]) -> torch.Tensor:
        """Output channels of `layer` kept for task `task` (class positions): the union over its classes."""
        return self.masks[layer][task].any(dim=0)

    def kept_fraction(self, task: list[int]) -> dict[str, float]:
        """Per layer, the fraction of output channels the task keeps (before coupling)."""
        return {name: self.task_channels(name, task).float().mean().item() for name in self.masks}


def check_thresholds(**values: float) -> None:
    """α and β are fractions of a normalised range: each must lie in [0, 1]."""
    for name, value in values.items():
        if not 0.0 <= float(value) <= 1.0:
            flag = "--" + name.replace("_", "-")
            raise ModellegoError(f"{flag} must be between 0 and 1, got {value}")


def minmax(values: torch.Tensor, dim: int) -> torch.Tensor:
    """(v − min) / (max − min + 1e-5) along `dim`, the normalisation DESIGN.md uses for R and for votes."""
    low = values.amin(dim=dim, keepdim=True)
    high = values.amax(dim=dim, keepdim=True)
    return (values - low) / (high - low + 1e-5)


def input_mask(relative: torch.Tensor, output_mask: torch.Tensor, alpha: float, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's step: relevant = R > α; votes[k,i] = Σ_o M[k,o]·relevant[k,o,i]; Min = minmax_i(votes) > β.
    Returns (Min, minmax_i(votes)), both K×I."""
    relevant = (relative > alpha).float()
    votes = torch.einsum("ko,koi->ki", output_mask.float(), relevant)
    normalised = minmax(votes, dim=1)
    return normalised > beta, normalised


def locate(model: nn.Module, profile: Profile, alpha_conv: float = 0.3, beta_conv: float = 0.2,
           alpha_fc: float = 0.4, beta_fc: float = 0.3, input_shape: tuple[int, ...] | None = None,
           graph: ChannelGraph | None = None) -> ComponentMasks:
    """Find every class's channels in every Conv2d/Linear layer of `model`, from `profile` (of this model).

    `graph` (a ChannelGraph of this model) can be passed to reuse its traced graph across calls."""
    check_thresholds(alpha_conv=alpha_conv, beta_conv=beta_conv, alpha_fc=alpha_fc, beta_fc=beta_fc)
    profile.check_model(model)
    layers = parameter_layers(model)
    order = profile.layers
    classifier_name = order[-1]
    classifier = layers[classifier_name]
    num_classes = len(profile.classes)
    if not isinstance(classifier, nn.Linear) or classifier.out_features != num_classes:
        raise ModellegoError(f"the last layer to run, {classifier_name}, is not a Linear classifier with "
                             f"{num_classes} outputs; modellego disassembles classifiers ending in nn.Linear")
    graph = graph or ChannelGraph(model, input_shape or profile.input_shape)
    # Masks are kept as 0/1 floats during the walk so that scatter-max gives the OR over repeated channels.
    masks = {name: torch.zeros(num_classes, _outputs(layers[name])) for name in order}
    scores = {name: torch.zeros(num_classes, _outputs(layers[name])) for name in order}
    masks[classifier_name] = torch.eye(num_classes)
    scores[classifier_name] = torch.eye(num_classes)
    for name in reversed(order):
        layer = layers[name]
        alpha, beta = (alpha_conv, beta_conv) if isinstance(layer, nn.Conv2d) else (alpha_fc, beta_fc)
        kept, normalised = input_mask(profile.relative(name), masks[name] > 0, alpha, beta)
        for feed in graph.feeds(name):
            # A producer channel is kept if any input position it feeds is kept (flatten, concat, adds).
            index = feed.channels.expand(num_classes, -1)
            masks[feed.producer].scatter_reduce_(1, index, kept[:, feed.inputs].float(), "amax")
            scores[feed.producer].scatter_reduce_(1, index, normalised[:, feed.inputs], "amax")
    return ComponentMasks(masks={name: mask > 0 for name, mask in masks.items()}, scores=scores, classes=list(profile.classes), classifier=classifier_name,
                          settings={"alpha_conv": alpha_conv, "beta_conv": beta_conv,
                                    "alpha_fc": alpha_fc, "beta_fc": beta_fc},
                          profile_hash=profile.digest())


def _outputs(layer: nn.Module) -> int:
    return layer.out_channels if isinstance(layer, nn.Conv2d) else layer.out_features
