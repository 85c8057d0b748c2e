"""The support matrix: every torchvision classification builder either goes through the whole chain or is refused
up front with one line; the README's table says the same as the check does today."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import modellego
from helpers import assert_user_error, invoke
from modellego.benchmarking.selfcheck import check_builder, matrix_builders
from modellego.core import profile as profiles
from modellego.core.support import check_supported
from modellego.errors import ModellegoError
from modellego.models import build

README = Path(__file__).resolve().parents[2] / "README.md"
# One small builder of each family (and each kind of refusal), fast enough for `make test`.
FAST = ["lenet5", "googlenet", "torchvision:resnet18", "torchvision:densenet121", "torchvision:mobilenet_v3_small",
        "torchvision:efficientnet_b0", "torchvision:regnet_x_400mf", "torchvision:mnasnet0_5",
        "torchvision:convnext_tiny", "torchvision:alexnet", "torchvision:squeezenet1_1",
        "torchvision:shufflenet_v2_x0_5", "vit", "swin", "timm:resnet18",
        "timm:mixnet_s", "timm:cspresnet50", "timm:ecaresnet26t", "timm:hgnetv2_b0", "timm:poolformer_s12",
        "timm:rexnet_100"]
ALL = matrix_builders()
SLOW = [name for name in ALL if name not in FAST]


def readme_statuses() -> dict[str, str]:
    block = README.read_text().split("<!-- support-matrix:start -->")[1].split("<!-- support-matrix:end -->")[0]
    return {match[0]: match[1] for match in re.findall(r"^\| `([^`]+)` \| ([a-z ]+) \|", block, flags=re.M)}


def test_the_readme_table_lists_every_builder():
    assert set(readme_statuses()) == set(ALL)
    assert "failed" not in readme_statuses().values()


def _check(builder: str) -> None:
    result = check_builder(builder)
    assert result.status != "failed", result
    assert result.status == readme_statuses()[builder], (result, "rerun benchmarks/support_matrix.py")
    if result.status == "refused":
        assert "\n" not in result.detail and result.detail


@pytest.mark.parametrize("builder", FAST)
def test_builder_goes_through_the_chain_or_is_refused(builder):
    _check(builder)


@pytest.mark.slow
@pytest.mark.parametrize("builder", SLOW)
def test_every_other_builder(builder):
    _check(builder)


def test_refusal_comes_before_any_work(monkeypatch):
    model = build("torchvision:squeezenet1_1", 3, 4)
    monkeypatch.setattr(profiles, "select_samples", lambda *a, **k: pytest.fail("profiled an unsupported model"))
    images = torch.zeros(8, 3, 32, 32, dtype=torch.uint8)
    data = modellego.data.TensorImages("random", "train", images, torch.arange(8) % 4, list("abcd"), (0.5,) * 3,
                                       (0.25,) * 3)
    with pytest.raises(ModellegoError, match="its last layer to run, .* is a Conv2d"):
        modellego.profile(model, data, samples_per_class=1)


def test_input_size_a_model_needs_is_named():
    with pytest.raises(ModellegoError, match=r"cannot run on 3×28×28 .* 3×75×75"):
        check_supported(build("torchvision:inception_v3", 3, 4), (3, 28, 28), "torchvision:inception_v3")


def test_train_refuses_an_unsupported_builder_before_training(tmp_path):
    result = invoke("train", "--model", "torchvision:squeezenet1_1", "--data", "digits", "--out",
                    str(tmp_path / "m.safetensors"))
    assert_user_error(result, "squeezenet1_1 is not supported", "nn.Linear")
    assert not list(tmp_path.iterdir())


def test_a_profile_too_big_for_the_machine_is_refused_before_any_work(monkeypatch):
    from modellego.core import support

    model = build("lenet5", 1, 10)
    monkeypatch.setattr(support, "available_memory", lambda: 1000)
    monkeypatch.setattr(profiles, "select_samples", lambda *a, **k: pytest.fail("profiled past the memory check"))
    data = modellego.data.TensorImages("random", "train", torch.zeros(20, 1, 28, 28, dtype=torch.uint8),
                                       torch.arange(20) % 10, [str(k) for k in range(10)], (0.5,), (0.25,))
    with pytest.raises(ModellegoError, match=r"needs about .* GiB .* more than the .* available"):
        modellego.profile(model, data, samples_per_class=1)
    assert support.profile_bytes(model, 10) == 10 * 12 * sum(
        layer.weight.shape[0] * layer.weight.shape[1] for layer in model.modules()
        if isinstance(layer, (torch.nn.Conv2d, torch.nn.Linear)))


@pytest.mark.parametrize("bias", [True, False])
def test_balancing_a_head_makes_every_class_predicted_without_changing_its_architecture(bias):
    """The support check labels random images by a head pointed at its inputs' principal directions and
    nudged until every class is predicted; a head without a bias (MaxViT's) is nudged along its inputs' mean."""
    from modellego.benchmarking.selfcheck import balance_head

    torch.manual_seed(0)
    inputs = 0.1 * torch.randn(64, 12) + torch.linspace(0.5, 2.0, 12)  # a mean far from 0 against the spread
    head = torch.nn.Linear(12, 6, bias=bias)
    with torch.no_grad():
        labels = balance_head(head, inputs, per_class=4)
    assert torch.bincount(labels, minlength=6).min() >= 4
    assert (head.bias is None) == (not bias)
