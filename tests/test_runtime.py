"""Where and how commands run (issue 23): devices named and refused, the precision of the ranking passes, the
DataLoader workers, the files the same whatever runs them, and a model trained on a device read on the CPU."""

from __future__ import annotations

import contextvars
import importlib.util
from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

from helpers import assert_user_error, invoke
from modellego import commands, runtime
from modellego.core.evaluate import predict
from modellego.core.profile import _rescored, keep_candidates, select_samples
from modellego.data.datasets import FolderImages
from modellego.errors import ModellegoError
from modellego.io.modelfile import load

ROOT = Path(__file__).resolve().parents[1]
# the devices this machine has: the CPU always, a GPU where there is one (the same tests then run there too)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def test_auto_is_the_first_gpu_or_the_cpu():
    expected = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    assert runtime.resolve_device("auto") == expected
    assert runtime.resolve_device(None) == expected
    assert runtime.resolve_device("cpu") == torch.device("cpu")
    assert runtime.resolve_device(torch.device("cpu")) == torch.device("cpu")


@pytest.mark.parametrize("spec", ["tpu", "cuda:x", "gpu", ""])
def test_a_device_that_is_no_device_is_refused(spec):
    if spec == "":
        assert runtime.resolve_device(spec) == runtime.resolve_device("auto")  # empty means the default
        return
    with pytest.raises(ModellegoError, match="--device must be"):
        runtime.resolve_device(spec)


def test_a_missing_gpu_is_refused_in_one_line(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ModellegoError, match="no CUDA device"):
        runtime.resolve_device("cuda")
    with pytest.raises(ModellegoError, match="no CUDA device"):
        runtime.resolve_device("cuda:1")
    assert runtime.resolve_device("auto") == torch.device("cpu")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(ModellegoError, match="no Apple GPU"):
        runtime.resolve_device("mps")


def test_a_gpu_index_beyond_the_machine_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ModellegoError, match="has 2 CUDA devices"):
        runtime.resolve_device("cuda:2")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the refusal cannot happen here")
def test_cli_device_cuda_without_cuda_is_one_line_exit_2(lenet, tmp_path):
    out = tmp_path / "p.safetensors"
    result = invoke("profile", str(lenet.path), "--out", str(out), "--device", "cuda")
    assert_user_error(result, "--device cuda", "no CUDA device")
    assert not out.exists()


@pytest.mark.parametrize("option,value,fragment", [("--device", "tpu", "--device must be"),
                                                   ("--precision", "fp8", "--precision must be one of"),
                                                   ("--workers", "-1", "--workers must be")])
def test_cli_runtime_options_checked_before_any_work(lenet, tmp_path, option, value, fragment):
    out = tmp_path / "p.safetensors"
    assert_user_error(invoke("profile", str(lenet.path), "--out", str(out), option, value), fragment)
    assert not out.exists()


def test_graph_models_refuse_precision_and_workers(tmp_path):
    model = tmp_path / "gcn.safetensors"
    commands.train("gcn", "karate", model, epochs=5, progress=False)
    assert_user_error(invoke("eval", str(model), "--precision", "bf16"), "--precision does not apply to GCN")
    assert_user_error(invoke("eval", str(model), "--workers", "2"), "--workers does not apply to GCN")


def test_out_of_memory_on_the_device_is_one_line(monkeypatch, lenet):
    def exhausted(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(commands, "evaluate_file", exhausted)
    assert_user_error(invoke("eval", str(lenet.path)), "ran out of memory", "--batch-size")


def test_ranking_autocasts_only_below_fp32():
    with runtime.ranking("cpu"):
        assert not torch.is_autocast_enabled("cpu")
    with runtime.settings(precision="bf16"), runtime.ranking("cpu"):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    with runtime.ranking("cpu", "fp16"):
        assert torch.get_autocast_dtype("cpu") == torch.float16
    with runtime.settings(precision="bf16"), runtime.ranking("cpu", "fp32"):  # the scaling factors' pass
        assert not torch.is_autocast_enabled("cpu")


def test_settings_nest_and_come_back():
    assert contextvars.Context().run(runtime.current) == runtime.Settings("fp32", None)  # the defaults
    outer = runtime.current()  # the tests' own: no workers (conftest)
    with runtime.settings(precision="bf16", workers=3):
        with runtime.settings(workers=1):
            assert runtime.current() == runtime.Settings("bf16", 1)
        assert runtime.current() == runtime.Settings("bf16", 3)
    assert runtime.current() == outer


def test_workers_no_more_than_batches():
    data = TensorDataset(torch.zeros(10, 1, 2, 2), torch.zeros(10))
    with runtime.settings(workers=4):
        assert runtime.loader(data, batch_size=10).num_workers == 0  # one batch: the main process reads it
        assert runtime.loader(data, batch_size=5).num_workers == 2
        assert runtime.loader(data, batch_size=1).num_workers == 4
        assert runtime.loader(data, batch_sampler=[[0, 1], [2]]).num_workers == 2


def test_workers_a_share_of_the_cores_for_files_none_for_memory(tmp_path):
    folder = FolderImages("imagefolder", "train", [(str(tmp_path / "a.png"), 0)], ["a"], 8)
    wrapped = torch.utils.data.Subset(folder, [0])
    in_memory = TensorDataset(torch.zeros(2, 1, 4, 4), torch.zeros(2))
    assert runtime.reads_files(wrapped) and not runtime.reads_files(in_memory)
    by_default = contextvars.Context()  # the settings a user starts with (the tests' own have no workers)
    assert by_default.run(runtime.workers_for, in_memory) == 0
    assert by_default.run(runtime.workers_for, wrapped) == runtime.default_workers() == \
        max(0, min(runtime.AUTO_WORKERS_CAP, runtime.usable_cores() - 1))
    with runtime.settings(workers=2):
        assert runtime.workers_for(in_memory) == 2
        loader = runtime.loader(in_memory, "cpu", batch_size=1)  # two batches
        assert loader.num_workers == 2 and not loader.pin_memory
    assert runtime.default_workers(world_size=64) == 0  # under torchrun each process takes its share


def test_bf16_selection_agrees_with_fp32(lenet):
    """The issue's bar: bf16 keeps ≥ 99% of the samples fp32 chooses on the LeNet-5 fixture."""
    model = load(lenet.path).model
    fp32 = select_samples(model, lenet.train, 50)
    with runtime.settings(precision="bf16"):
        bf16 = select_samples(model, lenet.train, 50)
    kept = sum(len(set(fp32.positions[fp32.labels == k].tolist()) & set(bf16.positions[bf16.labels == k].tolist()))
               for k in range(10))
    assert kept >= 0.99 * len(fp32.positions), (kept, len(fp32.positions))


def test_rescoring_chooses_by_fp32_among_the_shortlist(lenet):
    """Below fp32 the selection pass only shortlists; `_rescored` must rank the shortlist by fp32 confidence,
    whatever confidences the shortlist carries, read from a dataset or from a DataLoader."""
    model = load(lenet.path).model
    positions = torch.arange(0, 400, 3)
    labels = lenet.train.targets[positions]
    garbage = {int(label): (positions[labels == label], torch.rand(int((labels == label).sum())))
               for label in labels.unique()}
    logits, _ = predict(model, torch.utils.data.Subset(lenet.train, positions.tolist()), precision="fp32")
    expected = {}
    keep_candidates(expected, logits, labels, positions, 5)
    for data in (lenet.train, torch.utils.data.DataLoader(lenet.train, batch_size=100)):
        chosen = _rescored(model, data, garbage, 5, 64)
        assert chosen.keys() == expected.keys()
        for label in expected:
            assert torch.equal(chosen[label][0], expected[label][0]), label


def test_bf16_selection_reads_a_dataloader_and_some_classes_like_a_dataset(lenet):
    model = load(lenet.path).model
    with runtime.settings(precision="bf16"):
        from_dataset = select_samples(model, lenet.train, 20, batch_size=256, wanted=[1, 3])
        from_loader = select_samples(model, torch.utils.data.DataLoader(lenet.train, batch_size=256), 20,
                                     wanted=[1, 3])
    assert torch.equal(from_dataset.positions, from_loader.positions)
    assert set(lenet.train.targets[from_dataset.positions].tolist()) == {1, 3}


def test_precision_reaches_the_passes_that_rank(monkeypatch, lenet, tmp_path):
    seen = []
    ranking = runtime.ranking

    def recording(device, precision=None):
        seen.append(precision or runtime.current().precision)
        return ranking(device, precision)

    monkeypatch.setattr(runtime, "ranking", recording)
    commands.profile(lenet.path, tmp_path / "p", samples_per_class=5, progress=False, precision="bf16")
    assert "bf16" in seen
    seen.clear()
    with runtime.settings(precision="bf16"):  # a caller's settings count where the command is not told
        commands.evaluate_file(lenet.path, max_per_class=5)
    assert seen and set(seen) == {"bf16"}


def test_precision_never_reaches_the_weights_written(lenet, tmp_path):
    """disassemble's cut and re-fit, and the paper's scaling in assemble, write the same bytes at bf16."""
    profile = tmp_path / "p"
    commands.profile(lenet.path, profile, samples_per_class=10, progress=False)
    written = {}
    for precision in ("fp32", "bf16"):
        parts = [tmp_path / f"{precision}-{n}" for n in (0, 1)]
        for part, task in zip(parts, ("Trouser,Bag", "Sandal,Sneaker")):
            commands.disassemble(lenet.path, profile, task, part, progress=False, precision=precision)
        commands.assemble(parts, tmp_path / f"{precision}-a", calibration="scale", progress=False,
                          precision=precision)
        written[precision] = [path.read_bytes() for path in (*parts, tmp_path / f"{precision}-a")]
    assert written["fp32"] == written["bf16"]


def test_precision_changes_scoring_not_the_logits_that_become_weights(lenet):
    model = load(lenet.path).model
    images = torch.utils.data.Subset(lenet.train, range(64))
    exact, _ = predict(model, images)
    with runtime.settings(precision="bf16"):
        rounded, _ = predict(model, images)
        kept, _ = predict(model, images, precision="fp32")
    assert torch.equal(kept, exact)
    assert not torch.equal(rounded, exact) and torch.allclose(rounded, exact, atol=0.1, rtol=0.05)


def test_files_are_the_same_on_any_device_option_and_any_workers(lenet, tmp_path):
    """--device cpu / auto (on a machine without a GPU: the same path) and --workers 2 (worker processes) write
    the bytes the defaults write."""
    runs = {"default": [], "cpu": ["--device", "cpu"], "auto": ["--device", "auto"], "workers": ["--workers", "2"]}
    if torch.cuda.is_available():
        runs.pop("auto")  # auto is the GPU there: the GPU check compares it (benchmarks/gpu_check.py)
    files = {}
    for name, options in runs.items():
        profile, part = tmp_path / f"{name}.profile", tmp_path / f"{name}.component"
        assert invoke("profile", str(lenet.path), "--out", str(profile), "--samples-per-class", "10",
                      *options).returncode == 0
        assert invoke("disassemble", str(lenet.path), "--profile", str(profile), "--classes", "Trouser,Bag",
                      "--out", str(part), *options).returncode == 0
        files[name] = (profile.read_bytes(), part.read_bytes())
    assert all(value == files["default"] for value in files.values())


@pytest.mark.parametrize("device", DEVICES)
def test_a_model_trained_on_a_device_reads_on_the_cpu(tmp_path, device):
    path = tmp_path / "digits.safetensors"
    trained = commands.train("lenet5", "digits", path, epochs=2, progress=False, device=device)
    assert {p.device.type for p in trained.brick.model.parameters()} == {torch.device(device).type}
    brick = load(path)
    assert {p.device.type for p in brick.model.parameters()} == {"cpu"}
    for key, value in trained.brick.model.state_dict().items():
        assert torch.equal(brick.model.state_dict()[key], value.cpu()), key
    assert commands.evaluate_file(path, device="cpu")["accuracy"] == pytest.approx(trained.metrics["accuracy"],
                                                                                     abs=1e-3)


def test_the_gpu_check_passes_cpu_against_cpu(tmp_path, capsys):
    """benchmarks/gpu_check.py's logic, with the CPU as the device: both chains must agree."""
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check)
    assert check.main(["--device", "cpu", "--data", "digits", "--epochs", "20", "--out-dir", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "FAIL" not in printed and printed.count("PASS") >= 8, printed


def test_torchrun_refuses_a_device_its_process_group_cannot_use(monkeypatch):
    from modellego import distributed

    monkeypatch.setattr(distributed, "active", lambda: True)
    monkeypatch.setattr(distributed.dist, "get_backend", lambda: "nccl")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ModellegoError, match="NCCL"):
        distributed.check_device(torch.device("cpu"))
    with pytest.raises(ModellegoError, match="LOCAL_RANK"):
        distributed.check_device(torch.device("cuda", 0))
    distributed.check_device(torch.device("cuda", 1))
