"""The command line as a user runs it: train -> eval -> info, the demo, and one-line errors for bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from helpers import assert_user_error, invoke, run_cli
from modellego.io.modelfile import load


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    folder = tmp_path_factory.mktemp("trained")
    path = folder / "lenet.safetensors"
    result = run_cli("train", "--model", "lenet5", "--data", "fashion-mnist", "--classes", "Trouser,Bag,Sandal",
                     "--epochs", "4", "--lr", "0.005", "--max-per-class", "200", "--width", "0.5", "--seed", "3", "--out", str(path))
    assert result.returncode == 0, result.stderr
    return path


def test_train_eval_round_trip(trained):
    model, manifest = load(trained)
    assert manifest.class_names == ["Trouser", "Bag", "Sandal"]
    assert [ref.index for ref in manifest.classes] == [1, 8, 5]
    assert manifest.architecture == {"builder": "lenet5", "in_channels": 1, "num_classes": 3, "width": 0.5}
    assert manifest.provenance["trained"]["samples"] == 600
    result = run_cli("eval", str(trained), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert set(report) >= {"accuracy", "per_class", "params", "flops"}
    assert report["samples"] == 3000 and set(report["per_class"]) == {"Trouser", "Bag", "Sandal"}
    assert 0.8 < report["accuracy"] <= 1.0
    assert report["accuracy"] == pytest.approx(manifest.metrics["test_accuracy"])
    assert report["params"] == sum(p.numel() for p in model.parameters())
    assert report["flops"] > 0
    only_bag = json.loads(invoke("eval", str(trained), "--json", "--classes", "Bag").stdout)
    assert only_bag["samples"] == 1000 and list(only_bag["per_class"]) == ["Bag"]
    table = invoke("eval", str(trained))
    assert table.returncode == 0 and "Trouser" in table.stdout and "params" in table.stdout


def test_info_shows_the_manifest(trained):
    result = run_cli("info", str(trained))
    assert result.returncode == 0 and "lenet5" in result.stdout and "Sandal" in result.stdout
    manifest = json.loads(invoke("info", str(trained), "--json").stdout)
    assert manifest["classes"][1] == {"name": "Bag", "dataset": "fashion-mnist", "index": 8}


def test_same_seed_gives_identical_files(trained, tmp_path):
    again = tmp_path / "again.safetensors"
    result = run_cli("train", "--model", "lenet5", "--data", "fashion-mnist", "--classes", "Trouser,Bag,Sandal",
                     "--epochs", "4", "--lr", "0.005", "--max-per-class", "200", "--width", "0.5", "--seed", "3", "--out", str(again))
    assert result.returncode == 0, result.stderr
    assert again.read_bytes() == trained.read_bytes()


def test_demo_runs_end_to_end(tmp_path):
    result = run_cli("demo", "--epochs", "1", "--out-dir", str(tmp_path / "demo"))
    assert result.returncode == 0, result.stderr
    assert "Ankle boot" in result.stdout and (tmp_path / "demo" / "lenet5-fashion-mnist.safetensors").is_file()


TRAIN = ["train", "--model", "lenet5", "--data", "digits", "--epochs", "1"]


@pytest.mark.parametrize("args, message", [
    (["train", "--model", "alexnet", "--data", "digits"], "unknown model 'alexnet'"),
    (["train", "--model", "lenet5", "--data", "imagenet"], "unknown dataset 'imagenet'"),
    (["train", "--model", "lenet5", "--data", "fashion-mnist", "--data-root", "/nonexistent"], "looked in /nonexistent"),
    (["train", "--model", "lenet5", "--data", "cifar10", "--data-root", "/nonexistent"], "not found"),
    (TRAIN + ["--classes", "Trouser"], "'Trouser' is not in 'digits'"),
    (["train", "--model", "lenet5", "--data", "digits", "--epochs", "0"], "--epochs must be at least 1"),
    (["train", "--model", "lenet5", "--data", "digits", "--epochs", "-3"], "--epochs must be at least 1"),
    (TRAIN + ["--width", "0"], "width must be a positive"),
    (["train", "--model", "lenet5"], "--data"),
    (["frobnicate"], "frobnicate"),
])
def test_bad_training_input_is_one_line_and_writes_nothing(tmp_path, args, message):
    out = tmp_path / "model.safetensors"
    if "--out" not in args and args[0] == "train":
        args = args + ["--out", str(out)]
    assert_user_error(invoke(*args), message)
    assert list(tmp_path.iterdir()) == []


def test_output_in_a_missing_folder_fails_before_training(tmp_path):
    result = run_cli(*TRAIN, "--out", str(tmp_path / "no" / "such" / "model.safetensors"))  # as a user runs it
    assert_user_error(result, "does not exist")
    assert list(tmp_path.iterdir()) == []


def test_files_that_are_not_models_are_refused(tmp_path):
    from helpers import foreign_files

    for name, (path, message) in foreign_files(tmp_path).items():
        for command in ("eval", "info"):
            if command == "info" and name == "inconsistent":
                continue  # info reads the manifest only
            assert_user_error(invoke(command, str(path)), message)
    assert_user_error(run_cli("eval", str(tmp_path / "random.safetensors")), "not a readable")


def test_eval_on_a_dataset_without_the_models_classes(trained):
    assert_user_error(invoke("eval", str(trained), "--data", "digits"), "has no class named")
    assert_user_error(invoke("eval", str(trained), "--classes", "Coat"), "'Coat' is not in")


def test_an_unexpected_error_is_one_line_asking_for_a_report(trained, monkeypatch):
    import modellego.commands.evaluate

    def broken(*args, **kwargs):
        raise RuntimeError("the index went sideways\nsecond line")

    monkeypatch.setattr(modellego.commands.evaluate, "read_manifest", broken)
    result = invoke("info", str(trained))
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == ["error: RuntimeError: the index went sideways (please report this at the project's issue "
                     "tracker; rerun with --debug for the traceback)"]
    assert "Traceback" not in result.stdout + result.stderr
    debug = invoke("--debug", "info", str(trained))
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "the index went sideways" in debug.stderr
    assert invoke("info", str(trained)).returncode == 1 and "Traceback" not in invoke("info", str(trained)).stderr


def test_library_warnings_are_single_lines(trained, monkeypatch):
    import warnings

    import modellego.commands.evaluate

    real = modellego.commands.evaluate.read_manifest

    def warning_twice(path):
        warnings.warn("this file is odd")
        warnings.warn("this file is odd")
        return real(path)

    monkeypatch.setattr(modellego.commands.evaluate, "read_manifest", warning_twice)
    result = invoke("info", str(trained))
    assert result.returncode == 0
    assert result.stderr.strip().splitlines() == ["warning: this file is odd"]


def test_imagefolder_model_remembers_its_data_and_image_size(tmp_path, monkeypatch):
    from helpers import write_image_folder

    write_image_folder(tmp_path / "pictures", per_class=6)
    monkeypatch.chdir(tmp_path)
    trained = invoke("train", "--model", "lenet5", "--data", "imagefolder", "--data-root", "pictures",
                     "--image-size", "32", "--epochs", "3", "--lr", "0.01", "--batch-size", "4",
                     "--out", "folder.safetensors")
    assert trained.returncode == 0, trained.stderr
    _, manifest = load(tmp_path / "folder.safetensors")
    assert manifest.input.size == (32, 32)
    assert manifest.provenance["trained"]["data_root"] == str(tmp_path / "pictures")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.delenv("MODELLEGO_DATA_ROOT", raising=False)
    result = invoke("eval", str(tmp_path / "folder.safetensors"), "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["samples"] == 12
    assert_user_error(invoke("eval", str(tmp_path / "folder.safetensors"), "--image-size", "4"), "--image-size")
    assert_user_error(invoke("eval", str(tmp_path / "folder.safetensors"), "--data-root", str(elsewhere)),
                      "looked in", "--data-root", "MODELLEGO_DATA_ROOT")


def test_bad_image_sizes_are_refused_before_any_work(tmp_path):
    out = tmp_path / "m.safetensors"
    assert_user_error(invoke(*TRAIN, "--image-size", "5000", "--out", str(out)), "--image-size must be")
    assert_user_error(invoke(*TRAIN, "--image-size", "big", "--out", str(out)), "--image-size")
    assert_user_error(invoke(*TRAIN, "--image-size", "64", "--out", str(out)), "has 28×28 images")
    assert list(tmp_path.iterdir()) == []


def test_version_and_top_level_help_answer_without_torch():
    """`--version` and `--help` answer from cli/quick.py, a command's `--help` and an option typer refuses from the
    application before torch is imported: in a fresh interpreter torch is never imported. The top-level help lists
    exactly the application's commands with their docstrings' summaries."""
    import inspect

    import typer.main

    from modellego.cli.application import app
    from modellego.cli.quick import COMMANDS, OPTIONS, version

    probe = ("import sys; from unittest import mock; from modellego.cli import main\n"
             "for args in (['--version'], ['--help'], [], ['train', '--help'], ['assemble', '--help'],\n"
             "             ['disassemble', '--help'], ['route', '--help'], ['train', '--epochs', 'abc']):\n"
             "    with mock.patch.object(sys, 'argv', ['modellego', *args]):\n"
             "        try:\n"
             "            main()\n"
             "        except SystemExit:\n"
             "            pass\n"
             "print('TORCH' if 'torch' in sys.modules else 'NO TORCH')")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("NO TORCH") and f"modellego {version()}" in result.stdout
    commands = typer.main.get_command(app).commands
    assert [name for name, _ in COMMANDS] == list(commands)
    for name, summary in COMMANDS:
        assert summary == inspect.cleandoc(commands[name].callback.__doc__).split("\n\n")[0].replace("\n", " ")
        assert name in result.stdout
    options = {parameter.opts[0] for parameter in typer.main.get_command(app).params}
    assert {name for name, _ in OPTIONS} == options | {"--help"}
    # the version also answers through the application, after other global options
    assert invoke("--debug", "--version").stdout.strip() == f"modellego {version()}"
