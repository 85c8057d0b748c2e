"""The commands on whole models: `train`, `eval`, `info`, `finetune`, `import`, `demo`, `export`."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from modellego.cli.options import (
    MAX_ROWS,
    AutoBatchOption,
    BatchSizeOption,
    DataOption,
    DataRootOption,
    DeviceOption,
    ImageSizeOption,
    InferenceBatchOption,
    LrOption,
    NoVerifyOption,
    PrecisionOption,
    SeedOption,
    WorkersOption,
    app,
    check_batch,
    check_epochs,
    check_training,
    check_width,
    classes_option,
    commands,
    data_options,
    option_int,
    option_seed,
    option_text,
    out,
    percent,
    print_json,
    run_options,
    safe,
)
from modellego.errors import ModellegoError
from modellego.io.atomic import output_folder


@app.command()
def train(
    model: str = typer.Option(..., "--model", help="Zoo name (lenet5, vgg11, vgg16, resnet18, resnet50, googlenet), torchvision:<builder>, or gcn (graph data)."),
    data: str = typer.Option(..., "--data", help="Dataset to train on."),
    out_path: Path = typer.Option(..., "--out", help="Model file to write (.safetensors)."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Passes over the training data (default 3; 200 full-graph steps for a GCN)."),
    classes: Optional[str] = typer.Option(None, "--classes", help="Train on these classes only: names or indices, comma-separated."),
    width: float = typer.Option(1.0, "--width", help="Channel-width multiplier."),
    lr: Optional[float] = LrOption,
    batch_size: Optional[int] = BatchSizeOption,
    max_per_class: Optional[int] = typer.Option(None, "--max-per-class", help="Use at most this many training samples per class."),
    data_root: Optional[Path] = DataRootOption,
    image_size: Optional[int] = ImageSizeOption,
    no_verify: bool = NoVerifyOption,
    seed: int = SeedOption,
    auto_batch: bool = AutoBatchOption,
    device: str = DeviceOption,
    precision: str = PrecisionOption,
    workers: Optional[int] = WorkersOption,
) -> None:
    """Train a model from the zoo on a dataset (or some of its classes) and save it."""
    check_training(epochs, lr, batch_size, seed)
    check_width(width)
    option_text("--classes", classes)
    if max_per_class is not None:
        option_int("--max-per-class", max_per_class, 1, 10**7)
    result = commands.train(model, data, out_path, epochs, classes, width, lr, batch_size, max_per_class,
                            data_options(data_root, image_size, no_verify), seed, auto_batch=auto_batch, **run_options(device, precision, workers))
    trained = result.brick.manifest.provenance["trained"]
    out.print(f"trained {model} on {data} ({result.samples} {result.unit}s, {trained['epochs']} epochs): "
              f"test accuracy {percent(result.metrics['accuracy'])}, {result.metrics['params']:,} params -> {out_path}")


@app.command("eval")
def eval_command(
    file: Path = typer.Argument(..., help="A modellego model file."),
    data: Optional[str] = DataOption,
    data_root: Optional[Path] = DataRootOption,
    classes: Optional[str] = typer.Option(None, "--classes", help="Evaluate on these of the model's classes only."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table."),
    against: Optional[Path] = typer.Option(None, "--against", help="The source model: report Base / Restricted base / this model."),
    batch_size: Optional[int] = InferenceBatchOption,
    image_size: Optional[int] = ImageSizeOption,
    no_verify: bool = NoVerifyOption,
    device: str = DeviceOption,
    precision: str = PrecisionOption,
    workers: Optional[int] = WorkersOption,
) -> None:
    """Accuracy overall and per class on the test split, with params and FLOPs."""
    check_batch(batch_size)
    option_text("--classes", classes)
    options = data_options(data_root, image_size, no_verify)
    if against is not None:
        if data is not None or classes is not None:
            raise ModellegoError("--against evaluates on the component's own task; drop --data/--classes")
        result = commands.compare(file, against, options, batch_size, progress=not as_json, **run_options(device, precision, workers))
        if as_json:
            print_json(result)
        else:
            _print_comparison(file, against, result)
        return
    result = commands.evaluate_file(file, data, classes, options, batch_size, progress=not as_json, **run_options(device, precision, workers))
    if as_json:
        print_json(result)
        return
    unit = result["unit"]
    table = Table(title=safe(f"{file.name} on {result['data']} (test split, {result['samples']} {unit}s)"))
    table.add_column("class")
    table.add_column("accuracy", justify="right")
    for name, value in result["per_class"].items():
        table.add_row(safe(name), percent(value))
    table.add_row("[bold]all[/bold]", f"[bold]{percent(result['accuracy'])}[/bold]")
    out.print(table)
    out.print(f"params {result['params']:,}   FLOPs {result['flops']:,} per {unit}")
    if result.get("base") is not None:
        out.print(f"assembly: accuracy {percent(result['accuracy'])}; mean Base of the source models on the same "
                  f"classes {percent(result['base'])}")
    elif result.get("base_missing"):
        out.print(safe(f"assembly: accuracy {percent(result['accuracy'])}; mean Base of the source models: not "
                       f"known ({result['base_missing']})"))


def _print_comparison(file: Path, source: Path, result: dict) -> None:
    table = Table(title=safe(f"task {', '.join(result['classes'])}: test split, {result['samples']} "
                             f"{result['unit']}s"))
    for column in ("model", "accuracy", "params", "FLOPs"):
        table.add_column(column, justify="left" if column == "model" else "right")
    table.add_row(safe(f"Base ({source.name}, all classes)"), percent(result["base"]),
                  f"{result['source_params']:,}", f"{result['source_flops']:,}")
    table.add_row(safe(f"Restricted base ({source.name}, task classes)"), percent(result["restricted_base"]),
                  f"{result['source_params']:,}", f"{result['source_flops']:,}")
    table.add_row(safe(f"Disa ({file.name})"), percent(result["accuracy"]), f"{result['params']:,}",
                  f"{result['flops']:,}")
    out.print(table)


@app.command()
def finetune(
    file: Path = typer.Argument(..., help="A model file, usually an assembly."),
    out_path: Path = typer.Option(..., "--out", help="Fine-tuned model file to write."),
    epochs: int = typer.Option(2, "--epochs"),
    lr: Optional[float] = LrOption,
    batch_size: Optional[int] = BatchSizeOption,
    data_root: Optional[Path] = DataRootOption,
    image_size: Optional[int] = ImageSizeOption,
    no_verify: bool = NoVerifyOption,
    seed: int = SeedOption,
    auto_batch: bool = AutoBatchOption,
    device: str = DeviceOption,
    precision: str = PrecisionOption,
    workers: Optional[int] = WorkersOption,
) -> None:
    """Train a model (an assembly: its zero blocks too) on the training data of all its classes."""
    check_training(epochs, lr, batch_size, seed)
    commands.finetune(file, out_path, epochs, lr, batch_size, data_options(data_root, image_size, no_verify), seed,
                      auto_batch=auto_batch, **run_options(device, precision, workers))
    out.print(safe(f"fine-tuned {file.name} for {epochs} epochs -> {out_path}"))


@app.command()
def info(
    file: Path = typer.Argument(..., help="A modellego model file."),
    as_json: bool = typer.Option(False, "--json", help="Print the manifest as JSON."),
) -> None:
    """Show a model file's manifest (architecture, classes, input, provenance, metrics), or what a profile file
    holds (the classes, layers, dtype)."""
    manifest = commands.info(file)
    if isinstance(manifest, commands.ProfileInfo):
        _print_profile_info(file, manifest, as_json)
        return
    if as_json:
        print_json(json.loads(manifest.to_json()))
        return
    table = Table(title=safe(file), show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    for field, value in _info_rows(manifest):
        table.add_row(safe(field, 200), safe(value))
    out.print(table)


def _print_profile_info(file: Path, profile: commands.ProfileInfo, as_json: bool) -> None:
    if as_json:
        print_json({"format_version": profile.format_version, "model_hash": profile.model_hash,
                    "num_outputs": profile.num_outputs, "layers": profile.layers, "dtype": profile.dtype,
                    "dataset": profile.dataset, "samples_per_class": profile.samples_per_class,
                    "classes": [{"position": k, "name": name, "samples": count} for k, name, count in profile.classes],
                    "digest": profile.digest, "bytes": profile.bytes})
        return
    table = Table(title=safe(f"{file} (profile, format {profile.format_version})"), show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    shown = ", ".join(f"{name} (#{k}, {count})" for k, name, count in profile.classes[:MAX_ROWS * 10])
    more = f", … ({len(profile.classes):,} in all)" if len(profile.classes) > MAX_ROWS * 10 else ""
    for field, value in (("classes held", f"{len(profile.classes):,} of the model's {profile.num_outputs:,}"),
                         ("classes (output, samples)", shown + more), ("layers", f"{len(profile.layers)}"),
                         ("sums", profile.dtype), ("dataset", profile.dataset or "-"),
                         ("samples per class asked", str(profile.samples_per_class)),
                         ("model hash", profile.model_hash), ("digest", profile.digest),
                         ("size", f"{profile.bytes:,} bytes")):
        table.add_row(safe(field, 200), safe(value))
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
    stored = commands.stored_training_data(manifest)
    rows.insert(4, ("training data held", "; ".join(stored) if stored else "none"))
    rows.append(("format", str(manifest.format_version)))
    return rows


@app.command("import")
def import_command(
    builder: str = typer.Argument(..., help="A zoo name, torchvision:<builder> or timm:<name>."),
    weights: Path = typer.Option(..., "--weights", help="The network's state dict: a .pth (read with "
                                 "torch.load(weights_only=True), no code runs) or a .safetensors file."),
    out_path: Path = typer.Option(..., "--out", help="Model file to write (.safetensors)."),
    classes: Optional[str] = typer.Option(None, "--classes", help="The class names, comma-separated, in the "
                                          "weights' output order."),
    classes_file: Optional[Path] = typer.Option(None, "--classes-file", help="The class names, one per line, in "
                                                "the weights' output order."),
    image_size: int = typer.Option(224, "--image-size", help="Input images are N×N."),
    mean: str = typer.Option("0.485,0.456,0.406", "--mean", help="The normalisation's mean per channel (the "
                             "weights' documentation gives it; ImageNet's by default)."),
    std: str = typer.Option("0.229,0.224,0.225", "--std", help="The normalisation's deviation per channel."),
    dataset: str = typer.Option("imagefolder", "--dataset", help="Where the classes' images are: an ImageFolder "
                                "whose folders are named like the classes, by default."),
    width: float = typer.Option(1.0, "--width", help="The builder's width multiplier the weights were trained at."),
) -> None:
    """Bring a pretrained classifier in: a model file from a builder and its weights, no download."""
    check_width(width)
    from modellego.data.datasets import check_image_size

    check_image_size(image_size)
    names = classes_option(classes, classes_file)
    if names is None:
        raise ModellegoError("give the class names: --classes-file NAMES (one per line) or --classes a,b,...")
    brick = commands.import_model(builder, weights, names, out_path, image_size, numbers("--mean", mean),
                                  numbers("--std", std), dataset, width)
    out.print(safe(f"imported {builder} with {weights.name}: {len(names):,} classes, {brick.manifest.metrics['params']:,} "
                   f"params, {image_size}×{image_size} inputs -> {out_path}"))


def numbers(flag: str, text: str) -> list[float]:
    """A comma-separated list of finite numbers."""
    try:
        values = [float(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise ModellegoError(f"{flag} takes numbers separated by commas, got {text!r}") from None
    if not values or not all(math.isfinite(value) for value in values):
        raise ModellegoError(f"{flag} takes finite numbers separated by commas, got {text!r}")
    return values


@app.command()
def demo(
    out_dir: Path = typer.Option(Path("runs/demo"), "--out-dir", help="Folder for the demo's files (created)."),
    epochs: int = typer.Option(4, "--epochs"),
    seed: int = SeedOption,
    device: str = DeviceOption,
    precision: str = PrecisionOption,
    workers: Optional[int] = WorkersOption,
) -> None:
    """The whole job on Fashion-MNIST (digits when absent): train, profile, disassemble two tasks, assemble, fine-tune."""
    check_epochs(epochs)
    option_seed(seed)
    output_folder(out_dir)
    commands.run_demo(out_dir, epochs=epochs, seed=seed, console=out, **run_options(device, precision, workers))


@app.command("export")
def export_command(
    model: Path = typer.Argument(..., help="A modellego model file (or a folder an earlier export wrote)."),
    format: str = typer.Option(..., "--format", help="onnx (opset 18, dynamic batch; needs modellego[export]), pt2 "
                               "(torch.export), or folder (model.safetensors, config.json, README.md)."),
    out_path: Path = typer.Option(..., "--out", help="The file (onnx, pt2) or folder (folder) to write."),
    samples: int = typer.Option(64, "--samples", help="Test images both models run on before an onnx or pt2 "
                                "file is written (a graph model runs on its whole graph)."),
    data_root: Optional[Path] = DataRootOption,
    no_verify: bool = NoVerifyOption,
) -> None:
    """Export a model as ONNX, a torch.export program or a model-hub folder, checked against PyTorch first."""
    result = commands.export(model, out_path, format, samples, data_options(data_root, None, no_verify))
    size = f"{result.bytes / 1e6:.2f} MB" if result.bytes >= 1e5 else f"{result.bytes / 1e3:.1f} kB"
    if result.agreement is None:
        out.print(safe(f"exported {model} as a folder ({size}: model.safetensors, config.json, README.md) -> "
                       f"{result.path}"))
        return
    check = result.agreement
    form = f"ONNX opset {result.opset}" if result.opset else "pt2"
    out.print(safe(f"exported {model} as {form} ({size}) -> {result.path}; checked on {check.samples} test "
                   f"{result.unit}s: max relative logit error {check.max_relative_error:.2g}, argmax equal on "
                   f"{check.argmax_agree}/{check.samples}" + (f" ({check.ties} ties within the error)"
                                                               if check.ties else "")))
