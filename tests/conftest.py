"""Shared helpers: running the command as a user does, and small real datasets."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest
import torch

# The cores shared out among pytest-xdist's workers (`-n auto` in pyproject.toml), at least one thread each.
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))))


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run `python -m modellego ARGS` in a subprocess and capture its output."""
    env = dict(os.environ, COLUMNS="200", PYTHONWARNINGS="ignore", OMP_NUM_THREADS=str(torch.get_num_threads()))
    return subprocess.run([sys.executable, "-m", "modellego", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=timeout)


def invoke(*args: str) -> subprocess.CompletedProcess:
    """Run the `modellego` entry point in this process (fast; for the many error cases)."""
    import contextlib
    import io
    from unittest import mock

    from modellego.cli import main

    stdout, stderr = io.StringIO(), io.StringIO()
    code = 0
    with mock.patch.object(sys, "argv", ["modellego", *args]), contextlib.redirect_stdout(stdout), \
            contextlib.redirect_stderr(stderr):
        try:
            main()
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
    return subprocess.CompletedProcess(["modellego", *args], code, stdout.getvalue(), stderr.getvalue())


def assert_user_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    """Exit code 2, one readable line on stderr naming the problem, no traceback."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    for fragment in fragments:
        assert fragment.lower() in lines[0].lower(), (fragment, lines[0])


@pytest.fixture(scope="session")
def fashion_train():
    from modellego import data

    return data.load("fashion-mnist", "train")


@pytest.fixture(scope="session")
def fashion_test():
    from modellego import data

    return data.load("fashion-mnist", "test")


class TrainedFile(NamedTuple):
    """A model file on disk and the training images it learnt from."""

    path: Path
    train: object


@pytest.fixture(scope="session")
def lenet(tmp_path_factory, fashion_train) -> TrainedFile:
    """A LeNet-5 trained once per session (3 epochs on 400 Fashion-MNIST training images per class), saved to disk:
    the source that the profile, locate, disassembly and CLI tests share instead of each training their own."""
    from modellego import data
    from modellego.modelfile import save
    from modellego.train import train_model

    train = data.per_class_slice(fashion_train, 400)
    model, manifest = train_model("lenet5", train, epochs=3, lr=3e-3, progress=False)
    path = tmp_path_factory.mktemp("lenet") / "lenet.safetensors"
    save(model, path, manifest)
    return TrainedFile(path, train)


@pytest.fixture(scope="session")
def lenet_profile(lenet):
    """The session LeNet-5's profile: its 10 most confident correctly classified training images per class."""
    from modellego.modelfile import load
    from modellego.profiles import profile

    model, _ = load(lenet.path)
    return profile(model, lenet.train, samples_per_class=10)
