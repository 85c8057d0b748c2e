"""Contribution heat maps: for one layer of a profile, how strongly each class draws on each input channel
(soft relative contribution, classes × input channels) — the paper's heat-map figure, from the profile alone."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from matplotlib.figure import Figure

from modellego.core.profile import Profile
from modellego.errors import ModellegoError
from modellego.viz.text import drawable


@dataclass(frozen=True)
class LayerInfo:
    """A profiled layer: name, kind ("conv", "linear" or "" when the profile does not record it), channels."""

    name: str
    kind: str
    inputs: int
    outputs: int


def profile_layers(profile: Profile) -> list[LayerInfo]:
    """The profile's Conv2d/Linear layers in execution order with their kind and channel counts."""
    return [LayerInfo(name, profile.kinds.get(name, ""), int(profile.contributions[name].shape[2]),
                      int(profile.contributions[name].shape[1])) for name in profile.layers]


def default_layer(profile: Profile) -> str:
    """The last Conv2d layer of the profile (the paper's heat maps show the last conv layer)."""
    if not profile.kinds:
        raise ModellegoError("this profile was written before profiles recorded layer kinds, so its last conv layer "
                             "is unknown; name one with --layer (see --layers) or profile the model again")
    convs = [name for name in profile.layers if profile.kinds.get(name) == "conv"]
    if not convs:
        raise ModellegoError("this profile has no Conv2d layer; name a layer with --layer (see --layers)")
    return convs[-1]


def heatmap_values(profile: Profile, layer: str, output_masks: torch.Tensor | None = None) -> torch.Tensor:
    """H[k, i] (classes × input channels) for `layer`, in [0, 1]: the soft relative contribution
    R[k,o,i] = minmax_i(A[k,o,i]) of input channel i, averaged over the output channels o that class k keeps
    (`output_masks[k, o]`, the layer's masks from `locate`; a class keeping none gets a row of zeros). Without
    masks every output counts, except in the classifier (the profile's last layer), where class k's own
    output is the one that matters: H[k, i] = R[k, o_k, i]. With masks this is the soft form of the votes
    that decide which input channels a class keeps (DESIGN.md, "Component locating")."""
    if layer not in profile.contributions:
        shown = ", ".join(profile.layers[:12]) + (", ..." if len(profile.layers) > 12 else "")
        raise ModellegoError(f"layer {layer!r} is not in this profile; its layers are {shown} (see --layers)")
    relative = profile.relative(layer)
    classes, outputs = relative.shape[:2]
    if output_masks is None:
        if layer == profile.layers[-1]:  # each class's own output of the classifier
            output_masks = torch.zeros(classes, outputs)
            output_masks[torch.arange(classes), torch.tensor(profile.output_positions)] = 1.0
        else:
            output_masks = torch.ones(classes, outputs)
    if tuple(output_masks.shape) != (classes, outputs):
        raise ModellegoError(f"the masks of {layer} have shape {list(output_masks.shape)}, the profile needs "
                             f"{[classes, outputs]}")
    weights = output_masks.float()
    return torch.einsum("ko,koi->ki", weights, relative) / weights.sum(1, keepdim=True).clamp(min=1)


def heatmap_figure(values: torch.Tensor, classes: list[str], layer: str, title: str = "") -> Figure:
    """The heat map: one row per class (named), one column per input channel, a colour bar in [0, 1]."""
    rows, columns = values.shape
    classes, layer, title = [drawable(name) for name in classes], drawable(layer), drawable(title)
    figure = Figure(figsize=(min(20.0, max(7.5, 2.5 + columns * 0.12)), min(14.0, max(3.0, 1.2 + rows * 0.32))),
                    layout="constrained")
    axes = figure.add_subplot()
    image = axes.imshow(values.numpy(), aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
    axes.set_yticks(range(rows), classes, fontsize=8)
    step = max(1, round(columns / 16))
    axes.set_xticks(range(0, columns, step))
    axes.set_xlabel(f"input channel of {layer} ({columns} channels)")
    axes.set_ylabel("class")
    figure.colorbar(image, ax=axes, label="soft relative contribution")
    axes.set_title(title or f"Relative contribution of {layer}'s input channels per class", fontsize=9)
    return figure
