"""profile -> disassemble -> eval --against from the command line, repeatability, and one-line errors."""

from __future__ import annotations

import json

import pytest

from helpers import assert_user_error, invoke, run_cli


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, lenet):
    folder = tmp_path_factory.mktemp("pipeline")
    source, profile, component = lenet.path, folder / "p.safetensors", folder / "c.safetensors"
    profiled = run_cli("profile", str(source), "--samples-per-class", "20", "--out", str(profile))
    assert profiled.returncode == 0, profiled.stderr
    cut = run_cli("disassemble", str(source), "--profile", str(profile), "--classes", "Trouser,Bag",
                  "--out", str(component))
    assert cut.returncode == 0, cut.stderr
    return folder, source, profile, component


def test_eval_against_the_source(pipeline):
    _, source, _, component = pipeline
    result = invoke("eval", str(component), "--against", str(source), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert {"base", "restricted_base", "accuracy", "params", "flops", "source_params", "source_flops"} <= set(report)
    assert report["samples"] == 2000 and report["classes"] == ["Trouser", "Bag"]
    assert report["params"] < report["source_params"] and report["flops"] < report["source_flops"]
    assert report["base"] <= report["restricted_base"]
    assert report["accuracy"] > 0.9
    table = invoke("eval", str(component), "--against", str(source))
    assert "Restricted base" in table.stdout and "Disa" in table.stdout


def test_info_records_the_provenance(pipeline):
    _, _, _, component = pipeline
    manifest = json.loads(invoke("info", str(component), "--json").stdout)
    record = manifest["provenance"]["disassembled"]
    assert manifest["kind"] == "component" and record["task"] == ["Trouser", "Bag"]
    assert {"source_hash", "profile_hash", "alpha_conv", "beta_conv", "alpha_fc", "beta_fc"} <= set(record)


def test_same_inputs_give_identical_files(pipeline):
    folder, source, profile, component = pipeline
    again_profile, again_component = folder / "p2.safetensors", folder / "c2.safetensors"
    assert invoke("profile", str(source), "--samples-per-class", "20", "--out", str(again_profile)).returncode == 0
    assert again_profile.read_bytes() == profile.read_bytes()
    assert invoke("disassemble", str(source), "--profile", str(again_profile), "--classes", "Trouser,Bag",
                  "--out", str(again_component)).returncode == 0
    assert again_component.read_bytes() == component.read_bytes()


def test_auto_search_stays_within_the_allowed_drop(pipeline):
    folder, source, profile, _ = pipeline
    automatic = folder / "auto.safetensors"
    result = invoke("disassemble", str(source), "--profile", str(profile), "--classes", "Trouser,Bag", "--auto",
                    "--max-drop", "1.0", "--out", str(automatic))
    assert result.returncode == 0, result.stderr
    record = json.loads(invoke("info", str(automatic), "--json").stdout)["provenance"]["disassembled"]["auto"]
    assert record["met_target"] and record["validation_accuracy"] >= record["validation_restricted_base"] - 0.01
    assert record["validation_samples"] > 1000  # 10% of the task's 12,000 training images, minus the profile's


def test_bad_disassembly_input(pipeline, tmp_path):
    folder, source, profile, _ = pipeline
    out = tmp_path / "c.safetensors"
    base = ["disassemble", str(source), "--profile", str(profile), "--out", str(out)]
    assert_user_error(invoke(*base, "--classes", "Sofa"), "'Sofa' is not in")
    assert_user_error(invoke(*base, "--classes", ""), "no classes")
    assert_user_error(invoke(*base, "--classes", "Bag", "--alpha-conv", "1.5"), "alpha_conv must be between 0 and 1")
    assert_user_error(invoke(*base, "--classes", "Bag", "--beta-fc", "-0.2"), "beta_fc must be between 0 and 1")
    assert_user_error(invoke(*base, "--classes", "Bag", "--auto", "--max-drop", "-1"), "--max-drop")
    other = tmp_path / "other.safetensors"
    assert invoke("train", "--model", "lenet5", "--data", "fashion-mnist", "--epochs", "1",
                  "--max-per-class", "20", "--seed", "9", "--out", str(other)).returncode == 0
    assert_user_error(invoke("disassemble", str(other), "--profile", str(profile), "--classes", "Bag",
                             "--out", str(out)), "different model")
    assert_user_error(invoke(*base[:3], str(source), *base[4:], "--classes", "Bag"), "not a modellego profile")
    assert_user_error(invoke("profile", str(source), "--samples-per-class", "0", "--out", str(out)),
                      "--samples-per-class must be at least 1")
    assert_user_error(invoke("eval", str(out), "--against", str(source)), "no such file")
    assert not out.exists()


def test_a_component_that_lost_its_task_is_never_silent(pipeline, tmp_path):
    _, source, profile, _ = pipeline
    base = ["disassemble", str(source), "--profile", str(profile), "--classes", "Trouser,Bag,Sandal"]
    extreme = invoke(*base, "--alpha-conv", "1", "--beta-conv", "1", "--alpha-fc", "1", "--beta-fc", "1",
                     "--out", str(tmp_path / "cut.safetensors"))
    assert extreme.returncode == 0, extreme.stderr
    warned = [line for line in extreme.stderr.splitlines() if "profile images" in line]
    assert len(warned) == 1 and warned[0].startswith("warning: the component gets "), extreme.stderr
    assert "points below its source restricted to the task (100.00%)" in warned[0] and "--auto" in warned[0]
    assert len(extreme.stderr.splitlines()) == len(set(extreme.stderr.splitlines()))  # each warning once
    keep_all = invoke(*base, "--alpha-conv", "0", "--beta-conv", "0", "--alpha-fc", "0", "--beta-fc", "0",
                      "--out", str(tmp_path / "all.safetensors"))
    assert keep_all.returncode == 0, keep_all.stderr
    assert "profile images" not in keep_all.stderr


def test_test_split_is_used_only_when_asked(pipeline, tmp_path, monkeypatch):
    """`disassemble` never reads the test split unless --evaluate; then it records Base / Restricted base / accuracy."""
    from modellego.data import task as task_module

    _, source, profile, component = pipeline
    assert "test_accuracy" not in json.loads(invoke("info", str(component), "--json").stdout)["metrics"]
    splits = []
    original = task_module.load
    monkeypatch.setattr(task_module, "load", lambda name, split, *a, **k: splits.append(split) or original(name, split, *a, **k))
    plain, evaluated = tmp_path / "plain.safetensors", tmp_path / "evaluated.safetensors"
    assert invoke("disassemble", str(source), "--profile", str(profile), "--classes", "Bag", "--out",
                  str(plain)).returncode == 0
    assert "test" not in splits
    result = invoke("disassemble", str(source), "--profile", str(profile), "--classes", "Bag", "--out", str(evaluated),
                    "--evaluate")
    assert result.returncode == 0 and "test accuracy" in result.stdout and "test" in splits
    metrics = json.loads(invoke("info", str(evaluated), "--json").stdout)["metrics"]
    assert {"test_accuracy", "base", "restricted_base", "base_per_class"} <= set(metrics)
