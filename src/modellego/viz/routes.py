"""Decision routes: which channels of every Conv2d/Linear layer some classes route through (their masks from
`locate`), how much the classes share, and the strongest contributions between the kept channels of
connected layers — the data behind the paper's route figures, and the figure itself (matplotlib)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from torch import nn

from modellego.core.channels import ChannelGraph
from modellego.core.layers import parameter_layers
from modellego.core.locate import ComponentMasks
from modellego.core.profile import Profile
from modellego.core.samples import resolve_classes
from modellego.errors import ModellegoError
from modellego.viz.text import drawable

INPUT = "input"
MAX_LINKS = 40  # per class and pair of connected layers: enough to see a route, few enough for 512 channels
CLASS_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
                 "#bcbd22", "#7f7f7f")
SHARED_COLOUR = "#222222"
UNUSED_COLOUR = "#d9d9d9"


@dataclass(frozen=True)
class Link:
    """Class `route` (position in `Routes.classes`) routes channel `source` of `producer` into output channel
    `target` of `consumer`; `strength` is their contribution relative to the strongest link drawn for that
    class and pair of layers (in (0, 1])."""

    route: int
    producer: str
    source: int
    consumer: str
    target: int
    strength: float


@dataclass(frozen=True)
class RouteRow:
    """One line of the route table: a layer's channels kept per class, by every class and by any of them."""

    layer: str
    kind: str
    channels: int
    kept: list[int]
    in_all: int
    in_any: int

    @property
    def shared(self) -> float:
        """The share of the classes' channels that every class keeps (∩ / ∪; 1.0 for a single class)."""
        return self.in_all / self.in_any if self.in_any else 0.0


@dataclass
class Routes:
    """The decision routes of `classes` through `model`: per layer (execution order, the image input first) a
    classes × channels mask of the channels each class keeps, and the strongest links between kept channels."""

    classes: list[str]
    layers: list[str]
    kinds: dict[str, str]
    kept: dict[str, torch.Tensor]
    links: list[Link] = field(default_factory=list)
    settings: dict[str, float] = field(default_factory=dict)

    def table(self) -> list[RouteRow]:
        """Per parameter layer (the image input left out): channels kept per class, by all, by any."""
        rows = []
        for name in self.layers:
            if name == INPUT:
                continue
            mask = self.kept[name]
            rows.append(RouteRow(name, self.kinds[name], mask.shape[1], [int(n) for n in mask.sum(1)],
                                 int(mask.all(0).sum()), int(mask.any(0).sum())))
        return rows


def decision_routes(model: nn.Module, profile: Profile, masks: ComponentMasks, classes: str | Sequence[str | int],
                    max_links: int = MAX_LINKS, graph: ChannelGraph | None = None) -> Routes:
    """The routes of `classes` (names or output positions) through `model`, from its `profile` and the `masks`
    `locate` found with them. A link's weight is the class's summed contribution A[k,o,i] over the input
    positions i that the producer channel feeds (a flattened channel's features, an add's operands); only the
    `max_links` strongest links between kept channels are kept per class and pair of connected layers."""
    if max_links < 0:
        raise ModellegoError(f"max_links must be at least 0, got {max_links}")
    profile.check_model(model)
    if masks.classes != profile.classes:
        raise ModellegoError("the masks were located with a profile of other classes than this profile")
    chosen = resolve_classes(profile.classes, classes, "the model's classes")
    modules = parameter_layers(model)
    graph = graph or ChannelGraph(model, profile.input_shape)
    first = modules[profile.layers[0]]
    input_channels = first.in_channels if isinstance(first, nn.Conv2d) else first.in_features
    kinds = {name: "conv" if isinstance(modules[name], nn.Conv2d) else "linear" for name in profile.layers}
    kept = {INPUT: torch.ones(len(chosen), input_channels, dtype=torch.bool)}
    kept |= {name: masks.masks[name][chosen].bool() for name in profile.layers}
    links: list[Link] = []
    for consumer in profile.layers:
        sums = profile.contributions[consumer][chosen].double()  # K' × O × I
        feeds = [(feed.producer, feed.channels, feed.inputs) for feed in graph.feeds(consumer)]
        if consumer == profile.layers[0] and not feeds:
            everything = torch.arange(input_channels)
            feeds = [(INPUT, everything, everything)]
        for producer, channels, inputs in feeds:
            width = kept[producer].shape[1]
            for route in range(len(chosen)):
                # Contribution of each producer channel to each output channel, summed over the inputs it feeds.
                weight = torch.zeros(sums.shape[1], width, dtype=torch.float64)
                weight.index_add_(1, channels, sums[route][:, inputs])
                weight *= kept[consumer][route][:, None] & kept[producer][route][None, :]
                links.extend(_strongest(weight, route, producer, consumer, max_links))
    return Routes(classes=[profile.classes[k] for k in chosen], layers=[INPUT, *profile.layers],
                  kinds={INPUT: "input", **kinds}, kept=kept, links=links, settings=dict(masks.settings))


def _strongest(weight: torch.Tensor, route: int, producer: str, consumer: str, limit: int) -> list[Link]:
    flat = weight.flatten()
    count = min(limit, int((flat > 0).sum()))
    if count == 0:
        return []
    values, positions = flat.topk(count)
    top = float(values[0])
    columns = weight.shape[1]
    return [Link(route, producer, int(position) % columns, consumer, int(position) // columns, float(value) / top)
            for value, position in zip(values, positions)]


def _channel_y(channel: int, channels: int) -> float:
    """Channels spread over the column's height, channel 0 at the top."""
    return 1.0 - (channel + 0.5) / channels


def route_figure(routes: Routes, title: str = "") -> Figure:
    """The routes as a figure: one column per layer (execution order), its channels as dots — a class's colour
    when only that class keeps the channel, dark when several do, grey when none does — and the links as lines
    in the class's colour (the stronger, the more opaque)."""
    if len(routes.classes) > len(CLASS_COLOURS):
        raise ModellegoError(f"a route figure shows at most {len(CLASS_COLOURS)} classes, got {len(routes.classes)}")
    columns = {name: position for position, name in enumerate(routes.layers)}
    names, title = [drawable(name) for name in routes.classes], drawable(title)
    figure = Figure(figsize=(min(30.0, max(10.0, 1.0 + 0.95 * len(routes.layers))), 7.5), layout="constrained")
    axes = figure.add_subplot()
    for link in sorted(routes.links, key=lambda link: link.strength):
        producer_channels = routes.kept[link.producer].shape[1]
        consumer_channels = routes.kept[link.consumer].shape[1]
        axes.plot([columns[link.producer], columns[link.consumer]],
                  [_channel_y(link.source, producer_channels), _channel_y(link.target, consumer_channels)],
                  color=CLASS_COLOURS[link.route], linewidth=0.3 + 1.2 * link.strength,
                  alpha=0.15 + 0.6 * link.strength, zorder=1, solid_capstyle="round")
    for name, position in columns.items():
        mask = routes.kept[name]
        channels = mask.shape[1]
        keepers = mask.sum(0)
        size = max(3.0, min(60.0, 2400.0 / channels))
        colours = [UNUSED_COLOUR if n == 0 else SHARED_COLOUR if n > 1 else CLASS_COLOURS[int(mask[:, c].nonzero()[0])]
                   for c, n in enumerate(keepers.tolist())]
        axes.scatter([position] * channels, [_channel_y(c, channels) for c in range(channels)], s=size, c=colours,
                     linewidths=0, zorder=2)
    last = routes.layers[-1]
    head_channels = routes.kept[last].shape[1]
    for route, name in enumerate(names):
        rows = routes.kept[last][route].nonzero().flatten().tolist()
        for row in rows:
            axes.annotate(name, (columns[last], _channel_y(row, head_channels)), xytext=(6, 0),
                          textcoords="offset points", va="center", fontsize=8, color=CLASS_COLOURS[route])
    axes.set_xticks(range(len(routes.layers)),
                    [f"{drawable(name)}\n{routes.kinds[name]}, {routes.kept[name].shape[1]} ch" for name in routes.layers],
                    rotation=45, ha="right", fontsize=8)
    axes.set_yticks([0.0, 1.0], ["last channel", "channel 0"], fontsize=8)
    axes.set_xlim(-0.5, len(routes.layers) - 0.1)
    axes.set_ylim(-0.03, 1.03)
    axes.set_xlabel("layer (execution order); channels spread over the column's height")
    for side in ("top", "right"):
        axes.spines[side].set_visible(False)
    handles = [Patch(color=CLASS_COLOURS[k], label=f"{name} only") for k, name in enumerate(names)]
    if len(routes.classes) > 1:
        handles.append(Patch(color=SHARED_COLOUR, label="kept by several classes"))
    handles += [Patch(color=UNUSED_COLOUR, label="kept by none"),
                Line2D([], [], color="#555555", label="strongest contributions (opacity = strength)")]
    figure.legend(handles=handles, loc="outside lower center", ncol=min(3, len(handles)), fontsize=8, frameon=False)
    axes.set_title(title or f"Decision routes of {', '.join(names)}", fontsize=9)
    return figure
