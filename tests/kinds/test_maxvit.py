"""torchvision's MaxViT as units (models/maxvit.py): the converted model computes what torchvision's does and loads
its weights; dropping a head drops its position-bias column; locating carries the stream mask back through the
classifier's hidden Linear and each stage's shortcut convolution (against a literal reference); a cut's FLOPs
are the built component's."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils.data import TensorDataset
from torchvision.models.maxvit import MaxVit

import modellego as ml
from helpers import assert_planned_flops_are_counted, assert_units_vote_with, head_stream, reference_stream_before
from modellego.core.blocks import StreamConv2d, StreamLinear
from modellego.core.support import check_supported
from modellego.core.thresholds import PAPER
from modellego.core.tokens import locate_units
from modellego.models.maxvit import PartitionAttention, PartitionMLP
from modellego.models.vit import from_torchvision, renamed_weights


def tiny_maxvit(seed: int = 0, classes: int = 4) -> torch.nn.Module:
    """A 2-px stem, then two stages (16 and 32 channels, 2 and 4 heads of 8; one and two layers), partitions of 4
    on 32-px images. torchvision starts every weight at std 0.02: larger ones make differences show."""
    torch.manual_seed(seed)
    model = MaxVit(input_size=(32, 32), stem_channels=8, partition_size=4, block_channels=[16, 32],
                   block_layers=[1, 2], head_dim=8, stochastic_depth_prob=0.0, num_classes=classes).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(("weight", "bias", "table")) and parameter.dim() != 1 or name.endswith("bias"):
                parameter.normal_(0, 0.3)
    return model


def images(count: int = 3) -> torch.Tensor:
    return torch.randn(count, 3, 32, 32, generator=torch.Generator().manual_seed(2))


def test_the_converted_model_computes_what_torchvisions_computes_and_loads_its_weights():
    source = tiny_maxvit()
    converted = from_torchvision(copy.deepcopy(source))
    kinds = [type(module) for module in converted.modules()]
    assert kinds.count(PartitionAttention) == kinds.count(PartitionMLP) == 6
    assert kinds.count(StreamConv2d) == 2 and kinds.count(StreamLinear) == 1
    with torch.no_grad():
        expected = source(images())
        assert expected.abs().max() > 0.1
        assert torch.allclose(converted(images()), expected, atol=1e-5, rtol=1e-4)
    fresh = from_torchvision(tiny_maxvit(seed=1))
    fresh.load_state_dict(renamed_weights(fresh, source.state_dict()))
    with torch.no_grad():
        assert torch.allclose(fresh(images()), expected, atol=1e-5, rtol=1e-4)


def test_dropping_a_head_drops_its_bias_column_and_computes_the_source_without_it():
    model = from_torchvision(tiny_maxvit())
    name = "blocks.1.layers.1.layers.grid_attention.attn_layer.1"  # 4 heads
    source = dict(model.named_modules())[name]
    component = copy.deepcopy(model)
    attention = dict(component.named_modules())[name]
    attention.keep_heads(torch.tensor([0, 1, 3]))
    assert attention.heads == 3 and attention.scale == source.scale
    assert torch.equal(attention.relative_position_bias_table, source.relative_position_bias_table[:, [0, 1, 3]])
    d = source.head_dim
    with torch.no_grad():  # the same as the source with head 2's output projection zeroed
        source.proj.weight[:, 2 * d:3 * d] = 0
        assert torch.allclose(component(images()), model(images()), atol=1e-5, rtol=1e-4)


def labelled_by_itself(model: torch.nn.Module, count: int = 96) -> TensorDataset:
    """Random images labelled by `model`'s own predictions, its head given a bias (torchvision's has none) shifted
    so that every class is predicted: profiling needs correct samples of each class."""
    inputs = torch.randn(count, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    head = model.classifier[-1]
    biased = torch.nn.Linear(head.in_features, head.out_features)
    with torch.no_grad():
        biased.weight.copy_(head.weight)
        biased.bias.zero_()
        model.classifier[-1] = biased
        biased.bias -= model(inputs).median(0).values
        labels = model(inputs).argmax(1)
    data = TensorDataset(inputs, labels)
    data.classes = [str(k) for k in range(head.out_features)]
    return data


def test_locating_carries_the_stream_back_through_the_hidden_linear_and_the_stage_shortcut():
    model = from_torchvision(tiny_maxvit())
    data = labelled_by_itself(model)
    profile = ml.profile(model, data, samples_per_class=3)
    masks = locate_units(model, profile)
    alpha, beta = PAPER.pair("linear")
    count = len(profile.classes)
    hidden = head_stream(profile, "classifier.5")
    second = reference_stream_before(profile.relative("classifier.3"), hidden, alpha, beta)
    first = reference_stream_before(profile.relative("blocks.1.layers.0.layers.MBconv.proj.1"), second, alpha, beta)
    assert second.shape == (count, 32) and first.shape == (count, 16)
    assert_units_vote_with(model, profile, masks, lambda unit: first if unit.module.startswith("blocks.0.") else second)


def test_a_cuts_flops_are_the_components_and_the_component_runs():
    model = from_torchvision(tiny_maxvit())
    assert_planned_flops_are_counted(model, labelled_by_itself(model), [1, 3], samples_per_class=3)


def test_a_plain_torchvision_maxvit_is_told_to_convert():
    with pytest.raises(ml.ModellegoError, match=r"PartitionAttentionLayer.*vit.from_torchvision\(model\)"):
        check_supported(tiny_maxvit(), (3, 32, 32), "a MaxViT")
    check_supported(from_torchvision(tiny_maxvit()), (3, 32, 32), "a MaxViT")
