"""Pictures of what a model does inside: decision routes and contribution heat maps (matplotlib figures; the
pipeline writes them to files)."""

from modellego.viz.heatmap import LayerInfo, default_layer, heatmap_figure, heatmap_values, profile_layers
from modellego.viz.routes import Link, RouteRow, Routes, decision_routes, route_figure

__all__ = ["LayerInfo", "Link", "RouteRow", "Routes", "decision_routes", "default_layer", "heatmap_figure",
           "heatmap_values", "profile_layers", "route_figure"]
