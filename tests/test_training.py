"""Training that learns: BatchNorm statistics re-estimated after training, and a warning at chance level."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from modellego import data
from modellego.models.classifier import classifier
from modellego.reconstruct import reestimate_batchnorm
from modellego.train import train, train_model, training_accuracy


@pytest.fixture(scope="module")
def small_train(fashion_train):
    return data.per_class_slice(fashion_train, 30, seed=1)


def test_reestimation_turns_lagging_statistics_into_the_real_ones(small_train):
    model = classifier("vgg11", small_train.spec, 10, 0.125)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = 0.01  # MobileNetV3's: the running statistics lag the weights badly
    train(model, small_train, 2, lr=3e-3, batch_size=16, progress=False)
    stale, chance, _ = training_accuracy(model, small_train)
    used = reestimate_batchnorm(model, small_train, batch_size=100)
    fresh, _, _ = training_accuracy(model, small_train)
    assert used == 300
    assert fresh > stale + 0.3 and fresh > 2 * chance, (stale, fresh)
    # The first BN layer's statistics are those of its input over the same 300 images, computed by hand.
    first_bn = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    images = torch.stack([small_train[i][0] for i in range(len(small_train))])
    with torch.no_grad():
        features = model.net.features[0](model.normalize(images))
    mean = features.mean(dim=(0, 2, 3))
    variance = features.var(dim=(0, 2, 3))
    assert torch.allclose(first_bn.running_mean, mean, atol=1e-4, rtol=1e-4)
    assert torch.allclose(first_bn.running_var, variance, rtol=0.05)
    assert first_bn.momentum == 0.01 and not model.training


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
    record = manifest.provenance["trained"]
    assert record["train_accuracy"] < 0.4 and record["train_accuracy_images"] == 180
    assert record["batchnorm_reestimated_images"] == 0  # LeNet-5 has no BatchNorm
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, learned = train_model("vgg11", three, 2, width=0.125, lr=3e-3, batch_size=16, progress=False)
    assert learned.provenance["trained"]["train_accuracy"] > 0.8
    assert learned.provenance["trained"]["batchnorm_reestimated_images"] == 180
