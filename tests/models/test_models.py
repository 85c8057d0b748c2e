"""The model zoo and torchvision adapter: shapes, errors, and prunability (no hard-coded sizes)."""

from __future__ import annotations

import math

import pytest
import torch
import torch_pruning as tp
from torch import nn

from modellego.errors import ModellegoError
from modellego.models import ZOO, build, model_names
from modellego.models.tv import build_torchvision

torch.manual_seed(0)

ZOO_NAMES = ["lenet5", "vgg11", "vgg16", "resnet18", "resnet50", "googlenet", "vit", "swin"]
CNN_NAMES = [name for name in ZOO_NAMES if name not in ("vit", "swin")]  # torch-pruning's structured pruning: the CNNs
SHAPE_CASES = [(n, 0.25) for n in ZOO_NAMES] + [
    ("lenet5", 1.0),
    ("torchvision:resnet18", 1.0),
    ("torchvision:mobilenet_v2", 0.25),
]


def _check_forward(model: nn.Module, in_channels: int, num_classes: int, sizes=(28, 32)) -> None:
    for size in sizes:
        x = torch.rand(2, in_channels, size, size)
        for train in (True, False):
            model.train(train)
            with torch.no_grad():
                y = model(x)
            assert isinstance(y, torch.Tensor), type(y)
            assert y.shape == (2, num_classes), (size, train, tuple(y.shape))


def test_zoo_names():
    assert model_names() == ZOO_NAMES
    assert set(ZOO) == set(ZOO_NAMES)


@pytest.mark.parametrize("in_channels", [1, 3])
@pytest.mark.parametrize("name,width", SHAPE_CASES)
def test_forward_shapes(name: str, width: float, in_channels: int):
    model = build(name, in_channels=in_channels, num_classes=7, width=width)
    _check_forward(model, in_channels, 7)


def test_width_rule():
    """Channel counts are max(1, round(c * width)) and the head follows the real feature count."""
    m = build("lenet5", 1, 10, 0.25)
    convs = [mod for mod in m.modules() if isinstance(mod, nn.Conv2d)]
    linears = [mod for mod in m.modules() if isinstance(mod, nn.Linear)]
    assert [c.out_channels for c in convs] == [2, 4]
    assert [lin.out_features for lin in linears] == [30, 21, 10]
    assert linears[0].in_features == 4 * 25
    tiny = build("vgg11", 1, 10, 0.001)
    assert all(c.out_channels == 1 for c in tiny.modules() if isinstance(c, nn.Conv2d))
    _check_forward(tiny, 1, 10, sizes=(28,))
    g = build("googlenet", 3, 10, 0.25)
    assert g.linear.in_features == 256  # 1024 * 0.25


@pytest.mark.parametrize("bad", ["foo", "", "torchvision:", "torchvision:nope", "Lenet5", "resnet18 "])
def test_unknown_names(bad: str):
    with pytest.raises(ModellegoError) as info:
        build(bad)
    msg = str(info.value)
    assert "\n" not in msg
    if not bad.startswith("torchvision:"):
        assert all(n in msg for n in ZOO_NAMES) and "torchvision:<builder>" in msg


def test_non_classifier_torchvision_refused():
    for builder in ("fasterrcnn_resnet50_fpn", "fcn_resnet50", "r3d_18", "raft_small"):
        with pytest.raises(ModellegoError):
            build(f"torchvision:{builder}")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"width": 0.0},
        {"width": -1.0},
        {"width": math.nan},
        {"width": math.inf},
        {"in_channels": 0},
        {"num_classes": 0},
        {"num_classes": -3},
    ],
)
@pytest.mark.parametrize("name", ["lenet5", "torchvision:mobilenet_v2"])
def test_bad_numbers(name: str, kwargs: dict):
    with pytest.raises(ModellegoError):
        build(name, **kwargs)


def test_torchvision_width_only_where_supported():
    with pytest.raises(ModellegoError, match="width"):
        build("torchvision:resnet18", width=0.5)
    with pytest.raises(ModellegoError):
        build_torchvision("resnet18", 3, 10, width=0.5)
    small = build("torchvision:mobilenet_v3_small", 1, 5, width=0.5)
    _check_forward(small, 1, 5, sizes=(32,))


def test_torchvision_first_conv_replaced():
    m = build("torchvision:resnet18", in_channels=1, num_classes=4)
    assert m.conv1.in_channels == 1
    assert (m.conv1.out_channels, m.conv1.kernel_size, m.conv1.stride, m.conv1.padding) == (64, (7, 7), (2, 2), (3, 3))
    assert m.conv1.bias is None
    assert sum(isinstance(mod, nn.Conv2d) and mod.in_channels == 1 for mod in m.modules()) == 1


def test_torchvision_googlenet_plain_tensor_in_train_mode():
    m = build("torchvision:googlenet", in_channels=1, num_classes=3)
    assert m.aux1 is None and m.aux2 is None
    _check_forward(m, 1, 3, sizes=(32,))


def _prune_first_conv(model: nn.Module, example: torch.Tensor) -> nn.Conv2d:
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=example)
    conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    n = max(1, conv.out_channels // 4)
    group = dg.get_pruning_group(conv, tp.prune_conv_out_channels, idxs=list(range(n)))
    group.prune()
    return conv


@pytest.mark.parametrize("name", CNN_NAMES)
def test_prunable_first_conv(name: str):
    model = build(name, in_channels=3, num_classes=7, width=0.25)
    before = next(m for m in model.modules() if isinstance(m, nn.Conv2d)).out_channels
    conv = _prune_first_conv(model, torch.rand(1, 3, 28, 28))
    assert conv.out_channels == before - max(1, before // 4)
    _check_forward(model, 3, 7)


@pytest.mark.parametrize("name", CNN_NAMES)
def test_prunable_everywhere(name: str):
    """25% of every prunable layer's channels (through flatten, concat and residual adds), head kept."""
    model = build(name, in_channels=1, num_classes=7, width=0.25)
    head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    before = sum(p.numel() for p in model.parameters())
    pruner = tp.pruner.MagnitudePruner(
        model,
        torch.rand(1, 1, 28, 28),
        importance=tp.importance.MagnitudeImportance(p=2),
        pruning_ratio=0.25,
        ignored_layers=[head],
    )
    pruner.step()
    assert sum(p.numel() for p in model.parameters()) < 0.8 * before
    assert head.out_features == 7
    _check_forward(model, 1, 7)
