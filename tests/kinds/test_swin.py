"""torchvision's Swin Transformers (V1 and V2) as units (models/swin.py): the converted blocks compute what
torchvision's do and load its weights; dropping a head drops its part of the position bias (and V2's scale);
locating carries the stream features a class relies on back through PatchMerging (against a literal reference);
a cut's FLOPs are counted over windows."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils.data import TensorDataset
from torchvision.models.swin_transformer import PatchMergingV2, SwinTransformer, SwinTransformerBlockV2

import modellego as ml
from helpers import assert_planned_flops_are_counted, assert_units_vote_with, head_stream, reference_stream_before
from modellego.core.blocks import StreamLinear
from modellego.core.thresholds import PAPER
from modellego.core.tokens import locate_units
from modellego.models.swin import WindowAttention, WindowAttentionV2
from modellego.models.vit import from_torchvision, renamed_weights


def tiny_swin(seed: int = 0, classes: int = 4, version: int = 1, window: int = 4) -> torch.nn.Module:
    """Two stages (2 heads of 8, then 4 heads of 8), windows of `window`, a PatchMerging between them."""
    torch.manual_seed(seed)
    v2 = {"block": SwinTransformerBlockV2, "downsample_layer": PatchMergingV2} if version == 2 else {}
    model = SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 4],
                            window_size=[window, window], num_classes=classes, **v2).eval()
    with torch.no_grad():  # torchvision starts every head's V2 scale equal and every bias at 0 (V2's key bias too,
        for name, parameter in model.named_parameters():  # which it then ignores): make them differ, so that a
            if name.endswith(("logit_scale", "qkv.bias")):  # dropped head or a key bias not ignored shows
                parameter.uniform_(1.0, 3.0) if name.endswith("logit_scale") else parameter.normal_()
    return model


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("size", [16, 24, 32])  # a map the window covers (no shift), one padded, one exact
def test_converted_blocks_compute_what_torchvisions_compute_and_load_its_weights(size, version):
    source = tiny_swin(version=version)
    converted = from_torchvision(copy.deepcopy(source))
    attention = WindowAttentionV2 if version == 2 else WindowAttention
    assert [type(module) for module in converted.modules()].count(attention) == 4
    assert sum(isinstance(module, StreamLinear) for module in converted.modules()) == 1
    images = torch.randn(3, 3, size, size)
    with torch.no_grad():
        assert torch.allclose(converted(images), source(images), atol=1e-5)
    fresh = from_torchvision(tiny_swin(seed=1, version=version))
    fresh.load_state_dict(renamed_weights(fresh, source.state_dict()))
    with torch.no_grad():
        assert torch.allclose(fresh(images), source(images), atol=1e-5)


@pytest.mark.parametrize("version", [1, 2])
def test_dropping_a_head_drops_its_position_bias_and_computes_the_source_without_it(version):
    model = from_torchvision(tiny_swin(version=version))
    name = "features.3.1.attn"  # the second stage's shifted block: 4 heads
    source = dict(model.named_modules())[name]
    component = copy.deepcopy(model)
    attention = dict(component.named_modules())[name]
    attention.keep_heads(torch.tensor([0, 2, 3]))
    assert attention.heads == 3
    if version == 1:
        assert torch.equal(attention.relative_position_bias_table, source.relative_position_bias_table[:, [0, 2, 3]])
    else:
        assert torch.equal(attention.logit_scale, source.logit_scale[[0, 2, 3]])
        assert torch.equal(attention.cpb_mlp[2].weight, source.cpb_mlp[2].weight[[0, 2, 3]])
    d = source.head_dim
    assert torch.equal(attention.proj.weight, torch.cat([source.proj.weight[:, :d], source.proj.weight[:, 2 * d:]], 1))
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():  # the same as the source with head 1's output projection zeroed
        source.proj.weight[:, d:2 * d] = 0
        assert torch.allclose(component(images), model(images), atol=1e-5)


def labelled_by_itself(model: torch.nn.Module, count: int = 96) -> TensorDataset:
    images = torch.randn(count, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model.head.bias -= model(images).median(0).values
        labels = model(images).argmax(1)
    data = TensorDataset(images, labels)
    data.classes = [str(k) for k in range(model.head.out_features)]
    return data


@pytest.mark.parametrize("version", [1, 2])
def test_locating_carries_the_stream_back_through_patch_merging(version):
    model = from_torchvision(tiny_swin(version=version))
    profile = ml.profile(model, labelled_by_itself(model), samples_per_class=6)
    masks = locate_units(model, profile)
    alpha, beta = PAPER.pair("linear")
    count = len(profile.classes)
    after = head_stream(profile, "head")
    before = reference_stream_before(profile.relative("features.2.reduction"), after, alpha, beta, 4)
    assert before.shape == (count, 16) and after.shape == (count, 32)
    assert_units_vote_with(model, profile, masks, lambda unit: before if unit.module.startswith("features.1.") else after)


# V1 on maps of 8×8 and 4×4 in whole windows; V2 on the same maps padded to 9×9 and 6×6
@pytest.mark.parametrize("version,window", [(1, 4), (2, 3)])
def test_a_cuts_flops_are_counted_over_windows_and_the_component_runs(version, window):
    model = from_torchvision(tiny_swin(version=version, window=window))
    assert_planned_flops_are_counted(model, labelled_by_itself(model), [2, 0], samples_per_class=6)


@pytest.mark.parametrize("version", [1, 2])
def test_a_plain_torchvision_swin_is_told_to_convert(version):
    from modellego.core.support import check_supported

    with pytest.raises(ml.ModellegoError, match=r"ShiftedWindowAttention.*vit.from_torchvision\(model\)"):
        check_supported(tiny_swin(version=version), (3, 32, 32), "a Swin")
    check_supported(from_torchvision(tiny_swin(version=version)), (3, 32, 32), "a Swin")
