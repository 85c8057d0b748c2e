"""Fixtures shared by the test files: small real datasets, a LeNet-5 trained once per session and its profile.
The helpers tests import live in helpers.py (on the path: pyproject's `pythonpath`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
from hypothesis import settings

# Hypothesis draws the same examples on every run, so that CI passes or fails on the code, not on the draw (a
# float tolerance once failed one run in many). `HYPOTHESIS_PROFILE=explore` draws new examples each run.
settings.register_profile("ci", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# The cores shared out among pytest-xdist's workers (`-n auto` in pyproject.toml), at least one thread each.
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))))


@pytest.fixture(autouse=True, scope="session")
def _no_dataloader_workers():
    """Tests in this process read data without DataLoader workers (the cores are pytest-xdist's); tests that
    pass --workers, and the command line run in a subprocess, still use them."""
    from modellego import runtime

    with runtime.settings(workers=0):
        yield


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
    from modellego.io.modelfile import save
    from modellego.kinds.cnn import train_model

    train = data.per_class_slice(fashion_train, 400)
    model, manifest = train_model("lenet5", train, epochs=3, lr=3e-3, progress=False)
    path = tmp_path_factory.mktemp("lenet") / "lenet.safetensors"
    save(model, path, manifest)
    return TrainedFile(path, train)


@pytest.fixture(scope="session")
def digits_lenet(tmp_path_factory) -> Path:
    """A LeNet-5 trained once per session on scikit-learn's digits (3 epochs), saved to disk: the second source
    (another dataset) of the box's tests."""
    from modellego import data
    from modellego.io.modelfile import save
    from modellego.kinds.cnn import train_model

    model, manifest = train_model("lenet5", data.load("digits", "train"), epochs=3, lr=5e-3, progress=False)
    path = tmp_path_factory.mktemp("digits") / "digits.safetensors"
    save(model, path, manifest)
    return path


@pytest.fixture(scope="session")
def lenet_profile(lenet):
    """The session LeNet-5's profile: its 10 most confident correctly classified training images per class."""
    from modellego.core.profile import profile
    from modellego.io.modelfile import load

    model, _ = load(lenet.path)
    return profile(model, lenet.train, samples_per_class=10)
