"""Class profiles: per class k and parameter layer, `A[k,o,i]` = the sum of C⁺[o,i] over the class's most
confidently, correctly classified training samples (DESIGN.md, "Profile"). Profiles over shards add up."""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, SequentialSampler, Subset

from modellego import distributed
from modellego.core.contributions import class_sums
from modellego.core.hashing import weights_hash
from modellego.core.layers import execution_order, input_channels, output_channels, parameter_layers
from modellego.core.support import check_profile_fits, check_supported, profile_bytes
from modellego.errors import ModellegoError
from modellego.memory import fit_inference
from modellego.progress import track


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
    kinds: dict[str, str] = field(default_factory=dict)  # layer -> "conv" | "linear" (empty in older files)
    world_size: int = 1

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

    def merge(self, other: "Profile") -> "Profile":
        """The profile of both shards' samples: sums add up (profiles are plain sums), samples are listed together.
        Both must come from the same model and classes (e.g. two processes profiling halves of the data)."""
        if (self.model_hash, self.layers, self.classes) != (other.model_hash, other.layers, other.classes):
            raise ModellegoError("only profiles of the same model, layers and classes can be merged")
        return Profile(contributions={name: self.contributions[name] + other.contributions[name]
                                      for name in self.layers},
                       layers=list(self.layers), classes=list(self.classes), counts=self.counts + other.counts,
                       samples=torch.cat([self.samples, other.samples]),
                       sample_labels=torch.cat([self.sample_labels, other.sample_labels]), model_hash=self.model_hash,
                       input_shape=self.input_shape, dataset=self.dataset,
                       samples_per_class=self.samples_per_class, notes=self.notes + other.notes,
                       kinds=dict(self.kinds), world_size=max(self.world_size, other.world_size))

    def check_model(self, model: nn.Module) -> None:
        """Refuse a model other than the one this profile was computed on, and a profile whose layers or sums'
        shapes do not fit the model's Conv2d/Linear layers (an edited file can keep the model's hash)."""
        sizes = {name: (output_channels(layer), input_channels(layer)) for name, layer in parameter_layers(model).items()}
        self.check_fits(weights_hash(model), sizes, "Conv2d/Linear")

    def check_fits(self, model_hash: str, sizes: dict[str, tuple[int, int]], what: str) -> None:
        """Refuse this profile for a model of another hash, or whose parameter layers (`sizes`: name → (outputs,
        inputs), `what` names their type) are not the profile's layers with sums of their shapes."""
        if model_hash != self.model_hash:
            raise ModellegoError("this profile was computed on a different model; run `modellego profile` on this model")
        unknown = [name for name in self.layers if name not in sizes]
        if unknown or len(set(self.layers)) != len(sizes):
            names = unknown[:3] or sorted(set(sizes) - set(self.layers))[:3]
            raise ModellegoError(f"this profile's layers do not match the model's {what} layers ({names}); "
                                 "run `modellego profile` on this model again")
        for name in self.layers:
            expected = (len(self.classes), *sizes[name])
            if tuple(self.contributions[name].shape) != expected:
                raise ModellegoError(f"this profile's sums for layer {name} have shape "
                                     f"{list(self.contributions[name].shape)}, the model needs {list(expected)}; "
                                     "run `modellego profile` on this model again")


def _batches(data: Dataset | DataLoader, batch_size: int) -> DataLoader:
    """`data` as batches in a fixed order: a DataLoader as it is (it must not shuffle), a dataset in order."""
    if isinstance(data, DataLoader):
        sampler = data.batch_sampler.sampler if data.batch_sampler is not None else data.sampler
        if isinstance(sampler, RandomSampler):
            raise ModellegoError("the DataLoader shuffles, but profiling reads the data twice in the same order; "
                                 "pass DataLoader(..., shuffle=False) or the dataset itself")
        return data
    return DataLoader(data, batch_size=batch_size, shuffle=False)


@torch.no_grad()
def _outputs_of(model: nn.Module, inputs: torch.Tensor) -> int:
    return model(inputs[:1].to(next(model.parameters()).device)).shape[1]


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


def _numbered_batches(data: Dataset | DataLoader, batch_size: int) -> tuple[Iterator, int]:
    """This process's batches of `data` in a fixed order, each as (position of its first sample, inputs, labels),
    and how many there are: a DataLoader as it is (it must not shuffle), a dataset in order. With several
    processes, every world_size-th batch: batch boundaries stay those of one process."""
    if isinstance(data, DataLoader):
        loader = _batches(data, batch_size)
        share = len(range(distributed.rank(), len(loader), distributed.world_size()))

        def from_loader() -> Iterator:
            seen = 0
            for number, (inputs, labels) in enumerate(loader):
                if number % distributed.world_size() == distributed.rank():
                    yield seen, inputs, labels
                seen += len(labels)
        return from_loader(), share
    mine = distributed.own(list(BatchSampler(SequentialSampler(range(len(data))), batch_size, drop_last=False)))
    batches = zip(mine, DataLoader(data, batch_sampler=mine))
    return ((batch[0], inputs, labels) for batch, (inputs, labels) in batches), len(mine)


def _merge_candidates(parts: list[dict[int, tuple[torch.Tensor, torch.Tensor]]],
                      limit: int) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Every process's kept candidates as one: per class the `limit` most confident overall, ties to the earlier
    position, which is what one process streaming over all the data keeps."""
    merged: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    empty = (torch.empty(0, dtype=torch.long), torch.empty(0))
    for part in parts:
        for label, (positions, confidence) in part.items():
            merged[label] = _keep_most_confident(merged.get(label, empty), positions, confidence, limit)
    return merged


@torch.no_grad()
def select_samples(model: nn.Module, data: Dataset | DataLoader, samples_per_class: int, batch_size: int = 256,
                   progress: bool = False, num_classes: int | None = None) -> Selection:
    """Per class, the `samples_per_class` correctly classified samples with the highest softmax confidence on
    their class, streamed over `data` (memory does not grow with the number of samples). Under torchrun each
    process reads its share of the batches and the candidates are gathered: the same samples as one process."""
    if samples_per_class < 1:
        raise ModellegoError(f"samples per class must be at least 1, got {samples_per_class}")
    model.eval()
    device = next(model.parameters()).device
    batches, count = _numbered_batches(data, batch_size)
    kept: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    failure = None
    try:
        for start, inputs, labels in track(batches, "selecting samples", count, progress):
            logits = model(inputs.to(device)).float().cpu()
            labels = torch.as_tensor(labels).long().cpu()
            num_classes = num_classes or logits.shape[1]
            if logits.shape[1] != num_classes:
                raise ModellegoError(f"the data has {num_classes} classes but the model has {logits.shape[1]} outputs")
            if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
                raise ModellegoError(f"labels must be the model's output positions 0..{num_classes - 1}, "
                                     f"got {int(labels.min())}..{int(labels.max())}")
            keep_candidates(kept, logits, labels, torch.arange(start, start + len(labels)), samples_per_class)
    except ModellegoError as error:
        failure = error
    distributed.agree(failure)
    if distributed.active():
        kept = _merge_candidates(distributed.gather(kept), samples_per_class)
        num_classes = next((n for n in distributed.gather(num_classes) if n is not None), None)
    if num_classes is None:
        raise ModellegoError("the data is empty, so there is nothing to profile")
    names = class_names(data, num_classes)
    if len(names) != num_classes:
        raise ModellegoError(f"the data has {len(names)} classes but the model has {num_classes} outputs")
    return selection_of(kept, names, samples_per_class)


def keep_candidates(kept: dict[int, tuple[torch.Tensor, torch.Tensor]], logits: torch.Tensor, labels: torch.Tensor,
                    positions: torch.Tensor, limit: int) -> None:
    """Merge one batch into `kept` (per label: the positions and confidences of the `limit` most confident
    correctly classified samples so far, ties to the earlier position): `logits` and `labels` (output
    positions) of the samples at `positions`."""
    confidence = logits.softmax(1).gather(1, labels[:, None]).squeeze(1)
    correct = logits.argmax(1) == labels
    for label in labels[correct].unique().tolist():
        chosen = correct & (labels == label)
        empty = (torch.empty(0, dtype=torch.long), torch.empty(0))
        kept[label] = _keep_most_confident(kept.get(label, empty), positions[chosen], confidence[chosen], limit)


def selection_of(kept: dict[int, tuple[torch.Tensor, torch.Tensor]], names: list[str], samples_per_class: int,
                 unit: str = "sample") -> Selection:
    """The chosen samples from the candidates kept per class; a class without one is refused, a class with
    fewer than asked is noted. `unit` names a sample in messages (a graph's are nodes)."""
    chosen, chosen_labels, notes = [], [], []
    for label, name in enumerate(names):
        if label not in kept:
            raise ModellegoError(f"class {name!r} has no correctly classified training {unit}, so it cannot be "
                                 "profiled (train the model longer)")
        picked = kept[label][0]
        if len(picked) < samples_per_class:
            notes.append(f"class {name!r} has only {len(picked)} correctly classified {unit}s "
                         f"(asked for {samples_per_class}); using those")
        chosen.append(picked)
        chosen_labels.append(torch.full((len(picked),), label, dtype=torch.long))
    return Selection(torch.cat(chosen), torch.cat(chosen_labels), names, notes)


def _chosen_batches(data: Dataset | DataLoader, positions: torch.Tensor, labels: torch.Tensor,
                    batch_size: int) -> tuple[Iterator, int]:
    """This process's share of the chosen samples as (inputs, labels) batches, and how many batches: read by
    position from a dataset, filtered from a loader."""
    if not isinstance(data, DataLoader):
        mine = distributed.own(list(BatchSampler(SequentialSampler(range(len(positions))), batch_size, False)))
        chosen = DataLoader(Subset(data, positions.tolist()), batch_sampler=mine)
        return ((inputs, labels[batch]) for batch, (inputs, _) in zip(mine, chosen)), len(mine)
    label_of = dict(zip(positions.tolist(), labels.tolist()))
    batches, count = _numbered_batches(data, batch_size)

    def filtered() -> Iterator:
        for seen, inputs, batch_labels in batches:
            rows = [row for row in range(len(batch_labels)) if seen + row in label_of]
            if rows:
                yield inputs[rows], torch.tensor([label_of[seen + row] for row in rows])
    return filtered(), count


def _contribution_bytes(layers: dict[str, nn.Module], num_classes: int):
    """Bytes of the largest layer's per-batch contributions (float32 [B, O, I] and its float64 copy) plus its class
    sums, as a function of the batch size: what profiling holds besides the forward pass."""
    pairs = max((output_channels(layer) * input_channels(layer) for layer in layers.values()), default=0)

    def extra(batch_size: int) -> int:
        return pairs * (12 * batch_size + 16 * num_classes)
    return extra


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
    classes_counted = num_classes or _outputs_of(model, first_inputs)
    check_profile_fits(model, classes_counted)
    selection_batch = 256
    if not isinstance(data, DataLoader):  # a DataLoader's batches are the caller's to size
        shape = tuple(first_inputs.shape[1:])
        selection_batch = fit_inference(model, shape, selection_batch, "selecting profile samples",
                                        samples=len(data))
        batch_size = fit_inference(model, shape, batch_size, "profiling",
                                   state_bytes=profile_bytes(model, classes_counted),
                                   extra=_contribution_bytes(layers, classes_counted), samples=len(data))
    selection_batch, batch_size = distributed.smallest(selection_batch), distributed.smallest(batch_size)
    selection = select_samples(model, data, samples_per_class, batch_size=selection_batch, progress=progress,
                               num_classes=num_classes)
    for note in selection.notes:
        warnings.warn(note, stacklevel=2)
    positions, labels, names = selection.positions, selection.labels, selection.classes
    num_classes = len(names)
    order = execution_order(model, first_inputs[:1])
    unused = [name for name in layers if name not in order]
    if unused:
        raise ModellegoError(f"layers {unused[:3]} never ran in the forward pass, so they cannot be profiled")
    sums = {name: torch.zeros(num_classes, output_channels(layers[name]), input_channels(layers[name]),
                               dtype=torch.float64) for name in order}
    current: dict[str, torch.Tensor] = {}

    def accumulate(name: str):
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            sums[name] += class_sums(module, inputs[0], current["labels"], num_classes).cpu()
        return hook

    handles = [module.register_forward_pre_hook(accumulate(name)) for name, module in layers.items()]
    try:
        batches, count = _chosen_batches(data, positions, labels, batch_size)
        for images, batch_labels in track(batches, "profiling", count, progress):
            current["labels"] = batch_labels
            model(images.to(next(model.parameters()).device))
    finally:
        for handle in handles:
            handle.remove()
    for name in order:  # the same order in every process
        distributed.sum_(sums[name])
    return Profile(contributions={name: sums[name].float() for name in order}, layers=order,
                   classes=names, counts=torch.bincount(labels, minlength=num_classes),
                   samples=positions, sample_labels=labels, model_hash=weights_hash(model),
                   input_shape=tuple(first_inputs.shape[1:]),
                   dataset=str(getattr(_dataset(data), "name", "")), samples_per_class=samples_per_class,
                   notes=selection.notes, world_size=distributed.world_size(),
                   kinds={name: "conv" if isinstance(layers[name], nn.Conv2d) else "linear" for name in order})
