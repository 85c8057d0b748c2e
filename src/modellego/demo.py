"""`modellego demo`: the whole job on an embedded default, on a 2-core CPU in about a minute."""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from modellego import data as datasets
from modellego.errors import ModellegoError
from modellego.evaluate import report
from modellego.modelfile import load, save
from modellego.train import train_model


def _demo_dataset(console: Console) -> str:
    try:
        datasets.load("fashion-mnist", "test")
        return "fashion-mnist"
    except ModellegoError as error:
        console.print(f"[yellow]{error}[/yellow]\nFashion-MNIST is absent: the demo uses scikit-learn's digits instead.")
        return "digits"


def run_demo(out_dir: Path, epochs: int = 4, seed: int = 0, console: Console | None = None) -> dict:
    """Train LeNet-5 on Fashion-MNIST (digits when absent), save, reload, evaluate; returns the metrics."""
    console = console or Console()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = _demo_dataset(console)
    train_data, test_data = datasets.load(name, "train"), datasets.load(name, "test")
    console.print(f"[bold]1. train[/bold] LeNet-5 on {name}: {len(train_data)} training images, {epochs} epochs")
    started = time.perf_counter()
    model, manifest = train_model("lenet5", train_data, epochs, seed=seed)
    seconds = time.perf_counter() - started
    path = out_dir / f"lenet5-{name}.safetensors"
    metrics = report(model, manifest.input, test_data, progress=True)
    manifest.metrics = {"test_accuracy": metrics["accuracy"], "params": metrics["params"], "flops": metrics["flops"]}
    save(model, path, manifest)
    reloaded, _ = load(path)
    metrics = report(reloaded, manifest.input, test_data)

    console.print(f"saved {path}; reloaded it for the evaluation below")
    table = Table(title=f"LeNet-5 on {name}, test split ({metrics['samples']} images)")
    table.add_column("class")
    table.add_column("accuracy", justify="right")
    for class_name, value in metrics["per_class"].items():
        table.add_row(class_name, f"{100 * value:.2f}%")
    table.add_row("[bold]all[/bold]", f"[bold]{100 * metrics['accuracy']:.2f}%[/bold]")
    console.print(table)
    console.print(f"params {metrics['params']:,}   FLOPs {metrics['flops']:,} per image   training {seconds:.0f} s")
    return metrics
