"""Pruning baselines: HRank's importance is the feature-map rank computed directly, and the matched-FLOPs
search lands within 5% of its budget for every method."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch_pruning as tp
from torch import nn

from modellego.benchmarking.prune import METHODS, HRankImportance, feature_map_ranks, matched
from modellego.core.evaluate import count_flops
from modellego.data.spec import InputSpec
from modellego.errors import ModellegoError
from modellego.models.classifier import classifier


class SmallConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 5, 3, padding=1)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)).mean((2, 3)))


def test_hrank_importance_is_the_direct_feature_map_rank():
    torch.manual_seed(0)
    model = SmallConv().eval()
    with torch.no_grad():  # channel 1 gives rank-1 maps (constant per row: a kernel that only sees a constant)
        model.conv.weight[1] = 0.0
        model.conv.bias[1] = 0.5
    images = torch.rand(4, 2, 6, 6)
    images[:, :, :, :] = images[:, :, :, :1]  # every row constant → low-rank inputs for some maps
    images += torch.rand(4, 2, 6, 6) * torch.tensor([1.0, 0.0]).view(1, 2, 1, 1)
    ranks = feature_map_ranks(model, images)
    with torch.no_grad():
        maps = model.conv(images).numpy()
    direct = np.array([[np.linalg.matrix_rank(maps[n, c]) for c in range(5)] for n in range(4)]).mean(0)
    assert np.allclose(ranks["conv"].numpy(), direct)
    assert ranks["conv"][1] == 1.0
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=torch.zeros(1, 2, 6, 6))
    group = graph.get_pruning_group(model.conv, tp.prune_conv_out_channels, idxs=[0, 1, 2, 3, 4])
    scores = HRankImportance.for_model(model, ranks)(group)
    assert torch.allclose(scores, torch.tensor(direct, dtype=torch.float32))


def test_hrank_needs_its_ranks():
    with pytest.raises(ModellegoError, match="images"):
        matched(SmallConv(), (2, 6, 6), "hrank", 100)


@pytest.mark.parametrize("method, share", list(zip(METHODS, (0.6, 0.35, 0.5))))
def test_matched_flops_lands_within_five_percent(method, share):
    torch.manual_seed(1)
    spec = InputSpec(1, (28, 28), (0.5,), (0.5,))
    model = classifier("vgg11", spec, 10, 0.125).eval()
    full = count_flops(model, (1, 28, 28))
    budget = int(full * share)
    result = matched(model, (1, 28, 28), method, budget, images=torch.rand(8, 1, 28, 28))
    assert abs(result.flops - budget) <= 0.05 * budget, (method, share, result.flops, budget)
    assert result.flops == count_flops(result.model, (1, 28, 28))
    assert result.model(torch.rand(2, 1, 28, 28)).shape == (2, 10)
