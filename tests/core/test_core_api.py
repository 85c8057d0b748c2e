"""The method's core on a researcher's own model and data: a torchvision ResNet and a plain TensorDataset go
through profile → locate → disassemble → assemble with no modellego type or file in between."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torchvision
from torch.utils.data import DataLoader, TensorDataset

import modellego


@pytest.fixture(scope="module")
def resnet_and_data():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=4).eval()
    images = torch.rand(48, 3, 32, 32)
    with torch.no_grad():  # a random ResNet labelled by its own (balanced) predictions: confident and correct
        logits = model(images)
        model.fc.weight.div_(logits.std(0)[:, None])
        model.fc.bias.sub_(logits.mean(0)).div_(logits.std(0))
        labels = model(images).argmax(1)
    assert torch.bincount(labels, minlength=4).min() >= 3
    return model, TensorDataset(images, labels)


def test_readme_example_runs_on_plain_pytorch_objects(resnet_and_data):
    model, data = resnet_and_data
    class_profile = modellego.profile(model, data, num_classes=4, samples_per_class=3)
    masks = modellego.locate(model, class_profile)
    first = modellego.disassemble(model, masks, [0, 1])
    second = modellego.disassemble(model, masks, [2, 3])
    assert isinstance(first, torch.nn.Module) and type(first) is type(model)
    assert sum(p.numel() for p in first.parameters()) < sum(p.numel() for p in model.parameters())
    example = data[0][0].unsqueeze(0)
    padded = modellego.assemble([first, second], example, mode="padded")
    parallel = modellego.assemble([first, second], example, mode="parallel")
    images = data.tensors[0][:5]
    with torch.no_grad():
        expected = torch.cat([first(images), second(images)], 1)
        torch.testing.assert_close(parallel(images), expected)
        torch.testing.assert_close(padded(images), expected, rtol=1e-4, atol=1e-4)
    scaled, factors = modellego.scale(first, TensorDataset(images, torch.zeros(5, dtype=torch.long)))
    assert len(factors) == 2


def test_keeping_everything_reproduces_the_model_and_loaders_work(resnet_and_data):
    model, data = resnet_and_data
    class_profile = modellego.profile(model, DataLoader(data, batch_size=16), num_classes=4, samples_per_class=3)
    located = modellego.locate(model, class_profile)
    kept = {name: torch.ones_like(mask) for name, mask in located.masks.items()}
    masks = dataclasses.replace(located, masks=kept | {located.classifier: located.masks[located.classifier]})
    everything = modellego.disassemble(model, masks, [3, 1], example_input=(3, 32, 32))
    images = data.tensors[0][:4]
    with torch.no_grad():
        torch.testing.assert_close(everything(images), model(images)[:, [3, 1]], rtol=1e-5, atol=1e-5)


def test_masks_and_profiles_are_artefacts(resnet_and_data, tmp_path):
    model, data = resnet_and_data
    halves = [TensorDataset(*(tensor[part::2] for tensor in data.tensors)) for part in (0, 1)]
    profiles = [modellego.profile(model, half, num_classes=4, samples_per_class=2) for half in halves]
    merged = profiles[0].merge(profiles[1])
    for name in merged.layers:
        torch.testing.assert_close(merged.contributions[name],
                                   profiles[0].contributions[name] + profiles[1].contributions[name])
    assert torch.equal(merged.counts, profiles[0].counts + profiles[1].counts)
    masks = modellego.locate(model, merged)
    modellego.save_masks(masks, tmp_path / "masks.safetensors")
    again = modellego.load_masks(tmp_path / "masks.safetensors")
    assert again.classes == masks.classes and again.classifier == masks.classifier
    assert again.input_shape == masks.input_shape and again.settings == masks.settings
    for name in masks.masks:
        assert torch.equal(again.masks[name], masks.masks[name])
        assert torch.equal(again.scores[name], masks.scores[name])
    modellego.save_profile(merged, tmp_path / "profile.safetensors")
    with pytest.raises(modellego.ModellegoError, match="not modellego masks"):
        modellego.load_masks(tmp_path / "profile.safetensors")


def test_version_and_model_names():
    assert modellego.__version__ and modellego.__version__ != "0+unknown"
    assert "lenet5" in modellego.list_models() and "torchvision:resnet18" in modellego.list_models()
