"""Untrusted files and careless input (issue 8): bounded memory on load, no input destroyed, consistent reads,
every bad value refused with one line."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from helpers import assert_user_error, invoke
from modellego.benchmarking.hostile import (
    MODEL_FIELDS,
    PROFILE_FIELDS,
    bombs,
    json_text,
    measure_all_in_subprocess,
    model_parts,
    mutate_tensors,
    profile_parts,
    read_with,
    set_path,
    small_model,
    small_profile,
    strategies,
    write_model,
    write_raw,
)
from modellego.core.profile import Profile
from modellego.errors import ModellegoError
from modellego.io.atomic import atomic_write
from modellego.io.modelfile import load, save
from modellego.io.profiles import load_profile, save_profile

MATRIX_FILE = os.environ.get("MODELLEGO_SAFETY_MATRIX")  # set to a path to record the CLI matrix for docs/safety.md


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("inputs")
    model_path = write_model(folder, "model.safetensors")
    other = write_model(folder, "other.safetensors", seed=1)
    model, _ = load(model_path)
    profile_path = save_profile(small_profile(model), folder / "model.profile.safetensors")
    return {"model": model_path, "other": other, "profile": profile_path, "folder": folder}


# --- fuzz: every reader either loads cleanly or refuses with ModellegoError --------------------------------------

JUNK, TENSOR_CHANGES = strategies()


def _check_reader(reader: str, path: Path) -> None:
    outcome = read_with(reader, path)  # anything but ModellegoError propagates and fails the test
    if outcome == "loaded" and reader == "load":
        model, manifest = load(path)
        if max(manifest.input.size) <= 256:
            with torch.no_grad():
                output = model(torch.zeros(1, manifest.input.channels, *manifest.input.size))
            assert output.shape == (1, len(manifest.classes))


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fields=st.lists(st.tuples(st.sampled_from(MODEL_FIELDS), st.one_of(JUNK, st.just("DELETE"))), max_size=3),
       change=TENSOR_CHANGES)
@example(fields=[], change=("shape", 6, [1], torch.float32))  # a conv bias of one value (meta does not check it)
def test_fuzzed_model_files_load_or_are_refused(fields, change):
    tensors, manifest = model_parts()
    for path, value in fields:
        set_path(manifest, path, value)
    with tempfile.TemporaryDirectory() as folder:
        path = write_raw(Path(folder) / "m.safetensors", mutate_tensors(tensors, change), json_text(manifest))
        for reader in ("read_manifest", "load"):
            _check_reader(reader, path)


@settings(max_examples=80, deadline=None)
@given(fields=st.lists(st.tuples(st.sampled_from(PROFILE_FIELDS), st.one_of(JUNK, st.just("DELETE"))), max_size=3),
       change=TENSOR_CHANGES, scale=st.sampled_from([1.0, 0.0, -1.0, float("nan"), float("inf")]))
def test_fuzzed_profiles_load_or_are_refused(fields, change, scale):
    tensors, header = profile_parts()
    for path, value in fields:
        set_path(header, path, value)
    if scale != 1.0:
        name = f"A/{header['layers'][0] if isinstance(header.get('layers'), list) and header['layers'] else 'x'}"
        if name in tensors:
            tensors[name] = tensors[name] * scale
    with tempfile.TemporaryDirectory() as folder:
        path = write_raw(Path(folder) / "p.safetensors", mutate_tensors(tensors, change), json_text(header),
                         key="modellego-profile")
        _check_reader("profile", path)


@pytest.mark.parametrize("scale, message", [(float("nan"), "NaN"), (0.0, "all zero"), (-1.0, "negative")])
def test_damaged_profile_sums_are_refused(tmp_path, scale, message):
    tensors, header = profile_parts()
    for name in header["layers"]:
        tensors[f"A/{name}"] = tensors[f"A/{name}"] * scale
    path = write_raw(tmp_path / "p.safetensors", tensors, header, key="modellego-profile")
    with pytest.raises(ModellegoError, match=message):
        load_profile(path)


def test_profile_of_other_layers_or_shapes_is_refused_by_the_model(files, tmp_path):
    model, _ = load(files["model"])
    good = small_profile(model)
    renamed = Profile(**{**good.__dict__, "layers": ["net.nope", *good.layers[1:]]})
    renamed.contributions = {"net.nope": good.contributions[good.layers[0]],
                             **{n: good.contributions[n] for n in good.layers[1:]}}
    with pytest.raises(ModellegoError, match="layers do not match"):
        renamed.check_model(model)
    reshaped = Profile(**{**good.__dict__, "contributions": dict(good.contributions)})
    reshaped.contributions[good.layers[0]] = torch.rand(4, 3, 1) + 0.1
    with pytest.raises(ModellegoError, match="shape"):
        reshaped.check_model(model)
    # computed on inputs of another shape than the model takes; sample positions beyond the training data
    other_input = Profile(**{**good.__dict__, "input_shape": (1, 32, 32)})
    with pytest.raises(ModellegoError, match="inputs of shape"):
        other_input.check_model(model, (1, 28, 28))
    far = Profile(**{**good.__dict__, "samples": good.samples.clone()})
    far.samples[0] = 10**9
    with pytest.raises(ModellegoError, match="sample positions reach 1,000,000,000"):
        far.check_samples(60_000)


def test_old_files_still_load(files):
    model, manifest = load(files["model"])
    assert manifest.metrics == {"test_accuracy": 0.5}
    assert load_profile(files["profile"]).layers


# --- memory bombs: refused fast, in bounded memory -------------------------------------------------------------


def test_memory_bomb_files_are_refused_fast_in_bounded_memory(tmp_path):
    cases = bombs(tmp_path)
    # the ones that load or build torchvision are covered in-process below, which keeps this test fast
    refused = {name: case for name, case in cases.items()
               if not (name.startswith(("input size 4096", "mobilenet")) and "50" not in name)}
    results = measure_all_in_subprocess(list(refused.values()), address_space_gb=2.0)
    for name, result in zip(refused, results, strict=True):
        assert result["outcome"].startswith("refused"), (name, result)
        assert result["seconds"] < 2.0, (name, result)  # about 0.3 s at most on a quiet 2-core CPU
    for name in ("mobilenet_v2 width=16", "input size 4096x4096 (allowed)"):
        reader, path = cases[name]
        assert read_with(reader, path).startswith("refused" if "mobilenet" in name else "loaded")


# --- never destroy an input ------------------------------------------------------------------------------------


def _commands(files: dict, out: Path) -> dict[str, list[str]]:
    model, profile, other = str(files["model"]), str(files["profile"]), str(files["other"])
    return {
        "profile": ["profile", model, "--out", out.as_posix()],
        "disassemble --out model": ["disassemble", model, "--profile", profile, "--classes", "0,1", "--out", str(out)],
        "assemble": ["assemble", model, other, "--out", str(out)],
        "finetune": ["finetune", model, "--out", str(out)],
    }


@pytest.mark.parametrize("command", ["profile", "disassemble --out model", "disassemble --out profile", "assemble",
                                     "finetune"])
@pytest.mark.parametrize("how", ["same path", "symlink", "hard link"])
def test_output_equal_to_an_input_is_refused_before_any_work(files, tmp_path, command, how):
    target = files["profile"] if command == "disassemble --out profile" else files["model"]
    if how == "same path":
        out = target
    elif how == "symlink":
        out = tmp_path / "link.safetensors"
        out.symlink_to(target)
    else:
        out = tmp_path / "hard.safetensors"
        os.link(target, out)
    before = {name: files[name].read_bytes() for name in ("model", "profile", "other")}
    args = _commands(files, out)["disassemble --out model" if command.startswith("disassemble") else command]
    started = time.perf_counter()
    assert_user_error(invoke(*args), "would destroy the input")
    assert time.perf_counter() - started < 5
    assert {name: files[name].read_bytes() for name in before} == before


# --- consistent reads while a file is replaced ------------------------------------------------------------------


def test_concurrent_readers_never_mix_two_files(tmp_path):
    versions = []
    for marker in (0.25, 0.75):
        model, manifest = small_model(seed=0)
        with torch.no_grad():
            model.net.classifier[-1].bias.fill_(marker)
        manifest.metrics = {"test_accuracy": marker}
        versions.append(save(model, tmp_path / f"v{marker}.safetensors", manifest).read_bytes())
    target = tmp_path / "shared.safetensors"
    target.write_bytes(versions[0])
    stop = threading.Event()

    def writer() -> None:
        turn = 0
        while not stop.is_set():
            temp = tmp_path / f".writer.{turn % 2}"
            temp.write_bytes(versions[turn % 2])
            os.replace(temp, target)
            turn += 1

    thread = threading.Thread(target=writer)
    thread.start()
    loads, mixed, deadline = 0, 0, time.perf_counter() + 4
    try:
        while time.perf_counter() < deadline and loads < 400:
            model, manifest = load(target)
            bias = model.net.classifier[-1].bias[0].item()
            mixed += bias != manifest.metrics["test_accuracy"]
            loads += 1
    finally:
        stop.set()
        thread.join()
    assert loads > 20 and mixed == 0, (loads, mixed)


# --- interrupted and failing writes ------------------------------------------------------------------------------


def test_a_killed_write_leaves_no_stale_temp_after_the_next_write(tmp_path):
    target = tmp_path / "big.safetensors"
    script = f"""
import sys, time
from modellego.io.atomic import atomic_write
from modellego.io.profiles import load_profile, save_profile
def slow(temp):
    with open(temp, "wb") as handle:
        for _ in range(10_000):
            handle.write(b"x" * (1 << 16)); handle.flush()
            print("writing", flush=True); time.sleep(0.01)
atomic_write({str(target)!r}, slow)
"""
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    for _ in range(3):
        child.stdout.readline()
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")], "the kill should have left a temp file"
    model, manifest = small_model()
    save(model, target, manifest)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.safetensors"]
    assert load(target)[1].metrics == manifest.metrics


def test_a_full_disk_is_one_error_and_leaves_no_temp(tmp_path, monkeypatch):
    def full(tensors, temp, metadata=None):
        Path(temp).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("modellego.io.modelfile.save_file", full)
    model, manifest = small_model()
    with pytest.raises(ModellegoError, match="no space left"):
        save(model, tmp_path / "m.safetensors", manifest)
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_in_the_cli_is_one_line(tmp_path, monkeypatch):
    def full(tensors, temp, metadata=None):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("modellego.io.modelfile.save_file", full)
    # 5 epochs: after one or three, some digits are right on fewer than half their images, and `train` warns about each
    result = invoke("train", "--model", "lenet5", "--data", "digits", "--epochs", "5", "--out",
                    str(tmp_path / "m.safetensors"))
    assert_user_error(result, "no space left")
    assert list(tmp_path.iterdir()) == []


def test_writes_are_synced_before_the_rename(tmp_path, monkeypatch):
    calls = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: calls.append("fsync") or real_fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: calls.append("replace") or real_replace(a, b))
    atomic_write(tmp_path / "f.bin", lambda temp: Path(temp).write_bytes(b"data"))
    assert calls[:2] == ["fsync", "replace"]


# --- the command line's bad values -------------------------------------------------------------------------------

TRAIN = ["train", "--model", "lenet5", "--data", "digits"]
CLI_CASES = [
    (TRAIN + ["--batch-size", "0"], "--batch-size must be"),
    (TRAIN + ["--batch-size", "-1"], "--batch-size must be"),
    (["eval", "MODEL", "--batch-size", "0"], "--batch-size must be"),
    (["eval", "MODEL", "--against", "MODEL", "--batch-size", "-1"], "--batch-size must be"),
    (["profile", "MODEL", "--batch-size", "0"], "--batch-size must be"),
    (["finetune", "MODEL", "--batch-size", "0"], "--batch-size must be"),
    (TRAIN + ["--lr", "nan"], "--lr must be a finite"),
    (TRAIN + ["--lr", "inf"], "--lr must be a finite"),
    (TRAIN + ["--lr", "0"], "--lr must be"),
    (TRAIN + ["--lr", "-0.1"], "--lr must be"),
    (["finetune", "MODEL", "--lr", "nan"], "--lr must be"),
    (TRAIN + ["--seed", str(2**64)], "--seed must be"),
    (TRAIN + ["--seed", "-1"], "--seed must be"),
    (TRAIN + ["--width", "1e9"], "--width must be"),
    (TRAIN + ["--width", "nan"], "--width must be"),
    (TRAIN + ["--width", "0"], "--width must be"),
    (TRAIN + ["--epochs", str(10**30)], "--epochs must be"),
    (TRAIN + ["--epochs", "0"], "--epochs must be"),
    (["finetune", "MODEL", "--epochs", "20000"], "--epochs must be"),
    (TRAIN + ["--max-per-class", "0"], "--max-per-class must be"),
    (TRAIN + ["--max-per-class", "-1"], "--max-per-class must be"),
    (TRAIN + ["--classes", ""], "--classes is empty"),
    (TRAIN + ["--classes", " , "], "--classes is empty"),
    (["eval", "MODEL", "--classes", ""], "--classes is empty"),
    (["disassemble", "MODEL", "--profile", "PROFILE", "--classes", ""], "--classes is empty"),
    (["disassemble", "MODEL", "--profile", "PROFILE", "--classes", "0", "--max-drop", "nan"], "max_drop (--max-drop) must be"),
    (["disassemble", "MODEL", "--profile", "PROFILE", "--classes", "0", "--alpha-conv", "nan"], "alpha_conv must be"),
    (["profile", "MODEL", "--samples-per-class", "0"], "--samples-per-class must be"),
    (["profile", "MODEL", "--samples-per-class", str(10**9)], "--samples-per-class must be"),
    (TRAIN + ["--out", "/proc/model.safetensors"], "not writable"),
    (["demo", "--out-dir", "MODEL"], "is a file"),
    (["demo", "--out-dir", "/proc/modellego-demo"], "cannot be created"),
    (["demo", "--epochs", "0", "--out-dir", "OUT_DIR"], "--epochs must be"),
    (["demo", "--seed", "-3", "--out-dir", "OUT_DIR"], "--seed must be"),
]


def _fill(args: list[str], files: dict, tmp_path: Path) -> list[str]:
    filled = [str(files["model"]) if a == "MODEL" else str(files["profile"]) if a == "PROFILE" else
              str(tmp_path / "demo") if a == "OUT_DIR" else a for a in args]
    if args[0] in ("train", "profile", "disassemble", "finetune") and "--out" not in args:
        filled += ["--out", str(tmp_path / "out.safetensors")]
    return filled


@pytest.mark.parametrize("args, message", CLI_CASES, ids=[" ".join(a) for a, _ in CLI_CASES])
def test_bad_values_are_one_line_and_write_nothing(files, tmp_path, args, message):
    before = sorted(files["folder"].iterdir())
    result = invoke(*_fill(args, files, tmp_path))
    assert_user_error(result, message)
    assert list(tmp_path.iterdir()) == [] and sorted(files["folder"].iterdir()) == before
    if MATRIX_FILE:
        with open(MATRIX_FILE, "a") as handle:
            handle.write(json.dumps([" ".join(args), result.stderr.strip()]) + "\n")


def test_no_arguments_prints_the_usage():
    result = invoke()
    assert result.returncode in (0, 2) and "Usage" in result.stdout + result.stderr
    assert "error:" not in result.stderr


def test_training_that_diverges_is_refused_not_saved(tmp_path):
    from modellego import data
    from modellego.kinds.cnn import train_model

    with pytest.raises(ModellegoError, match="diverged"):
        train_model("lenet5", data.load("digits", "train"), 1, lr=1e30, progress=False)


# --- what is printed: escaped text, strict JSON ------------------------------------------------------------------


def test_info_escapes_terminal_controls_and_markup_and_json_is_strict(tmp_path):
    from modellego.io.manifest import ClassRef

    model, manifest = small_model()
    manifest.classes = [ClassRef("\x1b[31mred\x1b[0m", "fashion-mnist", 0), ClassRef("[/bold]", "fashion-mnist", 1),
                        ClassRef(":smile: [link=x]y[/link]", "fashion-mnist", 2), ClassRef("ok", "fashion-mnist", 3)]
    manifest.metrics = {"test_accuracy": float("nan"), "loss": float("inf")}
    manifest.provenance = {"note\x07": "\x1b]0;title\x07", "many": ["x" * 100] * 1000}
    path = save(model, tmp_path / "m.safetensors", manifest)
    result = invoke("info", str(path))
    assert result.returncode == 0, result.stderr
    assert "\x1b" not in result.stdout and "\x07" not in result.stdout
    assert "[/bold]" in result.stdout and "\\x1b[31mred" in result.stdout and ":smile:" in result.stdout
    strict = invoke("info", str(path), "--json")
    assert strict.returncode == 0 and "NaN" not in strict.stdout and "Infinity" not in strict.stdout
    data = json.loads(strict.stdout, parse_constant=lambda name: pytest.fail(f"non-JSON constant {name}"))
    assert data["metrics"] == {"test_accuracy": None, "loss": None}
    assert data["classes"][0]["name"] == "\x1b[31mred\x1b[0m"  # kept exactly, escaped by JSON


def test_class_index_out_of_the_dataset_is_refused(tmp_path):
    from modellego.io.manifest import ClassRef

    model, manifest = small_model()
    manifest.classes = [ClassRef(f"c{i}", "digits", i) for i in (0, 1, 2, 11)]
    path = save(model, tmp_path / "m.safetensors", manifest)
    assert_user_error(invoke("eval", str(path)), "index 11")


# --- the malformed manifests the tester found, one by one ----------------------------------------------------------

MALFORMED = [
    ("architecture.num_classes", "abc"), ("architecture.num_classes", None), ("architecture.num_classes", 10**12),
    ("architecture.num_classes", 10**400), ("architecture.width", "abc"), ("architecture.width", 1e9),
    ("architecture.builder", "parallel"), ("provenance", "DEEP"), ("classes", []), ("classes.1.index", 10**6 + 1),
    ("classes.1.index", -5), ("input.size", [0, 28]), ("input.size", [40_000, 28]), ("layers.net.features.0", {"groups": 0}),
    ("input.mean", [0.1, 0.2]), ("input.std", [0.0]), ("input.mean", [float("nan")]), ("format_version", "1"),
    ("input.channels", 3), ("architecture", []), ("metrics", [1]), ("classes.0.name", 5),
]
MALFORMED_TENSORS = [("net.features.0.weight", []), ("net.features.0.weight", [6]), ("net.features.0.weight", [6, 1, 5]),
                     ("net.classifier.4.weight", [4, 83]), ("net.classifier.4.weight", [0, 84]), ("normalize.mean", [2, 1, 1])]


@pytest.mark.parametrize("field, value", MALFORMED, ids=[f"{f}={json.dumps(v)[:20]}" for f, v in MALFORMED])
def test_each_malformed_manifest_is_one_clean_refusal(tmp_path, field, value):
    tensors, manifest = model_parts()
    set_path(manifest, field, value)
    path = write_raw(tmp_path / "m.safetensors", tensors, json_text(manifest))
    started = time.perf_counter()
    outcome = read_with("load", path)
    assert outcome.startswith("refused") and time.perf_counter() - started < 1, outcome
    if MATRIX_FILE:
        with open(MATRIX_FILE + ".files", "a") as handle:
            handle.write(json.dumps([f"manifest {field} = {json.dumps(value)[:40]}", outcome.replace(str(path), "FILE")]) + "\n")


@pytest.mark.parametrize("key, shape", MALFORMED_TENSORS, ids=[f"{k}{s}" for k, s in MALFORMED_TENSORS])
def test_each_malformed_tensor_is_one_clean_refusal(tmp_path, key, shape):
    tensors, manifest = model_parts()
    tensors[key] = torch.ones(shape)
    path = write_raw(tmp_path / "m.safetensors", tensors, manifest)
    outcome = read_with("load", path)
    assert outcome.startswith("refused"), outcome
    if MATRIX_FILE:
        with open(MATRIX_FILE + ".files", "a") as handle:
            handle.write(json.dumps([f"tensor {key} of shape {shape}", outcome.replace(str(path), "FILE")]) + "\n")


def test_an_output_path_through_a_file_or_ending_in_a_separator_is_refused(files, tmp_path):
    """`--out model.safetensors/r.png` names a folder that cannot exist (no `mkdir -p` advice); `--out o.png/`
    names a folder (nothing written as ./o.png)."""
    base = ["route", str(files["model"]), "--profile", str(files["profile"]), "--classes", "0"]
    assert_user_error(invoke(*base, "--out", f"{files['model']}/r.png"), "is a file")
    result = invoke(*base, "--out", f"{tmp_path}/o.png/")
    assert_user_error(result, "ends in a separator")
    assert list(tmp_path.iterdir()) == [] and not Path("o.png").exists()


def test_a_class_index_beyond_the_model_names_its_classes(files, tmp_path):
    result = invoke("eval", str(files["model"]), "--classes", "7")
    assert_user_error(result, "class index 7 is out of range", "by its name or its position")


def test_damaged_or_foreign_masks_are_refused_in_one_line(tmp_path):
    """Masks whose mask and score differ in shape, with NaN settings or scores, or located on another model
    (2 classes for a 4-class model, another width) are refused with one line, not an IndexError later."""
    from safetensors.torch import load_file, safe_open, save_file

    from modellego.core.cut import disassemble
    from modellego.core.locate import locate
    from modellego.data.spec import InputSpec
    from modellego.io.masks import MASKS_FORMAT, load_masks, save_masks
    from modellego.models.classifier import classifier

    model, _ = small_model(classes=4)
    masks = locate(model, small_profile(model))
    path = save_masks(masks, tmp_path / "masks.safetensors")
    tensors = load_file(str(path))
    with safe_open(str(path), "pt") as handle:
        header = dict(handle.metadata())
    meta_key = MASKS_FORMAT
    meta = json.loads(header[meta_key])
    layer = meta["layers"][0]

    def written(changed_tensors: dict, changed_meta: dict) -> Path:
        target = tmp_path / "edited.safetensors"
        save_file(changed_tensors, str(target), metadata={**header, meta_key: json.dumps(changed_meta)})
        return target

    score = tensors[f"score/{layer}"]
    cases = {"differ in shape": ({**tensors, f"score/{layer}": score[:, :-1].contiguous()}, meta),
             "score is not finite": ({**tensors, f"score/{layer}": torch.full_like(score, float("nan"))}, meta),
             "settings.alpha_conv": (tensors, {**meta, "settings": {**meta["settings"], "alpha_conv": float("nan")}})}
    for message, (changed_tensors, changed_meta) in cases.items():
        with pytest.raises(ModellegoError, match=message):
            load_masks(written(changed_tensors, changed_meta))
    other, _ = small_model(classes=10)
    with pytest.raises(ModellegoError, match="located on another model|beyond the model"):
        disassemble(other, masks, [0])
    wide = classifier("lenet5", InputSpec(1, (28, 28), (0.286,), (0.353,)), 4, 2.0)
    with pytest.raises(ModellegoError, match="located on another model"):
        disassemble(wide, masks, [0])
