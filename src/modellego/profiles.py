"""Class profiles: per class k and parameter layer, `A[k,o,i]` = the sum of C⁺[o,i] over the class's most
confidently, correctly classified training samples (DESIGN.md, "Profile"). Profiles over shards add up."""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader, Dataset, RandomSampler, Subset

from modellego.contributions import contributions
from modellego.errors import ModellegoError
from modellego.layers import execution_order, parameter_layers  # noqa: F401  (re-exported)
from modellego.modelfile import atomic_write, read_safetensors, weights_hash
from modellego.progress import track
from modellego.support import check_supported

PROFILE_FORMAT = "modellego-profile"
PROFILE_VERSION = 1


@dataclass
class Profile:
    """Per-layer class contributions `A[layer]` (K×O×I), the layers in execution order, the classes (K model
    outputs), how many samples each class used and which (positions in the profiled dataset)."""

    contributions: dict[str, torch.Tensor]
    layers: list[str]
    classes: list[str]
    counts: torch.Tensor
    samples: torch.Tensor
    sample_labels: torch.Tensor
    model_hash: str
    input_shape: tuple[int, ...] = ()
    dataset: str = ""
    samples_per_class: int = 50
    notes: list[str] = field(default_factory=list)

    def relative(self, layer: str) -> torch.Tensor:
        """Soft relative contribution R = (A − min_i A) / (max_i A − min_i A + 1e-5), per layer."""
        totals = self.contributions[layer]
        low = totals.amin(dim=2, keepdim=True)
        high = totals.amax(dim=2, keepdim=True)
        return (totals - low) / (high - low + 1e-5)

    def digest(self) -> str:
        """SHA-256 of the profile's content (sums, classes, samples), recorded in components' provenance."""
        digest = hashlib.sha256(json.dumps([self.layers, self.classes, self.model_hash]).encode())
        for name in self.layers:
            digest.update(self.contributions[name].contiguous().numpy().tobytes())
        digest.update(self.samples.numpy().tobytes())
        return digest.hexdigest()

    def save(self, path: str | os.PathLike) -> Path:
        """Write the profile to one safetensors file (atomically)."""
        tensors = {f"A/{name}": value.contiguous() for name, value in self.contributions.items()}
        tensors.update(counts=self.counts.contiguous(), samples=self.samples.contiguous(),
                       sample_labels=self.sample_labels.contiguous())
        meta = {"format": PROFILE_FORMAT, "format_version": PROFILE_VERSION, "layers": self.layers,
                "classes": self.classes, "model_hash": self.model_hash, "dataset": self.dataset,
                "input_shape": list(self.input_shape),
                "samples_per_class": self.samples_per_class, "notes": self.notes}
        return atomic_write(path, lambda temp: save_file(tensors, temp, metadata={"modellego-profile": json.dumps(meta)}))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Profile":
        """Read a profile written by `save`; anything else is refused without unpickling."""
        source = Path(path)
        metadata, tensors = read_safetensors(source, "modellego profile")
        if "modellego-profile" not in metadata:
            raise ModellegoError(f"{source} is a safetensors file but not a modellego profile; pass the file "
                                 "that `modellego profile` wrote")
        try:
            meta = json.loads(metadata["modellego-profile"])
            if meta.get("format") != PROFILE_FORMAT or int(meta["format_version"]) > PROFILE_VERSION:
                raise ValueError("unknown format")
            layers = list(meta["layers"])
            return cls(contributions={name: tensors[f"A/{name}"] for name in layers}, layers=layers,
                       classes=list(meta["classes"]), counts=tensors["counts"], samples=tensors["samples"],
                       sample_labels=tensors["sample_labels"], model_hash=str(meta["model_hash"]),
                       input_shape=tuple(int(v) for v in meta["input_shape"]),
                       dataset=str(meta.get("dataset", "")), samples_per_class=int(meta["samples_per_class"]),
                       notes=list(meta.get("notes", [])))
        except (KeyError, ValueError, TypeError) as error:
            raise ModellegoError(f"{source} is not a modellego profile (missing or damaged profile header: {error})") from None

    def check_model(self, model: nn.Module) -> None:
        """Refuse a model other than the one this profile was computed on."""
        if weights_hash(model) != self.model_hash:
            raise ModellegoError("this profile was computed on a different model; run `modellego profile` on this model")


def _batches(data: Dataset | DataLoader, batch_size: int) -> DataLoader:
    """`data` as batches in a fixed order: a DataLoader as it is (it must not shuffle), a dataset in order."""
    if isinstance(data, DataLoader):
        sampler = data.batch_sampler.sampler if data.batch_sampler is not None else data.sampler
        if isinstance(sampler, RandomSampler):
            raise ModellegoError("the DataLoader shuffles, but profiling reads the data twice in the same order; "
                                 "pass DataLoader(..., shuffle=False) or the dataset itself")
        return data
    return DataLoader(data, batch_size=batch_size, shuffle=False)


def _dataset(data: Dataset | DataLoader) -> Dataset:
    return data.dataset if isinstance(data, DataLoader) else data


def class_names(data: Dataset | DataLoader, num_classes: int | None = None) -> list[str]:
    """The class names a dataset (or a DataLoader's dataset) carries in `.classes`, else "0", "1", ..."""
    names = getattr(_dataset(data), "classes", None)
    if names is not None and (num_classes is None or len(names) == num_classes):
        return [str(name) for name in names]
    if num_classes is None:
        raise ModellegoError("the data has no `classes` attribute; pass num_classes")
    return [str(k) for k in range(num_classes)]


def _keep_most_confident(kept: tuple[torch.Tensor, torch.Tensor], positions: torch.Tensor, confidence: torch.Tensor,
                         limit: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge new candidates into a class's kept ones: the `limit` most confident, ties to the earlier position."""
    positions = torch.cat([kept[0], positions])
    confidence = torch.cat([kept[1], confidence])
    by_position = positions.argsort()
    positions, confidence = positions[by_position], confidence[by_position]
    best = confidence.argsort(descending=True, stable=True)[:limit]
    return positions[best], confidence[best]


@dataclass
class Selection:
    """The chosen samples: `positions` in the data (grouped by class, most confident first), their `labels`,
    the data's class names, and notes on classes with fewer samples than asked for."""

    positions: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    notes: list[str]


@torch.no_grad()
def select_samples(model: nn.Module, data: Dataset | DataLoader, samples_per_class: int, batch_size: int = 256,
                   progress: bool = False, num_classes: int | None = None) -> Selection:
    """Per class, the `samples_per_class` correctly classified samples with the highest softmax confidence on
    their class, streamed over `data` (memory does not grow with the number of samples)."""
    if samples_per_class < 1:
        raise ModellegoError(f"samples per class must be at least 1, got {samples_per_class}")
    model.eval()
    device = next(model.parameters()).device
    loader = _batches(data, batch_size)
    kept: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    seen = 0
    for inputs, labels in track(loader, "selecting samples", len(loader), progress):
        logits = model(inputs.to(device)).float().cpu()
        labels = torch.as_tensor(labels).long().cpu()
        num_classes = num_classes or logits.shape[1]
        if logits.shape[1] != num_classes:
            raise ModellegoError(f"the data has {num_classes} classes but the model has {logits.shape[1]} outputs")
        if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
            raise ModellegoError(f"labels must be the model's output positions 0..{num_classes - 1}, "
                                 f"got {int(labels.min())}..{int(labels.max())}")
        confidence = logits.softmax(1).gather(1, labels[:, None]).squeeze(1)
        correct = logits.argmax(1) == labels
        positions = torch.arange(seen, seen + len(labels))
        seen += len(labels)
        for label in labels[correct].unique().tolist():
            chosen = correct & (labels == label)
            empty = (torch.empty(0, dtype=torch.long), torch.empty(0))
            kept[label] = _keep_most_confident(kept.get(label, empty), positions[chosen], confidence[chosen],
                                               samples_per_class)
    if num_classes is None:
        raise ModellegoError("the data is empty, so there is nothing to profile")
    names = class_names(data, num_classes)
    if len(names) != num_classes:
        raise ModellegoError(f"the data has {len(names)} classes but the model has {num_classes} outputs")
    chosen, chosen_labels, notes = [], [], []
    for label, name in enumerate(names):
        if label not in kept:
            raise ModellegoError(f"class {name!r} has no correctly classified training sample, so it cannot be profiled")
        picked = kept[label][0]
        if len(picked) < samples_per_class:
            notes.append(f"class {name!r} has only {len(picked)} correctly classified samples "
                         f"(asked for {samples_per_class}); using those")
        chosen.append(picked)
        chosen_labels.append(torch.full((len(picked),), label, dtype=torch.long))
    return Selection(torch.cat(chosen), torch.cat(chosen_labels), names, notes)


def _chosen_batches(data: Dataset | DataLoader, positions: torch.Tensor, labels: torch.Tensor, batch_size: int):
    """The chosen samples as (inputs, labels) batches: read by position from a dataset, filtered from a loader."""
    if not isinstance(data, DataLoader):
        chosen = DataLoader(Subset(data, positions.tolist()), batch_size=batch_size, shuffle=False)
        start = 0
        for inputs, _ in chosen:
            yield inputs, labels[start:start + len(inputs)]
            start += len(inputs)
        return
    label_of = dict(zip(positions.tolist(), labels.tolist()))
    seen = 0
    for inputs, batch_labels in data:
        rows = [row for row in range(len(batch_labels)) if seen + row in label_of]
        if rows:
            yield inputs[rows], torch.tensor([label_of[seen + row] for row in rows])
        seen += len(batch_labels)


@torch.no_grad()
def profile(model: nn.Module, data: Dataset | DataLoader, *, num_classes: int | None = None,
            samples_per_class: int = 50, batch_size: int = 64, progress: bool = False) -> Profile:
    """Profile `model` on labelled `data` — any map-style dataset or DataLoader yielding (input, label), labels
    being the model's output positions (normally its training split); class names come from `data.classes`."""
    model.eval()
    layers = parameter_layers(model)
    loader = _batches(data, batch_size)
    first_inputs, _ = next(iter(loader))
    check_supported(model, tuple(first_inputs.shape[1:]))
    selection = select_samples(model, data, samples_per_class, progress=progress, num_classes=num_classes)
    for note in selection.notes:
        warnings.warn(note, stacklevel=2)
    positions, labels, names = selection.positions, selection.labels, selection.classes
    num_classes = len(names)
    sums: dict[str, torch.Tensor] = {}
    order: list[str] = []
    current: dict[str, torch.Tensor] = {}

    def accumulate(name: str):
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            if name not in sums:
                order.append(name)
                out_channels = module.out_channels if isinstance(module, nn.Conv2d) else module.out_features
                in_channels = module.in_channels if isinstance(module, nn.Conv2d) else module.in_features
                sums[name] = torch.zeros(num_classes, out_channels, in_channels, dtype=torch.float64)
            sums[name].index_add_(0, current["labels"], contributions(module, inputs[0]).double())
        return hook

    handles = [module.register_forward_pre_hook(accumulate(name)) for name, module in layers.items()]
    try:
        batches = _chosen_batches(data, positions, labels, batch_size)
        for images, batch_labels in track(batches, "profiling", -(-len(positions) // batch_size), progress):
            current["labels"] = batch_labels
            current["shape"] = tuple(images.shape[1:])
            model(images.to(next(model.parameters()).device))
    finally:
        for handle in handles:
            handle.remove()
    unused = [name for name in layers if name not in sums]
    if unused:
        raise ModellegoError(f"layers {unused[:3]} never ran in the forward pass, so they cannot be profiled")
    return Profile(contributions={name: sums[name].float() for name in order}, layers=order,
                   classes=names, counts=torch.bincount(labels, minlength=num_classes),
                   samples=positions, sample_labels=labels, model_hash=weights_hash(model),
                   input_shape=current["shape"],
                   dataset=str(getattr(_dataset(data), "name", "")), samples_per_class=samples_per_class,
                   notes=selection.notes)
