"""Calibrated assembly (gates.py): every gate's statistics against a slow by-hand reference on a tiny model, the
gated forward pass by hand, padded == parallel with every calibration, files that need no data, and the
one-line error when a component's training data is missing."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import TensorDataset

import modellego
from helpers import DIGITS, assert_user_error, invoke, load_without_data, random_component
from modellego import commands, data
from modellego.core.assemble import _padded, _taps, assemble
from modellego.core.gates import (
    CALIBRATIONS,
    GATES,
    KNN_NEIGHBOURS,
    NEAREST_NEIGHBOURS,
    NEAREST_SCALE,
    PER_SAMPLE,
    SHRINKAGE,
    Calibrated,
    Gate,
    fit,
)
from modellego.core.joint import joint_layers, solve
from modellego.core.modules import Parallel
from modellego.data.spec import InputSpec
from modellego.errors import ModellegoError

FASHION = InputSpec(1, (28, 28), (0.286,), (0.353,))


def tiny(seed: int, classes: int = 3) -> nn.Module:
    """1×8×8 → conv → conv (stride 2) → linear → linear: three layers the pattern gate compares."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(36, 5), nn.ReLU(), nn.Linear(5, classes)).eval()


def tiny_data(seed: int, count: int = 24, classes: int = 3) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.rand(count, 1, 8, 8, generator=generator), torch.arange(count) % classes)


# --- slow, obviously correct references --------------------------------------------------------------------------

def reference_contributions(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """C⁺[o, i] for one sample: for a conv, input channel i convolved alone with kernel W[o, i], summed over
    positions; for a linear layer W[o, i] · x[i]."""
    weight = layer.weight.detach().double()
    if isinstance(layer, nn.Linear):
        return (weight * x.double()[None, :]).clamp(min=0)
    out = torch.zeros(weight.shape[0], weight.shape[1], dtype=torch.float64)
    for o in range(weight.shape[0]):
        for i in range(weight.shape[1]):
            single = F.conv2d(x[i:i + 1][None].double(), weight[o:o + 1, i:i + 1], stride=layer.stride,
                              padding=layer.padding)
            out[o, i] = single.sum()
    return out.clamp(min=0)


def reference_quantities(model: nn.Sequential, images: torch.Tensor):
    """Logits, the classifier's input, and each compared layer's input, one sample at a time."""
    rows = []
    for image in images:
        activations = [image[None]]
        for module in model:
            activations.append(module(activations[-1]))
        logits = activations[-1][0]
        features = activations[-2][0]  # input of the last Linear
        inputs = {2: activations[2][0], 5: activations[5][0], 7: activations[7][0]}  # conv 2, linear 1, linear 2
        rows.append((logits, features, inputs))
    return rows


def reference_scores(method: str, model: nn.Sequential, dataset: TensorDataset, classes: int):
    images, labels = dataset.tensors
    with torch.no_grad():
        rows = reference_quantities(model, images)
    logits = torch.stack([r[0] for r in rows]).double()
    features = torch.stack([r[1] for r in rows]).double()
    expected: dict[str, torch.Tensor] = {}
    if method == "msp":
        scores = torch.tensor([max(math.exp(v) for v in row.tolist()) / sum(math.exp(v) for v in row.tolist())
                               for row in logits])
    elif method == "energy":
        scores = torch.tensor([math.log(sum(math.exp(v) for v in row.tolist())) for row in logits])
    elif method == "mahalanobis":
        means = torch.stack([features[labels == k].mean(0) for k in range(classes)])
        covariance = torch.zeros(features.shape[1], features.shape[1], dtype=torch.float64)
        for f, y in zip(features, labels):
            covariance += torch.outer(f - means[y], f - means[y])
        covariance /= len(features) - 1
        average = covariance.trace() / len(covariance)
        precision = torch.linalg.inv((1 - SHRINKAGE) * covariance + SHRINKAGE * average * torch.eye(len(covariance)))
        scores = torch.tensor([-min(float((f - m) @ precision @ (f - m)) for m in means) for f in features])
        expected.update(means=means, precision=precision)
    elif method == "knn":
        bank = features / features.norm(dim=1, keepdim=True)
        k = min(KNN_NEIGHBOURS, len(bank) - 1)
        scores = torch.tensor([-sorted((a - b).norm().item() for b in bank)[k] for a in bank])  # [0] is itself
        expected.update(bank=bank)
    elif method == "nearest":
        bank = images.flatten(1).double() / images.flatten(1).double().norm(dim=1, keepdim=True)
        expected.update(bank=bank, mean=torch.zeros(1), std=torch.full((1,), NEAREST_SCALE))
        return expected  # compared as they are: no z-scoring
    else:
        layers = [model[2], model[5], model[7]]
        per_sample = [[reference_contributions(layer, row[2][index]).flatten()
                       for layer, index in zip(layers, (2, 5, 7))] for row in rows]
        profiles = []
        for layer in range(3):
            means = torch.stack([torch.stack([per_sample[s][layer] for s in range(len(rows)) if labels[s] == k]).mean(0)
                                 for k in range(classes)])
            profiles.append(means / means.norm(dim=1, keepdim=True))
            expected[f"profile{layer}"] = profiles[-1]
        scores = torch.tensor([max(sum(float(F.cosine_similarity(per_sample[s][layer], profiles[layer][k], dim=0))
                                       for layer in range(3)) / 3 for k in range(classes)) for s in range(len(rows))])
    expected.update(mean=scores.mean(), std=scores.std().clamp(min=1e-3 * max(1.0, abs(scores.mean().item()))))
    return expected


@pytest.mark.parametrize("method", GATES)
def test_gate_statistics_match_a_by_hand_computation(method):
    model, dataset = tiny(0), tiny_data(1)
    stats = fit(method, model, dataset, (1, 8, 8))
    expected = reference_scores(method, model, dataset, 3)
    for name, value in expected.items():
        assert torch.allclose(stats[name].double().reshape(value.shape), value.double(), rtol=2e-4, atol=2e-5), name


@pytest.mark.parametrize("method", GATES)
@pytest.mark.parametrize("mode", ["padded", "parallel"])
def test_gated_forward_is_the_mixture_of_component_posteriors(method, mode):
    """out[j] = log_softmax(logits_c)[j] + log_softmax_c(z / T), z_c the score z-scored on c's own images."""
    first, second = tiny(0), tiny(1, classes=2)
    stats = [fit(method, first, tiny_data(1), (1, 8, 8)), fit(method, second, tiny_data(2, classes=2), (1, 8, 8))]
    model = assemble([first, second], (1, 8, 8), mode, calibration=method, stats=stats, temperature=0.5)
    images = torch.rand(5, 1, 8, 8)
    with torch.no_grad():
        z = []
        for member, own, classes in ((first, stats[0], 3), (second, stats[1], 2)):
            score = torch.tensor([reference_single(method, member, image, own, classes) for image in images])
            z.append((score - own["mean"]) / own["std"])
        weights = (torch.stack(z, 1) / 0.5).log_softmax(1)
        expected = torch.cat([first(images).log_softmax(1) + weights[:, :1],
                              second(images).log_softmax(1) + weights[:, 1:]], 1)
        assert torch.allclose(model(images), expected, rtol=1e-4, atol=1e-4)


def reference_single(method: str, model: nn.Sequential, image: torch.Tensor, stats: dict, classes: int) -> float:
    logits, features, inputs = reference_quantities(model, image[None])[0]
    logits, features = logits.double(), features.double()
    if method == "msp":
        return logits.softmax(0).max().item()
    if method == "energy":
        return logits.logsumexp(0).item()
    if method == "mahalanobis":
        precision = stats["precision"].double()
        return -min(float((features - m) @ precision @ (features - m)) for m in stats["means"].double())
    if method == "knn":
        unit = features / features.norm()
        return -sorted((unit - b).norm().item() for b in stats["bank"].double())[KNN_NEIGHBOURS - 1]
    if method == "nearest":
        unit = image.flatten().double() / image.flatten().double().norm()
        return -sorted((unit - b).norm().item() for b in stats["bank"].double())[NEAREST_NEIGHBOURS - 1]
    layers = [model[2], model[5], model[7]]
    patterns = [reference_contributions(layer, inputs[index]).flatten() for layer, index in zip(layers, (2, 5, 7))]
    return max(sum(float(F.cosine_similarity(patterns[layer], stats[f"profile{layer}"][k].double(), dim=0))
                   for layer in range(3)) / 3 for k in range(classes))


# --- real architectures, real images ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def digit_images():
    train = data.load("digits", "train")
    return torch.stack([train[k][0] for k in range(48)])


def test_padded_equals_parallel_with_every_calibration(digit_images):
    first = random_component("lenet5", 1.0, "0,3", seed=1)
    second = random_component("lenet5", 1.0, "5,7,9", seed=2)
    own = [TensorDataset(digit_images[:24], torch.arange(24) % 2), TensorDataset(digit_images[24:], torch.arange(24) % 3)]
    images = torch.rand(4, 1, 28, 28)
    for calibration in CALIBRATIONS:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            padded = assemble([first.model, second.model], (1, 28, 28), "padded", calibration=calibration, data=own)
            parallel = assemble([first.model, second.model], (1, 28, 28), "parallel", calibration=calibration, data=own)
        with torch.no_grad():
            a, b = padded(images), parallel(images)
        assert a.shape == (4, 5)
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item()), calibration


def test_padded_equals_parallel_through_residual_blocks(digit_images):
    """ResNet-18: the gates' taps (features, contribution blocks) follow channels through residual adds."""
    first = random_component("resnet18", 0.125, "0,3", seed=1)
    second = random_component("resnet18", 0.125, "5,7,9", seed=2)
    models = [first.model, second.model]
    own = [TensorDataset(digit_images[:16], torch.arange(16) % 2), TensorDataset(digit_images[16:32], torch.arange(16) % 3)]
    example = torch.zeros(1, 1, 28, 28)
    padded, layouts = _padded(models, [0, 1, 2, 3, 4], example)
    parallel = Parallel(models, [0, 1, 2, 3, 4]).eval()
    taps = {"padded": _taps(models, example, "padded", layouts, [2, 3]), "parallel": _taps(models, example, "parallel", {}, [2, 3])}
    images = digit_images[32:40]
    for method in ("mahalanobis", "pattern"):  # the feature taps and the contribution taps
        stats = [fit(method, model, data, example) for model, data in zip(models, own)]
        with torch.no_grad():
            a = Calibrated(padded, Gate.build(method, taps["padded"], stats))(images)
            b = Calibrated(parallel, Gate.build(method, taps["parallel"], stats))(images)
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item()), method


def test_shared_classes_and_two_datasets_with_a_gate(digit_images):
    """A class in two components gets the max of their calibrated logits; differently normalised inputs stack."""
    first = random_component("lenet5", 1.0, "0,3", seed=1)
    second = random_component("lenet5", 1.0, "3,8", seed=2)
    fashion = random_component("lenet5", 1.0, "Trouser,Bag", seed=3, spec=FASHION, dataset="fashion-mnist")
    own = [TensorDataset(digit_images[:24], torch.arange(24) % 2)] * 3
    stats = [fit("energy", m.model, d, (1, 28, 28)) for m, d in zip((first, second, fashion), own)]
    padded = assemble([first.model, second.model, fashion.model], (1, 28, 28), "padded", targets=[0, 1, 1, 2, 3, 4],
                      calibration="energy", stats=stats)
    parallel = assemble([first.model, second.model, fashion.model], (1, 28, 28), "parallel",
                        targets=[0, 1, 1, 2, 3, 4], calibration="energy", stats=stats)
    with torch.no_grad():
        a, b = padded(digit_images[:6]), parallel(digit_images[:6])
        raw = parallel.gate.combine(None, [parallel.gate.taps() and (m.model(digit_images[:6]), None, [])
                                           for m in (first, second, fashion)])
    assert a.shape == (6, 5) and torch.allclose(a, b, atol=1e-4)
    assert torch.allclose(b[:, 1], torch.maximum(raw[:, 1], raw[:, 2]))


@pytest.mark.parametrize("mode", ["padded", "parallel"])
def test_a_saved_calibrated_assembly_gives_the_same_logits_and_needs_no_data(mode, tmp_path, monkeypatch):
    first = random_component("lenet5", 1.0, "0,3", seed=1)
    second = random_component("lenet5", 1.0, "5,7,9", seed=2)
    images = torch.rand(6, 1, 28, 28)
    for calibration in GATES:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            built = commands.assembly([first, second], mode, calibration=calibration, store_training_data=True)
        path = tmp_path / f"{calibration}.safetensors"
        modellego.save(built.model, path, built.manifest)
        model, manifest = load_without_data(path, monkeypatch)
        with torch.no_grad():
            assert torch.equal(model(images), built.model(images)), calibration
        assert manifest.architecture["gate"]["method"] == calibration
        assert manifest.provenance["assembled"]["calibration"] == calibration


def test_auto_chooses_on_own_held_out_training_images(digit_images):
    first = random_component("lenet5", 1.0, "0,3", seed=1)
    second = random_component("lenet5", 1.0, "5,7,9", seed=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        built = commands.assembly([first, second], "parallel")
    record = built.manifest.provenance["assembled"]
    choice = record["calibration_choice"]
    assert record["calibration"] == choice["chosen"] in CALIBRATIONS
    # only data-free calibrations are candidates: auto never puts training images in a file
    assert set(choice["held_out_accuracy"]) == {"scale", *GATES, "joint"} - set(PER_SAMPLE)
    assert "stored_training_data" not in record
    assert choice["held_out_accuracy"][choice["chosen"]] == max(choice["held_out_accuracy"].values())
    assert choice["held_out_samples"] > 0


# --- the joint head (joint.py) ---------------------------------------------------------------------------------

@settings(max_examples=25, deadline=None)
@given(count=st.integers(3, 40), width=st.integers(1, 6), classes=st.integers(2, 4), ridge=st.floats(1e-4, 1.0),
       seed=st.integers(0, 2**16))
@example(count=5, width=4, classes=3, ridge=1e-2, seed=0)
def test_the_joint_head_is_the_ridge_least_squares_solution(count, width, classes, ridge, seed):
    """solve() from the sums equals torch.linalg.lstsq on the augmented system: features and a column of ones
    against the one-hot labels, plus sqrt(λn)·diag(σ) rows (the ridge on standardised features, intercept free)."""
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(count, width, generator=generator, dtype=torch.float64) * \
        torch.rand(width, generator=generator, dtype=torch.float64).add(0.1) * 5 + torch.randn(width, dtype=torch.float64,
                                                                                           generator=generator)
    labels = torch.randint(0, classes, (count,), generator=generator)
    onehot = F.one_hot(labels, classes).double()
    weight, bias = solve(features.T @ features, features.T @ onehot, features.sum(0), onehot.sum(0), count, ridge)
    spread = features.std(0, unbiased=False)
    design = torch.cat([torch.cat([features, torch.ones(count, 1, dtype=torch.float64)], 1),
                        torch.cat([math.sqrt(ridge * count) * torch.diag(spread),
                                   torch.zeros(width, 1, dtype=torch.float64)], 1)])
    answers = torch.cat([onehot, torch.zeros(width, classes, dtype=torch.float64)])
    reference = torch.linalg.lstsq(design, answers, driver="gelsd").solution                    # (D + 1) × K
    assert torch.allclose(weight, reference[:-1].T, atol=1e-7, rtol=1e-6)
    assert torch.allclose(bias, reference[-1], atol=1e-7, rtol=1e-6)


def test_a_constant_feature_gets_no_weight():
    features = torch.cat([torch.randn(30, 3, dtype=torch.float64), torch.full((30, 1), 7.0, dtype=torch.float64)], 1)
    onehot = F.one_hot(torch.arange(30) % 2, 2).double()
    weight, _ = solve(features.T @ features, features.T @ onehot, features.sum(0), onehot.sum(0), 30)
    assert torch.all(weight[:, 3] == 0) and torch.isfinite(weight).all()


def test_the_joint_head_reads_every_linear_input_within_its_budget(digit_images):
    """LeNet-5: its three Linear layers' inputs; a budget below the flattened features keeps the later two."""
    component = random_component("lenet5", 1.0, "0,3", seed=1).model
    names = [name for name, module in component.named_modules() if isinstance(module, nn.Linear)]
    assert joint_layers(component, (1, 28, 28), 10**6) == names
    assert joint_layers(component, (1, 28, 28), 300) == names[1:]
    assert joint_layers(component, (1, 28, 28), 1) == names[-1:]  # the classifier's input, whatever its width


@pytest.mark.parametrize("mode", ["padded", "parallel"])
def test_a_joint_assembly_answers_from_all_features_and_loads_without_data(mode, digit_images, tmp_path, monkeypatch):
    """The head's logits are weight · [features of every component] + bias, by hand; the file reloads exactly and
    holds the head (ordinary weights), no training image."""
    first = random_component("lenet5", 1.0, "0,3", seed=1)
    second = random_component("lenet5", 1.0, "5,7,9", seed=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        built = commands.assembly([first, second], mode, calibration="joint")
    record = built.manifest.provenance["assembled"]
    assert record["calibration"] == "joint" and "stored_training_data" not in record
    head = built.model.head.linear
    images = digit_images[:6]
    by_hand = []
    for member in (first, second):
        features = []
        member.model(images)  # warm: the hooks below record one pass
        modules = dict(member.model.named_modules())
        for name in record["calibration_choice"]["joint_head"]["layers"][len(by_hand)]:
            seen = []
            handle = modules[name].register_forward_pre_hook(lambda m, a: seen.append(a[0].flatten(1)))
            member.model(images)
            handle.remove()
            features.append(seen[0])
        by_hand.append(torch.cat(features, 1))
    with torch.no_grad():
        expected = torch.cat(by_hand, 1) @ head.weight.T + head.bias
        assert torch.allclose(built.model(images), expected, atol=1e-5)
    path = tmp_path / "joint.safetensors"
    modellego.save(built.model, path, built.manifest)
    model, manifest = load_without_data(path, monkeypatch)
    with torch.no_grad():
        assert torch.equal(model(images), built.model(images))
    assert manifest.architecture["joint"]["classes"] == 5
    assert not any("bank" in name for name, _ in model.named_buffers())


def test_a_hostile_joint_head_record_is_refused(tmp_path):
    first = random_component("lenet5", 1.0, "0,3", seed=1)
    second = random_component("lenet5", 1.0, "5,7,9", seed=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        built = commands.assembly([first, second], "padded", calibration="joint")
    path = tmp_path / "joint.safetensors"
    modellego.save(built.model, path, built.manifest)
    record = json.loads(modellego.read_manifest(path).to_json())
    tensors = {name: tensor.contiguous() for name, tensor in built.model.state_dict().items()}
    for field, value in (("features", 10**12), ("method", "knn"), ("classes", 10**5 + 1),
                         ("components", [[{"layer": 3}]] * 2)):
        hostile_record = json.loads(json.dumps(record))
        hostile_record["architecture"]["joint"][field] = value
        hostile = tmp_path / "hostile.safetensors"
        save_file(tensors, str(hostile), metadata={"modellego": json.dumps(hostile_record)})
        with pytest.raises(ModellegoError, match="joint"):
            modellego.load(hostile)
    # the head's tensors: positions beyond the layer it reads, weights that are not finite
    layer = next(name for name, value in tensors.items() if name.startswith("head.c"))
    for key, value in ((layer, torch.full_like(tensors[layer], 10**6)),
                       ("head.linear.weight", torch.full_like(tensors["head.linear.weight"], float("nan")))):
        hostile = tmp_path / "hostile.safetensors"
        save_file({**tensors, key: value}, str(hostile), metadata={"modellego": json.dumps(record)})
        with pytest.raises(ModellegoError, match="outside its|not finite"):
            modellego.load(hostile)


def test_unknown_calibration_and_missing_statistics_are_refused():
    first, second = tiny(0), tiny(1)
    with pytest.raises(ModellegoError, match="unknown calibration"):
        assemble([first, second], (1, 8, 8), calibration="softmax")
    with pytest.raises(ModellegoError, match="own training data"):
        assemble([first, second], (1, 8, 8), calibration="knn")


# --- the command line -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def component_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("calibration")
    paths = {}
    for name, task, seed, dataset, spec in (("digits-a", "0,3", 1, "digits", DIGITS), ("digits-b", "5,7,9", 2, "digits", DIGITS),
                                            ("fashion", "Trouser,Bag", 3, "fashion-mnist", FASHION)):
        brick = random_component("lenet5", 1.0, task, seed, spec, dataset)
        paths[name] = str(folder / f"{name}.safetensors")
        modellego.save(brick.model, paths[name], brick.manifest)
    return folder, paths


def test_cli_assembles_with_a_gate_and_finetunes_it(component_files):
    folder, paths = component_files
    out, tuned = folder / "gated.safetensors", folder / "gated-tuned.safetensors"
    result = invoke("assemble", paths["digits-a"], paths["digits-b"], "--calibration", "mahalanobis", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "calibration mahalanobis" in result.stdout
    side_by_side = sum(p.numel() for name in ("digits-a", "digits-b") for p in modellego.load(paths[name]).model.parameters())
    assert f"the components side by side: {side_by_side:,} params" in result.stdout
    assert modellego.read_manifest(out).architecture["gate"]["method"] == "mahalanobis"
    score = json.loads(invoke("eval", str(out), "--json").stdout)
    assert 0 <= score["accuracy"] <= 1
    assert invoke("finetune", str(out), "--epochs", "1", "--out", str(tuned)).returncode == 0
    assert modellego.read_manifest(tuned).architecture["gate"]["method"] == "mahalanobis"


def test_cli_default_assembly_says_how_auto_chose_and_a_joint_head_fine_tunes(component_files):
    folder, paths = component_files
    out, joint, tuned = (folder / name for name in ("default.safetensors", "joint.safetensors", "joint-tuned.safetensors"))
    result = invoke("assemble", paths["digits-a"], paths["digits-b"], "--out", str(out))
    assert result.returncode == 0, result.stderr
    record = modellego.read_manifest(out).provenance["assembled"]
    assert record["mode"] == "parallel" and "stored_training_data" not in record
    chosen = record["calibration_choice"]["chosen"]
    assert f"auto chose {chosen} on {record['calibration_choice']['held_out_samples']:,}" in result.stdout
    assert "joint " in result.stdout  # every candidate's held-out accuracy is printed, the joint head's among them
    shown = invoke("eval", str(out))  # components cut without --evaluate: the Base is said to be unknown, and why
    assert shown.returncode == 0 and "mean Base of the source models: not known" in shown.stdout
    assert "--evaluate" in json.loads(invoke("eval", str(out), "--json").stdout)["base_missing"]
    result = invoke("assemble", paths["digits-a"], paths["digits-b"], "--calibration", "joint", "--mode", "padded",
                    "--out", str(joint))
    assert result.returncode == 0, result.stderr
    assert modellego.read_manifest(joint).architecture["joint"]["classes"] == 5
    assert invoke("finetune", str(joint), "--epochs", "1", "--out", str(tuned)).returncode == 0
    assert "joint" in modellego.read_manifest(tuned).architecture


@pytest.mark.parametrize("calibration", [None, "scale", "knn", "pattern", "joint"])
def test_cli_names_the_missing_training_dataset(calibration, component_files, tmp_path):
    folder, paths = component_files
    out = tmp_path / "assembly.safetensors"
    empty = tmp_path / "empty"
    empty.mkdir()
    options = ["--calibration", calibration] if calibration else []
    if calibration == "knn":
        options.append("--store-training-data")
    result = invoke("assemble", paths["fashion"], paths["digits-a"], *options, "--data-root", str(empty),
                    "--out", str(out))
    assert_user_error(result, "fashion-mnist", "not found")
    assert not out.exists() and list(tmp_path.iterdir()) == [empty]


def test_cli_refuses_an_unknown_calibration_and_a_contradiction(component_files, tmp_path):
    _, paths = component_files
    out = tmp_path / "assembly.safetensors"
    assert_user_error(invoke("assemble", paths["digits-a"], paths["digits-b"], "--calibration", "oracle",
                             "--out", str(out)), "unknown calibration", "auto")
    assert_user_error(invoke("assemble", paths["digits-a"], paths["digits-b"], "--calibration", "knn", "--no-scale",
                             "--out", str(out)), "--no-scale")
    assert not out.exists()


@pytest.mark.parametrize("calibration", PER_SAMPLE)
def test_cli_stores_training_data_only_when_told_and_says_so(calibration, component_files, tmp_path):
    _, paths = component_files
    out = tmp_path / "assembly.safetensors"
    assert_user_error(invoke("assemble", paths["digits-a"], paths["digits-b"], "--calibration", calibration,
                             "--out", str(out)), "--store-training-data", "training images")
    assert not out.exists()
    result = invoke("assemble", paths["digits-a"], paths["digits-b"], "--calibration", calibration,
                    "--store-training-data", "--out", str(out))
    assert result.returncode == 0, result.stderr
    model = modellego.load(out).model
    rows = sum(int(buffer.shape[0]) for name, buffer in model.named_buffers() if name.endswith("bank"))
    stored = modellego.read_manifest(out).provenance["assembled"]["stored_training_data"]
    assert stored["rows"] == rows > 0 and stored["calibration"] == calibration
    assert f"the file holds training data: {rows:,}" in result.stdout
    shown = invoke("info", str(out))
    assert shown.returncode == 0 and f"{rows:,}" in shown.stdout and "training data held" in shown.stdout


def test_info_says_when_a_file_holds_no_training_data_and_recognises_older_files(component_files, tmp_path):
    _, paths = component_files
    out = tmp_path / "assembly.safetensors"
    assert invoke("assemble", paths["digits-a"], paths["digits-b"], "--calibration", "mahalanobis",
                  "--out", str(out)).returncode == 0
    manifest = modellego.read_manifest(out)
    assert commands.stored_training_data(manifest) == []
    assert "training data held" in invoke("info", str(out)).stdout
    manifest.provenance["assembled"]["calibration"] = "nearest"  # as a file written before the rows were recorded
    assert commands.stored_training_data(manifest) == [
        "training images average-pooled to at most 32×32, one row per image (calibration nearest; rows not recorded)"]
