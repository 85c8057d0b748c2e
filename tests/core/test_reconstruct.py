"""Reconstruction (closed-form re-fitting), the shared channel graph, the masked search and the pure method kept
byte for byte: against slow references and against the physically cut component."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from test_disassembly import FlattenNet  # noqa: F401
from torch import nn

import modellego
from helpers import assert_user_error, invoke, random_classifier, synthetic_profile  # noqa: F401
from helpers import random_masks as full_masks
from modellego import commands
from modellego.core import search as search_module
from modellego.core.channels import ChannelGraph
from modellego.core.cut import disassemble, disassemble_with_cut, zero_removed_inputs
from modellego.core.evaluate import count_flops, count_params
from modellego.core.hashing import weights_hash
from modellego.core.layers import execution_order, parameter_layers
from modellego.core.locate import Thresholds, locate
from modellego.core.reconstruct import (
    LayerFit,
    NormalEquations,
    component_fits,
    images_to_determine,
    reconstruct,
    reconstruct_component,
)
from modellego.data.spec import InputSpec
from modellego.io.manifest import Brick
from modellego.io.profiles import load_profile
from modellego.models.classifier import classifier


def random_source(builder: str, width: float, classes: int = 5):
    return random_classifier(builder, width, classes)

SHAPE = (1, 28, 28)


def all_fits(model: nn.Module) -> dict[str, LayerFit]:
    return {name: LayerFit(None, None, torch.arange(layer.weight.shape[0]))
            for name, layer in parameter_layers(model).items()}


# --- the mathematics ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("builder, width", [("lenet5", 1.0), ("resnet18", 0.125)])
@pytest.mark.parametrize("batchnorm", [False, True])
def test_a_chain_where_nothing_is_pruned_refits_to_the_same_function(builder, width, batchnorm):
    model, _ = random_source(builder, width)
    work = copy.deepcopy(model)
    torch.manual_seed(1)
    reconstruct(work, model, all_fits(work), torch.rand(16, *SHAPE), batch_size=8, batchnorm=batchnorm)
    images = torch.rand(6, *SHAPE)
    with torch.no_grad():
        expected = model(images)
        torch.testing.assert_close(work(images), expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item())
    if not batchnorm:  # the exact solution is the source's own weights
        for name, layer in parameter_layers(work).items():
            torch.testing.assert_close(layer.weight, parameter_layers(model)[name].weight, rtol=1e-3, atol=1e-5)


def test_the_ridge_solution_equals_lstsq_on_the_augmented_system():
    """argmin ‖XW − Y‖² + λ‖W − P‖² is the least-squares solution of [X; √λ I] W = [Y; √λ P]."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 30, 6, generator=generator, dtype=torch.float64)
    y = torch.randn(2, 30, 4, generator=generator, dtype=torch.float64)
    prior = torch.randn(2, 6, 4, generator=generator, dtype=torch.float64)
    equations = NormalEquations(2, 6, 4)
    for rows in torch.arange(30).split(7):  # batches of rows add up
        equations.add(x[:, rows], y[:, rows])
    ridge = 0.05
    solution = equations.solve(prior, ridge)
    for group in range(2):
        lam = ridge * (x[group] ** 2).sum(0).mean()
        stacked_x = torch.cat([x[group], lam.sqrt() * torch.eye(6, dtype=torch.float64)])
        stacked_y = torch.cat([y[group], lam.sqrt() * prior[group]])
        expected = torch.linalg.lstsq(stacked_x, stacked_y).solution
        torch.testing.assert_close(solution[group], expected, rtol=1e-9, atol=1e-10)
    tiny = NormalEquations(1, 6, 4)  # with a vanishing ridge and enough rows: ordinary least squares
    tiny.add(x[:1], y[:1])
    torch.testing.assert_close(tiny.solve(prior[:1], 1e-12)[0], torch.linalg.lstsq(x[0], y[0]).solution,
                               rtol=1e-6, atol=1e-8)


def slow_conv_refit(layer: nn.Conv2d, x: torch.Tensor, target: torch.Tensor, ridge: float) -> tuple:
    """The conv re-fit written out: per group g and output channel o, one row per (image, output position)
    holding the input window (every input channel of g, every kernel offset, then 1), solved by lstsq on the
    ridge-augmented system with the layer's own weights as the prior."""
    padded = F.pad(x, (layer.padding[1], layer.padding[1], layer.padding[0], layer.padding[0]))
    kh, kw = layer.kernel_size
    sh, sw = layer.stride
    dh, dw = layer.dilation
    out_h, out_w = target.shape[2:]
    per_in, per_out = layer.in_channels // layer.groups, layer.out_channels // layer.groups
    weight = torch.zeros_like(layer.weight, dtype=torch.float64)
    bias = torch.zeros(layer.out_channels, dtype=torch.float64)
    for g in range(layer.groups):
        rows, values = [], []
        for b in range(x.shape[0]):
            for i in range(out_h):
                for j in range(out_w):
                    window = [padded[b, g * per_in + c, i * sh + u * dh, j * sw + v * dw].item()
                              for c in range(per_in) for u in range(kh) for v in range(kw)]
                    rows.append(window + [1.0])
                    values.append([target[b, g * per_out + o, i, j].item() for o in range(per_out)])
        design = torch.tensor(rows, dtype=torch.float64)
        wanted = torch.tensor(values, dtype=torch.float64)
        prior = torch.cat([layer.weight[g * per_out:(g + 1) * per_out].reshape(per_out, -1),
                           layer.bias[g * per_out:(g + 1) * per_out, None]], 1).T.double()
        lam = ridge * (design ** 2).sum(0).mean()
        size = design.shape[1]
        solution = torch.linalg.lstsq(torch.cat([design, lam.sqrt() * torch.eye(size, dtype=torch.float64)]),
                                      torch.cat([wanted, lam.sqrt() * prior])).solution
        weight[g * per_out:(g + 1) * per_out] = solution[:-1].T.reshape(per_out, per_in, kh, kw)
        bias[g * per_out:(g + 1) * per_out] = solution[-1]
    return weight, bias


@pytest.mark.parametrize("groups, stride, dilation", [(1, 1, 1), (2, 2, 1), (4, 1, 2)])
def test_conv_refit_matches_a_slow_reference(groups, stride, dilation):
    torch.manual_seed(groups)
    source = nn.Sequential(nn.Conv2d(4, 4, 3, stride=stride, padding=1, dilation=dilation, groups=groups))
    model = copy.deepcopy(source)
    with torch.no_grad():
        model[0].weight.mul_(0.3)  # start away from the answer
    images = torch.rand(3, 4, 7, 7)
    target = source(images).detach()
    expected_weight, expected_bias = slow_conv_refit(model[0], images, target, 0.01)
    reconstruct(model, source, {"0": LayerFit(None, None, torch.arange(4))}, images, ridge=0.01, batch_size=2)
    torch.testing.assert_close(model[0].weight.double(), expected_weight, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(model[0].bias.double(), expected_bias, rtol=1e-4, atol=1e-5)


def test_memory_stays_flat_as_the_number_of_images_grows(monkeypatch):
    """The normal equations never see more than one batch of rows, and hold d×d + d×o numbers whatever N is."""
    largest, held = [], []
    original = NormalEquations.add

    def spy(self, x, y):
        largest.append(x.shape[1])
        held.append(self.gram.numel() + self.cross.numel())
        return original(self, x, y)

    monkeypatch.setattr(NormalEquations, "add", spy)
    model, _ = random_source("lenet5", 1.0)
    for count in (16, 128):
        largest.clear()
        held.clear()
        work = copy.deepcopy(model)
        reconstruct(work, model, all_fits(work), torch.rand(count, *SHAPE), batch_size=8)
        assert len(largest) == 5 * count // 8  # every layer saw every batch
        sizes = (max(largest), max(held))
        if count == 16:
            first = sizes
    assert sizes == first


# --- components -----------------------------------------------------------------------------------------------

# sha256 of the component files `commands.component` wrote before reconstruction existed; the `locate` one since
# profile format 2, whose digest (the provenance's profile_hash) is built from per-class records: tensors unchanged
GOLDEN = {
    ("full_masks", "lenet5"): "ceb6cc595ec54ec0ebf46cdc3d8823af3e844fcb8ecc5529c4a7c7b7d484f364",
    ("full_masks", "resnet18"): "f05fb5ab50a2dc0b06fc3ee188cdfa7d0b1a7637110680efff824b1e7844d210",
    ("full_masks", "torchvision:mobilenet_v2"): "ac3f55821b1e345b7d1a0772aa6e9c20959b233c454fc1f1535439c633634745",
    ("locate", "lenet5"): "f7a85c2013869527ac8fb25ed6f7dc32e512f073898a0147d3a0e7a4258ac289",
}
WIDTHS = {"lenet5": 1.0, "resnet18": 0.125, "torchvision:mobilenet_v2": 0.25}


@pytest.mark.parametrize("how, builder", list(GOLDEN))
def test_the_pure_method_reproduces_the_components_of_before_byte_for_byte(how, builder, tmp_path):
    model, manifest = random_source(builder, WIDTHS[builder])
    if how == "full_masks":
        masks, task = full_masks(model, 5, keep=0.4, seed=1), "c1,c4"
    else:
        masks, task = locate(model, synthetic_profile(model, SHAPE, 5, 3), flatten="any-feature"), "c2,c0"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        part = commands.component(Brick(model, manifest), masks, task)
    path = tmp_path / "c.safetensors"
    modellego.save(part.model, path, part.manifest)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == GOLDEN[(how, builder)]


@pytest.mark.parametrize("builder, width", [("lenet5", 1.0), ("resnet18", 0.125), ("torchvision:mobilenet_v2", 0.25)])
def test_a_shared_graph_prunes_a_copy_and_masking_equals_cutting(builder, width):
    """disassemble(graph=) gives the component a fresh trace gives and leaves the model alone; the search's
    masked model computes the component's function, before and after reconstruction; FLOPs without cutting."""
    model, _ = random_source(builder, width)
    masks = full_masks(model, 5, keep=0.6, seed=1)
    masks.input_shape = SHAPE
    before = weights_hash(model)
    graph = ChannelGraph(model, SHAPE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        shared, cut = disassemble_with_cut(model, masks, [1, 4], graph=graph)
        fresh = disassemble(model, masks, [1, 4])
    assert weights_hash(model) == before and weights_hash(shared) == weights_hash(fresh)
    assert search_module._FlopModel(model, SHAPE).of(cut) == count_flops(shared, SHAPE)
    order = execution_order(model, SHAPE)
    masked, masked_graph = copy.deepcopy((model, graph))
    zero_removed_inputs(masked, cut)
    images = torch.rand(5, *SHAPE)
    with torch.no_grad():
        torch.testing.assert_close(masked(images)[:, [1, 4]], shared(images), rtol=1e-4, atol=1e-6)
    refit_images = torch.rand(8, *SHAPE)
    reconstruct(shared, model, component_fits(cut, order), refit_images)
    reconstruct(masked, model, search_module._fits(masked, cut, order), refit_images)
    with torch.no_grad():
        scale = shared(images).abs().max().item()
        torch.testing.assert_close(masked(images)[:, [1, 4]], shared(images), rtol=1e-3, atol=1e-4 * scale)
    # the search cuts its chosen component out of the re-fitted masked copy: the same function, the same size
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from_masked, _ = disassemble_with_cut(masked, masks, [1, 4], graph=masked_graph)
    assert count_params(from_masked) == count_params(shared)
    with torch.no_grad():
        torch.testing.assert_close(from_masked(images), shared(images), rtol=1e-3, atol=1e-4 * scale)
    with pytest.raises(modellego.ModellegoError, match="another model"):
        disassemble(copy.deepcopy(model), masks, [1, 4], graph=graph)


def test_reconstructed_residual_components_still_assemble_padded_equal_to_parallel():
    model, manifest = random_source("resnet18", 0.125)
    source = Brick(model, manifest)
    images = torch.rand(16, *SHAPE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        first = commands.component(source, full_masks(model, 5, keep=0.5, seed=2), "c0,c1", images)
        second = commands.component(source, full_masks(model, 5, keep=0.5, seed=3), "c2,c3", images)
    assert first.manifest.provenance["disassembled"]["reconstruction"]["images"] == 16
    padded = commands.assembly([first, second], "padded", scale_logits=False)
    parallel = commands.assembly([first, second], "parallel", scale_logits=False)
    probe = torch.rand(4, *SHAPE)
    with torch.no_grad():
        torch.testing.assert_close(padded.model(probe), parallel.model(probe), rtol=1e-4, atol=1e-5)


def test_keep_all_keeps_every_channel_at_a_flatten():
    torch.manual_seed(0)
    model = FlattenNet().eval()
    fake = synthetic_profile(model, (1, 6, 6), 3, 0)
    strict = locate(model, fake, Thresholds(alpha_conv=0.9, beta_conv=0.9, alpha_fc=0.9, beta_fc=0.9))
    kept = locate(model, fake, Thresholds(alpha_conv=0.9, beta_conv=0.9, alpha_fc=0.9, beta_fc=0.9), flatten="keep-all")
    assert kept.masks["conv"].all() and not strict.masks["conv"].all()
    assert torch.equal(kept.masks["fc"], strict.masks["fc"])
    with pytest.raises(modellego.ModellegoError, match="choose any-feature or keep-all"):
        locate(model, fake, flatten="some")


# --- on a trained model: reconstruction helps, the fast search gives the full grid's answer ----------------

def test_reconstruction_brings_a_cut_component_back_to_its_source(lenet, lenet_profile):
    path, train = lenet
    model, manifest = modellego.load(path)
    task = [1, 3]  # Trouser, Dress
    masks = locate(model, lenet_profile, Thresholds(alpha_conv=0.5, beta_conv=0.3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        component, cut = disassemble_with_cut(model, masks, task)
    chosen = torch.isin(lenet_profile.sample_labels, torch.tensor(task))
    images = torch.stack([train[int(i)][0] for i in lenet_profile.samples[chosen]])
    test = modellego.data.task_data([manifest.classes[k] for k in task], "test")
    test = modellego.data.per_class_slice(test, 300)
    pure = modellego.core.evaluate.evaluate(component, test).accuracy
    record = reconstruct_component(component, model, cut, images)
    refitted = modellego.core.evaluate.evaluate(component, test).accuracy
    logits, labels = modellego.core.evaluate.predict(model, test)
    restricted = (logits[:, task].argmax(1) == labels).float().mean().item()
    assert record.images == len(images) and record.layers >= 1
    assert refitted >= pure and refitted >= restricted - 0.03, (pure, refitted, restricted)


def test_the_fast_search_gives_the_full_grids_answer(lenet, lenet_profile):
    """Same candidate as evaluating every grid point by cutting, reconstructing and scoring each component."""
    from modellego.core.search import search_thresholds, validation_data

    path, train = lenet
    model, _ = modellego.load(path)
    task = [1, 8]
    validation = validation_data(train, task, lenet_profile.samples, 0.1, seed=0)
    chosen = torch.isin(lenet_profile.sample_labels, torch.tensor(task))
    images = torch.stack([train[int(i)][0] for i in lenet_profile.samples[chosen]])
    grid = dict(alphas=(0.0, 0.3, 0.6), betas=(0.0, 0.3, 0.5))
    fast = search_thresholds(model, lenet_profile, task, validation, 1.0, reconstruct_images=images, **grid)
    logits, labels = modellego.core.evaluate.predict(model, validation)
    labels = torch.tensor([task.index(int(label)) for label in labels])
    full = []
    for alpha in grid["alphas"]:
        for beta in grid["betas"]:
            masks = locate(model, lenet_profile, Thresholds(alpha, beta, min(1.0, alpha + 0.1), min(1.0, beta + 0.1)))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                component, cut = disassemble_with_cut(model, masks, task)
            reconstruct_component(component, model, cut, images)
            accuracy = (modellego.core.evaluate.predict(component, validation)[0].argmax(1) == labels).float().mean().item()
            full.append((accuracy < fast.target, count_flops(component, SHAPE), alpha, beta, accuracy))
    best = min(full, key=lambda c: (c[0], c[1] if not c[0] else -c[4]))
    assert count_flops(fast.component, SHAPE) == best[1]
    assert abs(fast.accuracy - best[4]) < 1e-6
    assert len(fast.candidates) <= len(full) and fast.grid == len(full)


def test_a_finer_grid_holds_the_coarse_one_and_never_chooses_a_larger_component(lenet, lenet_profile):
    from modellego.core.search import SEARCH_ALPHAS, SEARCH_BETAS, search_grid, search_thresholds, validation_data

    assert search_grid(0.1) == (SEARCH_ALPHAS, SEARCH_BETAS)
    fine_alphas, fine_betas = search_grid(0.05)
    assert set(SEARCH_ALPHAS) <= set(fine_alphas) and set(SEARCH_BETAS) <= set(fine_betas)
    assert max(fine_alphas) == 0.6 and max(fine_betas) == 0.5 and search_grid(0.3) == ((0.0, 0.3, 0.6), (0.0, 0.3))
    with pytest.raises(modellego.ModellegoError, match="grid step"):
        search_grid(0)
    path, train = lenet
    model, _ = modellego.load(path)
    task = [0, 1, 2]
    validation = validation_data(train, task, lenet_profile.samples, 0.1, seed=0)
    coarse = search_thresholds(model, lenet_profile, task, validation, 1.0)
    fine = search_thresholds(model, lenet_profile, task, validation, 1.0, fine_alphas, fine_betas)
    assert fine.grid == len(fine_alphas) * len(fine_betas) == 143
    assert fine.met_target and count_flops(fine.component, SHAPE) <= count_flops(coarse.component, SHAPE)


# --- the command line -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def files(lenet, lenet_profile, tmp_path_factory):
    path, _ = lenet
    folder = tmp_path_factory.mktemp("reconstruct")
    profile_path = folder / "p.safetensors"
    modellego.save_profile(dataclasses.replace(lenet_profile, dataset="fashion-mnist"), profile_path)  # the session's stays as it is
    return folder, path, profile_path


def test_cli_reconstructs_by_default_and_no_reconstruct_is_the_pure_method(files):
    folder, source, profile_path = files
    base = ["disassemble", str(source), "--profile", str(profile_path), "--classes", "Trouser,Dress"]
    pure, refit, more = (folder / f"{name}.safetensors" for name in ("pure", "refit", "more"))
    result = invoke(*base, "--no-reconstruct", "--flatten", "any-feature", "--out", str(pure))
    assert result.returncode == 0, result.stderr
    # the pure file is the one the library's pure method writes
    model, manifest = modellego.load(source)
    masks = locate(model, modellego.load_profile(profile_path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = commands.component(Brick(model, manifest), masks, "Trouser,Dress")
    expected.manifest.metrics = {"params": modellego.count_params(expected.model),  # as `disassemble` records
                                 "flops": modellego.count_flops(expected.model, expected.manifest.input)}
    modellego.save(expected.model, folder / "expected.safetensors", expected.manifest)
    assert pure.read_bytes() == (folder / "expected.safetensors").read_bytes()
    assert invoke(*base, "--out", str(refit)).returncode == 0
    assert invoke(*base, "--reconstruct-samples", "30", "--ridge", "0.01", "--out", str(more)).returncode == 0
    records = [json.loads(invoke("info", str(path), "--json").stdout)["provenance"]["disassembled"]
               for path in (pure, refit, more)]
    assert "reconstruction" not in records[0]
    assert records[1]["reconstruction"]["method"] == "layerwise-ridge"
    # by default, enough training images to determine every re-fitted layer, spread over the task's 2 classes
    needed = images_to_determine(model, (manifest.input.channels, *manifest.input.size))
    assert records[1]["reconstruction"]["images"] == 2 * -(-needed // 2) > len(modellego.load_profile(profile_path).samples)
    assert records[2]["reconstruction"]["images"] == 60 and records[2]["reconstruction"]["ridge"] == 0.01
    accuracies = [json.loads(invoke("eval", str(path), "--against", str(source), "--json").stdout)["accuracy"]
                  for path in (pure, refit)]
    assert accuracies[1] >= accuracies[0]


def test_cli_refuses_bad_reconstruction_options(files, tmp_path):
    _, source, profile_path = files
    out = tmp_path / "c.safetensors"
    base = ["disassemble", str(source), "--profile", str(profile_path), "--classes", "Bag", "--out", str(out)]
    assert_user_error(invoke(*base, "--flatten", "sometimes"), "choose any-feature or keep-all")
    assert_user_error(invoke(*base, "--reconstruct-samples", "0"), "--reconstruct-samples")
    assert_user_error(invoke(*base, "--reconstruct-samples", "5", "--no-reconstruct"), "--no-reconstruct")
    assert_user_error(invoke(*base, "--ridge", "0"), "--ridge")
    assert_user_error(invoke(*base, "--ridge", "1e-30"), "--ridge must be between")
    assert_user_error(invoke(*base, "--auto", "--grid-step", "0"), "--grid-step")
    assert_user_error(invoke(*base, "--grid-step", "0.05"), "--grid-step only applies with --auto")
    assert not out.exists()


def test_images_to_determine_counts_rows_per_unknown_of_every_layer():
    """Against the counts written out by hand: LeNet-5 on 1×28×28 has conv1 (1·5·5+1 unknowns, 28·28 positions),
    conv2 (6·5·5+1, 10·10), fc1 (16·5·5+1, one row per image), fc2 (121), fc3 (85)."""
    model = classifier("lenet5", InputSpec(1, (28, 28), (0.5,), (0.5,)), 10, 1.0)
    by_hand = max(-(-4 * 26 // 784), -(-4 * 151 // 100), 4 * 401, 4 * 121, 4 * 85)
    assert images_to_determine(model, (1, 28, 28)) == by_hand == 1604
    assert images_to_determine(model, (1, 28, 28), rows_per_unknown=1) == 401


def test_default_reconstruction_reads_enough_images_to_determine_the_layers(lenet, tmp_path):
    """No flag: LeNet-5's 401-unknown fc1 needs 1604 images, 802 per class of a 2-class task (drawn from the
    model's training split); `--reconstruct-samples` still decides when given; a profile whose images suffice
    keeps them."""
    profile = tmp_path / "p"
    commands.profile(lenet.path, profile, samples_per_class=10, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = commands.disassemble(lenet.path, profile, "Trouser,Bag", tmp_path / "c", progress=False)
        given = commands.disassemble(lenet.path, profile, "Trouser,Bag", tmp_path / "d", progress=False,
                                     reconstruct_samples=30)
    assert result.brick.manifest.provenance["disassembled"]["reconstruction"]["images"] == 1604
    assert given.brick.manifest.provenance["disassembled"]["reconstruction"]["images"] == 60
    kind = modellego.kinds.kind_of(result.brick.manifest.architecture)
    small = classifier("lenet5", InputSpec(1, (28, 28), (0.5,), (0.5,)), 10, 1.0)
    roomy = dataclasses.replace(load_profile(profile), samples_per_class=2000)
    assert kind.default_reconstruction_per_class(small, roomy, [0, 1]) is None  # the profile's images suffice
