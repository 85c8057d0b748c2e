"""Several processes under torchrun (2 gloo processes on this CPU): the same profile and the same fine-tuned model
as one process, and the pieces that make it so (global batches cut into shares, candidates merged)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import invoke, run_cli
from modellego import distributed
from modellego.core.profile import _keep_most_confident, _merge_candidates
from modellego.io.modelfile import load, read_manifest
from modellego.io.profiles import load_profile
from modellego.train import GlobalBatchShards


def torchrun(*args: str, processes: int = 2, timeout: int = 900) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node N -m modellego ARGS`, as a user runs it."""
    env = dict(os.environ, COLUMNS="200", PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               "-m", "modellego", *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)


@pytest.fixture(scope="module")
def digits_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("distributed")
    path = folder / "lenet.safetensors"
    trained = invoke("train", "--model", "lenet5", "--data", "digits", "--epochs", "4", "--lr", "0.005",
                     "--out", str(path))
    assert trained.returncode == 0, trained.stderr
    return folder, path


def test_two_processes_give_the_one_process_profile(digits_model):
    folder, model = digits_model
    one, two = folder / "one.safetensors", folder / "two.safetensors"
    assert run_cli("profile", str(model), "--samples-per-class", "8", "--batch-size", "50",
                   "--out", str(one)).returncode == 0
    result = torchrun("profile", str(model), "--samples-per-class", "8", "--batch-size", "50", "--out", str(two))
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("profiled ") == 1  # the first process speaks for both
    single, shared = load_profile(one), load_profile(two)
    assert (single.world_size, shared.world_size) == (1, 2)
    assert torch.equal(single.samples, shared.samples) and torch.equal(single.sample_labels, shared.sample_labels)
    assert torch.equal(single.counts, shared.counts) and single.layers == shared.layers
    for name in single.layers:
        torch.testing.assert_close(shared.contributions[name], single.contributions[name], rtol=1e-6, atol=0)


def test_two_processes_fine_tune_like_one(digits_model):
    """LeNet-5 has no BatchNorm, so the two-process gradient is the one-process gradient of the same global batch:
    the weights agree up to float rounding."""
    folder, model = digits_model
    one, two = folder / "tuned-one.safetensors", folder / "tuned-two.safetensors"
    arguments = ["finetune", str(model), "--epochs", "1", "--batch-size", "64", "--lr", "0.002"]
    assert invoke(*arguments, "--out", str(one)).returncode == 0
    result = torchrun(*arguments, "--out", str(two))
    assert result.returncode == 0, result.stderr[-3000:]
    single, _ = load(one)
    shared, manifest = load(two)
    assert manifest.provenance["finetuned"][-1]["world_size"] == 2
    assert "world_size" not in read_manifest(one).provenance["finetuned"][-1]
    original, _ = load(model)
    moved = 0.0
    for (name, after), before, alone in zip(shared.state_dict().items(), original.state_dict().values(),
                                            single.state_dict().values()):
        torch.testing.assert_close(after, alone, rtol=1e-4, atol=1e-5, msg=name)
        moved = max(moved, (after - before).abs().max().item())
    assert moved > 1e-3  # it did train


def test_two_processes_reconstruct_like_one(digits_model):
    """Reconstruction's normal equations are summed over the processes' shares of the images: the component's
    weights are the one-process ones up to float rounding."""
    folder, model = digits_model
    profile_path, one, two = (folder / name for name in ("r.profile.safetensors", "r-one.safetensors",
                                                         "r-two.safetensors"))
    assert invoke("profile", str(model), "--samples-per-class", "10", "--out", str(profile_path)).returncode == 0
    arguments = ["disassemble", str(model), "--profile", str(profile_path), "--classes", "3,8"]
    assert invoke(*arguments, "--out", str(one)).returncode == 0
    result = torchrun(*arguments, "--out", str(two))
    assert result.returncode == 0, result.stderr[-3000:]
    single, manifest = load(one)
    shared, _ = load(two)
    assert manifest.provenance["disassembled"]["reconstruction"]
    for (name, alone), together in zip(single.state_dict().items(), shared.state_dict().values()):
        torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("calibration", ["mahalanobis", "pattern", "joint"])
def test_two_processes_fit_the_one_process_gate(digits_model, calibration):
    """A gate's statistics come from each process's share of a component's images, gathered in batch order, and a
    joint head's sums are added up over the processes: the assembled file holds the one-process numbers."""
    folder, model = digits_model
    profile_path = folder / "g.profile.safetensors"
    if not profile_path.exists():
        assert invoke("profile", str(model), "--samples-per-class", "10", "--out", str(profile_path)).returncode == 0
    parts = []
    for task in ("0,1", "2,3"):
        part = folder / f"g-{task.replace(',', '')}.safetensors"
        if not part.exists():
            assert invoke("disassemble", str(model), "--profile", str(profile_path), "--classes", task,
                          "--out", str(part)).returncode == 0
        parts.append(str(part))
    one, two = folder / f"a-{calibration}-one.safetensors", folder / f"a-{calibration}-two.safetensors"
    arguments = ["assemble", *parts, "--calibration", calibration]
    assert invoke(*arguments, "--out", str(one)).returncode == 0
    result = torchrun(*arguments, "--out", str(two))
    assert result.returncode == 0, result.stderr[-3000:]
    single, shared = load(one)[0].state_dict(), load(two)[0].state_dict()
    assert single.keys() == shared.keys() and any(key.startswith(("gate.", "head.")) for key in single)
    for name, alone in single.items():
        torch.testing.assert_close(shared[name], alone, rtol=1e-6, atol=1e-7, msg=name)


def test_a_user_error_is_one_line_from_the_first_process(digits_model, tmp_path):
    _, model = digits_model
    result = torchrun("profile", str(model), "--samples-per-class", "0", "--out", str(tmp_path / "p.safetensors"))
    assert result.returncode != 0
    assert [line for line in result.stderr.splitlines() if line.startswith("error: ")] == \
        ["error: --samples-per-class must be at least 1 and at most 100,000, got 0"]
    assert not (tmp_path / "p.safetensors").exists()


@settings(max_examples=60, deadline=None)
@given(size=st.integers(1, 60), batch=st.integers(1, 16), world=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_shares_of_a_global_batch_are_the_one_process_batch(size, batch, world, seed):
    dataset = list(range(size))
    alone = list(torch.utils.data.BatchSampler(
        torch.utils.data.RandomSampler(dataset, generator=torch.Generator().manual_seed(seed)), batch, False))
    shares = []
    for rank in range(world):
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(distributed, "world_size", lambda: world)
            patch.setattr(distributed, "rank", lambda r=rank: r)
            sampler = GlobalBatchShards(dataset, batch, torch.Generator().manual_seed(seed))
            shares.append(list(sampler))
            assert len(sampler) == len(shares[-1])
    kept = [step for step in alone if len(step) >= world]
    assert all(len(share) == len(kept) for share in shares)
    for step, parts in zip(kept, zip(*shares)):
        assert [index for part in parts for index in part] == step
        assert max(map(len, parts)) - min(map(len, parts)) <= 1


@settings(max_examples=60, deadline=None)
@given(confidence=st.lists(st.sampled_from([0.1, 0.5, 0.5, 0.9, 0.99]), min_size=1, max_size=40),
       limit=st.integers(1, 8), shards=st.integers(1, 4))
def test_merged_candidates_are_the_streamed_ones(confidence, limit, shards):
    """Each process keeps its own most confident; merged, they are what one process keeps (ties included)."""
    positions = torch.arange(len(confidence))
    values = torch.tensor(confidence)
    empty = (torch.empty(0, dtype=torch.long), torch.empty(0))
    alone = empty
    for start in range(0, len(confidence), 3):  # one process, streaming batches of 3
        alone = _keep_most_confident(alone, positions[start:start + 3], values[start:start + 3], limit)
    parts = []
    for shard in range(shards):  # batch b goes to process b % shards
        kept = empty
        for number, start in enumerate(range(0, len(confidence), 3)):
            if number % shards == shard:
                kept = _keep_most_confident(kept, positions[start:start + 3], values[start:start + 3], limit)
        parts.append({0: kept} if len(kept[0]) else {})
    merged = _merge_candidates(parts, limit)
    assert torch.equal(merged[0][0], alone[0])


def launch(*args: str, cwd=None, env: dict | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    """`python -m modellego.launch --standalone --nproc_per_node 2 ARGS`: torchrun with modellego's errors."""
    command = [sys.executable, "-m", "modellego.launch", "--standalone", "--nproc_per_node=2", *args]
    environment = dict(os.environ, COLUMNS="200", PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run(command, capture_output=True, text=True, env=environment, cwd=cwd, timeout=timeout)


def one_error_line(result: subprocess.CompletedProcess, fragment: str) -> None:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], result.stderr[-2000:]


def test_an_error_on_every_rank_is_one_line_from_the_launcher(digits_model, tmp_path):
    _, model = digits_model
    result = launch("finetune", str(tmp_path / "missing.safetensors"), "--epochs", "1",
                    "--out", str(tmp_path / "tuned.safetensors"))
    one_error_line(result, "no such file")
    assert list(tmp_path.iterdir()) == []


def test_an_error_on_rank_1_only_is_one_line_from_the_launcher(digits_model, tmp_path):
    """Rank 1 runs in another folder (a sitecustomize on its path moves it), so the relative input is missing on
    that process only, as on a machine without the file: its line is the one printed, nothing is written."""
    folder, model = digits_model
    work = tmp_path / "work"
    work.mkdir()
    (work / "lenet.safetensors").write_bytes(model.read_bytes())
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(
        "import os, tempfile\nif os.environ.get('RANK') == '1':\n    os.chdir(tempfile.mkdtemp())\n")
    path = os.pathsep.join([str(hooks), os.environ.get("PYTHONPATH", "")])
    result = launch("finetune", "lenet.safetensors", "--epochs", "1", "--out", "tuned.safetensors", cwd=work,
                    env={"PYTHONPATH": path})
    one_error_line(result, "no such file: lenet.safetensors")
    assert sorted(p.name for p in work.iterdir()) == ["lenet.safetensors"]
