"""Views of labelled data the method works on: some samples of a dataset (labels renumbered or not), class
selections by name or position, and labels renumbered to a task's classes."""

from __future__ import annotations

from typing import Sequence

import torch
from torch.utils.data import Dataset

from modellego.errors import ModellegoError


class SampleSubset(Dataset):
    """The samples of `dataset` at `positions`, keeping its classes, spec and (remapped) targets."""

    def __init__(self, dataset: Dataset, positions: torch.Tensor, targets: torch.Tensor | None = None,
                 classes: list[str] | None = None, class_indices: list[int] | None = None) -> None:
        self.dataset = dataset
        self.positions = positions.long()
        self.targets = dataset.targets[self.positions] if targets is None else targets.long()
        self.classes = list(getattr(dataset, "classes", []) if classes is None else classes)
        # The class indices of the underlying named dataset, one per class of this view.
        self.class_indices = list(getattr(dataset, "class_indices", range(len(self.classes)))
                                  if class_indices is None else class_indices)
        self.name = getattr(dataset, "name", "")
        self.split = getattr(dataset, "split", "")
        self.spec = getattr(dataset, "spec", None)
        self.root = getattr(dataset, "root", None)

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, _ = self.dataset[int(self.positions[index])]
        return image, int(self.targets[index])

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, int]]:
        index = torch.as_tensor(indices, dtype=torch.long)
        inner = self.positions[index].tolist()
        if hasattr(self.dataset, "__getitems__"):
            images = [image for image, _ in self.dataset.__getitems__(inner)]
        else:
            images = [self.dataset[position][0] for position in inner]
        return list(zip(images, self.targets[index].tolist()))


def resolve_classes(classes: Sequence[str], selection: str | Sequence[str | int], dataset: str = "dataset") -> list[int]:
    """Turn 'Trouser,Bag', '0,1,2' or a list of names/indices into class indices, in the order given.

    Names match exactly, else case-insensitively (ImageNet has both "Cardigan" and "cardigan"), and win over
    indices (digits' names are their indices anyway).
    """
    items = [part.strip() for part in selection.split(",")] if isinstance(selection, str) else list(selection)
    items = [item for item in items if not (isinstance(item, str) and item == "")]
    if not items:
        raise ModellegoError("no classes given; name at least one class, e.g. --classes 0,1")
    exact = {name: position for position, name in enumerate(classes)}
    lowered: dict[str, list[int]] = {}
    for position, name in enumerate(classes):
        lowered.setdefault(name.lower(), []).append(position)
    indices: list[int] = []
    for item in items:
        if isinstance(item, str) and item in exact:
            index = exact[item]
        elif isinstance(item, str) and item.lower() in lowered:
            matches = lowered[item.lower()]
            if len(matches) > 1:
                raise ModellegoError(f"class {item!r} matches {', '.join(repr(classes[k]) for k in matches)} in "
                                     f"{dataset}; write it exactly as one of them")
            index = matches[0]
        elif isinstance(item, int) or (isinstance(item, str) and item.lstrip("-").isdigit()):
            index = int(item)
            if not 0 <= index < len(classes):
                shown = ", ".join(f"{k}: {name!r}" for k, name in enumerate(classes[:20])) + \
                    (", ..." if len(classes) > 20 else "")
                raise ModellegoError(f"class index {index} is out of range: {dataset} has {len(classes)} classes, "
                                     f"numbered by position 0..{len(classes) - 1} ({shown}); name a class by its "
                                     "name or its position")
        else:
            shown = ", ".join(repr(name) for name in classes[:20]) + (", ..." if len(classes) > 20 else "")
            raise ModellegoError(f"class {item!r} is not in {dataset}; its classes are {shown}")
        if index in indices:
            raise ModellegoError(f"class {classes[index]!r} is named twice")
        indices.append(index)
    return indices


def task_labels(labels: torch.Tensor, task: Sequence[int], num_classes: int) -> torch.Tensor:
    """`labels` (a model's output positions, 0..num_classes−1) renumbered to positions in `task` (a component's
    classes, in its order); −1 for a label outside the task."""
    in_task = torch.full((num_classes,), -1, dtype=torch.long)
    in_task[torch.as_tensor(list(task), dtype=torch.long)] = torch.arange(len(task))
    return in_task[labels.long()]
