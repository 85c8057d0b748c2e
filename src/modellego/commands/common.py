"""What the commands share: writing a model file once under torchrun, a model file with its kind, the union of
components' classes, baselines against a source, an assembly's mean Base."""

from __future__ import annotations

import functools
import inspect
import os
from typing import Any, Callable, Sequence, TypeVar

import torch
from torch import nn

from modellego import distributed, runtime
from modellego.core.evaluate import baselines_of
from modellego.core.thresholds import PAPER, Thresholds
from modellego.errors import ModellegoError
from modellego.io.manifest import Brick, ClassRef, Manifest
from modellego.io.modelfile import load, save
from modellego.kinds import ModelKind, kind_of

FilePath = str | os.PathLike
Device = str | torch.device | None
Command = TypeVar("Command", bound=Callable[..., Any])


def runs_models(command: Command) -> Command:
    """For a command with `device`, `precision` and `workers` parameters: its `device` resolved (`auto`: the first
    CUDA device when there is one, else the CPU; one missing is refused before any work) and its body run under
    `runtime.settings(precision, workers)` (None: the caller's settings, by default fp32 and auto workers)."""
    signature = inspect.signature(command)

    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        options = bound.arguments
        with runtime.settings(options["precision"], options["workers"]):  # checks both first
            options["device"] = runtime.resolve_device(options["device"])
            distributed.check_device(options["device"])
            runtime.ranking(options["device"])  # a precision the device lacks is refused here, before any work
            return command(*bound.args, **bound.kwargs)
    return run  # type: ignore[return-value]


def write(model: nn.Module, out: FilePath, manifest: Manifest) -> None:
    """Save a model file; under torchrun only the first process writes (all hold the same model)."""
    if distributed.is_main():
        save(model, out, manifest)


def open_model(path: FilePath, device: Device = None) -> tuple[Brick, ModelKind]:
    """A model file (its model on `device`, default the CPU) and the kind of model it holds."""
    brick = load(path)
    if device is not None:
        brick.model.to(device)
    return brick, kind_of(brick.manifest.architecture)


def threshold_options(thresholds: Thresholds) -> dict[str, bool]:
    """The α/β options given (those that differ from the paper's), for `ModelKind.check_options`."""
    return {f"--{name.replace('_', '-')}": getattr(thresholds, name) != getattr(PAPER, name)
            for name in ("alpha_conv", "beta_conv", "alpha_fc", "beta_fc")}


def runtime_options(precision: str | None, workers: int | None) -> dict[str, bool]:
    """The runtime options given, for `ModelKind.check_options` (None: not given, the caller's settings)."""
    return {"--precision": precision not in (None, "fp32"), "--workers": workers is not None}


def union(manifests: Sequence[Manifest]) -> tuple[list[ClassRef], list[int]]:
    """The classes of several models in order, a class two of them share (same dataset, same class) once, and
    for each of their outputs (concatenated) the class it answers."""
    classes: list[ClassRef] = []
    targets: list[int] = []
    for manifest in manifests:
        for ref in manifest.classes:
            if ref not in classes:
                classes.append(ref)
            targets.append(classes.index(ref))
    return classes, targets


def source_baselines(kind: ModelKind, source: Brick, classes: Sequence[ClassRef], samples: Any,
                     batch_size: int = 256, progress: bool = False) -> dict:
    """Base (the source, argmax over all its classes) and Restricted base (its logits restricted to `classes`)
    on `samples` of those classes (labelled by position in `classes`), overall and per class."""
    positions = []
    for ref in classes:
        if ref not in source.manifest.classes:
            raise ModellegoError(f"the source model does not predict class {ref.name!r} of {ref.dataset}, "
                                 "so it is not this component's source")
        positions.append(source.manifest.classes.index(ref))
    logits, labels = kind.predict(source.model, samples, batch_size, progress)
    return baselines_of(logits, labels, torch.tensor(positions), [ref.name for ref in classes])


def assembly_base(manifest: Manifest) -> float | None:
    """The mean Base of the source models on an assembly's classes, from what each component recorded when it
    was disassembled (per class, weighted by test samples); None when a component did not record it."""
    total, weight = 0.0, 0
    for record in manifest.provenance.get("assembled", {}).get("components", []):
        metrics = record.get("metrics", {})
        per_class, counts = metrics.get("base_per_class"), metrics.get("test_samples_per_class")
        if not per_class or not counts:
            return None
        for name, value in per_class.items():
            total += value * counts[name]
            weight += counts[name]
    return total / weight if weight else None
