"""Edited calibrated assemblies (issue 25): a gate's or a joint head's numbers, taps and logit slices changed in the
file. Every such file is refused with one line on load, or loads and answers ordinary images with finite outputs."""

from __future__ import annotations

import json
import tempfile
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import modellego
from helpers import assert_user_error, invoke, random_component
from modellego import commands, data
from modellego.core.gates import CALIBRATIONS
from modellego.errors import ModellegoError

FITTED = [name for name in CALIBRATIONS if name not in ("none", "scale")]
VALUES = [0.0, -1.0, 1e-45, -1e-45, 1e-3, 3e38, -3e38, float("nan"), float("inf"), 1e6, 1e9, 7.0]


@pytest.fixture(scope="module")
def assemblies(tmp_path_factory) -> dict[str, tuple[dict, dict]]:
    """Per fitted calibration and mode: the assembled file's tensors and manifest record."""
    first, second = random_component("lenet5", 0.5, "0,3", 1), random_component("lenet5", 0.5, "5,7,9", 2)
    folder = tmp_path_factory.mktemp("calibrated")
    parts = {}
    for calibration in FITTED:
        for mode in ("padded", "parallel"):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                built = commands.assembly([first, second], mode, calibration=calibration, store_training_data=True)
            path = folder / f"{calibration}-{mode}.safetensors"
            modellego.save(built.model, path, built.manifest)
            tensors = {name: tensor.contiguous() for name, tensor in modellego.load(path).model.state_dict().items()}
            parts[f"{calibration}-{mode}"] = (tensors, json.loads(modellego.read_manifest(path).to_json()))
    return parts


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    test = data.load("digits", "test")
    return torch.stack([test[k][0] for k in range(32)])


def loads_or_refuses(tensors: dict, record: dict, images: torch.Tensor) -> str:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "edited.safetensors"
        save_file(tensors, str(path), metadata={"modellego": json.dumps(record)})
        try:
            model, _ = modellego.load(path)
        except ModellegoError as error:
            assert "\n" not in str(error)
            return "refused"
        with torch.no_grad():
            output = model(images)
        assert torch.isfinite(output).all(), "an edited file loaded and gave non-finite outputs"
        return "loaded"


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(which=st.sampled_from([f"{c}-{m}" for c in FITTED for m in ("padded", "parallel")]),
       pick=st.integers(0, 10**6), value=st.sampled_from(VALUES), everywhere=st.booleans(),
       config=st.sampled_from([None, "start", "stop", "temperature", "layer"]), number=st.sampled_from(VALUES))
@example(which="mahalanobis-parallel", pick=0, value=0.0, everywhere=True, config=None, number=0.0)
def test_edited_calibration_numbers_are_refused_or_harmless(assemblies, images, which, pick, value, everywhere,
                                                            config, number):
    tensors, record = assemblies[which]
    tensors, record = dict(tensors), json.loads(json.dumps(record))
    editable = sorted(name for name in tensors if name.startswith(("gate.", "head.")))
    name = editable[pick % len(editable)]
    tensor = tensors[name].clone()
    if tensor.is_floating_point():
        flat = tensor.view(-1)
        if everywhere:
            flat.fill_(value)
        else:
            flat[pick % flat.numel()] = value
    else:  # tap positions
        tensor.view(-1)[pick % tensor.numel()] = int(min(abs(value), 2**40)) if value == value else 10**6
    tensors[name] = tensor
    calibration = record["architecture"].get("gate") or record["architecture"].get("joint")
    if config in ("start", "stop") and "gate" in record["architecture"]:
        calibration["components"][1][config] = 0 if config == "start" else 1
    elif config == "temperature" and "gate" in record["architecture"]:
        calibration["temperature"] = number if number == number and abs(number) != float("inf") else 1e-300
    elif config == "layer":
        components = calibration["components"]
        tap = components[0]["features"] if "gate" in record["architecture"] else components[0][0]
        tap["layer"] = tap["layer"].rsplit(".", 1)[0] + ".0"   # another layer of the same block
    loads_or_refuses(tensors, record, images)


@pytest.mark.parametrize("calibration", FITTED)
def test_each_reported_edit_is_refused(assemblies, images, calibration):
    """The first hostile pass's cases: a deviation of 0, 1e-45 or −1, statistics of 3e38, a temperature of
    1e-300, overlapping logit slices, a tap at another layer, a position beyond its layer."""
    tensors, record = assemblies[f"{calibration}-parallel"]
    edits = []
    for name in tensors:
        if name.endswith("normalize.std"):  # the input normalisation's deviations: 1e-45 would give infinities too
            edits.append((name, torch.full_like(tensors[name], 1e-45)))
        if name.startswith("gate.") and name.endswith("_std"):
            edits += [(name, torch.zeros_like(tensors[name])), (name, torch.full_like(tensors[name], 1e-45)),
                      (name, -tensors[name])]
        if name.startswith(("gate.", "head.")) and tensors[name].is_floating_point() and not name.endswith("_std"):
            edits.append((name, torch.full_like(tensors[name], 3e38)))
    for name, value in edits:
        assert loads_or_refuses({**tensors, name: value}, record, images) == "refused", name
    if "gate" in record["architecture"]:
        for change in ({"temperature": 1e-300}, {"start": 0}):
            edited = json.loads(json.dumps(record))
            gate = edited["architecture"]["gate"]
            if "temperature" in change:
                gate["temperature"] = change["temperature"]
            else:
                gate["components"][1]["start"] = 0
            assert loads_or_refuses(tensors, edited, images) == "refused", change
        edited = json.loads(json.dumps(record))
        edited["architecture"]["gate"]["components"][0]["features"]["layer"] = "members.0.net.features.0"
        expected = "refused" if calibration in ("mahalanobis", "knn") else "loaded"  # the gates that read features
        assert loads_or_refuses(tensors, edited, images) == expected


def test_eval_refuses_to_score_non_finite_outputs(tmp_path):
    """A model whose weights (not a calibration's numbers) give NaN loads, but `eval` does not print an accuracy."""
    brick = random_component("lenet5", 0.5, "0,3", 1)
    with torch.no_grad():
        next(brick.model.parameters()).fill_(float("nan"))
    path = tmp_path / "nan.safetensors"
    modellego.save(brick.model, path, brick.manifest)
    assert_user_error(invoke("eval", str(path)), "non-finite outputs", "not scored")
