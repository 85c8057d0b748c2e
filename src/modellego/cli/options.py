"""What every command of the command line shares: the application, the consoles, the option declarations, the
checks of option values at the edge (numbers and text the library does not check itself), and printing text
from files safely."""

from __future__ import annotations

import importlib
import json
import math
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import typer
from rich.console import Console
from rich.text import Text

from modellego.core.thresholds import GRID_STEP, PAPER, RIDGE
from modellego.errors import ModellegoError
from modellego.io.fields import SEED_MAX, Invalid, number, show

if TYPE_CHECKING:
    from modellego.data.task import DataOptions


class LazyModule:
    """A module imported when first used: the commands import torch, which `--help` and option errors do not
    need (they answer before it is imported)."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attribute: str) -> Any:
        return getattr(importlib.import_module(self._name), attribute)


commands = LazyModule("modellego.commands")

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Make new classifiers without training: disassemble trained models, assemble components.")
out = Console()
err = Console(stderr=True)

DataOption = typer.Option(None, "--data", help="Dataset name: fashion-mnist, digits, mnist, cifar10, cifar100, imagefolder, tiny-imagenet; graphs: sbm, karate, cora, citeseer, pubmed.")
DataRootOption = typer.Option(None, "--data-root", help="Folder holding the dataset's files (default: where the dataset usually lives).")
SeedOption = typer.Option(0, "--seed", help="Seed for every random choice; the same seed gives the same files.")
LrOption = typer.Option(None, "--lr", help="Peak learning rate (Adam, one-cycle schedule; default 1e-3). A GCN: Adam's rate, default 0.01.")
BatchSizeOption = typer.Option(None, "--batch-size", help="Images per training step (default 128; graphs train full-batch).")
InferenceBatchOption = typer.Option(None, "--batch-size", help="Images per forward pass (lowered to fit in memory; graphs run full-batch).")
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
RidgeOption = typer.Option(RIDGE, "--ridge", help="Reconstruction's ridge, relative to the mean squared input.")
DeviceOption = typer.Option("auto", "--device", help="Where the model runs: auto (the first CUDA GPU when there is "
                            "one, else the CPU), cpu, cuda, cuda:N or mps.")
PrecisionOption = typer.Option("fp32", "--precision", help="fp32, bf16 or fp16 for the passes that only rank or score "
                               "(sample selection, evaluation, gates, --auto's candidates); contributions, re-fits "
                               "and the weights written stay float32.")
WorkersOption = typer.Option(None, "--workers", help="DataLoader worker processes (default: a share of the cores for "
                             "image folders, 0 for data held in memory).")
GridStepOption = typer.Option(GRID_STEP, "--grid-step", help="With --auto: spacing of the α/β grid (α 0…0.6, β 0…0.5; "
                              "Transformers: α and β 0…0.9); a finer step finds components between the points.")

def option_int(flag: str, value: int, low: int, high: int) -> int:
    """A command-line integer within [low, high], else a one-line error naming the flag."""
    if not low <= value <= high:
        raise ModellegoError(f"{flag} must be at least {low:,} and at most {high:,}, got {show(value)}")
    return value


def option_float(flag: str, value: float, low: float, high: float, low_open: bool = False) -> float:
    """A command-line number that is finite and within [low, high] (or (low, high])."""
    try:
        return number(value, flag, low, high, low_open)
    except Invalid as error:
        raise ModellegoError(str(error)) from None


def option_seed(value: int, flag: str = "--seed") -> int:
    """A seed in 0..2⁶⁴−1 (what torch.manual_seed accepts)."""
    return option_int(flag, value, 0, SEED_MAX)


def option_text(flag: str, value: str | None) -> str | None:
    """A list option such as --classes: absent is fine, empty or blank is a mistake."""
    if value is not None and not value.replace(",", "").strip():
        raise ModellegoError(f"{flag} is empty: no classes given; name at least one class (names or indices, comma-separated)")
    return value


def classes_option(classes: str | None, classes_file: Path | None) -> list[str] | None:
    """`--classes` or `--classes-file` (one name or index per line; blank lines and `#` comments skipped)."""
    if classes is not None and classes_file is not None:
        raise ModellegoError("give --classes or --classes-file, not both")
    if classes_file is None:
        return None if classes is None else [item.strip() for item in classes.split(",") if item.strip()]
    try:
        text = classes_file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ModellegoError(f"cannot read --classes-file {classes_file} ({error})") from None
    names = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    if not names:
        raise ModellegoError(f"--classes-file {classes_file} names no class")
    return names


MAX_EPOCHS = 10_000
MAX_BATCH = 65_536
MAX_SAMPLES_PER_CLASS = 100_000


def data_options(root: Optional[Path], image_size: Optional[int], no_verify: bool) -> "DataOptions":
    """Where the data is, checked at the edge."""
    if image_size is not None:
        from modellego.data.datasets import check_image_size

        check_image_size(image_size)
    from modellego.data.task import DataOptions

    return DataOptions(root, image_size, not no_verify)


def percent(value: float) -> str:
    return f"{100 * value:.2f}%"


def strict(value: Any) -> Any:
    """`value` with every non-finite float replaced by None, so that the JSON printed is strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: strict(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict(item) for item in value]
    return value


def print_json(payload: dict) -> None:
    sys.stdout.write(json.dumps(strict(payload), indent=2, sort_keys=True, allow_nan=False) + "\n")


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
MAX_CELL = 2_000
MAX_ROWS = 100


def safe(value: object, limit: int = MAX_CELL) -> Text:
    """Text from a file, fit for the terminal: control characters shown as escapes (no ANSI sequences reach
    the terminal), no markup or emoji interpreted (a Text is printed as is), cut to `limit` characters."""
    text = str(value)
    if len(text) > limit:
        text = f"{text[:limit]}… ({len(text) - limit:,} more characters)"
    return Text(_CONTROL.sub(lambda match: f"\\x{ord(match.group()):02x}", text))


def check_epochs(epochs: int) -> None:
    if not 1 <= epochs <= MAX_EPOCHS:
        raise ModellegoError(f"--epochs must be at least 1 and at most {MAX_EPOCHS:,}, got {epochs}")


def check_width(width: float) -> None:
    if not (math.isfinite(width) and 0 < width <= 16):
        raise ModellegoError(f"--width must be a positive number up to 16 (a channel multiplier), got {width}")


def check_training(epochs: int | None, lr: float | None, batch_size: int | None, seed: int) -> None:
    """Training options given on the command line (None: not given, the model kind's default)."""
    if epochs is not None:
        check_epochs(epochs)
    if lr is not None:
        option_float("--lr", lr, 0.0, 10.0, low_open=True)
    check_batch(batch_size)
    option_seed(seed)


def check_batch(batch_size: int | None) -> None:
    if batch_size is not None:
        option_int("--batch-size", batch_size, 1, MAX_BATCH)


def run_options(device: str, precision: str, workers: int | None) -> dict:
    """--device, --precision and --workers as the commands' keyword arguments (each command checks them)."""
    return {"device": device, "precision": precision, "workers": workers}
