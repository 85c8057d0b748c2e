"""Accuracy tables, parameter counts and FLOPs."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import Dataset
from torch.utils.flop_counter import FlopCounterMode

from modellego import runtime
from modellego.errors import ModellegoError
from modellego.memory import fit_inference, sample_shape_of
from modellego.progress import track


@dataclass
class Accuracy:
    """Overall accuracy (a fraction) and per-class accuracy keyed by class name."""

    accuracy: float
    per_class: dict[str, float]
    samples: int


@torch.no_grad()
def predict(model: nn.Module, dataset: Dataset, batch_size: int = 256, progress: bool = False,
            precision: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """All logits of `model` on `dataset` (float32, on the CPU) and the labels, in dataset order, on the model's
    device at `precision` (default: the current `runtime.settings`'; pass "fp32" where the logits become
    weights). A `batch_size` whose estimated peak memory does not fit is lowered to one that does, with a
    warning."""
    model.eval()
    device = runtime.device_of(model)
    shape = sample_shape_of(dataset)
    if shape is not None:
        batch_size = fit_inference(model, shape, batch_size, "evaluating", samples=len(dataset))
    loader = runtime.loader(dataset, device, batch_size=batch_size, shuffle=False)
    logits, labels = [], []
    for images, targets in track(loader, "evaluating", len(loader), progress):
        with runtime.ranking(device, precision):
            logits.append(model(images.to(device)).float().cpu())
        labels.append(targets)
    return torch.cat(logits), torch.cat(labels)


def accuracy_of(predictions: torch.Tensor, labels: torch.Tensor, class_names: list[str]) -> Accuracy:
    """Accuracy overall and per class from predicted and true labels (indices into `class_names`)."""
    correct = predictions == labels
    per_class = {}
    for index, name in enumerate(class_names):
        members = labels == index
        if members.any():
            per_class[name] = correct[members].float().mean().item()
    overall = correct.float().mean().item() if len(labels) else float("nan")
    return Accuracy(overall, per_class, len(labels))


def check_finite(logits: torch.Tensor, what: str = "the model") -> None:
    """Refuse to score outputs that are not all finite: an argmax over NaN is an arbitrary class, not an accuracy."""
    bad = int((~torch.isfinite(logits)).any(1).sum()) if logits.numel() else 0
    if bad:
        raise ModellegoError(f"{what} gives non-finite outputs (NaN or infinite) on {bad:,} of {len(logits):,} "
                             "samples, so it is not scored; the file may be damaged or the model diverged in training")


def evaluate(model: nn.Module, dataset: Dataset, batch_size: int = 256, progress: bool = False) -> Accuracy:
    """Accuracy of `model` (argmax over all its outputs) on `dataset`, overall and per class; non-finite outputs
    are refused, not scored."""
    logits, labels = predict(model, dataset, batch_size, progress)
    check_finite(logits)
    return accuracy_of(logits.argmax(1), labels, dataset.classes)


def count_params(model: nn.Module) -> int:
    """Number of parameters (weights and biases; BN running statistics are buffers, not counted)."""
    return sum(parameter.numel() for parameter in model.parameters())


@torch.no_grad()
def _attention_flops(query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    """Scaled dot-product attention: QKᵀ and the weighted values, 2 FLOPs per multiply-add each."""
    *batch, queries, depth = query_shape
    keys, value_depth = key_shape[-2], value_shape[-1]
    return 2 * math.prod(batch) * queries * keys * (depth + value_depth)


# torch's flop counter knows the GPU kernels of scaled_dot_product_attention, not the CPU one (it would count 0)
CPU_ATTENTION = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _attention_flops}


def count_flops(model: nn.Module, spec) -> int:
    """FLOPs of one forward pass on one image of `spec` (an image InputSpec or a shape C, H, W), by
    torch.utils.flop_counter (a multiply-add counts as 2)."""
    device = next(model.parameters()).device
    shape = (spec.channels, *spec.size) if hasattr(spec, "channels") else tuple(spec)
    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION)
    with counter:
        model(torch.zeros(1, *shape, device=device))
    model.train(was_training)
    return int(counter.get_total_flops())


def baselines_of(logits: torch.Tensor, labels: torch.Tensor, positions: torch.Tensor, names: list[str]) -> dict:
    """Base and Restricted base from the source's `logits` on the task's samples (`labels`: positions in the
    task, `positions`: each task class's output in the source), overall and per class."""
    base = accuracy_of(logits.argmax(1), positions[labels], [])
    base_per_class = accuracy_of(torch.where(logits.argmax(1) == positions[labels], labels, -1), labels, names)
    restricted = accuracy_of(logits[:, positions].argmax(1), labels, names)
    return {"base": base.accuracy, "base_per_class": base_per_class.per_class,
            "restricted_base": restricted.accuracy, "restricted_base_per_class": restricted.per_class,
            "test_samples_per_class": {name: int((labels == k).sum()) for k, name in enumerate(names)}}
