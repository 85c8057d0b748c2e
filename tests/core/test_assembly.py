"""Assembling: padded equals parallel on every architecture, scaling, shared classes, files, refusals."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import modellego
from helpers import DIGITS, FASHION, random_classifier, random_masks
from modellego import commands
from modellego.data.spec import InputSpec
from modellego.errors import ModellegoError
from modellego.io.manifest import Brick

ARCHITECTURES = [("lenet5", 1.0), ("vgg16", 0.125), ("resnet18", 0.125), ("resnet50", 0.0625),
                 ("googlenet", 0.125), ("torchvision:mobilenet_v2", 0.25)]


def component(builder: str, width: float, spec: InputSpec, dataset: str, task: str, seed: int):
    model, manifest = random_classifier(builder, width, 5, seed=seed, spec=spec, dataset=dataset)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cut = commands.component(Brick(model, manifest), random_masks(model, 5, keep=0.5, seed=seed), task)
    return cut.model, cut.manifest


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-12)).item()


@pytest.mark.parametrize("builder, width", ARCHITECTURES)
def test_padded_equals_parallel_before_finetuning(builder, width, tmp_path):
    first = component(builder, width, FASHION, "fashion-mnist", "c0,c3", seed=1)
    second = component(builder, width, DIGITS, "digits", "c4,c1,c2", seed=2)
    padded, manifest = commands.assembly([first, second], "padded", scale_logits=False)
    parallel, parallel_manifest = commands.assembly([first, second], "parallel", scale_logits=False)
    manifests = {"padded": manifest, "parallel": parallel_manifest}
    images = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        expected = torch.cat([first[0](images), second[0](images)], 1)
        assert relative_error(parallel(images), expected) < 1e-6
        assert relative_error(padded(images), expected) < 1e-4
    assert [(ref.dataset, ref.name) for ref in manifest.classes] == [
        ("fashion-mnist", "c0"), ("fashion-mnist", "c3"), ("digits", "c4"), ("digits", "c1"), ("digits", "c2")]
    # One dense network: each layer is as wide as the components' layers together.
    convs = [m for m in padded.modules() if isinstance(m, nn.Conv2d)]
    first_convs = [m for m in first[0].modules() if isinstance(m, nn.Conv2d)]
    second_convs = [m for m in second[0].modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [a.out_channels + b.out_channels for a, b in zip(first_convs, second_convs)]
    for name, model in (("padded", padded), ("parallel", parallel)):
        modellego.save(model, tmp_path / f"{name}.safetensors", manifests[name])
        reloaded, again = modellego.load(tmp_path / f"{name}.safetensors")
        with torch.no_grad():
            assert torch.equal(reloaded(images), model(images))
        assert again.kind == "assembly"


def test_shared_classes_get_one_output_with_the_max_logit():
    first = component("lenet5", 1.0, FASHION, "fashion-mnist", "c0,c1", seed=1)
    second = component("lenet5", 1.0, FASHION, "fashion-mnist", "c1,c2", seed=2)
    for mode in ("padded", "parallel"):
        model, manifest = commands.assembly([first, second], mode, scale_logits=False)
        assert manifest.class_names == ["c0", "c1", "c2"]
        images = torch.rand(4, 1, 28, 28)
        with torch.no_grad():
            a, b, merged = first[0](images), second[0](images), model(images)
        torch.testing.assert_close(merged[:, 1], torch.maximum(a[:, 1], b[:, 0]), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(merged[:, 2], b[:, 1], rtol=1e-4, atol=1e-5)


class Labelled(torch.utils.data.Dataset):
    def __init__(self, images, labels):
        self.images, self.targets = images, labels
        self.classes = ["a", "b"]

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, index):
        return self.images[index], int(self.targets[index])


def test_scaling_divides_each_row_by_its_mean_top_logit():
    model, manifest = component("lenet5", 1.0, FASHION, "fashion-mnist", "c0,c3", seed=4)
    images = torch.rand(64, 1, 28, 28)
    head = model.net.classifier[-1]
    with torch.no_grad():  # both classes predicted, all logits positive: the case scaling is for
        logits = model(images)
        head.bias[1] += (logits[:, 0] - logits[:, 1]).median() + 1e-4
        head.bias += 1.0 - model(images).min()
        logits = model(images)
    assert 10 < (logits.argmax(1) == 1).sum() < 54
    labels = logits.argmax(1).clone()
    labels[:5] = 1 - labels[:5]  # a few wrong labels: they must not count
    scaled, scaled_manifest = commands.scaled(Brick(model, manifest), Labelled(images, labels))
    factors = []
    for k in range(2):
        chosen = (labels == k) & (logits.argmax(1) == k)
        factors.append(1 / logits[chosen, k].mean().item())
    assert scaled_manifest.provenance["scaled"]["factors"] == pytest.approx(factors, rel=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(scaled(images), logits * torch.tensor(factors), rtol=1e-4, atol=1e-5)


def test_refusals():
    first = component("lenet5", 1.0, FASHION, "fashion-mnist", "c0,c1", seed=1)
    other = component("resnet18", 0.125, FASHION, "fashion-mnist", "c2", seed=2)
    with pytest.raises(ModellegoError, match="at least two"):
        commands.assembly([first], scale_logits=False)
    with pytest.raises(ModellegoError, match="--mode parallel"):
        commands.assembly([first, other], "padded", scale_logits=False)
    model, _ = commands.assembly([first, other], "parallel", scale_logits=False)
    assert model(torch.rand(2, 1, 28, 28)).shape == (2, 3)
    big = component("lenet5", 1.0, InputSpec(3, (32, 32), (0.5,) * 3, (0.25,) * 3), "cifar10", "c0", seed=3)
    with pytest.raises(ModellegoError, match="different inputs"):
        commands.assembly([first, big], "parallel", scale_logits=False)
    with pytest.raises(ModellegoError, match="mode"):
        commands.assembly([first, first], "stacked", scale_logits=False)
    nested = commands.assembly([first, first], "padded", scale_logits=False)
    with pytest.raises(ModellegoError, match="not assemblies"):
        commands.assembly([nested, first], "padded", scale_logits=False)
    combined, _ = commands.assembly([nested, other], "parallel", scale_logits=False)
    assert combined(torch.rand(2, 1, 28, 28)).shape == (2, 3)
