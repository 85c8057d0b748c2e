"""Structures beyond the zoo, on tiny hand-built networks: BatchNorm after a concatenation in padded mode, grouped
convolutions (kept whole) in disassembly and assembly, LayerNorm rebuilt from stored shapes."""

from __future__ import annotations

import warnings
from collections import OrderedDict

import pytest
import torch
from torch import nn

from helpers import random_masks
from modellego import commands
from modellego.core.channels import ChannelGraph
from modellego.core.modules import Normalize
from modellego.core.shapes import conform
from modellego.data.spec import InputSpec
from modellego.errors import ModellegoError
from modellego.io.manifest import Brick, ClassRef, Manifest

SPEC = InputSpec(1, (12, 12), (0.5,), (0.25,))


class DenseBlock(nn.Module):
    """DenseNet's pattern: two branches concatenated, then BatchNorm on the concatenation, then a conv."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 6, 3, padding=1)
        self.left = nn.Conv2d(6, 5, 3, padding=1)
        self.right = nn.Conv2d(6, 4, 1)
        self.norm = nn.BatchNorm2d(15)
        self.mix = nn.Conv2d(15, 7, 3, padding=1)
        self.head = nn.Linear(7, 4)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.relu(self.norm(torch.cat([x, self.left(x), self.right(x)], 1)))
        return self.head(self.mix(x).mean((2, 3)))


class GroupedBlock(nn.Module):
    """ResNeXt/RegNet's pattern: a grouped conv (groups of 4 channels) between ordinary convs."""

    def __init__(self, norm: type[nn.Module] = nn.BatchNorm2d) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.norm = nn.BatchNorm2d(8) if norm is nn.BatchNorm2d else nn.GroupNorm(2, 8)
        self.expand = nn.Conv2d(8, 6, 1)
        self.head = nn.Linear(6, 4)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.relu(self.norm(self.grouped(x)))
        return self.head(torch.relu(self.expand(x)).mean((2, 3)))


def wrapped(network: nn.Module, seed: int) -> tuple[nn.Module, Manifest]:
    torch.manual_seed(seed)
    for module in network.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            nn.init.uniform_(module.weight, 0.5, 1.5)
            nn.init.uniform_(module.bias, -0.5, 0.5)
    model = nn.Sequential(OrderedDict(normalize=Normalize(SPEC.mean, SPEC.std), net=network)).eval()
    manifest = Manifest(architecture={"builder": "custom", "in_channels": 1, "num_classes": 4, "width": 1.0},
                        classes=[ClassRef(f"c{k}", "random", k) for k in range(4)], input=SPEC)
    return model, manifest


def components(network_type, seeds=(1, 2), keep=0.6):
    result = []
    for seed in seeds:
        model, manifest = wrapped(network_type(), seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cut = commands.component(Brick(model, manifest), random_masks(model, 4, keep=keep, seed=seed), [0, 1] if seed == 1 else [2, 3])
        result.append((cut.model, cut.manifest))
    return result


def test_batchnorm_after_a_concatenation_follows_the_interleaved_layout():
    members = components(DenseBlock)
    padded, _ = commands.assembly(members, "padded", scale_logits=False)
    parallel, _ = commands.assembly(members, "parallel", scale_logits=False)
    images = torch.rand(5, 1, 12, 12)
    with torch.no_grad():
        torch.testing.assert_close(padded(images), parallel(images), rtol=1e-5, atol=1e-5)


def test_channel_graph_maps_a_batchnorm_on_a_concatenation_to_its_producers():
    model, _ = wrapped(DenseBlock(), 0)
    feeds = {feed.producer: feed for feed in ChannelGraph(model, (1, 12, 12)).feeds("net.norm")}
    assert set(feeds) == {"net.stem", "net.left", "net.right"}
    for producer, offset, width in (("net.stem", 0, 6), ("net.left", 6, 5), ("net.right", 11, 4)):
        order = feeds[producer].inputs.argsort()
        assert torch.equal(feeds[producer].inputs[order], torch.arange(offset, offset + width))
        assert torch.equal(feeds[producer].channels[order], torch.arange(width))


def test_grouped_convolutions_stay_whole_and_reproduce_the_source():
    model, manifest = wrapped(GroupedBlock(), 0)
    images = torch.rand(3, 1, 12, 12)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kept = commands.component(Brick(model, manifest), random_masks(model, 4), [2, 0])
        cut = commands.component(Brick(model, manifest), random_masks(model, 4, keep=0.3, seed=3), [2, 0])
    with torch.no_grad():
        torch.testing.assert_close(kept.model(images), model(images)[:, [2, 0]])
    grouped = cut.model.net.grouped
    assert (grouped.in_channels, grouped.out_channels, grouped.groups) == (8, 8, 2)
    assert cut.model.net.expand.out_channels < 6  # channels away from the grouped conv are still pruned
    with torch.no_grad():
        assert cut.model(images).shape == (3, 2)


def test_grouped_convolutions_assemble_padded_equal_to_parallel():
    members = components(GroupedBlock, keep=0.4)
    padded, _ = commands.assembly(members, "padded", scale_logits=False)
    parallel, _ = commands.assembly(members, "parallel", scale_logits=False)
    assert padded.net.grouped.groups == 4
    images = torch.rand(5, 1, 12, 12)
    with torch.no_grad():
        torch.testing.assert_close(padded(images), parallel(images), rtol=1e-5, atol=1e-5)


def test_normalisation_across_channels_is_refused_in_padded_mode_only():
    members = components(lambda: GroupedBlock(nn.GroupNorm), keep=1.0)
    with pytest.raises(ModellegoError, match="GroupNorm normalises across channels.*--mode parallel"):
        commands.assembly(members, "padded", scale_logits=False)
    parallel, _ = commands.assembly(members, "parallel", scale_logits=False)
    assert parallel(torch.rand(2, 1, 12, 12)).shape == (2, 4)


def test_layer_norm_is_rebuilt_from_stored_shapes():
    model = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.GroupNorm(1, 6), nn.PReLU(6))
    conform(model, {"1.weight": torch.Size([3]), "1.bias": torch.Size([3]), "2.weight": torch.Size([3]),
                     "2.bias": torch.Size([3]), "3.weight": torch.Size([3]), "0.weight": torch.Size([3, 4]),
                     "0.bias": torch.Size([3])}, {})
    assert model[1].normalized_shape == (3,) and model[2].num_channels == 3 and model[3].num_parameters == 3
    assert model(torch.rand(2, 4)).shape == (2, 3)
