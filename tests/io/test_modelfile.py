"""Model files: exact round trips (pruned models too), atomic writes, and refusal of anything not ours."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch_pruning as tp

import modellego
from helpers import foreign_files, random_classifier
from modellego.errors import ModellegoError
from modellego.io.manifest import Manifest
from modellego.io.modelfile import load, read_manifest, save

ARCHITECTURES = [("lenet5", 1.0), ("vgg11", 0.25), ("vgg16", 0.25), ("resnet18", 0.25), ("resnet50", 0.125),
                 ("googlenet", 0.25), ("torchvision:resnet18", 1.0), ("torchvision:mobilenet_v2", 0.5)]


def make(builder: str, width: float, classes: int = 4) -> tuple[torch.nn.Module, Manifest]:
    return random_classifier(builder, width, classes, spread=0.5, variance=(0.5, 2.0))


def assert_round_trip(model, manifest, path):
    save(model, path, manifest)
    reloaded, again = load(path)
    images = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(model.eval()(images), reloaded(images))
    assert again.classes == manifest.classes and again.input == manifest.input
    return reloaded


@pytest.mark.parametrize("builder, width", ARCHITECTURES)
def test_round_trip_is_bit_identical(builder, width, tmp_path):
    model, manifest = make(builder, width)
    assert_round_trip(model, manifest, tmp_path / "model.safetensors")


@pytest.mark.parametrize("builder, width", [("lenet5", 1.0), ("resnet18", 0.25), ("googlenet", 0.25),
                                            ("torchvision:mobilenet_v2", 0.5)])
def test_channel_pruned_models_load_from_their_tensor_shapes(builder, width, tmp_path):
    model, manifest = make(builder, width)
    example = torch.rand(1, 1, 28, 28)
    head = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    pruner = tp.pruner.MagnitudePruner(model, example, importance=tp.importance.MagnitudeImportance(p=2),
                                       pruning_ratio=0.4, ignored_layers=[head])
    before = modellego.count_params(model)
    pruner.step()
    assert modellego.count_params(model) < 0.8 * before
    reloaded = assert_round_trip(model, manifest, tmp_path / "pruned.safetensors")
    assert modellego.count_params(reloaded) == modellego.count_params(model)


def test_manifest_is_json_in_the_safetensors_header(tmp_path):
    model, manifest = make("lenet5", 1.0)
    manifest.metrics = {"test_accuracy": 0.5}
    save(model, tmp_path / "m.safetensors", manifest)
    raw = (tmp_path / "m.safetensors").read_bytes()
    header = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])
    stored = json.loads(header["__metadata__"]["modellego"])
    assert stored["format"] == "modellego" and stored["architecture"]["builder"] == "lenet5"
    assert stored["classes"][2] == {"name": "c2", "dataset": "fashion-mnist", "index": 2}
    assert read_manifest(tmp_path / "m.safetensors").metrics == {"test_accuracy": 0.5}


def test_files_that_are_not_ours_are_refused(tmp_path, monkeypatch):
    monkeypatch.setattr("pickle.load", lambda *a, **k: pytest.fail("something was unpickled"))
    monkeypatch.setattr("pickle.loads", lambda *a, **k: pytest.fail("something was unpickled"))
    for name, (path, message) in foreign_files(tmp_path).items():
        with pytest.raises(ModellegoError, match=message):
            load(path)


def test_writes_are_atomic_and_fail_early(tmp_path, monkeypatch):
    model, manifest = make("lenet5", 1.0)
    with pytest.raises(ModellegoError, match="does not exist"):
        save(model, tmp_path / "missing" / "m.safetensors", manifest)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("modellego.io.modelfile.save_file", crash)
    with pytest.raises(OSError):
        save(model, tmp_path / "m.safetensors", manifest)
    assert list(tmp_path.iterdir()) == []


def test_a_model_that_does_not_match_its_manifest_is_not_written(tmp_path):
    model, manifest = make("lenet5", 1.0)
    manifest.architecture["builder"] = "vgg11"
    with pytest.raises(ModellegoError, match="does not match"):
        save(model, tmp_path / "m.safetensors", manifest)
    assert list(tmp_path.iterdir()) == []


def test_written_files_follow_the_umask_like_any_file(tmp_path):
    """Temp files start owner-only (mkstemp); the file renamed into place gets the usual 0666 minus umask."""

    from modellego.io.atomic import atomic_write

    previous = os.umask(0o022)
    try:
        target = atomic_write(tmp_path / "f.bin", lambda temp: open(temp, "wb").write(b"x"))
    finally:
        os.umask(previous)
    assert target.stat().st_mode & 0o777 == 0o644
