"""Views of a dataset: some of its classes with labels renumbered, balanced slices and held-out splits (the
sample views themselves are the core's `SampleSubset` and `resolve_classes`)."""

from __future__ import annotations

from typing import Sequence

import torch
from torch.utils.data import Dataset

from modellego.core.samples import SampleSubset, resolve_classes, task_labels


def select_classes(dataset: Dataset, selection: str | Sequence[str | int]) -> SampleSubset:
    """The samples of the chosen classes, relabelled 0..n-1 in the order the classes were given."""
    indices = resolve_classes(dataset.classes, selection, f"'{dataset.name}'")
    new_targets = task_labels(dataset.targets, indices, len(dataset.classes))
    positions = torch.nonzero(new_targets >= 0).flatten()
    return SampleSubset(dataset, positions, new_targets[positions], [dataset.classes[i] for i in indices],
                        [dataset.class_indices[i] for i in indices])


def per_class_slice(dataset: Dataset, per_class: int, seed: int = 0) -> SampleSubset:
    """At most `per_class` samples of every class, drawn with a fixed seed (small, balanced test sets)."""
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for label in range(len(dataset.classes)):
        members = torch.nonzero(dataset.targets == label).flatten()
        chosen.append(members[torch.randperm(len(members), generator=generator)[:per_class]])
    positions = torch.cat(chosen).sort().values
    return SampleSubset(dataset, positions)


def holdout_split(dataset: Dataset, fraction: float, seed: int = 0) -> tuple[SampleSubset, SampleSubset]:
    """Split into (rest, held-out) with `fraction` of every class held out, for validation on training data."""
    generator = torch.Generator().manual_seed(seed)
    kept, held = [], []
    for label in range(len(dataset.classes)):
        members = torch.nonzero(dataset.targets == label).flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        cut = int(round(len(members) * fraction))
        held.append(members[:cut])
        kept.append(members[cut:])
    return SampleSubset(dataset, torch.cat(kept).sort().values), SampleSubset(dataset, torch.cat(held).sort().values)
