"""Shared steps of the paper-application benchmarks (sweeps, compression, distillation, figures): the source
models, cached profiles, the one function that makes a component, evaluation on test slices, and writing a
Markdown block into docs/results.md between a benchmark's own markers.

Sizes are chosen for a shared 2-core CPU: profiles select their 50 images per class from a fixed slice of
the training split, accuracies are measured on fixed per-class slices of the test split, and every caption
says which."""

from __future__ import annotations

import functools
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch

import modellego
from modellego import commands
from modellego import data as datasets
from modellego.core.evaluate import count_flops, count_params, evaluate
from modellego.core.locate import PAPER, Thresholds, locate
from modellego.core.profile import Profile
from modellego.core.profile import profile as profile_model
from modellego.data.subsets import SampleSubset, per_class_slice, resolve_classes
from modellego.data.task import task_data
from modellego.io.manifest import Brick, ClassRef
from modellego.io.modelfile import load, save

ROOT = Path(__file__).resolve().parents[1]

SHARED_MODELS = Path(os.environ.get("MODELLEGO_SHARED_MODELS", Path(__file__).resolve().parents[1] / "runs" / "models"))
OUT_DIR = ROOT / "runs" / "paper"
DOCS = ROOT / "docs"
FIGURES = DOCS / "figures"
RESULTS = DOCS / "results.md"
SEED = 0
SAMPLES_PER_CLASS = 50
PROFILE_SLICE = 1000  # training images per class the profile's 50 most confident are chosen from
SOURCES = {  # name -> (file name, how it was trained: the command that makes it)
    "lenet5": ("lenet5.safetensors", "modellego train --model lenet5 --data fashion-mnist --epochs 8 --width 1.0 "
                                     "--lr 0.002 --seed 0"),
    "vgg16-w0.25": ("vgg16-w0.25.safetensors", "modellego train --model vgg16 --data fashion-mnist --epochs 5 "
                                               "--width 0.25 --lr 0.002 --seed 0"),
    "resnet18-w0.25": ("resnet18-w0.25.safetensors", "modellego train --model resnet18 --data fashion-mnist "
                                                     "--epochs 5 --width 0.25 --lr 0.002 --seed 0"),
}
DIGITS = {  # digits models are tiny and cheap: trained here (name -> builder, width, epochs, lr)
    "lenet5-digits": ("lenet5", 1.0, 8, 0.005),
    "vgg16-w0.25-digits": ("vgg16", 0.25, 8, 0.003),
    "resnet18-w0.25-digits": ("resnet18", 0.25, 8, 0.003),
}
START = time.monotonic()
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))


def log(message: str) -> None:
    print(f"[{time.monotonic() - START:7.1f}s] {message}", flush=True)


def source_model(name: str, out_dir: Path = OUT_DIR) -> Path:
    """The shared trained source model `name`, copied into `out_dir` (never trained here; a digits model is)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if name in DIGITS:
        target = out_dir / f"{name}.safetensors"
        if not target.exists():
            builder, width, epochs, lr = DIGITS[name]
            log(f"training {name} ({builder} ×{width}, digits, {epochs} epochs)")
            commands.train(builder, "digits", target, epochs=epochs, width=width, lr=lr, seed=SEED, progress=False)
        return target
    file_name, command = SOURCES[name]
    target = out_dir / file_name
    if not target.exists():
        shared = SHARED_MODELS / file_name
        if not shared.exists():
            sys.exit(f"{shared} is missing: train it first with `{command} --out {shared}`")
        shutil.copy(shared, target)
    return target


@functools.lru_cache(maxsize=4)
def profile_slice(classes: tuple[ClassRef, ...]):
    """The PROFILE_SLICE training images per class that profiles are computed on (and index), loaded once per
    run: the sweeps make dozens of reconstructed components from the same source."""
    return per_class_slice(task_data(classes, "train"), PROFILE_SLICE, SEED)


def source_profile(name: str, out_dir: Path = OUT_DIR) -> Path:
    """The model's profile (50 most confident correct images per class, chosen from PROFILE_SLICE training
    images per class), computed once and cached next to the model."""
    model_path = source_model(name, out_dir)
    target = out_dir / f"{name}.profile.safetensors"
    if not target.exists():
        log(f"profiling {name}")
        model, manifest = load(model_path)
        train = profile_slice(tuple(manifest.classes))
        result = profile_model(model, train, samples_per_class=SAMPLES_PER_CLASS)
        result.dataset = train.name
        modellego.save_profile(result, target)
    return target


def profile_images(manifest, profile: Profile, task: list[int]):
    """The profile's images of the task's classes: what reconstruction re-fits on by default (the profile
    indexes the PROFILE_SLICE training slice it was computed on, see `source_profile`)."""
    train = profile_slice(tuple(manifest.classes))
    chosen = torch.isin(profile.sample_labels, torch.tensor(task))
    return SampleSubset(train, profile.samples[chosen].sort().values)


VARIANTS = ("pure", "reconstructed")


def make_component(source: Brick, profile: Profile, classes, thresholds: Thresholds = PAPER,
                   variant: str = "pure", graph=None) -> Brick:
    """THE component-making step of every paper benchmark: locate with `thresholds`, then disassemble.
    `variant` "pure" is the paper's method (`--no-reconstruct`); "reconstructed" is modellego's default, the
    component re-fitted without gradients on the profile's images of its task (issue 10)."""
    if variant not in VARIANTS:
        raise SystemExit(f"unknown component variant {variant!r}; choose from {', '.join(VARIANTS)}")
    masks = locate(source.model, profile, thresholds, graph=graph)
    task = resolve_classes(profile.classes, classes, "the model's classes")
    images = profile_images(source.manifest, profile, task) if variant == "reconstructed" else None
    return commands.component(source, masks, task, images, graph=graph)


def test_slice(manifest, per_class: int):
    """The task's test split, `per_class` images per class (fixed seed)."""
    return per_class_slice(task_data(manifest, "test"), per_class, SEED)


def train_slice(manifest, per_class: int):
    return per_class_slice(task_data(manifest, "train"), per_class, SEED)


def measure(model, manifest, test_data) -> dict:
    """Accuracy on `test_data`, params, FLOPs (one image)."""
    return {"accuracy": evaluate(model, test_data).accuracy, "params": count_params(model),
            "flops": count_flops(model, manifest.input)}


def pct(value: float) -> str:
    return f"{100 * value:.2f}%"


def human(count: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if count >= size:
            return f"{count / size:.2f} {unit}"
    return f"{count:.0f}"


def publish(name: str, heading: str, caption: str, parts: list[str], no_doc: bool) -> None:
    """A benchmark's section (heading, caption, tables and figures) printed, and written between its markers in
    docs/results.md unless `no_doc`."""
    text = "\n".join([f"### {heading}", "", caption, "", *parts])
    if not no_doc:
        write_block(name, text)
    print(text)


def write_block(name: str, text: str, path: Path = RESULTS) -> None:
    """Put `text` between `<!-- NAME:begin -->` and `<!-- NAME:end -->` in docs/results.md (appended at the end
    of the page when the markers are not there yet); the rest of the page is kept."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    page = path.read_text() if path.exists() else "# Results\n"
    block = f"{begin}\n{text.rstrip()}\n{end}"
    if begin in page and end in page:
        page = page[:page.index(begin)] + block + page[page.index(end) + len(end):]
    else:
        page = page.rstrip() + "\n\n" + block + "\n"
    path.write_text(page)


def save_json(name: str, payload: dict, out_dir: Path = OUT_DIR) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps(payload, indent=2))


def figure_path(name: str) -> Path:
    FIGURES.mkdir(parents=True, exist_ok=True)
    return FIGURES / name


def command_line() -> str:
    """The command that ran this benchmark, as typed (for captions)."""
    return " ".join(["python", os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]]).replace(" --no-doc", "")


def elapsed() -> float:
    return time.monotonic() - START


__all__ = ["Brick", "DOCS", "OUT_DIR", "PAPER", "Profile", "Thresholds", "count_flops", "count_params", "datasets",
           "evaluate", "figure_path", "human", "load", "log", "make_component", "measure", "pct", "commands",
           "save", "save_json", "source_model", "source_profile", "test_slice", "train_slice", "write_block"]
