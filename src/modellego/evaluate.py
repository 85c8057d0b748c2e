"""Accuracy tables, parameter counts and FLOPs."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torch.utils.flop_counter import FlopCounterMode

from modellego.data.spec import InputSpec
from modellego.progress import track


@dataclass
class Accuracy:
    """Overall accuracy (a fraction) and per-class accuracy keyed by class name."""

    accuracy: float
    per_class: dict[str, float]
    samples: int


@torch.no_grad()
def predict(model: nn.Module, dataset: Dataset, batch_size: int = 256, progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """All logits of `model` on `dataset` and the labels, in dataset order."""
    model.eval()
    device = next(model.parameters()).device
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    logits, labels = [], []
    for images, targets in track(loader, "evaluating", len(loader), progress):
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


def evaluate(model: nn.Module, dataset: Dataset, batch_size: int = 256, progress: bool = False) -> Accuracy:
    """Accuracy of `model` (argmax over all its outputs) on `dataset`, overall and per class."""
    logits, labels = predict(model, dataset, batch_size, progress)
    return accuracy_of(logits.argmax(1), labels, dataset.classes)


def count_params(model: nn.Module) -> int:
    """Number of parameters (weights and biases; BN running statistics are buffers, not counted)."""
    return sum(parameter.numel() for parameter in model.parameters())


@torch.no_grad()
def count_flops(model: nn.Module, spec: InputSpec) -> int:
    """FLOPs of one forward pass on one image, by torch.utils.flop_counter (a multiply-add counts as 2)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    with counter:
        model(torch.zeros(1, spec.channels, *spec.size, device=device))
    model.train(was_training)
    return int(counter.get_total_flops())


def report(model: nn.Module, spec: InputSpec, dataset: Dataset, batch_size: int = 256, progress: bool = False) -> dict:
    """The evaluation table of a model on a labelled dataset: accuracy, per-class accuracy, params, FLOPs."""
    result = evaluate(model, dataset, batch_size, progress)
    return {"accuracy": result.accuracy, "per_class": result.per_class, "samples": result.samples,
            "params": count_params(model), "flops": count_flops(model, spec)}


def evaluate_file(path, dataset: str | None = None, root=None, classes=None, batch_size: int = 256,
                  progress: bool = False, max_per_class: int | None = None, image_size: int | None = None,
                  verify: bool = True) -> dict:
    """Evaluate a model file on the test split of its own task (or `dataset`, matched by class names)."""
    from modellego.data.subsets import per_class_slice
    from modellego.data.task import task_data
    from modellego.modelfile import load

    model, manifest = load(path)
    test_data = task_data(manifest, "test", root=root, dataset=dataset, only=classes, image_size=image_size,
                          verify=verify)
    if max_per_class:
        test_data = per_class_slice(test_data, max_per_class)
    result = report(model, manifest.input, test_data, batch_size, progress)
    result["data"] = test_data.name
    if manifest.kind == "assembly":
        result["base"] = assembly_base(manifest)
    return result


def source_baselines(source: nn.Module, source_manifest, classes: list, test_data: Dataset,
                     batch_size: int = 256, progress: bool = False) -> dict:
    """Base (the source, argmax over all its classes) and Restricted base (its logits restricted to `classes`)
    on `test_data` (labelled by position in `classes`), overall and per class."""
    from modellego.errors import ModellegoError

    positions = []
    for ref in classes:
        if ref not in source_manifest.classes:
            raise ModellegoError(f"the source model does not predict class {ref.name!r} of {ref.dataset}, "
                                 "so it is not this component's source")
        positions.append(source_manifest.classes.index(ref))
    logits, labels = predict(source, test_data, batch_size, progress)
    positions_tensor = torch.tensor(positions)
    names = [ref.name for ref in classes]
    base = accuracy_of(logits.argmax(1), positions_tensor[labels], [])
    base_per_class = accuracy_of(torch.where(logits.argmax(1) == positions_tensor[labels], labels, -1), labels, names)
    restricted = accuracy_of(logits[:, positions_tensor].argmax(1), labels, names)
    return {"base": base.accuracy, "base_per_class": base_per_class.per_class,
            "restricted_base": restricted.accuracy, "restricted_base_per_class": restricted.per_class,
            "test_samples_per_class": {name: int((labels == k).sum()) for k, name in enumerate(names)}}


def compare(component_path, source_path, root=None, batch_size: int = 256, progress: bool = False,
            max_per_class: int | None = None, image_size: int | None = None, verify: bool = True) -> dict:
    """A component (or any model) against its source on the component's task test samples: Base (source,
    argmax over all its classes), Restricted base (source logits restricted to the task), and the component."""
    from modellego.data.subsets import per_class_slice
    from modellego.data.task import task_data
    from modellego.modelfile import load

    component, manifest = load(component_path)
    source, source_manifest = load(source_path)
    test_data = task_data(manifest, "test", root=root, image_size=image_size, verify=verify)
    if max_per_class:
        test_data = per_class_slice(test_data, max_per_class)
    baselines = source_baselines(source, source_manifest, manifest.classes, test_data, batch_size, progress)
    own = evaluate(component, test_data, batch_size, progress)
    return {**baselines, "accuracy": own.accuracy, "per_class": own.per_class,
            "params": count_params(component), "flops": count_flops(component, manifest.input),
            "source_params": count_params(source), "source_flops": count_flops(source, source_manifest.input),
            "samples": own.samples, "classes": manifest.class_names, "data": test_data.name}


def assembly_base(manifest) -> float | None:
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


def component_metrics(component: nn.Module, manifest, source: nn.Module, source_manifest, root=None,
                      batch_size: int = 256, image_size: int | None = None, verify: bool = True) -> dict:
    """Test metrics recorded in a component's manifest: its accuracy and its source's Base / Restricted base
    on the task (per class too), so that assemblies can report the mean Base of their sources later."""
    from modellego.data.task import task_data

    test_data = task_data(manifest, "test", root=root, image_size=image_size, verify=verify)
    baselines = source_baselines(source, source_manifest, manifest.classes, test_data, batch_size)
    own = evaluate(component, test_data, batch_size)
    return {**baselines, "test_accuracy": own.accuracy, "params": count_params(component),
            "flops": count_flops(component, manifest.input)}


@dataclass
class ProfileSampleCheck:
    """A component and its source restricted to the task, on the task's profile images (training data)."""

    component_accuracy: float
    restricted_base: float
    samples: int


def profile_sample_accuracy(component: nn.Module, source: nn.Module, task_positions: list[int], train_data: Dataset,
                            profile, batch_size: int = 256) -> ProfileSampleCheck:
    """Accuracy of `component` (outputs = the task, in order) and of `source` restricted to `task_positions`
    (its outputs of the task) on the profile's images of the task; `train_data` is the source's training
    data the profile was computed on (positions = `profile.samples`). Cheap: at most the profile's N per class."""
    from modellego.data.subsets import SampleSubset

    task = torch.tensor(task_positions)
    in_task = torch.full((len(profile.classes),), -1, dtype=torch.long)
    in_task[task] = torch.arange(len(task))
    labels = in_task[profile.sample_labels.long()]
    chosen = labels >= 0
    if not chosen.any():
        return ProfileSampleCheck(float("nan"), float("nan"), 0)
    subset = SampleSubset(train_data, profile.samples[chosen], labels[chosen])
    source_logits, labels = predict(source, subset, batch_size)
    component_logits, _ = predict(component, subset, batch_size)
    restricted = (source_logits[:, task].argmax(1) == labels).float().mean().item()
    own = (component_logits.argmax(1) == labels).float().mean().item()
    return ProfileSampleCheck(own, restricted, len(labels))
