"""Sizing work to the machine before it starts (issue 15): the tensor tracer against hand-counted bytes, the memory
limits read from cgroup files and rlimits, training refused or resized in one line, inference batches lowered with a
warning, and the issue's GoogLeNet-at-224-px command under a real `ulimit -v` in a subprocess."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from helpers import assert_user_error, invoke
from modellego import memory
from modellego.core.evaluate import predict
from modellego.io.modelfile import load
from modellego.models import build, warn_if_oversized


def test_traced_peak_matches_hand_counted_bytes():
    """Inference through two Linear layers: the input, the hidden activations and the logits are alive together
    at the end (the hidden ones until the step ends), 4 bytes each; the model's own weights are not counted."""
    model = nn.Sequential(nn.Linear(10, 1000), nn.Linear(1000, 7))
    for batch in (1, 3, 16):
        expected = 4 * batch * (10 + 1000 + 7)
        for device in ("meta", "cpu"):
            assert memory._step_peak(model, (10,), batch, training=False, device=device) == expected


def test_meta_trace_equals_a_real_trace_for_training():
    """The meta device allocates the same tensors as the CPU for a training step (conv, BN, pooling, gradients)."""
    model = build("resnet18", 3, 4, 0.125)
    meta = memory._step_peak(model, (3, 16, 16), 4, training=True, device="meta")
    real = memory._step_peak(model, (3, 16, 16), 4, training=True, device="cpu")
    assert meta == real > 0
    assert all(not p.requires_grad or p.grad is None for p in model.parameters())  # the model itself untouched
    assert all(m.training for m in model.modules())


def test_a_model_that_reads_values_is_probed_with_real_tensors():
    class ReadsAValue(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(8, 3)

        def forward(self, x):
            return self.linear(x) * int(x.shape[0] > 0 and bool(x.abs().sum() >= 0))

    line = memory._line(ReadsAValue(), (8,), training=False)
    assert line is not None and line.method.startswith("probe") and line.per_sample > 0


def test_memory_limits_read_cgroup_files(tmp_path):
    (tmp_path / "memory.max").write_text("1000000\n")
    (tmp_path / "memory.current").write_text("400000\n")
    (tmp_path / "memory").mkdir()
    (tmp_path / "memory" / "memory.limit_in_bytes").write_text("3000000\n")
    (tmp_path / "memory" / "memory.usage_in_bytes").write_text("1000000\n")
    limits = memory.memory_limits(cgroup_root=tmp_path)
    assert limits["cgroup memory.max"] == 600000
    assert limits["cgroup memory.limit_in_bytes"] == 2000000
    assert limits["MemAvailable"] > 0
    (tmp_path / "memory.max").write_text("max\n")
    (tmp_path / "memory" / "memory.limit_in_bytes").write_text(f"{2**63 - 4096}\n")  # v1's "no limit"
    limits = memory.memory_limits(cgroup_root=tmp_path)
    assert "cgroup memory.max" not in limits and "cgroup memory.limit_in_bytes" not in limits


def test_ulimit_v_is_read_as_the_address_space_left():
    code = ("import resource; resource.setrlimit(resource.RLIMIT_AS, (8 * 2**30, resource.RLIM_INFINITY)); "
            "from modellego import memory; l = memory.memory_limits(); "
            "mapped = int(open('/proc/self/status').read().split('VmSize:')[1].split()[0]) * 1024; "
            "print(l['ulimit -v'], 8 * 2**30 - mapped)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    reported, left = map(int, done.stdout.split())
    assert abs(reported - left) < 64 * 2**20  # the import of `memory` itself maps a little in between


def _limit(monkeypatch, available: int) -> None:
    monkeypatch.setattr(memory, "memory_limits", lambda: {"test limit": available})


def test_training_that_does_not_fit_is_refused_naming_a_batch_size_that_does(monkeypatch):
    model = build("vgg11", 3, 4, 0.125)
    at_8 = memory.estimate(model, (3, 32, 32), 8, training=True)
    _limit(monkeypatch, int(at_8.peak_bytes / memory.USABLE_SHARE) + 1)
    with pytest.raises(memory.ModellegoError) as refused:
        memory.plan_training(model, (3, 32, 32), 64, name="vgg11")
    message = str(refused.value)
    assert "--batch-size 8 fits" in message and "--auto-batch" in message and "test limit" in message
    chosen = memory.plan_training(model, (3, 32, 32), 64, auto_batch=True, name="vgg11")
    assert chosen.batch_size == 8 and chosen.requested_batch_size == 64 and chosen.fits
    assert memory.plan_training(model, (3, 32, 32), 64, samples=8, name="vgg11").batch_size == 8
    _limit(monkeypatch, 1000)
    with pytest.raises(memory.ModellegoError, match="at batch size 1, more than"):
        memory.plan_training(model, (3, 32, 32), 64, auto_batch=True, name="vgg11")


def test_inference_lowers_its_batch_with_one_warning_and_the_same_logits(monkeypatch):
    torch.manual_seed(0)
    model = build("lenet5", 3, 4, 0.5).eval()
    data = TensorDataset(torch.rand(40, 3, 32, 32), torch.arange(40) % 4)
    expected, _ = predict(model, data, batch_size=40)
    at_5 = memory.estimate(model, (3, 32, 32), 5)
    _limit(monkeypatch, int(at_5.peak_bytes / memory.USABLE_SHARE) + 1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        logits, _ = predict(model, data, batch_size=40)
    lowered = [str(w.message) for w in caught if "using batch size" in str(w.message)]
    assert len(lowered) == 1 and "evaluating at batch size 40" in lowered[0]
    assert "using batch size 5" in lowered[0] and "test limit" in lowered[0]
    torch.testing.assert_close(logits, expected)


def test_cifar_style_zoo_models_warn_above_64_px():
    with pytest.warns(UserWarning, match=r"49 times.*--image-size 32.*torchvision:googlenet"):
        assert warn_if_oversized("googlenet", (224, 224))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not warn_if_oversized("googlenet", (64, 64))
        assert not warn_if_oversized("torchvision:googlenet", (224, 224))


def test_train_cli_refuses_or_auto_sizes_and_records_the_estimate(tmp_path, monkeypatch):
    args = ("train", "--model", "lenet5", "--data", "digits", "--max-per-class", "4", "--epochs", "1",
            "--batch-size", "32")
    from modellego import data
    from modellego.models.classifier import classifier

    spec = data.load("digits", "train").spec
    at_4 = memory.estimate(classifier("lenet5", spec, 10), (1, *spec.size), 4, training=True)
    _limit(monkeypatch, int(at_4.peak_bytes / memory.USABLE_SHARE) + 1)
    refused = invoke(*args, "--out", str(tmp_path / "a.safetensors"))
    assert_user_error(refused, "training lenet5", "more than", "test limit", "--batch-size 4 fits", "--auto-batch")
    assert list(tmp_path.iterdir()) == []
    done = invoke(*args, "--auto-batch", "--verbose", "--out", str(tmp_path / "b.safetensors"))
    assert done.returncode == 0, done.stderr
    assert "memory: training lenet5 at batch size 4 (lowered from 32)" in done.stderr
    _, manifest = load(tmp_path / "b.safetensors")
    recorded = manifest.provenance["trained"]["memory"]
    assert recorded["batch_size"] == manifest.provenance["trained"]["batch_size"] == 4
    assert recorded["requested_batch_size"] == 32 and recorded["peak_bytes"] == at_4.peak_bytes
    assert "available_bytes" not in recorded  # the file must not depend on the machine's free memory


def _write_small_images(folder, per_class: int) -> None:
    from PIL import Image

    generator = torch.Generator().manual_seed(0)
    for split, count in (("train", per_class), ("test", 2)):
        for name in ("a", "b"):
            (folder / split / name).mkdir(parents=True)
            for k in range(count):
                pixels = (torch.rand(16, 16, 3, generator=generator) * 255).to(torch.uint8).numpy()
                Image.fromarray(pixels).save(folder / split / name / f"{k}.png")


def test_issue_command_under_a_small_ulimit_ends_with_one_clear_line(tmp_path):
    """The issue's command (GoogLeNet at width 0.25 on 64 small images resized to 224 px, batch 128) under a
    4 GiB `ulimit -v` (or this process's address space plus 1 GiB where importing torch maps more): one error
    line naming the estimate and the limit, exit 2, no file, instead of the kernel's OOM killer."""
    _write_small_images(tmp_path / "pictures", per_class=32)
    mapped = int(open("/proc/self/status").read().split("VmSize:")[1].split()[0]) * 1024
    limit = max(4 * 2**30, mapped + 2**30)

    def small_limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    out = tmp_path / "g.safetensors"
    env = dict(os.environ, COLUMNS="300", PYTHONWARNINGS="ignore")
    done = subprocess.run([sys.executable, "-m", "modellego", "train", "--model", "googlenet", "--width", "0.25",
                           "--data", "imagefolder", "--data-root", str(tmp_path / "pictures"), "--epochs", "1",
                           "--out", str(out)], capture_output=True, text=True, env=env, timeout=600,
                          preexec_fn=small_limit)
    assert_user_error(done, "training googlenet on 3×224×224 inputs needs about", "GiB of memory at batch size 64",
                      "(all 64 training images)", "available (ulimit -v)")
    assert not out.exists()


def test_the_suggested_batch_and_auto_batch_run_under_an_address_space_limit(tmp_path):
    """Under `ulimit -v` about 390 MB above what the command maps once torch is imported (the hostile pass's
    `ulimit -v 4000000` on this machine) and 470 MB: a refused batch size names one that then trains (or, where
    memory is too tight to promise one, says so), `--auto-batch` trains, and both models evaluate; running out
    anyway is one line, never an allocator's traceback. Before malloc's arenas were limited to one under such a
    limit, the suggested batch and --auto-batch both ran out."""
    import re
    import shlex
    import subprocess
    import sys

    probe = "import modellego.commands, modellego.cli.application; print(open('/proc/self/status').read().split('VmSize:')[1].split()[0])"
    baseline = int(subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                                  check=True).stdout.strip())
    limit = 0

    def run(*args: str) -> subprocess.CompletedProcess:
        command = f"ulimit -v {limit}; exec {shlex.quote(sys.executable)} -m modellego {shlex.join(args)}"
        return subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=600, cwd=tmp_path)

    train = ["train", "--model", "lenet5", "--data", "digits", "--epochs", "1"]
    for headroom in (390_000, 470_000):
        limit = baseline + headroom
        refused = run(*train, "--batch-size", "65536", "--out", "refused.safetensors")
        assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr
        assert not (tmp_path / "refused.safetensors").exists()
        suggested = re.search(r"--batch-size (\d+) fits", refused.stderr)
        # with room, a batch size is named; without (390 MB here), the refusal says so and points to --auto-batch
        assert suggested or (headroom == 390_000 and "too tight" in refused.stderr), refused.stderr
        runs = [("auto", ["--auto-batch"])] + ([("suggested", ["--batch-size", suggested.group(1)])] if suggested else [])
        for name, options in runs:
            trained = run(*train, *options, "--out", f"{name}-{headroom}.safetensors")
            if headroom == 390_000 and trained.returncode != 0:
                # at the very edge, a thread or workspace can still find no address space: one line, nothing written
                assert trained.returncode == 2 and "out of memory" in trained.stderr, trained.stderr[-1500:]
                assert not (tmp_path / f"{name}-{headroom}.safetensors").exists()
                continue
            assert trained.returncode == 0, (headroom, name, trained.stderr[-1500:])
            scored = run("eval", f"{name}-{headroom}.safetensors")
            assert scored.returncode == 0 and "all" in scored.stdout, (headroom, name, scored.stderr[-1500:])
