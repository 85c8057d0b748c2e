"""`modellego import`: a torchvision state dict saved as .pth and as .safetensors comes in with logits equal to the
module's; every malformed weights file is one line, exit 2, nothing written."""

from __future__ import annotations

import os
import pickle

import pytest
import torch
import torchvision
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from helpers import assert_user_error, invoke
from modellego import load

NAMES = ["tabby", "tiger cat", "bus", "car", "dog"]
MEAN, STD = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    folder = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    module = torchvision.models.resnet18(num_classes=len(NAMES)).eval()
    state = module.state_dict()
    torch.save(state, folder / "r18.pth")
    save_file({key: value.contiguous() for key, value in state.items()}, str(folder / "r18.safetensors"))
    (folder / "names.txt").write_text("\n".join(NAMES) + "\n")
    return folder, module


def _import(folder, name: str, *extra: str):
    out = folder / f"imported-{name}.safetensors"
    return invoke("import", "torchvision:resnet18", "--weights", str(folder / name), "--classes-file",
                  str(folder / "names.txt"), "--image-size", "32", *extra, "--out", str(out)), out


@pytest.mark.parametrize("name", ["r18.pth", "r18.safetensors"])
def test_imported_weights_give_the_modules_logits(weights, name):
    folder, module = weights
    result, out = _import(folder, name)
    assert result.returncode == 0, result.stderr
    model, manifest = load(out)
    assert manifest.class_names == NAMES and manifest.input.size == (32, 32)
    assert manifest.provenance["imported"]["builder"] == "torchvision:resnet18"
    images = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(images), module((images - MEAN) / STD))


def test_checkpoint_wrappers_and_dataparallel_prefixes_are_unwrapped(weights, tmp_path):
    folder, module = weights
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in module.state_dict().items()}},
               tmp_path / "checkpoint.pth")
    (tmp_path / "names.txt").write_text("\n".join(NAMES))
    result, out = _import(tmp_path, "checkpoint.pth")
    assert result.returncode == 0, result.stderr
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(load(out).model(images), module((images - MEAN) / STD))


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def _malformed(folder, module) -> dict[str, tuple[str, str]]:
    """name -> (file written in `folder`, the fragment its refusal names)."""
    state = module.state_dict()
    cases = {}
    (folder / "random.pth").write_bytes(os.urandom(4096))
    cases["random bytes"] = ("random.pth", "not a state dict")
    (folder / "truncated.pth").write_bytes((folder.parent / "r18.pth").read_bytes()[:5000]
                                           if (folder.parent / "r18.pth").exists() else b"PK\x03\x04")
    cases["truncated"] = ("truncated.pth", "not a state dict")
    with open(folder / "evil.pth", "wb") as handle:
        pickle.dump({"x": Evil()}, handle)
    cases["pickled code"] = ("evil.pth", "not a state dict")
    torch.save(torch.zeros(3), folder / "tensor.pth")
    cases["a bare tensor"] = ("tensor.pth", "holds no state dict")
    torch.save({k: v for k, v in state.items() if k != "fc.bias"}, folder / "missing.pth")
    cases["a missing key"] = ("missing.pth", "lacks 'fc.bias'")
    torch.save({**state, "extra.weight": torch.zeros(1)}, folder / "extra.pth")
    cases["an extra key"] = ("extra.pth", "holds 'extra.weight'")
    torch.save({**state, "layer1.0.conv1.weight": torch.zeros(64, 64, 1, 1)}, folder / "shape.pth")
    cases["a wrong shape"] = ("shape.pth", "layer1.0.conv1.weight has shape")
    torch.save({**state, "fc.weight": torch.zeros(7, 512), "fc.bias": torch.zeros(7)}, folder / "head.pth")
    cases["another class count"] = ("head.pth", "classifier has 7 outputs")
    (folder / "foreign.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    cases["an empty safetensors"] = ("foreign.safetensors", "lacks")
    (folder / "junk.safetensors").write_bytes(os.urandom(100))
    cases["junk safetensors"] = ("junk.safetensors", "not a readable weights file")
    return cases


def test_malformed_weights_are_one_line_and_write_nothing(weights, tmp_path):
    folder, module = weights
    (tmp_path / "names.txt").write_text("\n".join(NAMES))
    for name, (file, fragment) in _malformed(tmp_path, module).items():
        result, out = _import(tmp_path, file)
        assert_user_error(result, fragment)
        assert not out.exists(), name
    (tmp_path / "four.txt").write_text("\n".join(NAMES[:4]))
    out = tmp_path / "four.safetensors"
    assert_user_error(invoke("import", "torchvision:resnet18", "--weights", str(folder / "r18.pth"), "--classes-file",
                             str(tmp_path / "four.txt"), "--out", str(out)), "5 outputs", "names 4 classes")
    assert_user_error(invoke("import", "torchvision:resnet18", "--weights", str(folder / "r18.pth"), "--out",
                             str(out)), "--classes-file")
    assert_user_error(invoke("import", "torchvision:resnet18", "--weights", str(folder / "r18.pth"), "--classes",
                             ",".join(NAMES), "--mean", "0.5,x", "--out", str(out)), "--mean")
    assert not out.exists()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cut=st.integers(0, 50_000), flips=st.lists(st.integers(0, 50_000), max_size=4))
def test_fuzzed_weights_files_are_refused_in_one_line_or_import(weights, tmp_path_factory, cut, flips):
    folder, _ = weights
    target = tmp_path_factory.mktemp("fuzz")
    (target / "names.txt").write_text("\n".join(NAMES))
    data = bytearray((folder / "r18.pth").read_bytes())
    for flip in flips:
        data[flip % len(data)] ^= 0xA5
    (target / "w.pth").write_bytes(bytes(data[:len(data) - cut]))
    result, out = _import(target, "w.pth")
    if result.returncode != 0:
        assert_user_error(result)
        assert not out.exists()
