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
from torch.utils.data import DataLoader, Dataset

from modellego.contributions import contributions
from modellego.data.subsets import SampleSubset
from modellego.errors import ModellegoError
from modellego.evaluate import predict
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


def select_samples(model: nn.Module, dataset: Dataset, samples_per_class: int, batch_size: int = 256,
                   progress: bool = False) -> tuple[torch.Tensor, list[str]]:
    """Per class, the positions of the `samples_per_class` correctly classified samples with the highest
    softmax confidence on their class. Returns the positions (grouped by class) and notes on short classes."""
    if samples_per_class < 1:
        raise ModellegoError(f"samples per class must be at least 1, got {samples_per_class}")
    logits, labels = predict(model, dataset, batch_size, progress)
    if logits.shape[1] != len(dataset.classes):
        raise ModellegoError(f"the data has {len(dataset.classes)} classes but the model has {logits.shape[1]} outputs")
    confidence = logits.softmax(1).gather(1, labels[:, None]).squeeze(1)
    correct = logits.argmax(1) == labels
    chosen, notes = [], []
    for label, name in enumerate(dataset.classes):
        candidates = torch.nonzero(correct & (labels == label)).flatten()
        if len(candidates) == 0:
            raise ModellegoError(f"class {name!r} has no correctly classified training sample, so it cannot be profiled")
        order = confidence[candidates].argsort(descending=True, stable=True)
        picked = candidates[order[:samples_per_class]]
        if len(picked) < samples_per_class:
            notes.append(f"class {name!r} has only {len(picked)} correctly classified samples "
                         f"(asked for {samples_per_class}); using those")
        chosen.append(picked)
    return torch.cat(chosen), notes


@torch.no_grad()
def profile(model: nn.Module, dataset: Dataset, samples_per_class: int = 50, batch_size: int = 64,
            progress: bool = False) -> Profile:
    """Profile `model` on `dataset` (labels = the model's output positions, normally its training split)."""
    model.eval()
    layers = parameter_layers(model)
    check_supported(model, tuple(dataset[0][0].shape))
    positions, notes = select_samples(model, dataset, samples_per_class, progress=progress)
    for note in notes:
        warnings.warn(note, stacklevel=2)
    chosen = SampleSubset(dataset, positions)
    num_classes = len(dataset.classes)
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
        loader = DataLoader(chosen, batch_size=batch_size, shuffle=False)
        for images, labels in track(loader, "profiling", len(loader), progress):
            current["labels"] = labels
            current["shape"] = tuple(images.shape[1:])
            model(images.to(next(model.parameters()).device))
    finally:
        for handle in handles:
            handle.remove()
    unused = [name for name in layers if name not in sums]
    if unused:
        raise ModellegoError(f"layers {unused[:3]} never ran in the forward pass, so they cannot be profiled")
    labels = chosen.targets
    return Profile(contributions={name: sums[name].float() for name in order}, layers=order,
                   classes=list(dataset.classes), counts=torch.bincount(labels, minlength=num_classes),
                   samples=positions, sample_labels=labels, model_hash=weights_hash(model),
                   input_shape=current["shape"],
                   dataset=getattr(dataset, "name", ""), samples_per_class=samples_per_class, notes=notes)

