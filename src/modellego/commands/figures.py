"""`modellego route` and `modellego heatmap`: pictures of what the method sees — the channels each class routes
through a model, and a layer's soft relative contributions per class and input channel."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import torch

from modellego.commands.common import FilePath, open_model, threshold_options
from modellego.core.locate import DEFAULT_FLATTEN, PAPER, Thresholds, locate
from modellego.core.samples import resolve_classes
from modellego.errors import ModellegoError
from modellego.io.atomic import atomic_write, check_output_path
from modellego.io.profiles import ProfileFile, load_profile

if TYPE_CHECKING:  # matplotlib is imported only by the commands that draw
    from matplotlib.figure import Figure

    from modellego import viz

FIGURE_FORMATS = (".png", ".svg")


def check_figure_path(out: FilePath, inputs: Sequence[FilePath] = ()) -> str:
    """Refuse (before any work) a figure path that does not end in .png or .svg or cannot be written; returns
    the format matplotlib writes ("png" or "svg")."""
    suffix = os.path.splitext(os.fspath(out))[1].lower()
    if suffix not in FIGURE_FORMATS:
        raise ModellegoError(f"--out {out} must end in .png or .svg (the figure's format), got "
                             f"{suffix or 'no suffix'}")
    check_output_path(out, inputs=list(inputs))
    return suffix[1:]


def save_figure(figure: Figure, out: FilePath) -> None:
    """Write a matplotlib figure to `out` (.png or .svg) atomically: a reader never sees half a picture."""
    kind = check_figure_path(out)
    atomic_write(out, lambda temp: figure.savefig(temp, format=kind, dpi=150))


def route(model_path: FilePath, profile_path: FilePath, classes: str | Sequence[str | int], out: FilePath,
          thresholds: Thresholds = PAPER, max_links: int = 40) -> viz.Routes:
    """Draw the decision routes of `classes` through a model file (masks located with its profile and
    `thresholds`) into `out` (.png or .svg); returns the routes, whose `table()` is the per-layer summary.
    `max_links` caps the lines drawn per class and pair of connected layers (the strongest stay)."""
    from modellego import viz

    check_figure_path(out, inputs=[model_path, profile_path])
    source, kind = open_model(model_path)
    if kind.name != "cnn":
        raise ModellegoError(f"route draws the channel graphs of CNNs; {model_path} is a {kind.name.upper()} model "
                             "(heatmap draws its profile's layers)")
    positions = resolve_classes(source.manifest.class_names, classes, "the model's classes")
    class_profile = load_profile(profile_path, positions, [source.manifest.class_names[k] for k in positions])
    kind.check_profile(source.model, class_profile, source.manifest.input)
    masks = locate(source.model, class_profile, thresholds)
    routes = viz.decision_routes(source.model, class_profile, masks, list(range(len(positions))), max_links)
    settings = ", ".join(f"{key} {value:g}" for key, value in thresholds.as_dict().items())
    title = (f"Decision routes of {', '.join(routes.classes)} in {os.path.basename(os.fspath(model_path))}\n"
             f"({source.manifest.architecture.get('builder', 'model')}, {settings}; "
             f"at most {max_links} strongest links per class and pair of layers)")
    save_figure(viz.route_figure(routes, title), out)
    return routes


@dataclass
class Heatmap:
    """`heatmap`'s result: the layer drawn and its classes × input channels values."""

    layer: str
    classes: list[str]
    values: torch.Tensor


def profile_layers(profile_path: FilePath) -> list[viz.LayerInfo]:
    """The layers of a profile file, in execution order (what `heatmap --layer` accepts), from its header."""
    from modellego import viz

    with ProfileFile(profile_path) as opened:
        header = opened.header
        if header is None:  # format 1: the layers' sizes are the sums' shapes
            return viz.profile_layers(opened.read())
        return [viz.LayerInfo(name, header.kinds.get(name, ""), inputs, outputs)
                for name, (outputs, inputs) in zip(header.layers, header.sizes)]


def heatmap(profile_path: FilePath, out: FilePath, layer: str | None = None, model_path: FilePath | None = None,
            thresholds: Thresholds = PAPER, classes: str | Sequence[str | int] | None = None) -> Heatmap:
    """Draw the soft relative contribution (classes × input channels) of one layer of a profile file — by
    default its last conv layer — into `out` (.png or .svg), for every class it holds or `classes` (names or
    positions among the classes held; only their records are read). With the profiled model (`model_path`), each
    class's row averages only over the layer's outputs that the class keeps (masks located with `thresholds`),
    which is what makes the rows differ; without it, over all outputs (the classifier: the class's own row)."""
    from modellego import viz

    check_figure_path(out, inputs=[profile_path, model_path])
    with ProfileFile(profile_path) as opened:
        held = opened.classes()
        positions = None
        if classes is not None:
            rows = resolve_classes([name for _, name, _ in held], classes, "the profile's classes")
            positions = [held[row][0] for row in rows]
        class_profile = opened.read(positions)
    layer = layer if layer is not None else viz.default_layer(class_profile)
    if layer not in class_profile.contributions:
        viz.heatmap_values(class_profile, layer)  # refuses it, naming the profile's layers
    output_masks, weighting = None, "all outputs"
    if model_path is not None:
        source, kind = open_model(model_path)
        kind.check_options(threshold_options(thresholds))
        kind.check_profile(source.model, class_profile, source.manifest.input)
        graph = kind.channels(source.model, source.manifest.input)
        output_masks = kind.locate(source.model, class_profile, thresholds, graph, DEFAULT_FLATTEN).masks[layer]
        weighting = "outputs each class keeps"
    values = viz.heatmap_values(class_profile, layer, output_masks)
    dataset = f" on {class_profile.dataset}" if class_profile.dataset else ""
    title = (f"{layer}: soft relative contribution per class and input channel\n(mean over {weighting}; "
             f"{os.path.basename(os.fspath(profile_path))}{dataset},\n"
             f"{class_profile.samples_per_class} samples per class)")
    save_figure(viz.heatmap_figure(values, class_profile.classes, layer, title), out)
    return Heatmap(layer, list(class_profile.classes), values)
