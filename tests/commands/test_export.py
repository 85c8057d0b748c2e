"""`modellego export` (issue 28): ONNX and torch.export files of components and calibrated assemblies agree with the
PyTorch model, the ONNX file runs where modellego is absent, the model-hub folder loads back as the same model, and
every mistake is one line with nothing written."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import warnings
import zipfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from torch import nn

from helpers import assert_user_error, invoke, run_cli
from modellego import commands
from modellego.errors import ModellegoError
from modellego.io.export import OPSET, agreement, write_onnx, write_pt2
from modellego.io.modelfile import load
from modellego.kinds import ExportInputs, kind_of


@pytest.fixture(scope="module")
def parts(digits_lenet, tmp_path_factory):
    """A component of the digits LeNet-5 (classes 0, 1) and a padded assembly of it with a {2, 3, 4} component,
    calibrated by the Mahalanobis gate (statistics and hooks in the forward pass)."""
    folder = tmp_path_factory.mktemp("export")
    profile = folder / "digits.profile.safetensors"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        commands.profile(digits_lenet, profile, samples_per_class=10, progress=False)
        for task, name in (("0,1", "c01"), ("2,3,4", "c234")):
            commands.disassemble(digits_lenet, profile, task, folder / f"{name}.safetensors", progress=False,
                                 reconstruct=False)
        commands.assemble([folder / "c01.safetensors", folder / "c234.safetensors"], folder / "a.safetensors",
                          mode="padded", calibration="mahalanobis", progress=False)
    return {"component": folder / "c01.safetensors", "assembly": folder / "a.safetensors"}


def _test_images(path: Path, count: int) -> torch.Tensor:
    """`count` of the model's test images, from the end of the split (the export checks on a spread of it)."""
    brick = load(path)
    samples = kind_of(brick.manifest.architecture).data(brick.manifest, "test")
    return torch.stack([samples[len(samples) - 1 - k][0] for k in range(count)])


def _onnx_logits(path: Path, images: torch.Tensor) -> np.ndarray:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"images": images.numpy()})[0]


@pytest.mark.parametrize("part", ["component", "assembly"])
def test_onnx_and_pt2_exports_answer_like_the_pytorch_model(parts, part, tmp_path):
    """Both formats, written by the library function, give PyTorch's logits on a batch of another size than the
    check's (the batch dimension is dynamic); the ONNX file states its opset and the class names."""
    source = parts[part]
    brick = load(source)
    images = _test_images(source, 5)
    with torch.no_grad():
        expected = brick.model(images)

    onnx_result = commands.export(source, tmp_path / "m.onnx", "onnx", samples=16)
    assert onnx_result.agreement.argmax_equal and onnx_result.agreement.samples == 16
    assert onnx_result.agreement.max_relative_error < 1e-4 and onnx_result.opset == OPSET
    assert np.allclose(_onnx_logits(tmp_path / "m.onnx", images), expected.numpy(), rtol=1e-4, atol=1e-4)
    model = onnx.load(tmp_path / "m.onnx")
    assert [entry.version for entry in model.opset_import if entry.domain == ""] == [OPSET]
    metadata = {entry.key: entry.value for entry in model.metadata_props}
    assert json.loads(metadata["classes"]) == brick.manifest.class_names
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"

    pt2_result = commands.export(source, tmp_path / "m.pt2", "pt2", samples=16)
    assert pt2_result.agreement.argmax_equal and pt2_result.bytes == (tmp_path / "m.pt2").stat().st_size
    with zipfile.ZipFile(tmp_path / "m.pt2") as archive:  # the check's 16 images are not stored with the program
        stored = {info.filename: info.file_size for info in archive.infolist()}
    assert all(size < 16 * images[0].numel() * 4 for name, size in stored.items() if "sample_inputs" in name)
    program = torch.export.load(tmp_path / "m.pt2")
    with torch.no_grad():
        assert torch.allclose(program.module()(images), expected, rtol=1e-5, atol=1e-5)


def test_a_nearest_neighbour_gate_exports_with_a_batch_above_cdists_switch(parts, tmp_path):
    """The knn gate's distances take one algorithm at every batch size, so both formats keep the batch dynamic
    and agree on 40 images (torch.cdist changes algorithm above 25 rows)."""
    assembly = tmp_path / "knn.safetensors"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        commands.assemble([parts["component"], parts["component"].parent / "c234.safetensors"], assembly,
                          mode="parallel", calibration="knn", store_training_data=True, progress=False)
    for form in ("onnx", "pt2"):
        result = commands.export(assembly, tmp_path / f"knn.{form}", form, samples=40)
        assert result.agreement.samples == 40 and result.agreement.argmax_equal
        assert result.agreement.max_relative_error < 1e-4


def test_the_onnx_file_runs_without_modellego_and_normalises_its_input(parts, tmp_path):
    """onnxruntime and numpy alone, in a fresh interpreter that never imports modellego (nor torch), feed raw
    pixels in [0, 1] and get the assembly's logits: the normalisation is inside the graph."""
    source = parts["assembly"]
    commands.export(source, tmp_path / "a.onnx", "onnx", samples=8)
    images = _test_images(source, 7)
    with torch.no_grad():
        expected = load(source).model(images).numpy()
    np.save(tmp_path / "images.npy", images.numpy())
    script = textwrap.dedent(f"""
        import sys, numpy as np, onnxruntime
        session = onnxruntime.InferenceSession({str(tmp_path / 'a.onnx')!r}, providers=["CPUExecutionProvider"])
        logits = session.run(None, {{"images": np.load({str(tmp_path / 'images.npy')!r})}})[0]
        np.save({str(tmp_path / 'logits.npy')!r}, logits)
        print("modellego" in sys.modules, "torch" in sys.modules)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "False"]
    assert np.allclose(np.load(tmp_path / "logits.npy"), expected, rtol=1e-4, atol=1e-4)


def test_a_folder_export_killed_midway_is_cleaned_up_by_the_next(parts, tmp_path):
    """The temporary folder a killed export left (its writer's pid gone) is removed by the next export there."""
    stale = tmp_path / f".hub.{2**22 + 12345}-abcd.tmp"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"partial")
    commands.export(parts["component"], tmp_path / "hub", "folder")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["hub"]


def test_the_folder_loads_back_as_the_same_model(parts, tmp_path):
    """model.safetensors is the model file byte for byte, config.json and the model card describe it, and
    `load(DIR)` gives the same outputs; a second export replaces the first, a folder of other files is refused."""
    source = parts["assembly"]
    folder = tmp_path / "hub"
    result = commands.export(source, folder, "folder")
    assert sorted(path.name for path in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert (folder / "model.safetensors").read_bytes() == source.read_bytes()
    manifest = load(source).manifest
    config = json.loads((folder / "config.json").read_text())
    assert config["classes"] == manifest.class_names and config["input"]["mean"] == list(manifest.input.mean)
    card = (folder / "README.md").read_text()
    assert "calibration `mahalanobis`" in card and "padded" in card and "modellego.load" in card
    assert "Trained** on digits" in card
    images = _test_images(source, 6)
    with torch.no_grad():
        assert torch.equal(load(folder).model(images), load(source).model(images))
    assert result.agreement is None and result.bytes > source.stat().st_size

    commands.export(parts["component"], folder, "folder")  # a previous export is replaced whole
    assert (folder / "model.safetensors").read_bytes() == parts["component"].read_bytes()
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(ModellegoError, match="holds other files"):
        commands.export(source, other, "folder")
    assert [path.name for path in other.iterdir()] == ["notes.txt"]


def test_a_graph_model_exports_in_both_formats(tmp_path):
    """A GCN takes its whole graph (nodes and edges both dynamic), in ONNX and in torch.export."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        commands.train("gcn", "karate", tmp_path / "g.safetensors", epochs=30, progress=False)
    for form in ("onnx", "pt2"):
        result = commands.export(tmp_path / "g.safetensors", tmp_path / f"g.{form}", form)
        assert result.agreement.argmax_equal and result.unit == "node"
    model = onnx.load(tmp_path / "g.onnx")
    assert [value.name for value in model.graph.input] == ["x", "edge_index"]


class _DistanceToItself(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist")


class _Branching(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Sequential(nn.Linear(4, 3), _DataDependent())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


class _DataDependent(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if x.sum() > 0 else -x


def test_a_model_that_does_not_export_is_one_line_naming_what_failed(tmp_path):
    """An operator ONNX has no translation for, and a module torch.export cannot trace, are named; nothing is
    written."""
    x = torch.rand(3, 4)
    inputs = ExportInputs((x,), ("images",), ({0: "batch"},))
    with pytest.raises(ModellegoError, match=r"operator aten\._cdist_forward") as caught:
        write_onnx(_DistanceToItself(), inputs, _DistanceToItself()(x), tmp_path / "d.onnx", "d", {})
    assert "\n" not in str(caught.value)
    with pytest.raises(ModellegoError, match=r"module inner\.1 \(_DataDependent\)") as caught:
        write_pt2(_Branching(), inputs, _Branching()(x), tmp_path / "b.pt2", "b")
    assert "\n" not in str(caught.value)
    assert list(tmp_path.iterdir()) == []


def test_an_export_that_disagrees_is_refused_before_it_is_written(tmp_path):
    """The check compares with the PyTorch logits it is given: other logits (another top class) refuse the file,
    which is never written; a top class that differs only within the arithmetic's error is a tie."""
    model = nn.Sequential(nn.Linear(4, 3)).eval()
    x = torch.rand(6, 4)
    inputs = ExportInputs((x,), ("images",), ({0: "batch"},))
    with torch.no_grad():
        wrong = -model(x)
    with pytest.raises(ModellegoError, match="top class differs"):
        write_pt2(model, inputs, wrong, tmp_path / "m.pt2", "m")
    with pytest.raises(ModellegoError, match="top class differs"):
        write_onnx(model, inputs, wrong, tmp_path / "m.onnx", "m", {})
    assert list(tmp_path.iterdir()) == []
    tie = agreement(torch.tensor([[1.0, 1.0 + 1e-7]]), torch.tensor([[1.0 + 1e-7, 1.0]]))
    assert tie.argmax_equal and tie.ties == 1
    far = agreement(torch.tensor([[1.0, 2.0]]), torch.tensor([[2.0, 1.0]]))
    assert not far.argmax_equal and far.problem()


def test_onnx_without_the_extra_says_how_to_install_it(parts, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # what an environment without the extra raises
    with pytest.raises(ModellegoError, match=r"pip install 'modellego\[export\]'"):
        commands.export(parts["component"], tmp_path / "m.onnx", "onnx")
    assert list(tmp_path.iterdir()) == []


def test_the_command_line_exports_and_refuses_mistakes_in_one_line(parts, tmp_path):
    """As a user runs it: one line saying what was written and how it was checked; mistakes are one `error:` line
    with exit code 2 and nothing written."""
    result = run_cli("export", str(parts["component"]), "--format", "onnx", "--out", str(tmp_path / "c.onnx"),
                     "--samples", "8")
    assert result.returncode == 0, result.stderr
    assert "ONNX opset 18" in result.stdout and "argmax equal on 8/8" in result.stdout
    assert (tmp_path / "c.onnx").is_file()
    result = invoke("export", str(parts["component"]), "--format", "folder", "--out", str(tmp_path / "hub") + "/")
    assert result.returncode == 0 and "README.md" in result.stdout
    assert invoke("eval", str(tmp_path / "hub"), "--json").returncode == 0

    profile = tmp_path / "p.safetensors"
    profile.write_bytes((parts["component"].parent / "digits.profile.safetensors").read_bytes())
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("")
    before = sorted(path.name for path in tmp_path.iterdir())
    component = str(parts["component"])
    for args, fragment in (
            ((component, "--format", "tflite", "--out", str(tmp_path / "m")), "unknown export format"),
            ((str(tmp_path / "missing.safetensors"), "--format", "pt2", "--out", str(tmp_path / "m.pt2")),
             "no such file"),
            ((str(profile), "--format", "onnx", "--out", str(tmp_path / "m.onnx")), "not a modellego model"),
            ((component, "--format", "folder", "--out", str(tmp_path / "taken")), "holds other files"),
            ((component, "--format", "pt2", "--out", str(tmp_path / "no" / "m.pt2")), "does not exist"),
            ((component, "--format", "onnx", "--out", str(tmp_path)), "is a folder;"),
            ((component, "--format", "pt2", "--out", str(tmp_path / "new") + "/"), "ends in a separator"),
            ((component, "--format", "pt2", "--out", component), "would destroy the input"),
            ((component, "--format", "pt2", "--out", str(tmp_path / "m.pt2"), "--samples", "0"), "--samples")):
        assert_user_error(invoke("export", *args), fragment)
    assert sorted(path.name for path in tmp_path.iterdir()) == before
