"""Profiles of the classes asked for, written one class's record at a time and read by record: the same masks as
a profile of every class, appending equals profiling at once, a subset is read without reading the file,
float16 halves it, old files load, hostile files are refused in one line."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import assert_user_error, invoke
from modellego import load, locate
from modellego.benchmarking.hostile import profile_parts, write_raw
from modellego.core.profile import profile
from modellego.errors import ModellegoError
from modellego.io.profiles import ProfileFile, load_profile, save_profile

TASK = [7, 1, 3]  # output positions, in the task's order


@pytest.fixture(scope="module")
def source(lenet):
    model, manifest = load(lenet.path)
    return model, manifest, lenet.train


@pytest.fixture(scope="module")
def whole(source):
    model, _, train = source
    return profile(model, train, samples_per_class=8)


def test_a_profile_of_the_tasks_classes_gives_the_same_masks_as_a_profile_of_all(source, whole):
    model, _, train = source
    asked = profile(model, train, classes=TASK, samples_per_class=8)
    assert asked.classes == [whole.classes[k] for k in TASK] and asked.output_positions == TASK
    assert asked.outputs == 10 and asked.contributions[asked.layers[-1]].shape[1] == 10
    full, part = locate(model, whole), locate(model, asked)
    for layer in whole.layers:
        assert torch.equal(part.masks[layer], full.masks[layer][TASK]), layer
        assert torch.equal(part.scores[layer], full.scores[layer][TASK]), layer
    for row, k in enumerate(TASK):
        assert torch.equal(asked.samples[asked.sample_labels == row], whole.samples[whole.sample_labels == k])


def test_the_selection_reads_only_the_asked_classes_samples(source):
    model, _, train = source

    class Counting(torch.utils.data.Dataset):
        def __init__(self, inner):
            self.inner, self.read = inner, []
            self.targets, self.classes, self.name = inner.targets, inner.classes, inner.name

        def __len__(self):
            return len(self.inner)

        def __getitem__(self, index):
            self.read.append(int(self.targets[index]))
            return self.inner[index]

    counting = Counting(train)
    profile(model, counting, classes=[2, 5], samples_per_class=4)
    assert set(counting.read) == {2, 5}


def test_files_hold_per_class_records_read_alone(source, whole, tmp_path):
    path = tmp_path / "whole.safetensors"
    save_profile(whole, path)
    again = load_profile(path)
    assert again.digest() == whole.digest()
    for layer in whole.layers:
        assert torch.equal(again.contributions[layer], whole.contributions[layer])
    with ProfileFile(path) as opened:
        part = opened.read([3])
        # one class of ten: the header and one record, about a tenth of the file
        assert opened.bytes_read < 0.15 * path.stat().st_size
    assert part.classes == [whole.classes[3]] and part.digest() == whole.digest()
    assert torch.equal(part.contributions[whole.layers[0]][0], whole.contributions[whole.layers[0]][3])
    with pytest.raises(ModellegoError, match="holds no record of class 'Bag'"):
        load_profile(save_profile(part, tmp_path / "one.safetensors"), [8], ["Bag"])


def test_appending_classes_equals_profiling_them_at_once(source, tmp_path):
    model, manifest, train = source
    path, at_once = tmp_path / "appended.safetensors", tmp_path / "at-once.safetensors"
    assert invoke("profile", str(model_file(source, tmp_path)), "--classes", "Trouser,Bag", "--samples-per-class",
                  "5", "--out", str(path)).returncode == 0
    appended = invoke("profile", str(model_file(source, tmp_path)), "--classes", "Sandal", "--samples-per-class", "5",
                      "--append", str(path))
    assert appended.returncode == 0, appended.stderr
    assert invoke("profile", str(model_file(source, tmp_path)), "--classes", "Trouser,Bag,Sandal",
                  "--samples-per-class", "5", "--out", str(at_once)).returncode == 0
    first, second = load_profile(path), load_profile(at_once)
    assert first.digest() == second.digest() and first.classes == second.classes == ["Trouser", "Bag", "Sandal"]
    for layer in first.layers:
        assert torch.equal(first.contributions[layer], second.contributions[layer])
    everything = tmp_path / "all.safetensors"
    assert invoke("profile", str(model_file(source, tmp_path)), "--samples-per-class", "5", "--out",
                  str(everything)).returncode == 0
    whole_file = load_profile(everything)
    for row, name in enumerate(first.classes):  # sample positions index the model's whole training set
        assert torch.equal(first.samples[first.sample_labels == row],
                           whole_file.samples[whole_file.sample_labels == whole_file.classes.index(name)])
    listed = json.loads(invoke("info", str(path), "--json").stdout)
    assert [c["name"] for c in listed["classes"]] == ["Trouser", "Bag", "Sandal"] and listed["format_version"] == 2
    assert_user_error(invoke("profile", str(model_file(source, tmp_path)), "--classes", "Bag", "--append",
                             str(path)), "holds class 'Bag' already")
    assert_user_error(invoke("profile", str(model_file(source, tmp_path)), "--classes", "Bag", "--append", str(path),
                             "--out", str(tmp_path / "x.safetensors")), "--out FILE", "--append PROFILE")


def model_file(source, tmp_path: Path) -> Path:
    model, manifest, _ = source
    path = tmp_path / "lenet.safetensors"
    if not path.exists():
        from modellego import save

        save(model, path, manifest)
    return path


def test_float16_halves_the_file_and_a_small_disk_is_refused_before_any_work(source, whole, tmp_path, monkeypatch):
    single, half = tmp_path / "single.safetensors", tmp_path / "half.safetensors"
    save_profile(whole, single)
    save_profile(whole, half, dtype="float16")
    assert half.stat().st_size < 0.55 * single.stat().st_size
    rounded = load_profile(half)
    for layer in whole.layers:
        torch.testing.assert_close(rounded.contributions[layer], whole.contributions[layer], rtol=1e-3, atol=1e-3)
    import shutil

    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    out = tmp_path / "big.safetensors"
    assert_user_error(invoke("profile", str(model_file(source, tmp_path)), "--out", str(out)),
                      "needs about", "on disk", "--dtype float16")
    assert not out.exists()


def test_a_profile_of_format_1_still_loads(tmp_path):
    tensors, header = profile_parts()
    path = write_raw(tmp_path / "old.safetensors", tensors, header, key="modellego-profile")
    old = load_profile(path)
    assert old.classes == header["classes"] and old.output_positions == [0, 1, 2, 3]
    assert load_profile(path, [2]).classes == [header["classes"][2]]


def _rewrite(source: Path, target: Path, change) -> Path:
    """Copy a profile file with its safetensors header (index and metadata) changed by `change(index, meta)`."""
    raw = source.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    index = json.loads(raw[8:8 + size])
    meta = json.loads(index["__metadata__"]["modellego-profile"])
    change(index, meta)
    index["__metadata__"]["modellego-profile"] = json.dumps(meta)
    text = json.dumps(index).encode()
    text += b" " * (-len(text) % 8)
    target.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + size:])
    return target


JUNK = st.one_of(st.none(), st.booleans(), st.integers(-3, 10**12), st.floats(allow_nan=True), st.text(max_size=8),
                 st.lists(st.integers(-2, 5), max_size=3))
FIELDS = ["layer_sizes", "layer_sizes.0", "layer_sizes.0.1", "num_outputs", "dtype", "layers", "layers.1",
          "classes", "classes.0", "classes.0.position", "classes.0.count", "classes.0.sha256", "classes.1.name",
          "model_hash", "input_shape", "format_version"]


@pytest.fixture(scope="module")
def small_file(tmp_path_factory):
    from modellego.benchmarking.hostile import small_model, small_profile

    model, _ = small_model()
    path = tmp_path_factory.mktemp("v2") / "p.safetensors"
    save_profile(small_profile(model), path)
    return path


def _set(meta: dict, path: str, value) -> None:
    """Put `value` at `path` (list indices wrap). Where an earlier change of the same example replaced part of the
    path with junk (an empty list, a number), the value goes at the deepest part that still exists, instead of
    the fuzzer itself crashing on it."""
    node, parts = meta, path.split(".")
    for part in parts[:-1]:
        child = _at(node, part)
        if not isinstance(child, (dict, list)) or child == []:
            _put(node, part, value)
            return
        node = child
    _put(node, parts[-1], value)


def _at(node, part: str):
    return node[int(part) % len(node)] if isinstance(node, list) else node.get(part)


def _put(node, part: str, value) -> None:
    if isinstance(node, list):
        if node:
            node[int(part) % len(node)] = value
        else:
            node.append(value)
    else:
        node[part] = value


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fields=st.lists(st.tuples(st.sampled_from(FIELDS), JUNK), min_size=1, max_size=3),
       flip=st.one_of(st.none(), st.integers(0, 10_000)), positions=st.sampled_from([None, [0], [3, 1]]))
def test_hostile_profile_files_are_refused_in_one_line_or_load(small_file, fields, flip, positions):
    with tempfile.TemporaryDirectory() as folder:
        target = Path(folder) / "p.safetensors"

        def change(index, meta):
            for path, value in fields:
                try:
                    _set(meta, path, value)
                except (KeyError, IndexError, TypeError, ValueError):
                    pass

        _rewrite(small_file, target, change)
        if flip is not None:
            data = bytearray(target.read_bytes())
            data[-1 - flip % 4000] ^= 0xFF
            target.write_bytes(bytes(data))
        try:
            loaded = load_profile(target, positions)
        except ModellegoError as error:
            assert "\n" not in str(error)
            return
        assert all(torch.isfinite(value).all() for value in loaded.contributions.values())


def test_a_record_that_does_not_match_its_digest_is_refused(small_file, tmp_path):
    data = bytearray(small_file.read_bytes())
    data[-100] ^= 0x01  # inside the last record
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(bytes(data))
    with ProfileFile(damaged) as opened:
        last = opened.classes()[-1][0]
        with pytest.raises(ModellegoError, match="does not match its digest"):
            opened.read([last])
        assert opened.read([opened.classes()[0][0]]).classes  # the other records are fine
