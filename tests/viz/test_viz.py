"""Decision routes and heat maps: the figures are written, the tables name the right layers and classes, the
links join kept channels of really connected layers, and the heat map's numbers match a slow reference."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from helpers import assert_user_error, invoke, run_cli, synthetic_profile
from modellego.core.channels import ChannelGraph
from modellego.core.locate import Thresholds, locate
from modellego.io.profiles import load_profile
from modellego.viz import decision_routes, heatmap_values, route_figure
from modellego.viz.routes import INPUT

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def digits_files(tmp_path_factory):
    """A LeNet-5 trained briefly on scikit-learn's digits and its profile (small and quick, real data)."""
    folder = tmp_path_factory.mktemp("viz")
    model, profile = folder / "lenet.safetensors", folder / "lenet.profile.safetensors"
    trained = invoke("train", "--model", "lenet5", "--data", "digits", "--epochs", "3", "--lr", "0.005",
                     "--out", str(model))
    assert trained.returncode == 0, trained.stderr
    profiled = invoke("profile", str(model), "--samples-per-class", "8", "--out", str(profile))
    assert profiled.returncode == 0, profiled.stderr
    return folder, model, profile


def test_route_writes_the_figure_and_tabulates_layers_and_classes(digits_files, tmp_path):
    _, model, profile = digits_files
    figure = tmp_path / "route.png"
    result = run_cli("route", str(model), "--profile", str(profile), "--classes", "3,8", "--out", str(figure))
    assert result.returncode == 0, result.stderr
    assert figure.read_bytes().startswith(PNG)
    for layer in ("net.features.0", "net.features.3", "net.classifier.0", "net.classifier.2", "net.classifier.4"):
        assert layer in result.stdout
    assert "kept: 3" in result.stdout and "kept: 8" in result.stdout and "kept: 5" not in result.stdout
    vector = tmp_path / "route.svg"
    assert invoke("route", str(model), "--profile", str(profile), "--classes", "0", "--out", str(vector),
                  "--max-links", "5").returncode == 0
    assert b"<svg" in vector.read_bytes()[:2000]


def test_route_table_counts_the_masks(digits_files):
    _, model_path, profile_path = digits_files
    from modellego.io.modelfile import load

    model, _ = load(model_path)
    profile = load_profile(profile_path)
    masks = locate(model, profile)
    routes = decision_routes(model, profile, masks, "2,7,9")
    assert routes.classes == ["2", "7", "9"]
    rows = {row.layer: row for row in routes.table()}
    assert list(rows) == profile.layers
    for name, row in rows.items():
        chosen = masks.masks[name][[2, 7, 9]]
        assert row.kept == chosen.sum(1).tolist()
        assert row.in_all == int(chosen.all(0).sum()) and row.in_any == int(chosen.any(0).sum())
    head = rows[profile.layers[-1]]
    assert head.kept == [1, 1, 1] and head.in_all == 0 and head.in_any == 3


def test_heatmap_writes_the_figure_and_lists_layers(digits_files, tmp_path):
    _, model, profile = digits_files
    listed = invoke("heatmap", str(profile), "--layers")
    assert listed.returncode == 0, listed.stderr
    for layer, kind in (("net.features.0", "conv"), ("net.features.3", "conv"), ("net.classifier.4", "linear")):
        assert layer in listed.stdout and kind in listed.stdout
    figure = tmp_path / "heat.png"
    drawn = invoke("heatmap", str(profile), "--out", str(figure))
    assert drawn.returncode == 0, drawn.stderr
    assert figure.read_bytes().startswith(PNG)
    assert "heat map of net.features.3" in drawn.stdout  # the last conv layer by default
    assert all(f"│ {digit} " in drawn.stdout for digit in "0123456789")  # a row per class
    chosen = tmp_path / "heat.svg"
    masked = invoke("heatmap", str(profile), "--layer", "net.classifier.0", "--model", str(model), "--out", str(chosen))
    assert masked.returncode == 0, masked.stderr
    assert "net.classifier.0: 10 classes × 400 input channels" in masked.stdout.replace("\n", " ")


def test_bad_figure_input(digits_files, tmp_path):
    _, model, profile = digits_files
    base = ["route", str(model), "--profile", str(profile)]
    assert_user_error(invoke(*base, "--classes", "3", "--out", str(tmp_path / "r.jpg")), "must end in .png or .svg")
    assert_user_error(invoke(*base, "--classes", "Sofa", "--out", str(tmp_path / "r.png")), "'Sofa' is not in")
    assert_user_error(invoke(*base, "--classes", "3", "--alpha-conv", "2", "--out", str(tmp_path / "r.png")),
                      "alpha_conv must be between 0 and 1")
    assert_user_error(invoke(*base, "--classes", "3", "--out", str(tmp_path / "none" / "r.png")), "does not exist")
    assert_user_error(invoke("route", str(model), "--profile", str(model), "--classes", "3",
                             "--out", str(tmp_path / "r.png")), "not a modellego profile")
    assert_user_error(invoke("heatmap", str(profile), "--layer", "net.nope", "--out", str(tmp_path / "h.png")),
                      "'net.nope' is not in this profile")
    assert_user_error(invoke("heatmap", str(profile)), "needs --out")
    assert not list(tmp_path.iterdir())  # nothing half-written


class Residual(nn.Module):
    """conv → two branches added → conv → pooled linear head: links must follow the add."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.branch = nn.Conv2d(8, 8, 3, padding=1)
        self.after = nn.Conv2d(8, 6, 3, padding=1)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.relu(x + self.branch(x))
        return self.head(torch.relu(self.after(x)).mean((2, 3)))


def test_links_join_kept_channels_of_connected_layers_and_are_capped():
    torch.manual_seed(0)
    model = Residual().eval()
    profile = synthetic_profile(model, (1, 8, 8), 3, seed=1)
    masks = locate(model, profile, Thresholds(alpha_conv=0.2, beta_conv=0.1))
    graph = ChannelGraph(model, (1, 8, 8))
    routes = decision_routes(model, profile, masks, [0, 2], max_links=4, graph=graph)
    assert routes.layers == [INPUT, "stem", "branch", "after", "head"]
    connected = {(feed.producer, consumer) for consumer in profile.layers for feed in graph.feeds(consumer)}
    connected |= {(INPUT, "stem")}
    assert ("stem", "after") in connected  # through the add
    per_pair: dict[tuple, int] = {}
    for link in routes.links:
        assert (link.producer, link.consumer) in connected
        assert routes.kept[link.producer][link.route, link.source] and routes.kept[link.consumer][link.route, link.target]
        assert 0 < link.strength <= 1
        key = (link.route, link.producer, link.consumer)
        per_pair[key] = per_pair.get(key, 0) + 1
    assert per_pair and max(per_pair.values()) <= 4
    assert route_figure(routes).axes


def test_wide_layers_draw_only_the_strongest_links():
    wide = nn.Sequential(nn.Conv2d(1, 512, 3, padding=1), nn.ReLU(), nn.Conv2d(512, 512, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, 4))
    profile = synthetic_profile(wide, (1, 6, 6), 4, seed=2)
    masks = locate(wide, profile, Thresholds(alpha_conv=0.1, beta_conv=0.05, alpha_fc=0.1, beta_fc=0.05))
    routes = decision_routes(wide, profile, masks, [0, 1, 2], max_links=40)
    pairs = {(link.route, link.producer, link.consumer) for link in routes.links}
    assert len(routes.links) <= 40 * len(pairs)
    assert routes.kept["0"].sum() > 100  # many kept channels, few lines
    figure = route_figure(routes)
    lines = [line for line in figure.axes[0].lines]
    assert len(lines) == len(routes.links) <= 40 * 3 * 3


def test_heatmap_values_match_a_slow_reference():
    torch.manual_seed(3)
    model = Residual().eval()
    profile = synthetic_profile(model, (1, 8, 8), 3, seed=4)
    masks = torch.tensor([[1, 0, 1, 0, 0, 1], [0, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    values = heatmap_values(profile, "after", masks)
    sums = profile.contributions["after"]
    for k in range(3):
        for i in range(8):
            total, kept = 0.0, 0
            for o in range(6):
                column = sums[k, o]
                relative = (column[i] - column.min()) / (column.max() - column.min() + 1e-5)
                if masks[k, o]:
                    total, kept = total + float(relative), kept + 1
            assert values[k, i].item() == pytest.approx(total / kept if kept else 0.0, abs=1e-6)
    classifier = heatmap_values(profile, "head")
    relative = profile.relative("head")
    assert torch.allclose(classifier, torch.stack([relative[k, k] for k in range(3)]))


def test_figures_of_names_with_control_characters_are_well_formed_svg(digits_files, tmp_path):
    """A class or layer name holding an ESC byte is drawn as its escape: the SVG parses as XML."""
    import xml.etree.ElementTree as ElementTree

    from modellego.io.modelfile import load
    from modellego.viz import heatmap_figure

    figure = heatmap_figure(torch.rand(2, 5), ["a\x1bb", "tab\tand\x00nul"], "layer\x07", "title\x1b[31m")
    path = tmp_path / "heat.svg"
    figure.savefig(path)
    text = path.read_text()
    ElementTree.fromstring(text)
    assert "\\x1b" in text
    _, model_path, profile_path = digits_files
    model, _ = load(model_path)
    profile = load_profile(profile_path)
    routes = decision_routes(model, profile, locate(model, profile), "2,7")
    routes.classes = ["two\x1b", "seven"]
    path = tmp_path / "route.svg"
    route_figure(routes).savefig(path)
    ElementTree.fromstring(path.read_text())
