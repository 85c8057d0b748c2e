"""Component locating: per layer and class, which channels matter (α/β on relative contributions), walked from
the classifier back to the input through the real channel graph (DESIGN.md, "Component locating")."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from modellego.artifacts import read_artifact, write_artifact
from modellego.checks import Invalid, integer, mapping, parse_json, sequence, string
from modellego.errors import ModellegoError
from modellego.graph import ChannelGraph
from modellego.layers import output_channels, parameter_layers
from modellego.profiles import Profile



@dataclass(frozen=True)
class Thresholds:
    """α (relative-contribution threshold) and β (vote threshold) for conv and linear layers; the defaults are
    the paper's, written here and nowhere else."""

    alpha_conv: float = 0.3
    beta_conv: float = 0.2
    alpha_fc: float = 0.4
    beta_fc: float = 0.3

    def as_dict(self) -> dict[str, float]:
        return {"alpha_conv": self.alpha_conv, "beta_conv": self.beta_conv, "alpha_fc": self.alpha_fc,
                "beta_fc": self.beta_fc}


PAPER = Thresholds()
FLATTEN_RULES = ("any-feature", "keep-all")
DEFAULT_FLATTEN = "any-feature"  # what `disassemble` uses unless told otherwise (measured: docs/results.md)
MASKS_FORMAT = "modellego-masks"


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
    input_shape: tuple[int, ...] = ()

    def task_channels(self, layer: str, task: list[int]) -> torch.Tensor:
        """Output channels of `layer` kept for task `task` (class positions): the union over its classes."""
        return self.masks[layer][task].any(dim=0)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the masks and scores to one safetensors file (atomically), like models and profiles."""
        tensors = {f"mask/{name}": mask.to(torch.uint8) for name, mask in self.masks.items()}
        tensors |= {f"score/{name}": score.float() for name, score in self.scores.items()}
        header = {"format": MASKS_FORMAT, "format_version": 1, "layers": list(self.masks), "classes": self.classes,
                  "classifier": self.classifier, "settings": self.settings, "profile_hash": self.profile_hash,
                  "input_shape": list(self.input_shape)}
        return write_artifact(path, tensors, MASKS_FORMAT, header)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ComponentMasks":
        """Read masks written by `save`; anything else is refused with one line, never unpickled."""
        header, raw = read_artifact(path, MASKS_FORMAT, "modellego masks", "pass a file written by ComponentMasks.save",
                                    article="")
        try:
            meta = mapping(parse_json(header, "the header", 4 << 20, 8), "the header")
            layers = [string(name, "layers[]", 1_000) for name in sequence(meta.get("layers"), "layers", 1, 10_000)]
            classes = [string(name, "classes[]", 1_000, empty=True)
                       for name in sequence(meta.get("classes"), "classes", 1, 100_000)]
            expected = {f"{kind}/{name}" for kind in ("mask", "score") for name in layers}
            if set(raw.entries) != expected:
                raise Invalid("its tensors do not match its layers")
            if any(len(shape) != 2 or shape[0] != len(classes) for _, shape in raw.entries.values()):
                raise Invalid("every mask and score must be classes × channels")
            settings = {str(key): float(value) for key, value in mapping(meta.get("settings", {}), "settings").items()}
            shape = tuple(integer(side, "input_shape[]", 1, 4_096)
                          for side in sequence(meta.get("input_shape", []), "input_shape", 0, 3))
            classifier = string(meta.get("classifier"), "classifier", 1_000)
        except (Invalid, TypeError, ValueError) as error:
            raise ModellegoError(f"{path} holds damaged modellego masks ({error})") from None
        tensors = raw.tensors("modellego masks")
        return cls(masks={name: tensors[f"mask/{name}"].bool() for name in layers},
                   scores={name: tensors[f"score/{name}"] for name in layers}, classes=classes, classifier=classifier,
                   settings=settings, profile_hash=str(meta.get("profile_hash", "")), input_shape=shape)

    def kept_fraction(self, task: list[int]) -> dict[str, float]:
        """Per layer, the fraction of output channels the task keeps (before coupling)."""
        return {name: self.task_channels(name, task).float().mean().item() for name in self.masks}


def check_thresholds(values: dict[str, float]) -> None:
    """α and β are fractions of a normalised range: each must lie in [0, 1]. `values` maps the name to show
    (a parameter or a command-line flag) to the value."""
    for name, value in values.items():
        if not 0.0 <= float(value) <= 1.0:
            raise ModellegoError(f"{name} must be between 0 and 1, got {value}")


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


def locate(model: nn.Module, profile: Profile, alpha_conv: float = PAPER.alpha_conv,
           beta_conv: float = PAPER.beta_conv, alpha_fc: float = PAPER.alpha_fc, beta_fc: float = PAPER.beta_fc,
           example_input: torch.Tensor | tuple[int, ...] | None = None,
           graph: ChannelGraph | None = None, flatten: str = "any-feature") -> ComponentMasks:
    """Find every class's channels in every Conv2d/Linear layer of `model`, from `profile` (of this model).

    `graph` (a ChannelGraph of this model) can be passed to reuse its traced graph across calls. `flatten`: where
    a conv's channels are flattened into a Linear layer's features (several features per channel),
    "any-feature" keeps a channel if any of its features is kept; "keep-all" keeps every channel there (what
    the paper's official code does in effect) and walks on from the conv as if all its outputs were kept."""
    check_thresholds({"alpha_conv": alpha_conv, "beta_conv": beta_conv, "alpha_fc": alpha_fc, "beta_fc": beta_fc})
    if flatten not in FLATTEN_RULES:
        raise ModellegoError(f"unknown flatten rule {flatten!r}; choose {' or '.join(FLATTEN_RULES)}")
    profile.check_model(model)
    layers = parameter_layers(model)
    order = profile.layers
    classifier_name = order[-1]
    classifier = layers[classifier_name]
    num_classes = len(profile.classes)
    if not isinstance(classifier, nn.Linear) or classifier.out_features != num_classes:
        raise ModellegoError(f"the last layer to run, {classifier_name}, is not a Linear classifier with "
                             f"{num_classes} outputs; modellego disassembles classifiers ending in nn.Linear")
    graph = graph or ChannelGraph(model, example_input if example_input is not None else profile.input_shape)
    # Masks are kept as 0/1 floats during the walk so that scatter-max gives the OR over repeated channels.
    masks = {name: torch.zeros(num_classes, output_channels(layers[name])) for name in order}
    scores = {name: torch.zeros(num_classes, output_channels(layers[name])) for name in order}
    masks[classifier_name] = torch.eye(num_classes)
    scores[classifier_name] = torch.eye(num_classes)
    for name in reversed(order):
        layer = layers[name]
        alpha, beta = (alpha_conv, beta_conv) if isinstance(layer, nn.Conv2d) else (alpha_fc, beta_fc)
        kept, normalised = input_mask(profile.relative(name), masks[name] > 0, alpha, beta)
        for feed in graph.feeds(name):
            # A producer channel is kept if any input position it feeds is kept (flatten, concat, adds).
            index = feed.channels.expand(num_classes, -1)
            if flatten == "keep-all" and len(feed.channels.unique()) < len(feed.channels):
                masks[feed.producer][:, feed.channels] = 1.0
                scores[feed.producer][:, feed.channels] = 1.0
                continue
            masks[feed.producer].scatter_reduce_(1, index, kept[:, feed.inputs].float(), "amax")
            scores[feed.producer].scatter_reduce_(1, index, normalised[:, feed.inputs], "amax")
    return ComponentMasks(masks={name: mask > 0 for name, mask in masks.items()}, scores=scores, classes=list(profile.classes), classifier=classifier_name,
                          settings={"alpha_conv": alpha_conv, "beta_conv": beta_conv,
                                    "alpha_fc": alpha_fc, "beta_fc": beta_fc},
                          profile_hash=profile.digest(), input_shape=tuple(profile.input_shape))
