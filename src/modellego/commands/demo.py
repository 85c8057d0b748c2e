"""`modellego demo`: the whole job on an embedded default, on a 2-core CPU in about a minute. Each step is one
command function, the same one its command calls."""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from modellego.commands.assemble import assemble
from modellego.commands.common import Device, assembly_base, runs_models
from modellego.commands.disassemble import disassemble
from modellego.commands.evaluate import evaluate_file
from modellego.commands.profile import profile
from modellego.commands.train import finetune, train
from modellego.core.evaluate import count_flops, count_params
from modellego.data import datasets
from modellego.errors import ModellegoError

DEMO_TASKS = {"fashion-mnist": ["Trouser,Bag", "Sandal,Sneaker,Ankle boot"], "digits": ["0,1", "3,5,8"]}


def demo_dataset(console: Console | None = None) -> str:
    """The demo's dataset: Fashion-MNIST when it is installed, else scikit-learn's digits (always there)."""
    try:
        datasets.load("fashion-mnist", "test")
        return "fashion-mnist"
    except ModellegoError as error:
        if console is not None:
            console.print(f"[yellow]{error}[/yellow]\nFashion-MNIST is absent: the demo uses scikit-learn's digits "
                          "instead.")
        return "digits"


def _file_name(task: str) -> str:
    return f"component-{task.replace(',', '-').replace(' ', '').replace('/', '')}.safetensors"


@runs_models
def run_demo(out_dir: Path, epochs: int = 4, seed: int = 0, console: Console | None = None, device: Device = "auto",
             precision: str | None = None, workers: int | None = None) -> dict:
    """Train LeNet-5 on Fashion-MNIST (digits when absent), profile it, disassemble two tasks, assemble the two
    components and fine-tune the assembly for one epoch, printing each stage's table; returns the metrics. Every
    stage runs on `device`, with `precision` and `workers` (see `runtime`)."""
    run = {"device": device, "precision": precision, "workers": workers}
    console = console or Console()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = demo_dataset(console)
    if name == "digits":
        epochs = max(epochs, 30)  # 1,437 training images: more passes, still a few seconds
    console.print(f"[bold]1. train[/bold] LeNet-5 on {name}, {epochs} epochs, on {device}")
    started = time.perf_counter()
    path = out_dir / f"lenet5-{name}.safetensors"
    trained = train("lenet5", name, path, epochs, seed=seed, **run)
    seconds = time.perf_counter() - started
    metrics = evaluate_file(path, **run)  # the file as written, reloaded
    console.print(f"saved {path} ({trained.samples} training images); reloaded it for the evaluation below")
    table = Table(title=f"LeNet-5 on {name}, test split ({metrics['samples']} images)")
    table.add_column("class")
    table.add_column("accuracy", justify="right")
    for class_name, value in metrics["per_class"].items():
        table.add_row(class_name, f"{100 * value:.2f}%")
    table.add_row("[bold]all[/bold]", f"[bold]{100 * metrics['accuracy']:.2f}%[/bold]")
    console.print(table)
    console.print(f"params {metrics['params']:,}   FLOPs {metrics['flops']:,} per image   training and evaluation "
                  f"{seconds:.0f} s")

    console.print("[bold]2. profile[/bold] the 50 most confident correct training images per class")
    profile_path = out_dir / "lenet5.profile.safetensors"
    profile(path, profile_path, samples_per_class=50, **run)
    table = Table(title="3. disassemble (paper α/β, no training): components on their tasks' test images")
    for column in ("task", "Base", "Restricted base", "Disa", "params", "FLOPs"):
        table.add_column(column, justify="left" if column == "task" else "right", overflow="fold")
    results, components = {}, []
    for task in DEMO_TASKS[name]:
        component_path = out_dir / _file_name(task)
        result = disassemble(path, profile_path, task, component_path, evaluate=True, **run).metrics
        components.append(component_path)
        results[task] = result
        table.add_row(task, f"{100 * result['base']:.2f}%", f"{100 * result['restricted_base']:.2f}%",
                      f"{100 * result['test_accuracy']:.2f}%",
                      f"{result['params'] / 1e3:.1f}k ({result['params'] / metrics['params']:.0%})",
                      f"{result['flops'] / 1e6:.2f}M ({result['flops'] / metrics['flops']:.0%})")
    console.print(table)
    console.print("Base: the source model over all classes; Restricted base: its logits restricted to the task; "
                  f"Disa: the component. Files are in {out_dir}/.")
    metrics["components"] = results

    console.print("[bold]4. assemble[/bold] the two components into one model (the defaults: side by side, the "
                  "calibration that answers the components' own held-out training images best)")
    assembly_path = out_dir / "assembly.safetensors"
    assembled = assemble(components, assembly_path, **run)
    assembly, assembly_manifest = assembled.brick
    console.print(f"calibration {assembled.calibration.value} ({assembled.mode.value} mode)")
    score1 = evaluate_file(assembly_path, **run)
    console.print("[bold]5. fine-tune[/bold] the assembly for one epoch on its classes' training images")
    tuned_path = out_dir / "assembly-finetuned.safetensors"
    tuned, _ = finetune(assembly_path, tuned_path, epochs=1, seed=seed, **run)
    score2 = evaluate_file(tuned_path, **run)
    base = assembly_base(assembly_manifest)
    summary = Table(title=f"assembly of {len(components)} components: {', '.join(assembly_manifest.class_names)} "
                          f"({score1['samples']} test images)")
    for column in ("model", "accuracy", "params", "FLOPs"):
        summary.add_column(column, justify="left" if column == "model" else "right")
    summary.add_row("Base (LeNet-5, all 10 classes, on these images)", f"{100 * base:.2f}%",
                    f"{metrics['params']:,}", f"{metrics['flops']:,}")
    summary.add_row("Score1 (assembled, no training)", f"{100 * score1['accuracy']:.2f}%",
                    f"{count_params(assembly):,}", f"{count_flops(assembly, assembly_manifest.input):,}")
    summary.add_row("Score2 (after 1 fine-tuning epoch)", f"{100 * score2['accuracy']:.2f}%",
                    f"{count_params(tuned):,}", f"{count_flops(tuned, assembly_manifest.input):,}")
    console.print(summary)
    metrics.update(score1=score1["accuracy"], score2=score2["accuracy"], assembly_base=base)
    return metrics
