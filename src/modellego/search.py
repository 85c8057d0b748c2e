"""The α/β search (`--auto`): the smallest component whose accuracy on held-out training images of its task stays
within a budget of the source restricted to the task."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn
from torch.utils.data import Dataset

from modellego.data.subsets import SampleSubset, resolve_classes
from modellego.disassembly import disassemble
from modellego.errors import ModellegoError
from modellego.evaluate import count_flops, predict
from modellego.graph import ChannelGraph
from modellego.masks import Thresholds, locate
from modellego.profiles import Profile
from modellego.progress import track

SEARCH_ALPHAS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6)
SEARCH_BETAS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5)


@dataclass
class SearchResult:
    """The chosen component and thresholds, its validation accuracy, the accuracy it had to keep (`target`,
    from the restricted base on the same data), and every candidate tried (thresholds, accuracy, FLOPs)."""

    component: nn.Module
    thresholds: Thresholds
    accuracy: float
    target: float
    restricted_base: float
    candidates: list[dict] = field(default_factory=list)
    validation_samples: int = 0

    @property
    def met_target(self) -> bool:
        return self.accuracy >= self.target


def search_thresholds(model: nn.Module, profile: Profile, classes: str | Sequence[str | int], validation: Dataset,
                      max_drop: float = 1.0, alphas: Sequence[float] = SEARCH_ALPHAS,
                      betas: Sequence[float] = SEARCH_BETAS, progress: bool = False) -> SearchResult:
    """Search α/β for the smallest component (FLOPs) whose accuracy on `validation` (held-out *training* data
    of the task, labelled by the source model's outputs, see `validation_data`) stays within `max_drop` points of
    the restricted base on the same data; if none does, the most accurate, with a warning. Linear layers use the
    paper's offsets: α_fc = α + 0.1, β_fc = β + 0.1 (capped at 1)."""
    if not 0 <= max_drop <= 100:
        raise ModellegoError(f"max_drop is in accuracy points and must be between 0 and 100, got {max_drop}")
    task = resolve_classes(profile.classes, classes, "the model's classes")
    logits, labels = predict(model, validation)
    in_task = torch.full((len(profile.classes),), -1, dtype=torch.long)
    in_task[torch.tensor(task)] = torch.arange(len(task))
    labels = in_task[labels]
    if (labels < 0).any() or len(labels) == 0:
        raise ModellegoError("the validation data must hold samples of the task's classes only")
    restricted = (logits[:, torch.tensor(task)].argmax(1) == labels).float().mean().item()
    target = restricted - max_drop / 100
    shape = tuple(profile.input_shape)
    graph = ChannelGraph(model, shape)
    candidates, best = [], None
    grid = [(alpha, beta) for alpha in alphas for beta in betas]
    for alpha, beta in track(grid, "searching α/β", len(grid), progress):
        thresholds = Thresholds(alpha, beta, round(min(1.0, alpha + 0.1), 4), round(min(1.0, beta + 0.1), 4))
        masks = locate(model, profile, **thresholds.as_dict(), graph=graph)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            component = disassemble(model, masks, task, shape)
        accuracy = (predict(component, validation)[0].argmax(1) == labels).float().mean().item()
        flops = count_flops(component, shape)
        candidates.append({**thresholds.as_dict(), "accuracy": accuracy, "flops": flops})
        key = (accuracy < target, flops if accuracy >= target else -accuracy)
        if best is None or key < best[0]:
            best = (key, component, thresholds, accuracy)
    _, component, thresholds, accuracy = best
    if accuracy < target:
        warnings.warn(f"no α/β kept accuracy within {max_drop} points; chose the most accurate component",
                      stacklevel=2)
    return SearchResult(component, thresholds, accuracy, target, restricted, candidates, len(validation))


def validation_data(train_data: Dataset, classes: str | Sequence[str | int], exclude: torch.Tensor,
                    fraction: float = 0.1, seed: int = 0) -> SampleSubset:
    """Held-out training samples of the task's classes for `search_thresholds`: `fraction` of each class, drawn
    with `seed`, never one of the positions in `exclude` (the profile's samples). Never test data."""
    task = resolve_classes(train_data.classes, classes, "the model's classes")
    generator = torch.Generator().manual_seed(seed)
    allowed = torch.ones(len(train_data), dtype=torch.bool)
    allowed[exclude.long()] = False
    chosen = []
    for label in task:
        members = torch.nonzero((train_data.targets == label) & allowed).flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        chosen.append(members[: max(1, round(len(members) * fraction))])
    return SampleSubset(train_data, torch.cat(chosen).sort().values)
