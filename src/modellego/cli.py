"""The `modellego` command: a thin layer over the library, one public function per command."""

from __future__ import annotations

import json
import logging
import math
import re
import sys
import traceback
import warnings
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from modellego import distributed, pipeline
from modellego.checks import option_float, option_int, option_seed, option_text, output_folder
from modellego.data.datasets import check_image_size
from modellego.demo import run_demo
from modellego.errors import ModellegoError
from modellego.evaluate import count_flops, count_params
from modellego.masks import DEFAULT_FLATTEN, FLATTEN_RULES, PAPER, Thresholds, check_thresholds
from modellego.reconstruct import RIDGE
from modellego.search import GRID_STEP

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Make new CNN classifiers without training: disassemble trained models, assemble components.")
out = Console()
err = Console(stderr=True)

DataOption = typer.Option(None, "--data", help="Dataset name: fashion-mnist, digits, mnist, cifar10, cifar100, imagefolder, tiny-imagenet; graphs: sbm, karate, cora, citeseer, pubmed.")
DataRootOption = typer.Option(None, "--data-root", help="Folder holding the dataset's files (default: where the dataset usually lives).")
SeedOption = typer.Option(0, "--seed", help="Seed for every random choice; the same seed gives the same files.")
LrOption = typer.Option(1e-3, "--lr", help="Peak learning rate (Adam, one-cycle schedule).")
BatchSizeOption = typer.Option(128, "--batch-size", help="Images per training step.")
ImageSizeOption = typer.Option(None, "--image-size", help="Resize imagefolder / tiny-imagenet images to N×N "
                               "(default: 224 / 64 for train, then the size the model was trained at).")
AutoBatchOption = typer.Option(False, "--auto-batch", help="When --batch-size would not fit in memory, train with "
                               "the largest batch size that does (instead of refusing).")
AlphaConvOption = typer.Option(PAPER.alpha_conv, "--alpha-conv",
                               help="Relative-contribution threshold α for conv layers (and GCNConv).")
BetaConvOption = typer.Option(PAPER.beta_conv, "--beta-conv", help="Vote threshold β for conv layers (and GCNConv).")
AlphaFcOption = typer.Option(PAPER.alpha_fc, "--alpha-fc", help="α for linear layers.")
BetaFcOption = typer.Option(PAPER.beta_fc, "--beta-fc", help="β for linear layers.")
NoVerifyOption = typer.Option(False, "--no-verify", help="Read a CIFAR folder that fails torchvision's checksums "
                              "(a subset or copy of your own).")


_options = {"debug": False}


@app.callback()
def _global_options(
    debug: bool = typer.Option(False, "--debug", help="On an unexpected error, print the full traceback."),
    verbose: bool = typer.Option(False, "--verbose", help="Also print what each loop is estimated to need in "
                                 "memory (before the command or after it: `modellego train ... --verbose`)."),
) -> None:
    """Make new CNN classifiers without training: disassemble trained models, assemble components."""
    _options["debug"] = debug
    if verbose:
        _show_memory_estimates()


class _ErrLines(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        err.print(record.getMessage(), highlight=False, markup=False, soft_wrap=True)


def _show_memory_estimates() -> None:
    """Print modellego.memory's estimates (one `memory: ...` line each) on stderr."""
    logger = logging.getLogger("modellego.memory")
    if not any(isinstance(handler, _ErrLines) for handler in logger.handlers):
        logger.addHandler(_ErrLines())
    logger.setLevel(logging.INFO)


def _verbose_first(args: list[str]) -> list[str]:
    """`--verbose` is a global option; accept it after the command too, where users type it."""
    if "--verbose" in args[1:] and "--" not in args:
        return ["--verbose", *[arg for arg in args if arg != "--verbose"]]
    return args


MAX_EPOCHS = 10_000
MAX_BATCH = 65_536
MAX_SAMPLES_PER_CLASS = 100_000


def _data(root: Optional[Path], image_size: Optional[int], no_verify: bool) -> pipeline.DataOptions:
    return pipeline.DataOptions(root, image_size, not no_verify)


def _percent(value: float) -> str:
    return f"{100 * value:.2f}%"


def _check_image_size(image_size: Optional[int]) -> None:
    if image_size is not None:
        check_image_size(image_size)


def _strict(value: Any) -> Any:
    """`value` with every non-finite float replaced by None, so that the JSON printed is strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _strict(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(item) for item in value]
    return value


def _print_json(payload: dict) -> None:
    sys.stdout.write(json.dumps(_strict(payload), indent=2, sort_keys=True, allow_nan=False) + "\n")


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
MAX_CELL = 2_000
MAX_ROWS = 100


def _safe(value: object, limit: int = MAX_CELL) -> Text:
    """Text from a file, fit for the terminal: control characters shown as escapes (no ANSI sequences reach
    the terminal), no markup or emoji interpreted (a Text is printed as is), cut to `limit` characters."""
    text = str(value)
    if len(text) > limit:
        text = f"{text[:limit]}… ({len(text) - limit:,} more characters)"
    return Text(_CONTROL.sub(lambda match: f"\\x{ord(match.group()):02x}", text))


def _check_epochs(epochs: int) -> None:
    if not 1 <= epochs <= MAX_EPOCHS:
        raise ModellegoError(f"--epochs must be at least 1 and at most {MAX_EPOCHS:,}, got {epochs}")


def _check_width(width: float) -> None:
    if not (math.isfinite(width) and 0 < width <= 16):
        raise ModellegoError(f"--width must be a positive number up to 16 (a channel multiplier), got {width}")


def _check_training(epochs: int, lr: float, batch_size: int, seed: int) -> None:
    _check_epochs(epochs)
    option_float("--lr", lr, 0.0, 10.0, low_open=True)
    option_int("--batch-size", batch_size, 1, MAX_BATCH)
    option_seed(seed)


@app.command()
def train(
    model: str = typer.Option(..., "--model", help="Zoo name (lenet5, vgg11, vgg16, resnet18, resnet50, googlenet), torchvision:<builder>, or gcn (graph data)."),
    data: str = typer.Option(..., "--data", help="Dataset to train on."),
    out_path: Path = typer.Option(..., "--out", help="Model file to write (.safetensors)."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Passes over the training data (default 3; 200 full-graph steps for a GCN)."),
    classes: Optional[str] = typer.Option(None, "--classes", help="Train on these classes only: names or indices, comma-separated."),
    width: float = typer.Option(1.0, "--width", help="Channel-width multiplier."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Peak learning rate (Adam, one-cycle schedule; default 1e-3). A GCN: Adam's rate, default 0.01."),
    batch_size: int = BatchSizeOption,
    max_per_class: Optional[int] = typer.Option(None, "--max-per-class", help="Use at most this many training samples per class."),
    data_root: Optional[Path] = DataRootOption,
    image_size: Optional[int] = ImageSizeOption,
    no_verify: bool = NoVerifyOption,
    seed: int = SeedOption,
    auto_batch: bool = AutoBatchOption,
) -> None:
    """Train a model from the zoo on a dataset (or some of its classes) and save it."""
    graph = pipeline._graph_request(model, data)
    epochs = epochs if epochs is not None else (200 if graph else 3)
    lr = lr if lr is not None else (0.01 if graph else 1e-3)
    _check_training(epochs, lr, batch_size, seed)
    _check_width(width)
    option_text("--classes", classes)
    if max_per_class is not None:
        option_int("--max-per-class", max_per_class, 1, 10**7)
    _check_image_size(image_size)
    result = pipeline.train(model, data, out_path, epochs, classes, width, lr, batch_size, max_per_class,
                            _data(data_root, image_size, no_verify), seed, auto_batch=auto_batch)
    out.print(f"trained {model} on {data} ({result.samples} {result.metrics.get('unit', 'sample')}s, {epochs} epochs): "
              f"test accuracy {_percent(result.metrics['accuracy'])}, {result.metrics['params']:,} params -> {out_path}")


@app.command("eval")
def eval_command(
    file: Path = typer.Argument(..., help="A modellego model file."),
    data: Optional[str] = DataOption,
    data_root: Optional[Path] = DataRootOption,
    classes: Optional[str] = typer.Option(None, "--classes", help="Evaluate on these of the model's classes only."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table."),
    against: Optional[Path] = typer.Option(None, "--against", help="The source model: report Base / Restricted base / this model."),
    batch_size: int = typer.Option(256, "--batch-size"),
    image_size: Optional[int] = ImageSizeOption,
    no_verify: bool = NoVerifyOption,
) -> None:
    """Accuracy overall and per class on the test split, with params and FLOPs."""
    option_int("--batch-size", batch_size, 1, MAX_BATCH)
    option_text("--classes", classes)
    _check_image_size(image_size)
    if against is not None:
        if data is not None or classes is not None:
            raise ModellegoError("--against evaluates on the component's own task; drop --data/--classes")
        result = pipeline.compare(file, against, _data(data_root, image_size, no_verify), batch_size,
                                  progress=not as_json)
        if as_json:
            _print_json(result)
        else:
            _print_comparison(file, against, result)
        return
    result = pipeline.evaluate_file(file, data, classes, _data(data_root, image_size, no_verify), batch_size,
                                    progress=not as_json)
    if as_json:
        _print_json(result)
        return
    unit = result.get("unit", "sample")  # graph models count nodes
    table = Table(title=_safe(f"{file.name} on {result['data']} (test split, {result['samples']} {unit}s)"))
    table.add_column("class")
    table.add_column("accuracy", justify="right")
    for name, value in result["per_class"].items():
        table.add_row(_safe(name), _percent(value))
    table.add_row("[bold]all[/bold]", f"[bold]{_percent(result['accuracy'])}[/bold]")
    out.print(table)
    out.print(f"params {result['params']:,}   FLOPs {result['flops']:,} per {'node' if unit == 'node' else 'image'}")
    if result.get("base") is not None:
        out.print(f"assembly: accuracy {_percent(result['accuracy'])}; mean Base of the source models on the same "
                  f"classes {_percent(result['base'])}")


def _print_comparison(file: Path, source: Path, result: dict) -> None:
    table = Table(title=_safe(f"task {', '.join(result['classes'])}: test split, {result['samples']} "
                              f"{result.get('unit', 'sample')}s"))
    for column in ("model", "accuracy", "params", "FLOPs"):
        table.add_column(column, justify="left" if column == "model" else "right")
    table.add_row(_safe(f"Base ({source.name}, all classes)"), _percent(result["base"]),
                  f"{result['source_params']:,}", f"{result['source_flops']:,}")
    table.add_row(_safe(f"Restricted base ({source.name}, task classes)"), _percent(result["restricted_base"]),
                  f"{result['source_params']:,}", f"{result['source_flops']:,}")
    table.add_row(_safe(f"Disa ({file.name})"), _percent(result["accuracy"]), f"{result['params']:,}",
                  f"{result['flops']:,}")
    out.print(table)


@app.command()
def profile(
    model: Path = typer.Argument(..., help="The model file to profile."),
    out_path: Path = typer.Option(..., "--out", help="Profile file to write (.safetensors)."),
    samples_per_class: int = typer.Option(50, "--samples-per-class", help="Most confident correct training samples per class."),
    data: Optional[str] = DataOption,
    data_root: Optional[Path] = DataRootOption,
    image_size: Optional[int] = ImageSizeOption,
    no_verify: bool = NoVerifyOption,
    batch_size: int = typer.Option(64, "--batch-size"),
) -> None:
    """Per-class contributions of every Conv2d/Linear layer, on the model's training data."""
    option_int("--samples-per-class", samples_per_class, 1, MAX_SAMPLES_PER_CLASS)
    option_int("--batch-size", batch_size, 1, MAX_BATCH)
    _check_image_size(image_size)
    result = pipeline.profile(model, out_path, samples_per_class, data, _data(data_root, image_size, no_verify),
                              batch_size)
    out.print(f"profiled {len(result.layers)} layers on {int(result.counts.sum())} samples "
              f"({samples_per_class} per class asked) -> {out_path}")


@app.command()
def disassemble(
    model: Path = typer.Argument(..., help="The source model file."),
    profile_path: Path = typer.Option(..., "--profile", help="The source model's profile (modellego profile)."),
    classes: str = typer.Option(..., "--classes", help="The task: class names or indices, comma-separated, in output order."),
    out_path: Path = typer.Option(..., "--out", help="Component file to write (.safetensors)."),
    alpha_conv: float = AlphaConvOption,
    beta_conv: float = BetaConvOption,
    alpha_fc: float = AlphaFcOption,
    beta_fc: float = BetaFcOption,
    auto: bool = typer.Option(False, "--auto", help="Search α/β for the smallest component within --max-drop."),
    max_drop: float = typer.Option(1.0, "--max-drop", help="With --auto: accuracy points the component may lose on validation data."),
    grid_step: float = typer.Option(GRID_STEP, "--grid-step", help="With --auto: spacing of the α/β grid "
                                    "(α 0…0.6, β 0…0.5); 0.05 tries 4× the points and finds components between them."),
    evaluate: bool = typer.Option(False, "--evaluate", help="Also measure and record test accuracy, Base and "
                                  "Restricted base (an assembly's mean Base needs them; `eval --against` gives them any time)."),
    no_reconstruct: bool = typer.Option(False, "--no-reconstruct", help="The paper's pure method: no re-fitting of "
                                        "the component's layers and no BatchNorm re-estimation."),
    reconstruct_samples: Optional[int] = typer.Option(None, "--reconstruct-samples", help="Re-fit on N training "
                                                      "images per task class (default: the profile's images of the task)."),
    ridge: float = typer.Option(RIDGE, "--ridge", help="Reconstruction's ridge, relative to the mean squared input."),
    flatten: str = typer.Option(DEFAULT_FLATTEN, "--flatten", help="Where conv channels are flattened into a Linear "
                                "layer: any-feature keeps a channel if any of its features is kept; keep-all keeps "
                                "them all (the official code's behaviour)."),
    data_root: Optional[Path] = DataRootOption,
    image_size: Optional[int] = ImageSizeOption,
    no_verify: bool = NoVerifyOption,
    seed: int = SeedOption,
) -> None:
    """Cut a standalone component for some classes out of a model, without training."""
    flags = {"--alpha-conv": alpha_conv, "--beta-conv": beta_conv, "--alpha-fc": alpha_fc, "--beta-fc": beta_fc}
    check_thresholds(flags)
    option_text("--classes", classes)
    option_float("--max-drop", max_drop, 0.0, 100.0)
    option_float("--grid-step", grid_step, 0.01, 0.5)
    if grid_step != GRID_STEP and not auto:
        raise ModellegoError("--grid-step only applies with --auto; add --auto or drop it")
    option_seed(seed)
    _check_image_size(image_size)
    if flatten not in FLATTEN_RULES:
        raise ModellegoError(f"--flatten must be {' or '.join(FLATTEN_RULES)}, got {flatten!r}")
    if reconstruct_samples is not None:
        if no_reconstruct:
            raise ModellegoError("--reconstruct-samples has no effect with --no-reconstruct; drop one of them")
        option_int("--reconstruct-samples", reconstruct_samples, 1, MAX_SAMPLES_PER_CLASS)
    option_float("--ridge", ridge, 0.0, 1e6, low_open=True)
    result = pipeline.disassemble(model, profile_path, classes, out_path,
                                  Thresholds(alpha_conv, beta_conv, alpha_fc, beta_fc), auto, max_drop, evaluate,
                                  _data(data_root, image_size, no_verify), seed, reconstruct=not no_reconstruct,
                                  reconstruct_samples=reconstruct_samples, flatten=flatten, ridge=ridge,
                                  grid_step=grid_step)
    if result.search is not None:
        search, chosen = result.search, result.search.thresholds
        held_out = ("validation nodes" if "validation_nodes" in result.brick.manifest.provenance["disassembled"]["auto"]
                    else "held-out training samples")
        out.print(f"--auto: restricted base on {search.validation_samples} {held_out} "
                  f"{_percent(search.restricted_base)}; chose α_conv={chosen.alpha_conv} β_conv={chosen.beta_conv} "
                  f"α_fc={chosen.alpha_fc} β_fc={chosen.beta_fc} (validation {_percent(search.accuracy)}, "
                  f"{len(search.candidates)} of {search.grid} grid points evaluated)")
        front = result.brick.manifest.provenance["disassembled"]["auto"]["pareto"]
        out.print("Pareto front (validation accuracy vs FLOPs): " + ", ".join(
            f"α {c['alpha_conv']}/β {c['beta_conv']}: {_percent(c['accuracy'])} at {c['flops']:,}" for c in front))
    refit = result.brick.manifest.provenance["disassembled"].get("reconstruction")
    if refit:
        out.print(f"reconstructed: {refit['layers_refitted']} layers re-fitted on {refit['images']} training images "
                  f"(ridge {refit['ridge']:g}), no gradients")
    metrics = result.metrics
    accuracy = (f"test accuracy {_percent(metrics['test_accuracy'])} (restricted base "
                f"{_percent(metrics['restricted_base'])}), " if evaluate else "")
    out.print(_safe(f"component for {', '.join(result.brick.manifest.class_names)}: {accuracy}"
                    f"{metrics['params']:,} params ({count_params(result.source.model):,} in the source), "
                    f"{metrics['flops']:,} FLOPs -> {out_path}"))


@app.command()
def assemble(
    components: list[Path] = typer.Argument(..., help="Two or more component files (or any modellego models)."),
    out_path: Path = typer.Option(..., "--out", help="Assembled model file to write (.safetensors)."),
    mode: str = typer.Option("padded", "--mode", help="padded: one dense network (alignment padding); parallel: side by side (GCNs: parallel only)."),
    no_scale: bool = typer.Option(False, "--no-scale", help="Skip parameter scaling of the components' logits "
                                  "(the same as --calibration none)."),
    calibration: Optional[str] = typer.Option(
        None, "--calibration", help="How the assembly decides between its components: auto (default: the one "
        "that answers the components' own held-out training images best), scale (the paper's parameter scaling), "
        "msp, energy, mahalanobis, knn, pattern, nearest (gates fitted on each component's own training images, stored in "
        "the file), none."),
    data_root: Optional[Path] = DataRootOption,
    image_size: Optional[int] = ImageSizeOption,
    no_verify: bool = NoVerifyOption,
) -> None:
    """Assemble components into one model that answers the union of their classes, without training."""
    _check_image_size(image_size)
    if no_scale and calibration not in (None, "none"):
        raise ModellegoError(f"--no-scale contradicts --calibration {calibration}; give one of them")
    model, manifest = pipeline.assemble(components, out_path, mode, not no_scale,
                                        _data(data_root, image_size, no_verify), calibration=calibration)
    record = manifest.provenance.get("assembled", {})
    if "calibration" in record:
        chosen = record["calibration"]
        how = f"auto: {chosen}" if (calibration or ("none" if no_scale else "auto")) == "auto" else chosen
    else:  # graph assemblies: the paper's scaling, or nothing
        how = "none" if no_scale or calibration == "none" else "scale"
    out.print(_safe(f"assembled {len(components)} components ({mode}, calibration {how}): "
                    f"{len(manifest.classes)} classes, {count_params(model):,} params, "
                    f"{count_flops(model, manifest.input):,} FLOPs -> {out_path}"))


@app.command()
def finetune(
    file: Path = typer.Argument(..., help="A model file, usually an assembly."),
    out_path: Path = typer.Option(..., "--out", help="Fine-tuned model file to write."),
    epochs: int = typer.Option(2, "--epochs"),
    lr: float = LrOption,
    batch_size: int = BatchSizeOption,
    data_root: Optional[Path] = DataRootOption,
    image_size: Optional[int] = ImageSizeOption,
    no_verify: bool = NoVerifyOption,
    seed: int = SeedOption,
    auto_batch: bool = AutoBatchOption,
) -> None:
    """Train a model (an assembly: its zero blocks too) on the training data of all its classes."""
    _check_training(epochs, lr, batch_size, seed)
    _check_image_size(image_size)
    pipeline.finetune(file, out_path, epochs, lr, batch_size, _data(data_root, image_size, no_verify), seed,
                      auto_batch=auto_batch)
    out.print(_safe(f"fine-tuned {file.name} for {epochs} epochs -> {out_path}"))


@app.command()
def info(
    file: Path = typer.Argument(..., help="A modellego model file."),
    as_json: bool = typer.Option(False, "--json", help="Print the manifest as JSON."),
) -> None:
    """Show a model file's manifest: architecture, classes, input, provenance, metrics."""
    manifest = pipeline.info(file)
    if as_json:
        _print_json(json.loads(manifest.to_json()))
        return
    table = Table(title=_safe(file), show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    for field, value in _info_rows(manifest):
        table.add_row(_safe(field, 200), _safe(value))
    out.print(table)


def _info_rows(manifest) -> list[tuple[str, str]]:
    """The manifest as (field, value) rows; long values are cut when printed, and at most MAX_ROWS
    provenance/metrics entries are listed."""
    rows = [("kind", manifest.kind), ("architecture", json.dumps(manifest.architecture)),
            ("input", f"{manifest.input.describe()}, mean {list(manifest.input.mean)}, std {list(manifest.input.std)}"
             if hasattr(manifest.input, "mean") else manifest.input.describe()),
            ("classes", ", ".join(f"{ref.name} ({ref.dataset}#{ref.index})"
                                  for ref in manifest.classes[:MAX_ROWS * 10])
             + (f", … ({len(manifest.classes):,} in all)" if len(manifest.classes) > MAX_ROWS * 10 else ""))]
    for section in ("provenance", "metrics"):
        entries = getattr(manifest, section)
        for key, value in list(entries.items())[:MAX_ROWS]:
            rows.append((f"{section}.{key}", json.dumps(value)))
        if len(entries) > MAX_ROWS:
            rows.append((f"{section}", f"… {len(entries) - MAX_ROWS:,} more entries (see --json)"))
    rows.append(("format", str(manifest.format_version)))
    return rows


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
    flags = {"--alpha-conv": alpha_conv, "--beta-conv": beta_conv, "--alpha-fc": alpha_fc, "--beta-fc": beta_fc}
    check_thresholds(flags)
    option_text("--classes", classes)
    if len([name for name in classes.split(",") if name.strip()]) > 10:
        raise ModellegoError("--classes: a route figure shows at most 10 classes; name fewer")
    option_int("--max-links", max_links, 0, 100_000)
    routes = pipeline.route(model, profile_path, classes, out_path,
                            Thresholds(alpha_conv, beta_conv, alpha_fc, beta_fc), max_links)
    table = Table(title=_safe(f"decision routes -> {out_path}"))
    table.add_column("layer", no_wrap=True)
    table.add_column("kind")
    table.add_column("channels", justify="right")
    for name in routes.classes:
        table.add_column(_safe(f"kept: {name}", 200), justify="right")
    table.add_column("kept by all", justify="right")
    table.add_column("kept by any", justify="right")
    table.add_column("shared", justify="right")
    for row in routes.table():
        table.add_row(_safe(row.layer, 200), row.kind, str(row.channels), *(str(n) for n in row.kept),
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
) -> None:
    """Heat map of one layer's soft relative contribution: classes (rows) × input channels (columns)."""
    if list_layers:
        table = Table(title=_safe(f"layers of {profile_path}"))
        for column in ("layer", "kind", "input channels", "output channels"):
            table.add_column(column, overflow="fold")
        for info in pipeline.profile_layers(profile_path)[:MAX_ROWS * 10]:
            table.add_row(_safe(info.name, 200), info.kind or "?", str(info.inputs), str(info.outputs))
        out.print(table)
        return
    if out_path is None:
        raise ModellegoError("heatmap needs --out FILE.png (or .svg); --layers lists the layers instead")
    check_thresholds({"--alpha-conv": alpha_conv, "--beta-conv": beta_conv, "--alpha-fc": alpha_fc,
                      "--beta-fc": beta_fc})
    result = pipeline.heatmap(profile_path, out_path, layer, model,
                              Thresholds(alpha_conv, beta_conv, alpha_fc, beta_fc))
    out.print(_safe(f"heat map of {result.layer}: {len(result.classes)} classes × {result.values.shape[1]} input "
                    f"channels -> {out_path}"))
    strongest = result.values.argmax(dim=1).tolist()
    table = Table(title=_safe(f"{result.layer}: strongest input channel per class"))
    for column in ("class", "strongest channel", "mean contribution", "channels above 0.5"):
        table.add_column(column, overflow="fold")
    for k, name in enumerate(result.classes[:MAX_ROWS * 10]):
        row = result.values[k]
        table.add_row(_safe(name, 200), str(strongest[k]), f"{row.mean():.3f}", str(int((row > 0.5).sum())))
    out.print(table)


@app.command()
def demo(
    out_dir: Path = typer.Option(Path("runs/demo"), "--out-dir", help="Folder for the demo's files (created)."),
    epochs: int = typer.Option(4, "--epochs"),
    seed: int = SeedOption,
) -> None:
    """The whole job on Fashion-MNIST (digits when absent): train, profile, disassemble two tasks, assemble, fine-tune."""
    _check_epochs(epochs)
    option_seed(seed)
    output_folder(out_dir)
    run_demo(out_dir, epochs=epochs, seed=seed, console=out)


def _show_warning_once(shown: set[str]):
    """A `warnings.showwarning` that prints each distinct message once as `warning: ...` on stderr."""
    def show(message, category, filename, lineno, file=None, line=None) -> None:
        text = str(message)
        if text not in shown and distributed.is_main():
            shown.add(text)
            err.print(f"warning: {text}", highlight=False, markup=False, soft_wrap=True)
    return show


def main() -> None:
    """Entry point: user mistakes print one line on stderr and exit with code 2, unexpected errors one line
    asking for a report (exit 1, the traceback with --debug), warnings one `warning:` line each."""
    _options["debug"] = False
    logging.getLogger("modellego.memory").setLevel(logging.WARNING)  # --verbose turns the estimates on
    with warnings.catch_warnings():
        if not sys.warnoptions:  # -W / PYTHONWARNINGS, when given, decide what is shown
            warnings.simplefilter("ignore")
            warnings.simplefilter("always", UserWarning)
        warnings.showwarning = _show_warning_once(set())
        _run()


def _run() -> None:
    try:
        distributed.setup()
        out.quiet = not distributed.is_main()  # under torchrun, the first process speaks for all
        app(args=_verbose_first(sys.argv[1:]) or ["--help"], standalone_mode=False)
    except ModellegoError as error:
        if distributed.is_main():
            err.print(f"error: {error}", highlight=False, markup=False, soft_wrap=True)
        sys.exit(2)
    except typer.Abort:
        err.print("aborted", highlight=False)
        sys.exit(130)
    except typer.TyperException as error:
        command = " ".join(sys.argv[1:2]) if len(sys.argv) > 1 and not sys.argv[1].startswith("-") else ""
        hint = f"see `modellego {command} --help`".replace("  ", " ")
        err.print(f"error: {error.format_message()} ({hint})", highlight=False, markup=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        err.print("interrupted", highlight=False)
        sys.exit(130)
    except Exception as error:  # a bug: one line by default, the traceback on request
        if _options["debug"]:
            sys.stderr.write(traceback.format_exc())
        else:
            message = str(error).splitlines()[0] if str(error) else ""
            err.print(f"error: {type(error).__name__}: {message} (please report this at the project's issue "
                      "tracker; rerun with --debug for the traceback)", highlight=False, markup=False, soft_wrap=True)
        sys.exit(1)
    finally:
        distributed.teardown()
