"""The commands that draw: `route` (decision routes) and `heatmap` (relative contributions of one layer)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from modellego.cli.options import (
    MAX_ROWS,
    AlphaConvOption,
    AlphaFcOption,
    BetaConvOption,
    BetaFcOption,
    app,
    commands,
    option_int,
    option_text,
    out,
    safe,
)
from modellego.core.thresholds import PAPER, Thresholds
from modellego.errors import ModellegoError


@app.command()
def route(
    model: Path = typer.Argument(..., help="The model file."),
    profile_path: Path = typer.Option(..., "--profile", help="The model's profile (modellego profile)."),
    classes: str = typer.Option(..., "--classes", help="Classes whose routes to draw: names or indices, comma-separated (at most 10)."),
    out_path: Path = typer.Option(..., "--out", help="Figure to write: .png or .svg."),
    alpha_conv: float = AlphaConvOption,
    beta_conv: float = BetaConvOption,
    alpha_fc: float = AlphaFcOption,
    beta_fc: float = BetaFcOption,
    max_links: int = typer.Option(40, "--max-links", help="Lines drawn per class and pair of connected layers (the strongest)."),
) -> None:
    """Draw the decision routes of some classes (the channels they keep in every layer) and print a table of
    channels kept per class and shared."""
    thresholds = Thresholds(alpha_conv, beta_conv, alpha_fc, beta_fc)
    option_text("--classes", classes)
    if len([name for name in classes.split(",") if name.strip()]) > 10:
        raise ModellegoError("--classes: a route figure shows at most 10 classes; name fewer")
    option_int("--max-links", max_links, 0, 100_000)
    routes = commands.route(model, profile_path, classes, out_path, thresholds, max_links)
    table = Table(title=safe(f"decision routes -> {out_path}"))
    table.add_column("layer", no_wrap=True)
    table.add_column("kind")
    table.add_column("channels", justify="right")
    for name in routes.classes:
        table.add_column(safe(f"kept: {name}", 200), justify="right")
    table.add_column("kept by all", justify="right")
    table.add_column("kept by any", justify="right")
    table.add_column("shared", justify="right")
    for row in routes.table():
        table.add_row(safe(row.layer, 200), row.kind, str(row.channels), *(str(n) for n in row.kept),
                      str(row.in_all), str(row.in_any), f"{100 * row.shared:.0f}%")
    out.print(table)


@app.command()
def heatmap(
    profile_path: Path = typer.Argument(..., help="A profile file (modellego profile)."),
    out_path: Optional[Path] = typer.Option(None, "--out", help="Figure to write: .png or .svg."),
    layer: Optional[str] = typer.Option(None, "--layer", help="The layer to draw (default: the last conv layer; see --layers)."),
    list_layers: bool = typer.Option(False, "--layers", help="List the profile's layers and exit."),
    model: Optional[Path] = typer.Option(None, "--model", help="The profiled model: each class's row then averages "
                                         "over the outputs the class keeps (masks with the α/β below)."),
    alpha_conv: float = typer.Option(PAPER.alpha_conv, "--alpha-conv", help="With --model: α for conv layers."),
    beta_conv: float = typer.Option(PAPER.beta_conv, "--beta-conv", help="With --model: β for conv layers."),
    alpha_fc: float = typer.Option(PAPER.alpha_fc, "--alpha-fc", help="With --model: α for linear layers."),
    beta_fc: float = typer.Option(PAPER.beta_fc, "--beta-fc", help="With --model: β for linear layers."),
    classes: Optional[str] = typer.Option(None, "--classes", help="Draw these of the profile's classes only "
                                          "(names or indices, comma-separated; default: all it holds)."),
) -> None:
    """Heat map of one layer's soft relative contribution: classes (rows) × input channels (columns)."""
    if list_layers:
        table = Table(title=safe(f"layers of {profile_path}"))
        for column in ("layer", "kind", "input channels", "output channels"):
            table.add_column(column, overflow="fold")
        for info in commands.profile_layers(profile_path)[:MAX_ROWS * 10]:
            table.add_row(safe(info.name, 200), info.kind or "?", str(info.inputs), str(info.outputs))
        out.print(table)
        return
    if out_path is None:
        raise ModellegoError("heatmap needs --out FILE.png (or .svg); --layers lists the layers instead")
    option_text("--classes", classes)
    result = commands.heatmap(profile_path, out_path, layer, model, Thresholds(alpha_conv, beta_conv, alpha_fc, beta_fc),
                              classes)
    out.print(safe(f"heat map of {result.layer}: {len(result.classes)} classes × {result.values.shape[1]} input "
                    f"channels -> {out_path}"))
    strongest = result.values.argmax(dim=1).tolist()
    table = Table(title=safe(f"{result.layer}: strongest input channel per class"))
    for column in ("class", "strongest channel", "mean contribution", "channels above 0.5"):
        table.add_column(column, overflow="fold")
    for k, name in enumerate(result.classes[:MAX_ROWS * 10]):
        row = result.values[k]
        table.add_row(safe(name, 200), str(strongest[k]), f"{row.mean():.3f}", str(int((row > 0.5).sum())))
    out.print(table)
