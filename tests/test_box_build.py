"""`box build` on real files: a LeNet-5 trained on Fashion-MNIST and one trained on digits. The built model answers
exactly the asked classes in order and matches the same chain run by hand; a second build reuses what the first
cut; changed files, missing classes and mixed inputs are refused in one line; the README's five commands run."""

from __future__ import annotations

import re
import shlex
import shutil
from pathlib import Path

import pytest

from helpers import assert_user_error, invoke, random_classifier
from modellego import commands
from modellego.box import Box
from modellego.data.spec import InputSpec
from modellego.io.modelfile import read_manifest, save

THREE = "fashion-mnist:Trouser,fashion-mnist:Bag,digits:3"
README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture(scope="module")
def sources(tmp_path_factory, lenet, digits_lenet):
    """The two trained models and, for each, a profile of just the classes asked of it (8 images per class)."""
    folder = tmp_path_factory.mktemp("sources")
    fashion, digits = folder / "fashion.safetensors", folder / "digits.safetensors"
    shutil.copyfile(lenet.path, fashion)
    shutil.copyfile(digits_lenet, digits)
    fashion_profile, digits_profile = folder / "fashion.profile.safetensors", folder / "digits.profile.safetensors"
    commands.profile(fashion, fashion_profile, 8, classes="Trouser,Bag", progress=False)
    commands.profile(digits, digits_profile, 8, classes="3", progress=False)
    return fashion, digits, fashion_profile, digits_profile


def test_build_from_sources_and_profiles_matches_the_hand_chain_and_is_reused(sources, tmp_path):
    fashion, digits, fashion_profile, digits_profile = sources
    out, again = tmp_path / "three.safetensors", tmp_path / "again.safetensors"
    with Box(tmp_path / "box.sqlite") as box:
        added = box.add([fashion, fashion_profile, digits, digits_profile])
        built = box.build(THREE, out, progress=False)
        assert [(ref.dataset, ref.name) for ref in read_manifest(out).classes] == \
            [("fashion-mnist", "Trouser"), ("fashion-mnist", "Bag"), ("digits", "3")]
        assert [step.profile.id for step in built.plan.steps] == [added[1].id, added[3].id]  # registered ones
        assert [entry.kind for entry in built.made] == ["component", "component"]
        assert all(Path(entry.path).parent == box.files for entry in built.made)
        assert box.get(built.entry.id).accuracy == pytest.approx(built.accuracy)
        assert [parent.id for parent in box.lineage(built.entry)][:2] == [entry.id for entry in built.made]

        rebuilt = box.build(THREE, again, progress=False)  # nothing is cut again
        assert rebuilt.plan.cuts == 0 and rebuilt.made == []
        assert [member.id for member in rebuilt.members] == [entry.id for entry in built.made]
        assert rebuilt.accuracy == pytest.approx(built.accuracy)
        assert len(list(box.entries())) == 4 + 2 + 2  # sources and profiles, two components, two models

    parts = [tmp_path / "hand-fashion.safetensors", tmp_path / "hand-digits.safetensors"]
    commands.disassemble(fashion, fashion_profile, "Trouser,Bag", parts[0], evaluate=True, progress=False)
    commands.disassemble(digits, digits_profile, "3", parts[1], evaluate=True, progress=False)
    commands.assemble(parts, tmp_path / "hand.safetensors", progress=False)
    by_hand = commands.evaluate_file(tmp_path / "hand.safetensors")
    assert by_hand["samples"] == built.samples > 2000  # both datasets' test images of the three classes
    assert abs(by_hand["accuracy"] - built.accuracy) <= 0.01
    assert built.accuracy > 0.8


def test_a_changed_file_is_never_used(sources, tmp_path):
    _, digits, _, _ = sources
    copy = tmp_path / "digits.safetensors"
    shutil.copyfile(digits, copy)
    box_path, out = tmp_path / "box.sqlite", tmp_path / "out.safetensors"
    assert invoke("box", "add", str(copy), "--box", str(box_path)).returncode == 0
    copy.write_bytes(copy.read_bytes() + b" ")
    assert_user_error(invoke("box", "build", "--classes", "digits:3,digits:5", "--out", str(out), "--box",
                             str(box_path)), "files changed or are gone")
    assert not out.exists() and not (tmp_path / "box-files").exists()


def test_plans_and_refusals_in_one_line(sources, tmp_path):
    fashion, digits, _, _ = sources
    box_path = str(tmp_path / "box.sqlite")
    cifar = tmp_path / "cifar.safetensors"
    model, manifest = random_classifier(spec=InputSpec(3, (32, 32), (0.5,) * 3, (0.25,) * 3), dataset="cifar10")
    save(model, cifar, manifest)
    assert invoke("box", "add", str(fashion), str(digits), str(cifar), "--box", box_path).returncode == 0

    plan = invoke("box", "build", "--classes", "trouser, digits:3 ,DIGITS:4", "--dry-run", "--box", box_path)
    assert plan.returncode == 0, plan.stderr
    assert "3 classes from 2 members (2 to cut)" in plan.stdout
    assert "fashion-mnist:Trouser ←" in plan.stdout and "digits:3, digits:4 ← cut from model 2" in plan.stdout
    assert not (tmp_path / "box-files").exists()  # a dry run writes nothing
    with Box(box_path) as box:
        assert box.plan("digits:0,digits:1,digits:2,digits:3,digits:4,digits:5,digits:6,digits:7,digits:8,"
                        "digits:9").steps[0].use.id == 2  # the model itself answers its own classes

    def refused(*arguments: str, message: str) -> None:
        assert_user_error(invoke("box", "build", *arguments, "--box", box_path), message)

    refused("--classes", "fashion-mnist:Cat", "--dry-run", message="the box can give")
    refused("--classes", "digits:3,cifar10:c1", "--dry-run", message="different inputs")
    refused("--classes", "digits:3,digits:3", "--dry-run", message="asked twice")
    refused("--classes", "digits:3", message="--out")
    refused("--classes", "digits:3", "--dry-run", "--max-flops", "0", message="--max-flops")
    refused("--classes", "digits:3", "--out", str(tmp_path / "x.safetensors"), "--max-flops", "10",
            message="over --max-flops")  # known only once cut: the component stays registered, no model is written
    with Box(box_path) as box:
        assert [entry.kind for entry in box.find(class_name="3")][-2:] == ["profile", "component"]
        cut = box.find(kind="component")[0]
        assert box.plan("digits:3", max_flops=cut.flops).steps[0].use.id == cut.id
        assert box.plan("digits:3", max_flops=cut.flops - 1).steps[0].use is None  # over the limit: not reused
    refused("--classes", ":3", "--dry-run", message="DATASET:CLASS")
    refused("--classes", "digits:3", "--out", str(tmp_path / "x.safetensors"), "--calibration", "psychic",
            message="calibration")
    assert not (tmp_path / "x.safetensors").exists()


def test_the_readme_walks_from_two_models_to_three_classes_in_five_commands(sources, tmp_path, monkeypatch):
    fashion, digits, _, _ = sources
    section = README.read_text().split("### From two trained models to a 3-class model in five commands")[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    lines = [line for line in block.splitlines() if line.strip()]
    assert len(lines) == 5 and all(line.startswith("modellego ") for line in lines)
    shutil.copyfile(fashion, tmp_path / "fashion.safetensors")
    shutil.copyfile(digits, tmp_path / "digits.safetensors")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MODELLEGO_BOX", str(tmp_path / "box.sqlite"))
    results = [invoke(*shlex.split(line)[1:]) for line in lines]
    assert [result.returncode for result in results] == [0] * 5, [result.stderr for result in results]
    assert "2 to cut" in results[2].stdout and "built" in results[3].stdout
    assert "accuracy" in results[4].stdout
    assert [ref.name for ref in read_manifest(tmp_path / "three.safetensors").classes] == ["Trouser", "Bag", "3"]
