"""Class profiles: per class k and parameter layer, `A[k,o,i]` = the sum of C⁺[o,i] over the class's most
confidently, correctly classified training samples (DESIGN.md, "Profile"). Profiles over shards add up."""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
from torch import nn
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    RandomSampler,
    SequentialSampler,
    Subset,
    default_collate,
)

from modellego import distributed, runtime
from modellego.core.contributions import class_sums
from modellego.core.hashing import weights_hash
from modellego.core.layers import execution_order, input_channels, output_channels, parameter_layers
from modellego.core.samples import SampleSubset, resolve_classes
from modellego.core.support import check_profile_fits, check_supported, profile_bytes
from modellego.errors import ModellegoError
from modellego.memory import fit_inference
from modellego.progress import track


def record_digest(sums: bytes, samples: bytes) -> str:
    """The digest of one class's record: its sums (flat, in the layers' order) and its samples, as stored."""
    return hashlib.sha256(sums + samples).hexdigest()


def profile_digest(model_hash: str, layers: list[str], sizes: list[tuple[int, int]], dtype: str,
                   records: list[tuple[int, str, int, str]]) -> str:
    """A profile's digest: its model, layers and their sizes, the dtype of its sums, and every class's (model
    output, name, number of samples, record digest), whatever the order the classes were profiled in."""
    content = [model_hash, list(layers), [list(size) for size in sizes], dtype,
               sorted([position, name, count, sha] for position, name, count, sha in records)]
    return hashlib.sha256(json.dumps(content).encode()).hexdigest()


@dataclass
class Profile:
    """Per-layer class contributions `A[layer]` (K×O×I), the layers in execution order, the classes (K of the
    model's outputs: all of them, or those asked for, at `positions`), how many samples each class used and which
    (positions in the profiled dataset; `sample_labels` are rows of the profile)."""

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
    positions: list[int] | None = None  # the model output each class is (None: class k is output k)
    num_outputs: int | None = None      # the model's number of outputs (None: as many as the profile's classes)
    file_digest: str | None = None      # the digest of the profile file it was read from, which `digest` gives

    @property
    def output_positions(self) -> list[int]:
        """The model output each of the profile's classes is."""
        return list(self.positions) if self.positions is not None else list(range(len(self.classes)))

    @property
    def outputs(self) -> int:
        """The profiled model's number of outputs (its classifier's rows)."""
        return self.num_outputs if self.num_outputs is not None else len(self.classes)

    def rows(self, positions: list[int], names: list[str] | None = None) -> list[int]:
        """The profile's rows of model outputs `positions` (`names`: how to call them in the refusal); a class the
        profile holds no record of is refused in one line."""
        held = self.output_positions
        missing = [k for k in positions if k not in held]
        if missing:
            shown = ", ".join(repr(names[positions.index(k)]) if names else str(k) for k in missing[:5])
            raise ModellegoError(f"the profile holds no record of class {shown}; add it (modellego profile MODEL "
                                 "--classes ... --append PROFILE) or use a profile of all the model's classes")
        return [held.index(k) for k in positions]

    def subset(self, rows: list[int]) -> "Profile":
        """The profile of the classes at `rows` only (its file's digest kept: it names the same profile)."""
        index = torch.tensor(rows, dtype=torch.long)
        chosen = torch.isin(self.sample_labels, index)
        renumber = torch.full((len(self.classes),), -1, dtype=torch.long)
        renumber[index] = torch.arange(len(rows))
        return Profile(contributions={name: value[index] for name, value in self.contributions.items()},
                       layers=list(self.layers), classes=[self.classes[k] for k in rows], counts=self.counts[index],
                       samples=self.samples[chosen], sample_labels=renumber[self.sample_labels[chosen]],
                       model_hash=self.model_hash, input_shape=self.input_shape, dataset=self.dataset,
                       samples_per_class=self.samples_per_class, notes=list(self.notes), kinds=dict(self.kinds),
                       world_size=self.world_size, positions=[self.output_positions[k] for k in rows],
                       num_outputs=self.outputs, file_digest=self.digest())

    def relative(self, layer: str) -> torch.Tensor:
        """Soft relative contribution R = (A − min_i A) / (max_i A − min_i A + 1e-5), per layer."""
        totals = self.contributions[layer]
        low = totals.amin(dim=2, keepdim=True)
        high = totals.amax(dim=2, keepdim=True)
        return (totals - low) / (high - low + 1e-5)

    def digest(self) -> str:
        """SHA-256 of the profile's content (model, layers, and every class's sums and samples), recorded in
        components' provenance; the same whether the profile is in memory or in a float32 file (`profile_digest`),
        and for a profile read from a file (all of it or some classes), the file's digest."""
        if self.file_digest is not None:
            return self.file_digest
        sizes = [tuple(self.contributions[name].shape[1:]) for name in self.layers]
        records = []
        for row, (position, name) in enumerate(zip(self.output_positions, self.classes)):
            flat = torch.cat([self.contributions[layer][row].reshape(-1) for layer in self.layers]).float()
            samples = self.samples[self.sample_labels == row].long()
            records.append((position, name, len(samples), record_digest(flat.contiguous().numpy().tobytes(),
                                                                       samples.contiguous().numpy().tobytes())))
        return profile_digest(self.model_hash, self.layers, sizes, "float32", records)

    def merge(self, other: "Profile") -> "Profile":
        """The profile of both shards' samples: sums add up (profiles are plain sums), samples are listed together.
        Both must come from the same model and classes (e.g. two processes profiling halves of the data)."""
        if (self.model_hash, self.layers, self.classes, self.output_positions) != \
                (other.model_hash, other.layers, other.classes, other.output_positions):
            raise ModellegoError("only profiles of the same model, layers and classes can be merged")
        return Profile(contributions={name: self.contributions[name] + other.contributions[name]
                                      for name in self.layers},
                       layers=list(self.layers), classes=list(self.classes), counts=self.counts + other.counts,
                       samples=torch.cat([self.samples, other.samples]),
                       sample_labels=torch.cat([self.sample_labels, other.sample_labels]), model_hash=self.model_hash,
                       input_shape=self.input_shape, dataset=self.dataset,
                       samples_per_class=self.samples_per_class, notes=self.notes + other.notes,
                       kinds=dict(self.kinds), world_size=max(self.world_size, other.world_size),
                       positions=self.positions, num_outputs=self.num_outputs)

    def check_model(self, model: nn.Module, input_shape: tuple[int, ...] | None = None) -> None:
        """Refuse a model other than the one this profile was computed on, a profile whose layers or sums' shapes
        do not fit the model's Conv2d/Linear layers (an edited file can keep the model's hash), and one computed on
        inputs of another shape than the model's `input_shape` (C, H, W), when both are known."""
        sizes = {name: (output_channels(layer), input_channels(layer)) for name, layer in parameter_layers(model).items()}
        self.check_fits(weights_hash(model), sizes, "Conv2d/Linear")
        if input_shape is not None and self.input_shape and tuple(self.input_shape) != tuple(input_shape):
            raise ModellegoError(f"this profile was computed on inputs of shape {list(self.input_shape)}, the model "
                                 f"takes {list(input_shape)}; run `modellego profile` on this model again")

    def check_samples(self, count: int) -> None:
        """Refuse sample positions outside training data of `count` samples: the profile was computed on other
        data (or edited), and its positions would index past the data."""
        if self.samples.numel() and (int(self.samples.min()) < 0 or int(self.samples.max()) >= count):
            raise ModellegoError(f"this profile's sample positions reach {int(self.samples.max()):,}, but the training "
                                 f"data has {count:,} samples: it was computed on other data; run `modellego "
                                 "profile` again on this data")

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
            if name == self.layers[-1] and sizes[name][0] != self.outputs:
                raise ModellegoError(f"this profile was computed on a model with {self.outputs} outputs, but "
                                     f"{name} has {sizes[name][0]}; run `modellego profile` on this model")
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
    return runtime.loader(data, batch_size=batch_size, shuffle=False)


def _first_inputs(data: Dataset | DataLoader, batch_size: int) -> torch.Tensor:
    """One batch of inputs to learn the input shape from: a dataset's first sample (one image read), a
    DataLoader's first batch."""
    if isinstance(data, DataLoader):
        return next(iter(data))[0]
    if len(data) == 0:
        raise ModellegoError("the data holds no samples of the asked classes")
    return next(iter(_batches(Subset(data, [0]), 1)))[0]


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
    """The chosen samples: `positions` in the data (grouped by class, most confident first), their `labels`
    (rows of `wanted`), the names of the classes chosen for, notes on classes with fewer samples than asked for,
    and the model outputs chosen for (`wanted`)."""

    positions: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    notes: list[str]
    wanted: list[int] = field(default_factory=list)


def _numbered_batches(data: Dataset | DataLoader, batch_size: int, device: torch.device | None = None,
                      distribute: bool = True) -> tuple[Iterator, int]:
    """This process's batches of `data` in a fixed order, each as (position of its first sample, inputs, labels),
    and how many there are: a DataLoader as it is (it must not shuffle), a dataset in order (batches pinned for
    a CUDA `device`). With several processes (and `distribute`), every world_size-th batch: batch boundaries
    stay those of one process."""
    rank, world = (distributed.rank(), distributed.world_size()) if distribute else (0, 1)
    if isinstance(data, DataLoader):
        loader = _batches(data, batch_size)
        share = len(range(rank, len(loader), world))

        def from_loader() -> Iterator:
            seen = 0
            for number, (inputs, labels) in enumerate(loader):
                if number % world == rank:
                    yield seen, inputs, labels
                seen += len(labels)
        return from_loader(), share
    batches = list(BatchSampler(SequentialSampler(range(len(data))), batch_size, drop_last=False))
    mine = distributed.own(batches) if distribute else batches
    batches = zip(mine, runtime.loader(data, device, batch_sampler=mine))
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


RESCORE_POOL = 2  # below fp32, the selection pass shortlists twice the samples asked for (plus 8) per class


@torch.no_grad()
def select_samples(model: nn.Module, data: Dataset | DataLoader, samples_per_class: int, batch_size: int = 256,
                   progress: bool = False, num_classes: int | None = None,
                   wanted: list[int] | None = None) -> Selection:
    """Per class, the `samples_per_class` correctly classified samples with the highest softmax confidence on
    their class, streamed over `data` (memory does not grow with the number of samples). `wanted`: only these
    classes (model outputs), in this order; `labels` are then rows of `wanted`. Under torchrun each process reads
    its share of the batches and the candidates are gathered: the same samples as one process. At a `runtime`
    precision below fp32 the pass shortlists RESCORE_POOL× the samples per class and fp32 chooses among them."""
    if samples_per_class < 1:
        raise ModellegoError(f"samples per class must be at least 1, got {samples_per_class}")
    model.eval()
    device = runtime.device_of(model)
    batches, count = _numbered_batches(data, batch_size, device)
    kept: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    # Below fp32 the pass only shortlists (RESCORE_POOL× the samples asked, per class); fp32 then chooses among
    # them, so rounding reorders near-equal confidences only inside the shortlist.
    pool = samples_per_class if runtime.current().precision == "fp32" else RESCORE_POOL * samples_per_class + 8
    failure = None
    try:
        for start, inputs, labels in track(batches, "selecting samples", count, progress):
            with runtime.ranking(device):
                logits = model(inputs.to(device)).float().cpu()
            labels = torch.as_tensor(labels).long().cpu()
            num_classes = num_classes or logits.shape[1]
            if logits.shape[1] != num_classes:
                raise ModellegoError(f"the data has {num_classes} classes but the model has {logits.shape[1]} outputs")
            if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
                raise ModellegoError(f"labels must be the model's output positions 0..{num_classes - 1}, "
                                     f"got {int(labels.min())}..{int(labels.max())}")
            positions = torch.arange(start, start + len(labels))
            if wanted is not None:
                chosen = torch.isin(labels, torch.tensor(wanted, dtype=torch.long))
                logits, labels, positions = logits[chosen], labels[chosen], positions[chosen]
            keep_candidates(kept, logits, labels, positions, pool)
    except ModellegoError as error:
        failure = error
    distributed.agree(failure)
    if distributed.active():
        kept = _merge_candidates(distributed.gather(kept), pool)
        num_classes = next((n for n in distributed.gather(num_classes) if n is not None), None)
    if num_classes is None:
        raise ModellegoError("the data is empty, so there is nothing to profile")
    if pool != samples_per_class:
        kept = _rescored(model, data, kept, samples_per_class, batch_size)
    names = class_names(data, num_classes)
    if len(names) != num_classes:
        raise ModellegoError(f"the data has {len(names)} classes but the model has {num_classes} outputs")
    return selection_of(kept, names, samples_per_class, wanted=wanted)


@torch.no_grad()
def _rescored(model: nn.Module, data: Dataset | DataLoader, shortlist: dict[int, tuple[torch.Tensor, torch.Tensor]],
              limit: int, batch_size: int) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Per class, the `limit` most confident of its `shortlist` (positions in `data`), scored again in fp32. A
    DataLoader that reads its dataset in order with the default collation is read at the shortlist's positions
    only; any other is read again whole."""
    device = runtime.device_of(model)
    if isinstance(data, DataLoader):
        sampler = data.batch_sampler.sampler if data.batch_sampler is not None else data.sampler
        if isinstance(sampler, SequentialSampler) and data.collate_fn is default_collate:
            data = data.dataset  # its positions are the dataset's indices
    positions = torch.cat([chosen for chosen, _ in shortlist.values()]) if shortlist else torch.empty(0, dtype=torch.long)
    labels = torch.cat([torch.full((len(chosen),), label, dtype=torch.long) for label, (chosen, _) in shortlist.items()]) \
        if shortlist else torch.empty(0, dtype=torch.long)
    order = positions.argsort()  # the data's order: a DataLoader is read front to back
    positions, labels = positions[order], labels[order]
    logits = []
    batches, _ = _chosen_batches(data, positions, labels, batch_size, device, distribute=False)
    for inputs, _ in batches:
        with runtime.ranking(device, "fp32"):
            logits.append(model(inputs.to(device)).float().cpu())
    kept: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    if positions.numel():
        keep_candidates(kept, torch.cat(logits), labels, positions, limit)
    return kept


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
                 unit: str = "sample", wanted: list[int] | None = None) -> Selection:
    """The chosen samples from the candidates kept per class (of the model's classes `names`; `wanted`: only
    these outputs, whose rows label the samples); a class without one is refused, a class with fewer than asked
    is noted. `unit` names a sample in messages (a graph's are nodes)."""
    wanted = list(range(len(names))) if wanted is None else wanted
    chosen, chosen_labels, notes = [], [], []
    for row, label in enumerate(wanted):
        name = names[label]
        if label not in kept:
            raise ModellegoError(f"class {name!r} has no correctly classified training {unit}, so it cannot be "
                                 "profiled (train the model longer)")
        picked = kept[label][0]
        if len(picked) < samples_per_class:
            notes.append(f"class {name!r} has only {len(picked)} correctly classified {unit}s "
                         f"(asked for {samples_per_class}); using those")
        chosen.append(picked)
        chosen_labels.append(torch.full((len(picked),), row, dtype=torch.long))
    return Selection(torch.cat(chosen), torch.cat(chosen_labels), [names[k] for k in wanted], notes, wanted)


def _chosen_batches(data: Dataset | DataLoader, positions: torch.Tensor, labels: torch.Tensor,
                    batch_size: int, device: torch.device | None = None,
                    distribute: bool = True) -> tuple[Iterator, int]:
    """This process's share of the chosen samples (all of them without `distribute`) as (inputs, labels)
    batches, and how many batches: read by position from a dataset (in the order of `positions`), filtered from
    a loader (in the loader's order)."""
    if not isinstance(data, DataLoader):
        batches = list(BatchSampler(SequentialSampler(range(len(positions))), batch_size, False))
        mine = distributed.own(batches) if distribute else batches
        chosen = runtime.loader(Subset(data, positions.tolist()), device, batch_sampler=mine)
        return ((inputs, labels[batch]) for batch, (inputs, _) in zip(mine, chosen)), len(mine)
    label_of = dict(zip(positions.tolist(), labels.tolist()))
    batches, count = _numbered_batches(data, batch_size, device, distribute)

    def filtered() -> Iterator:
        for seen, inputs, batch_labels in batches:
            rows = [row for row in range(len(batch_labels)) if seen + row in label_of]
            if rows:
                yield inputs[rows], torch.tensor([label_of[seen + row] for row in rows])
    return filtered(), count


def _contribution_bytes(layers: dict[str, nn.Module]):
    """Bytes of the largest layer's per-batch contributions (float32 [B, O, I] and its float64 copy) plus one
    class's sum of it, as a function of the batch size: what profiling holds besides the forward pass."""
    pairs = max((output_channels(layer) * input_channels(layer) for layer in layers.values()), default=0)

    def extra(batch_size: int) -> int:
        return pairs * (12 * batch_size + 16)
    return extra


@dataclass
class ClassRecord:
    """One class's part of a profile: the model output it is, its name, its sums per layer (O×I, float32) and
    the samples they are summed over (positions in the profiled data)."""

    position: int
    name: str
    sums: dict[str, torch.Tensor]
    samples: torch.Tensor


@dataclass
class ProfilePlan:
    """What profiling will do, known before the sums are computed: the chosen samples of the classes asked for,
    the layers in execution order with their kinds and sizes (outputs, inputs), and the facts a profile records."""

    selection: Selection
    layers: list[str]
    kinds: dict[str, str]
    sizes: dict[str, tuple[int, int]]
    model_hash: str
    input_shape: tuple[int, ...]
    dataset: str
    samples_per_class: int
    num_outputs: int
    batch_size: int

    @property
    def pairs(self) -> int:
        """(output, input) channel pairs of all layers: the values of one class's record."""
        return sum(outputs * inputs for outputs, inputs in self.sizes.values())


def _wanted(classes: Sequence[str | int] | str | None, names: list[str]) -> list[int] | None:
    if classes is None:
        return None
    return resolve_classes(names, classes, "the model's classes")


def _restricted(data: Dataset | DataLoader, wanted: list[int] | None) -> tuple[Dataset | DataLoader, torch.Tensor | None]:
    """Only the asked classes' samples, where the data knows its labels without reading the samples (`targets`):
    the view and the position in `data` of each of its samples; else `data` itself."""
    targets = getattr(data, "targets", None)
    if wanted is None or isinstance(data, DataLoader) or not isinstance(targets, torch.Tensor):
        return data, None
    index = torch.nonzero(torch.isin(targets.long(), torch.tensor(wanted, dtype=torch.long))).flatten()
    return SampleSubset(data, index), index


# Input values per batch of the selection pass: 256 images up to 3×64×64, fewer larger ones (20 at 3×224×224),
# so that the memory profiling takes does not grow with the number of images it chooses from.
SELECTION_VALUES = 256 * 3 * 64 * 64


def selection_batch_size(input_shape: Sequence[int]) -> int:
    """The selection pass's batch for inputs of `input_shape`: at most 256, at most SELECTION_VALUES values."""
    return max(1, min(256, SELECTION_VALUES // math.prod(input_shape)))


@torch.no_grad()
def plan_profile(model: nn.Module, data: Dataset | DataLoader, *, num_classes: int | None = None,
                 classes: Sequence[str | int] | str | None = None, samples_per_class: int = 50,
                 batch_size: int = 64, progress: bool = False) -> ProfilePlan:
    """Check the model, size the batches for memory and choose each asked class's samples (`classes`: names or
    output positions, default all): the first half of `profile`. Only the asked classes' samples are read where
    the data knows its labels (a dataset with `targets`)."""
    model.eval()
    layers = parameter_layers(model)
    names = getattr(_dataset(data), "classes", None)
    wanted = _wanted(classes, [str(name) for name in names]) if names is not None else None
    selection_data, index = _restricted(data, wanted)  # the first batch too: no other class's sample is read
    first_inputs = _first_inputs(selection_data, batch_size)
    shape = tuple(first_inputs.shape[1:])
    check_supported(model, shape)
    outputs = num_classes or _outputs_of(model, first_inputs)
    if classes is not None and wanted is None:  # the data names no classes: its labels are output positions
        wanted = _wanted(classes, class_names(data, outputs))
        selection_data, index = _restricted(data, wanted)
    check_profile_fits(model, 1)  # one class's sums are held at a time
    selection_batch = selection_batch_size(shape)
    if not isinstance(data, DataLoader):  # a DataLoader's batches are the caller's to size
        selection_batch = fit_inference(model, shape, selection_batch, "selecting profile samples",
                                        samples=len(selection_data))
        batch_size = fit_inference(model, shape, batch_size, "profiling", state_bytes=profile_bytes(model, 1),
                                   extra=_contribution_bytes(layers), samples=len(selection_data))
    selection_batch, batch_size = distributed.smallest(selection_batch), distributed.smallest(batch_size)
    selection = select_samples(model, selection_data, samples_per_class, batch_size=selection_batch,
                               progress=progress, num_classes=outputs, wanted=wanted)
    if index is not None:
        selection.positions = index[selection.positions]
    order = execution_order(model, first_inputs[:1])
    unused = [name for name in layers if name not in order]
    if unused:
        raise ModellegoError(f"layers {unused[:3]} never ran in the forward pass, so they cannot be profiled")
    return ProfilePlan(selection, order,
                       {name: "conv" if isinstance(layers[name], nn.Conv2d) else "linear" for name in order},
                       {name: (output_channels(layers[name]), input_channels(layers[name])) for name in order},
                       weights_hash(model), shape, str(getattr(_dataset(data), "name", "")), samples_per_class,
                       outputs, batch_size)


@torch.no_grad()
def class_records(model: nn.Module, data: Dataset | DataLoader, plan: ProfilePlan,
                  progress: bool = False) -> Iterator[ClassRecord]:
    """The second half of `profile`: each asked class's sums, one class at a time, so that memory holds one
    batch and one class's sums whatever the number of classes. Under torchrun each process adds its share of a
    class's batches and the sums are all-reduced. The sums are kept in float64 on the model's device and
    brought to the CPU once per class."""
    layers = parameter_layers(model)
    device = runtime.device_of(model)
    selection = plan.selection
    sums: dict[str, torch.Tensor] = {}

    def accumulate(name: str):
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            batch = inputs[0]
            labels = torch.zeros(batch.shape[0], dtype=torch.long, device=batch.device)
            sums[name] += class_sums(module, batch, labels, 1)[0]
        return hook

    handles = [module.register_forward_pre_hook(accumulate(name)) for name, module in layers.items()]
    try:
        for row in track(range(len(selection.wanted)), "profiling", len(selection.wanted), progress):
            chosen = selection.labels == row
            positions = selection.positions[chosen]
            for name in plan.layers:
                sums[name] = torch.zeros(plan.sizes[name], dtype=torch.float64, device=device)
            batches, _ = _chosen_batches(data, positions, selection.labels[chosen], plan.batch_size, device)
            for images, _ in batches:
                model(images.to(device))
            for name in plan.layers:  # the same order in every process
                distributed.sum_(sums[name])
            yield ClassRecord(selection.wanted[row], selection.classes[row],
                              {name: sums[name].float().cpu() for name in plan.layers}, positions)
    finally:
        for handle in handles:
            handle.remove()


def from_records(plan: ProfilePlan, records: Iterator[ClassRecord]) -> Profile:
    """A profile in memory from its plan and its classes' records."""
    records = list(records)
    selection = plan.selection
    return Profile(contributions={name: torch.stack([record.sums[name] for record in records])
                                  for name in plan.layers},
                   layers=plan.layers, classes=selection.classes,
                   counts=torch.bincount(selection.labels, minlength=len(selection.classes)),
                   samples=selection.positions, sample_labels=selection.labels, model_hash=plan.model_hash,
                   input_shape=plan.input_shape, dataset=plan.dataset, samples_per_class=plan.samples_per_class,
                   notes=selection.notes, world_size=distributed.world_size(), kinds=plan.kinds,
                   positions=None if selection.wanted == list(range(plan.num_outputs)) else selection.wanted,
                   num_outputs=None if selection.wanted == list(range(plan.num_outputs)) else plan.num_outputs)


def as_records(profile: Profile) -> tuple[ProfilePlan, Iterator[ClassRecord]]:
    """A profile held in memory as a plan and its classes' records (what files are written from)."""
    positions = profile.output_positions
    selection = Selection(profile.samples, profile.sample_labels, list(profile.classes), list(profile.notes),
                          positions)
    plan = ProfilePlan(selection, list(profile.layers),
                       profile.kinds or {name: "linear" if name == profile.layers[-1] else "conv"
                                         for name in profile.layers},
                       {name: tuple(profile.contributions[name].shape[1:]) for name in profile.layers},
                       profile.model_hash, tuple(profile.input_shape), profile.dataset, profile.samples_per_class,
                       profile.outputs, 1)
    records = (ClassRecord(position, name, {layer: profile.contributions[layer][row] for layer in profile.layers},
                           profile.samples[profile.sample_labels == row])
               for row, (position, name) in enumerate(zip(positions, profile.classes)))
    return plan, records


def profile(model: nn.Module, data: Dataset | DataLoader, *, num_classes: int | None = None,
            classes: Sequence[str | int] | str | None = None, samples_per_class: int = 50, batch_size: int = 64,
            progress: bool = False) -> Profile:
    """Profile `model` on labelled `data` — any map-style dataset or DataLoader yielding (input, label), labels
    being the model's output positions (normally its training split); class names come from `data.classes`.
    `classes` (names or output positions): profile only those (default: all); only their samples are read where
    the data knows its labels, and memory holds one class's sums at a time."""
    plan = plan_profile(model, data, num_classes=num_classes, classes=classes, samples_per_class=samples_per_class,
                        batch_size=batch_size, progress=progress)
    for note in plan.selection.notes:
        warnings.warn(note, stacklevel=2)
    return from_records(plan, class_records(model, data, plan, progress))
