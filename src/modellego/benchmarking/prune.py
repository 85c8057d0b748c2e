"""Structured-pruning baselines to compare components with: torch-pruning's FPGM and L1-magnitude filter
pruning, and HRank (the average rank of a filter's feature maps, Lin et al., CVPR 2020) written on
torch-pruning's importance interface; each pruned to a FLOPs budget by searching its pruning ratio."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import torch
import torch_pruning as tp
from torch import nn

from modellego.core.evaluate import count_flops
from modellego.core.layers import example_batch, head
from modellego.errors import ModellegoError

METHODS = ("fpgm", "l1", "hrank")
FLOPS_TOLERANCE = 0.02  # the search stops this close to the budget (relative)


@torch.no_grad()
def feature_map_ranks(model: nn.Module, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per Conv2d layer (by name), the rank of each output channel's H×W feature map, averaged over `images`
    (HRank's filter importance). The maps are the conv's own outputs."""
    convs = {name: module for name, module in model.named_modules() if isinstance(module, nn.Conv2d)}
    ranks: dict[str, torch.Tensor] = {}

    def record(name: str):
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            ranks[name] = torch.linalg.matrix_rank(output.double()).double().mean(0).float()
        return hook

    handles = [module.register_forward_hook(record(name)) for name, module in convs.items()]
    try:
        model.eval()
        model(images.to(next(model.parameters()).device))
    finally:
        for handle in handles:
            handle.remove()
    return ranks


class HRankImportance(tp.importance.Importance):
    """HRank on torch-pruning: a channel group's importance is the mean, over the group's convs whose output
    channels it removes, of those channels' average feature-map rank (`feature_map_ranks`). Groups without a
    conv (a hidden Linear layer) get no score, so torch-pruning leaves them whole: HRank ranks filters only."""

    def __init__(self, ranks: dict[nn.Module, torch.Tensor]) -> None:
        self.ranks = ranks

    @classmethod
    def for_model(cls, model: nn.Module, ranks_by_name: dict[str, torch.Tensor]) -> "HRankImportance":
        """The importance for `model` (e.g. a copy of the ranked model) from ranks keyed by layer name."""
        modules = dict(model.named_modules())
        return cls({modules[name]: value for name, value in ranks_by_name.items() if name in modules})

    @torch.no_grad()
    def __call__(self, group: tp.Group) -> torch.Tensor | None:
        total = torch.zeros(len(group[0].idxs))
        count = 0
        for item in group:
            layer, handler = item.dep.target.module, item.dep.handler
            if handler != tp.prune_conv_out_channels or layer not in self.ranks:
                continue
            if any(root is None for root in item.root_idxs):
                continue
            total.scatter_add_(0, torch.tensor(item.root_idxs), self.ranks[layer][list(item.idxs)])
            count += 1
        return total / count if count else None


def importance(method: str, model: nn.Module, ranks: dict[str, torch.Tensor] | None = None) -> tp.importance.Importance:
    """The importance criterion `method` ("fpgm", "l1" or "hrank") for `model`; HRank needs the ranks."""
    if method == "fpgm":
        return tp.importance.FPGMImportance(p=2)
    if method == "l1":
        return tp.importance.MagnitudeImportance(p=1)
    if method == "hrank":
        if ranks is None:
            raise ModellegoError("HRank needs feature-map ranks; compute them with feature_map_ranks(model, images)")
        return HRankImportance.for_model(model, ranks)
    raise ModellegoError(f"unknown pruning method {method!r}; choose one of {', '.join(METHODS)}")


def prune(model: nn.Module, input_shape: tuple[int, ...], criterion: tp.importance.Importance,
          ratio: float) -> nn.Module:
    """A pruned copy of `model`: every Conv2d/Linear group except the classifier loses `ratio` of its channels,
    the least important by `criterion` (torch-pruning's local pruning, one shot)."""
    pruned = copy.deepcopy(model).eval()
    example = example_batch(pruned, input_shape)
    _, classifier = head(pruned, input_shape)
    if isinstance(criterion, HRankImportance):  # the ranks are keyed by the original's modules
        names = {module: name for name, module in model.named_modules()}
        copied = dict(pruned.named_modules())
        criterion = HRankImportance({copied[names[module]]: value for module, value in criterion.ranks.items()
                                     if module in names})
    pruner = tp.pruner.MetaPruner(pruned, example, importance=criterion, pruning_ratio=ratio,
                                  ignored_layers=[classifier], global_pruning=False)
    pruner.step()
    return pruned


@dataclass
class Pruned:
    """`prune_to_flops`'s result: the pruned model, the ratio that made it, its FLOPs and the budget's."""

    model: nn.Module
    ratio: float
    flops: int
    budget: int

    @property
    def relative_error(self) -> float:
        return abs(self.flops - self.budget) / self.budget


def prune_to_flops(model: nn.Module, input_shape: tuple[int, ...], make_criterion: Callable[[nn.Module], tp.importance.Importance],
                   budget: int, tolerance: float = FLOPS_TOLERANCE, steps: int = 18) -> Pruned:
    """Prune `model` to about `budget` FLOPs (one image, `count_flops`): bisect the pruning ratio until the
    pruned model's FLOPs lie within `tolerance` of the budget (or `steps` tries), keeping the closest."""
    full = count_flops(model, input_shape)
    if not 0 < budget <= full:
        raise ModellegoError(f"the FLOPs budget must be positive and at most the model's {full:,}, got {budget:,}")
    low, high = 0.0, 0.99
    best: Pruned | None = None
    for _ in range(steps):
        ratio = (low + high) / 2
        candidate = prune(model, input_shape, make_criterion(model), ratio)
        flops = count_flops(candidate, input_shape)
        if best is None or abs(flops - budget) < abs(best.flops - budget):
            best = Pruned(candidate, ratio, flops, budget)
        if best.relative_error <= tolerance:
            break
        if flops > budget:
            low = ratio
        else:
            high = ratio
    return best


def matched(model: nn.Module, input_shape: tuple[int, ...], method: str, budget: int,
            images: torch.Tensor | None = None, tolerance: float = FLOPS_TOLERANCE) -> Pruned:
    """`model` pruned by `method` ("fpgm", "l1", "hrank") to `budget` FLOPs; HRank ranks its filters on
    `images` (a batch of training images)."""
    ranks = None
    if method == "hrank":
        if images is None:
            raise ModellegoError("HRank needs a batch of images to rank the feature maps on")
        ranks = feature_map_ranks(model, images)
    return prune_to_flops(model, input_shape, lambda m: importance(method, m, ranks), budget, tolerance)


__all__ = ["FLOPS_TOLERANCE", "HRankImportance", "METHODS", "Pruned", "feature_map_ranks", "importance", "matched", "prune",
           "prune_to_flops"]
