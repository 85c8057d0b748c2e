"""The data of a model's task: for each of its outputs, that class's samples, labelled by output position."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import torch
from torch.utils.data import Dataset

from modellego.core.samples import SampleSubset, resolve_classes
from modellego.data.datasets import RESIZABLE, load
from modellego.errors import ModellegoError
from modellego.io.manifest import provenance_records

if TYPE_CHECKING:
    from modellego.io.manifest import ClassRef, Manifest


@dataclass
class DataOptions:
    """Where a command reads a model's data: the folder (`root`), an image size for resizable datasets, and
    whether CIFAR checksums are verified. None / True: what the model file recorded, else the defaults."""

    root: str | os.PathLike | None = None
    image_size: int | None = None
    verify: bool = True


class TaskData(Dataset):
    """Samples of several named datasets, relabelled to a model's outputs (label = output position)."""

    def __init__(self, parts: list[SampleSubset], classes: list[str]) -> None:
        self.parts = parts
        self.classes = classes
        self.targets = torch.cat([part.targets for part in parts]) if parts else torch.zeros(0, dtype=torch.long)
        self.offsets = torch.cumsum(torch.tensor([0] + [len(part) for part in parts]), 0)
        self.name = "+".join(part.name for part in parts)
        self.split = parts[0].split if parts else "test"
        self.spec = parts[0].spec if parts else None
        self.class_indices = list(range(len(classes)))

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        part = int(torch.searchsorted(self.offsets, index, right=True)) - 1
        image, _ = self.parts[part][index - int(self.offsets[part])]
        return image, int(self.targets[index])

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, int]]:
        index = torch.as_tensor(indices, dtype=torch.long)
        owners = torch.searchsorted(self.offsets, index, right=True) - 1
        images: list[torch.Tensor | None] = [None] * len(indices)
        for part in owners.unique().tolist():
            slots = torch.nonzero(owners == part).flatten()
            local = (index[slots] - self.offsets[part]).tolist()
            for slot, (image, _) in zip(slots.tolist(), self.parts[part].__getitems__(local)):
                images[slot] = image
        return list(zip(images, self.targets[index].tolist()))


def data_root_hints(provenance: dict) -> dict[str, str]:
    """The data roots a model's lineage was trained from, by dataset name (components and assemblies carry
    their sources' provenance, so these are found at any depth; the outermost record of a dataset wins)."""
    hints: dict[str, str] = {}
    for record in provenance_records(provenance):
        if isinstance(record.get("dataset"), str) and isinstance(record.get("data_root"), str):
            hints.setdefault(record["dataset"], record["data_root"])
    return hints


def resolve_root(dataset: str, root: str | os.PathLike | None, hint: str | None) -> str | os.PathLike | None:
    """Where to read `dataset` from: an explicit `root` first, then `$MODELLEGO_DATA_ROOT/<dataset>` when it
    exists, then `hint` (the folder a model was trained from) when it exists; None means the default location."""
    if root is not None:
        return root
    env = os.environ.get("MODELLEGO_DATA_ROOT")
    if env and (Path(env) / dataset).exists():
        return None  # `load` reads it there
    if hint and Path(hint).is_dir():
        return hint
    return None


def task_data(classes: "Manifest | Sequence[ClassRef]", split: str, root: str | os.PathLike | None = None, dataset: str | None = None,
              only: str | Sequence[str | int] | None = None, image_size: int | None = None,
              verify: bool = True) -> TaskData:
    """The `split` samples of a model's classes, labelled by output position. `classes` is the model's
    Manifest (then the data roots it was trained from and its input size are the defaults) or a list of ClassRef.

    `dataset` evaluates on another dataset whose class names match the model's (e.g. mnist for a digits
    model); `only` keeps a subset of the model's classes (names or output positions), labels unchanged.
    `root` is where the (single) dataset lives; `image_size` and `verify` go to `load`.
    """
    hints: dict[str, str] = {}
    default_size = None
    if hasattr(classes, "provenance"):  # a Manifest
        hints = data_root_hints(classes.provenance)
        height, width = classes.input.size
        default_size = height if height == width else None
        classes = classes.classes
    names = [ref.name for ref in classes]
    keep = range(len(classes)) if only is None else resolve_classes(names, only, "this model's classes")
    by_dataset: dict[str, list[tuple[int, int]]] = {}
    loaded: dict[str, Dataset] = {}
    for position in keep:
        ref = classes[position]
        source = dataset or ref.dataset
        if source not in loaded:
            size = image_size if image_size is not None else (default_size if source in RESIZABLE else None)
            loaded[source] = load(source, split, resolve_root(source, root, hints.get(source)), image_size=size,
                                  verify=verify)
        same = dataset is None or dataset == ref.dataset  # `--data` naming the model's own dataset changes nothing
        if same and source in RESIZABLE:  # folders: a class is its folder's name, wherever it sorts
            matches = [i for i, name in enumerate(loaded[source].classes) if name == ref.name]
            if not matches:
                raise ModellegoError(f"'{source}' has no folder of this model's class {ref.name!r}; its folders are "
                                     f"{', '.join(loaded[source].classes[:10])}{' …' if len(loaded[source].classes) > 10 else ''}"
                                     " (--data-root names where they are)")
            index = matches[0]
        elif same:
            index = ref.index
            if not 0 <= index < len(loaded[source].classes):
                raise ModellegoError(f"this model's class {ref.name!r} has index {index} in '{source}', which has "
                                     f"classes 0..{len(loaded[source].classes) - 1}; the model file is damaged")
        else:  # the same name, else the one name that differs only in case ("Cardigan" the dog, "cardigan")
            matches = [i for i, name in enumerate(loaded[source].classes) if name == ref.name] or \
                [i for i, name in enumerate(loaded[source].classes) if name.lower() == ref.name.lower()]
            if len(matches) > 1:
                raise ModellegoError(f"dataset '{source}' has {len(matches)} classes named like {ref.name!r} but "
                                     "differing in case; name the class exactly as the dataset does")
            if not matches:
                raise ModellegoError(f"dataset '{source}' has no class named {ref.name!r}, which this model predicts")
            index = matches[0]
        by_dataset.setdefault(source, []).append((index, position))
    parts = []
    for source, pairs in by_dataset.items():
        data = loaded[source]
        relabel = torch.full((len(data.classes),), -1, dtype=torch.long)
        for index, position in pairs:
            if relabel[index] >= 0:  # two of the model's classes read from one class of the data: refused
                raise ModellegoError(f"the model's classes {names[int(relabel[index])]!r} and {names[position]!r} "
                                     f"both match class {data.classes[index]!r} of '{source}'")
            relabel[index] = position
        targets = relabel[data.targets]
        positions = torch.nonzero(targets >= 0).flatten()
        parts.append(SampleSubset(data, positions, targets[positions], names))
    return TaskData(parts, names)
