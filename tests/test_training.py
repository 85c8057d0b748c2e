"""Training that learns: BatchNorm statistics re-estimated after training, and a warning at chance level."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from modellego import data
from modellego.core.reconstruct import batchnorm_levels, reestimate_batchnorm
from modellego.kinds.cnn import train_model
from modellego.models.classifier import classifier
from modellego.train import train, training_accuracy


@pytest.fixture(scope="module")
def small_train(fashion_train):
    return data.per_class_slice(fashion_train, 30, seed=1)


def test_reestimation_turns_lagging_statistics_into_the_real_ones(small_train):
    model = classifier("vgg11", small_train.spec, 10, 0.125)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = 0.01  # MobileNetV3's: the running statistics lag the weights badly
    train(model, small_train, 2, lr=3e-3, batch_size=16, progress=False)
    stale = training_accuracy(model, small_train)
    used = reestimate_batchnorm(model, small_train, batch_size=100)
    fresh = training_accuracy(model, small_train)
    assert used == 300
    assert fresh.accuracy > stale.accuracy + 0.3 and fresh.accuracy > 2 * fresh.chance, (stale, fresh)
    # The first BN layer's statistics are those of its input over the same 300 images, computed by hand.
    first_bn = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    images = torch.stack([small_train[i][0] for i in range(len(small_train))])
    with torch.no_grad():
        features = model.net.features[0](model.normalize(images))
    mean = features.mean(dim=(0, 2, 3))
    variance = features.var(dim=(0, 2, 3))
    assert torch.allclose(first_bn.running_mean, mean, atol=1e-4, rtol=1e-4)
    assert torch.allclose(first_bn.running_var, variance, rtol=1e-4)
    assert first_bn.momentum == 0.01 and not model.training


def few_classes_network() -> nn.Module:
    """A small BatchNorm network with BatchNorm at several depths, a branch and a BatchNorm1d."""
    torch.manual_seed(0)

    class Branched(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
            self.left = nn.Sequential(nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8))
            self.right = nn.Sequential(nn.Conv2d(8, 8, 1, stride=2), nn.BatchNorm2d(8))
            self.head = nn.Sequential(nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 16),
                                      nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.stem(x)
            return self.head(self.left(x) + self.right(x))

    return Branched().eval()


def statistics_layer_by_layer(model: nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
    """The obviously correct reference: for each BatchNorm in execution order, run all images at once in eval
    mode (the BatchNorms before it already set), and take its input's mean and unbiased variance."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for norm in norms:
        seen = []
        handle = norm.register_forward_pre_hook(lambda module, args: seen.append(args[0].double()))
        with torch.no_grad():
            model(images)
        handle.remove()
        x = seen[0].transpose(0, 1).reshape(norm.num_features, -1)
        norm.running_mean.copy_(x.mean(1))
        norm.running_var.copy_(x.var(1))
    return [torch.cat([norm.running_mean, norm.running_var]).clone() for norm in norms]


def test_reestimation_does_not_depend_on_the_batch_size(fashion_train):
    few = data.select_classes(data.per_class_slice(fashion_train, 20, seed=1), "Trouser,Bag,Sandal")
    images = torch.stack([few[i][0] for i in range(len(few))])
    model = few_classes_network()
    reference = statistics_layer_by_layer(model, images)
    found = {}
    for batch_size in (4, len(few)):  # batches of 4 hold one class each: their statistics are far from the whole's
        model = few_classes_network()
        assert reestimate_batchnorm(model, few, batch_size=batch_size) == 60
        found[batch_size] = [torch.cat([m.running_mean, m.running_var]) for m in model.modules()
                             if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for small, whole, expected in zip(found[4], found[len(few)], reference):
        assert torch.allclose(small, whole, rtol=1e-3, atol=1e-6)
        assert torch.allclose(whole, expected.float(), rtol=1e-4, atol=1e-6)


def test_batchnorm_levels_follow_the_graph():
    model = few_classes_network()
    stem, left_1, left_2, right, linear = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    levels = batchnorm_levels(model, [stem, left_1, left_2, right, linear], torch.zeros(1, 1, 28, 28))
    assert levels == [[stem], [left_1, right], [left_2], [linear]]
    assert batchnorm_levels(model, [left_2, right], torch.zeros(1, 1, 28, 28)) == [[left_2, right]]


def test_reestimation_changes_batchnorm_statistics_only(small_train):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.5),
                          nn.Linear(32, 10)).eval()
    parameters = {name: value.clone() for name, value in model.named_parameters()}
    reestimate_batchnorm(model, small_train, samples=256, batch_size=64)
    first = model[2].running_var.clone()
    reestimate_batchnorm(model, small_train, samples=256, batch_size=64)
    assert torch.equal(model[2].running_var, first)  # dropout stayed off: the same images give the same statistics
    assert all(torch.equal(value, parameters[name]) for name, value in model.named_parameters())
    assert not any(module.training for module in model.modules())
    assert reestimate_batchnorm(nn.Sequential(nn.Flatten(), nn.Linear(784, 10)), small_train) == 0


def test_a_model_at_chance_level_is_reported(fashion_train):
    three = data.select_classes(data.per_class_slice(fashion_train, 60, seed=1), "Trouser,Bag,Sandal")
    with pytest.warns(UserWarning, match="chance level on its own training data") as caught:
        _, manifest = train_model("lenet5", three, 1, lr=1e-7, batch_size=32, progress=False)
    message = str(caught[0].message)
    assert "--epochs" in message and "--lr" in message and "--batch-size" in message
    weak = [str(w.message) for w in caught if "of its own training images in eval mode" in str(w.message)]
    assert weak and all(w.startswith("class '") for w in weak)  # each class right on fewer than half is named
    record = manifest.provenance["trained"]
    assert record["train_accuracy"] < 0.4 and record["train_accuracy_images"] == 180
    assert record["batchnorm_reestimated_images"] == 0  # LeNet-5 has no BatchNorm
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, learned = train_model("vgg11", three, 2, width=0.125, lr=3e-3, batch_size=16, progress=False)
    assert learned.provenance["trained"]["train_accuracy"] > 0.8
    assert learned.provenance["trained"]["batchnorm_reestimated_images"] == 180
