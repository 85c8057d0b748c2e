"""The method on Vision Transformers (docs/method.md): contributions over tokens against a literal reference; a
component keeping every unit computes its source's task logits; dropping a head removes exactly that head's rows
and columns and computes what the source computes without it; components save, load and assemble in parallel
with the same outputs; padded mode is refused; the chain runs on real data (digits)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import DIGITS, assert_user_error, invoke
from modellego.core.blocks import HeadAttention, units
from modellego.core.contributions import TokenLinear, class_sums, contributions
from modellego.core.locate import by_max, input_mask, minmax
from modellego.core.masks import ComponentMasks
from modellego.core.tokens import cut_units
from modellego.io.manifest import Brick, ClassRef, Manifest
from modellego.io.modelfile import load, save
from modellego.kinds import kind_of
from modellego.models.classifier import classifier


def reference_token_contributions(layer: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """C⁺[b,o,i] = Σ_t max(W[o,i]·x[b,t,i], 0), literally."""
    batch, tokens, inputs = x.shape
    out = torch.zeros(batch, layer.out_features, inputs, dtype=torch.float64)
    for b in range(batch):
        for t in range(tokens):
            for o in range(layer.out_features):
                for i in range(inputs):
                    out[b, o, i] += max(float(layer.weight[o, i].detach()) * float(x[b, t, i]), 0.0)
    return out


@settings(max_examples=25, deadline=None)
@given(batch=st.integers(1, 3), tokens=st.integers(1, 5), inputs=st.integers(1, 4), outputs=st.integers(1, 4),
       seed=st.integers(0, 10_000))
def test_token_contributions_are_the_positive_parts_per_token_summed(batch, tokens, inputs, outputs, seed):
    torch.manual_seed(seed)
    layer = TokenLinear(inputs, outputs)
    x = torch.randn(batch, tokens, inputs)
    expected = reference_token_contributions(layer, x)
    assert torch.allclose(contributions(layer, x).double(), expected, atol=1e-5)
    labels = torch.randint(0, 2, (batch,))
    sums = class_sums(layer, x, labels, 2)
    for k in range(2):
        assert torch.allclose(sums[k], expected[labels == k].sum(0), atol=1e-5)
    layer.profiled_tokens = "class"  # benchmarks/vit_tokens.py's alternative: the first token only
    first = reference_token_contributions(layer, x[:, :1])
    sums = class_sums(layer, x, labels, 2)
    for k in range(2):
        assert torch.allclose(sums[k], first[labels == k].sum(0), atol=1e-5)


def vit(classes: int = 4, seed: int = 0) -> Brick:
    """A random ViT (width 0.5: 2 heads of 32, MLPs of 128) on digits' input, with its manifest."""
    torch.manual_seed(seed)
    model = classifier("vit", DIGITS, classes, 0.5).eval()
    manifest = Manifest(architecture={"builder": "vit", "in_channels": 1, "num_classes": classes, "width": 0.5},
                        classes=[ClassRef(str(k), "digits", k) for k in range(classes)], input=DIGITS)
    return Brick(model, manifest)


def masks_keeping(model: torch.nn.Module, classes: int, drop: dict[str, list[int]] | None = None) -> ComponentMasks:
    """Masks keeping every unit for every class, except the heads `drop[block]` (by index)."""
    layers = {name: module for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
    masks = {name: torch.ones(classes, layer.out_features, dtype=torch.bool) for name, layer in layers.items()}
    for unit in units(model):
        if unit.kind == "heads":
            for head in (drop or {}).get(unit.module, []):
                for third in range(3):
                    start = third * unit.size * unit.group + head * unit.group
                    masks[unit.reader][:, start:start + unit.group] = False
    head = "net.head"
    masks[head] = torch.eye(classes, dtype=torch.bool)
    return ComponentMasks(masks, {name: mask.float() for name, mask in masks.items()},
                          [str(k) for k in range(classes)], head)


def test_a_component_keeping_every_unit_computes_its_sources_task_logits():
    model, _ = vit()
    component, cut = cut_units(model, masks_keeping(model, 4), [3, 1])
    images = torch.rand(5, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(component(images), model(images)[:, [3, 1]], atol=1e-5)
    assert cut.outputs["net.head"].tolist() == [3, 1]


def test_dropping_a_head_removes_exactly_its_rows_and_columns():
    model, _ = vit()
    block = "net.blocks.1.attn"
    component, _ = cut_units(model, masks_keeping(model, 4, {block: [0]}), [0, 1, 2, 3])
    source, cut_attention = dict(model.named_modules())[block], dict(component.named_modules())[block]
    assert isinstance(cut_attention, HeadAttention) and cut_attention.heads == source.heads - 1
    d, heads = source.head_dim, source.heads
    kept_rows = [third * heads * d + row for third in range(3) for row in range(d, heads * d)]
    assert torch.equal(cut_attention.qkv.weight, source.qkv.weight[kept_rows])
    assert torch.equal(cut_attention.qkv.bias, source.qkv.bias[kept_rows])
    assert torch.equal(cut_attention.proj.weight, source.proj.weight[:, d:])
    assert torch.equal(cut_attention.proj.bias, source.proj.bias)
    for name, module in component.named_modules():  # every other block is the source's
        if isinstance(module, HeadAttention) and name != block:
            assert torch.equal(module.qkv.weight, dict(model.named_modules())[name].qkv.weight)
    with torch.no_grad():  # the same as the source with that head's output projection zeroed
        source.proj.weight[:, :d] = 0
        images = torch.rand(4, 1, 28, 28)
        assert torch.allclose(component(images), model(images), atol=1e-5)


def test_components_save_load_and_assemble_in_parallel(tmp_path):
    from modellego import commands

    model, manifest = vit(seed=1)
    kind = kind_of(manifest.architecture)
    assert kind.name == "transformer"
    paths = []
    for task, drop in (([0, 1], {"net.blocks.0.attn": [1]}), ([2, 3], {"net.blocks.2.attn": [0]})):
        component, _ = cut_units(model, masks_keeping(model, 4, drop), task)
        part = Manifest(architecture=kind.component_architecture(manifest, component, task),
                        classes=[manifest.classes[k] for k in task], input=DIGITS, kind="component")
        paths.append(tmp_path / f"part{task[0]}.safetensors")
        save(component, paths[-1], part)
        loaded, _ = load(paths[-1])
        images = torch.rand(3, 1, 28, 28)
        with torch.no_grad():
            assert torch.equal(loaded.eval()(images), component(images))
    out = tmp_path / "assembly.safetensors"
    commands.assemble(paths, out, calibration="none", progress=False)
    assembly, assembled = load(out)
    members = [load(path)[0].eval() for path in paths]
    images = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(assembly.eval()(images), torch.cat([member(images) for member in members], 1))
    for form in ("onnx", "pt2"):  # attention and the members side by side export, checked on digits' test images
        exported = commands.export(out, tmp_path / f"assembly.{form}", form, samples=8)
        assert exported.agreement.argmax_equal and exported.agreement.max_relative_error < 1e-4
    assert [ref.name for ref in assembled.classes] == ["0", "1", "2", "3"]
    assert_user_error(invoke("assemble", *map(str, paths), "--mode", "padded", "--out", str(tmp_path / "p.safetensors")),
                      "parallel")


def test_the_chain_runs_on_real_data(tmp_path):
    """train → profile → disassemble (re-fitted, and --auto) → assemble → eval, as a user runs it, on digits."""
    model, profile = tmp_path / "vit.safetensors", tmp_path / "vit.profile.safetensors"
    assert invoke("train", "--model", "vit", "--width", "0.5", "--data", "digits", "--epochs", "8",
                  "--lr", "0.004", "--out", str(model)).returncode == 0
    assert invoke("profile", str(model), "--samples-per-class", "8", "--out", str(profile)).returncode == 0
    parts = [tmp_path / "a.safetensors", tmp_path / "b.safetensors"]
    result = invoke("disassemble", str(model), "--profile", str(profile), "--classes", "0,1", "--evaluate",
                    "--out", str(parts[0]))
    assert result.returncode == 0, result.stderr
    result = invoke("disassemble", str(model), "--profile", str(profile), "--classes", "7,9", "--auto",
                    "--out", str(parts[1]))
    assert result.returncode == 0, result.stderr
    _, manifest = load(parts[0])
    assert manifest.metrics["test_accuracy"] >= manifest.metrics["restricted_base"] - 0.05
    assert load(parts[1])[1].provenance["disassembled"]["auto"]["grid"] == 100  # the Transformer's grid
    assert set(manifest.architecture["units"]) == {f"net.blocks.{b}.{part}" for b in range(6) for part in ("attn", "mlp")}
    assert invoke("assemble", *map(str, parts), "--out", str(tmp_path / "asm.safetensors")).returncode == 0
    evaluated = invoke("eval", str(tmp_path / "asm.safetensors"), "--json")
    assert evaluated.returncode == 0, evaluated.stderr
    assert_user_error(invoke("disassemble", str(model), "--profile", str(profile), "--classes", "0,1",
                             "--flatten", "keep-all", "--out", str(tmp_path / "x.safetensors")), "flattens nothing")
    assert_user_error(invoke("disassemble", str(model), "--profile", str(profile), "--classes", "0,1",
                             "--alpha-conv", "0.5", "--out", str(tmp_path / "x.safetensors")), "--alpha-fc")
    assert_user_error(invoke("disassemble", str(model), "--profile", str(profile), "--classes", "7", "--auto",
                             "--out", str(tmp_path / "x.safetensors")), "one class")


def test_the_transformer_grid_reaches_past_the_cnn_grid():
    """One (α, β) pair per point, each up to 0.9: the CNN grid's largest thresholds left small ViT tasks there."""
    grid = kind_of({"builder": "vit"}).auto_grid(0.1)
    assert len(grid) == 100 and all(p.alpha_conv == p.alpha_fc and p.beta_conv == p.beta_fc for p in grid)
    assert max(p.alpha_fc for p in grid) == max(p.beta_fc for p in grid) == 0.9
    cnn = kind_of({"builder": "lenet5"}).auto_grid(0.1)
    assert len(cnn) == 42 and max(p.alpha_fc for p in cnn) == 0.7 and max(p.beta_fc for p in cnn) == 0.6
    assert len(kind_of({"builder": "vit"}).auto_grid(0.3)) == 16  # 0, 0.3, 0.6, 0.9 each


def test_torchvision_vits_become_units_with_the_same_outputs_and_import_torchvisions_names():
    import torchvision

    from modellego.commands.imported import load_weights
    from modellego.models import build

    torch.manual_seed(0)
    reference = torchvision.models.vit_b_32(weights=None, num_classes=4).eval()
    converted = build("torchvision:vit_b_32", 3, 4).eval()
    assert len([unit for unit in units(converted) if unit.kind == "heads"]) == 12
    load_weights(converted, reference.state_dict(), "vit_b_32.pth")  # torchvision's names: in_proj_weight, mlp.0, ...
    load_weights(converted, {f"module.{key}": value for key, value in reference.state_dict().items()}, "dp.pth")
    images = torch.rand(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(converted(images), reference(images), atol=1e-5)
    assert kind_of({"builder": "torchvision:vit_b_32"}).name == "transformer"


def test_timm_deit_blocks_become_units_with_the_same_outputs_and_names():
    timm = pytest.importorskip("timm")
    from modellego.models import build

    torch.manual_seed(0)
    reference = timm.create_model("deit_tiny_patch16_224", pretrained=False, num_classes=4).eval()
    converted = build("timm:deit_tiny_patch16_224", 3, 4).eval()
    assert len(units(converted)) == 24  # 12 blocks: heads and neurons
    converted.load_state_dict(reference.state_dict())  # timm's own names
    images = torch.rand(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(converted(images), reference(images), atol=1e-5)


def test_a_distilled_deit_with_two_heads_is_refused_up_front():
    pytest.importorskip("timm")
    from modellego.core.support import unsupported_reason
    from modellego.models import build

    reason = unsupported_reason(build("timm:deit_tiny_distilled_patch16_224", 3, 4).eval(), (3, 224, 224))
    assert reason is not None and "2 classifier heads" in reason


def test_flops_count_the_attention_of_every_head():
    from modellego.core.evaluate import count_flops

    model, manifest = vit()
    linear = 0
    tokens = (28 // 4) ** 2 + 1

    def hook(module, args, output):
        nonlocal linear
        positions = output.shape[2] * output.shape[3] if output.dim() == 4 else output.numel() // output.shape[-1]
        weights = module.weight.numel() if isinstance(module, torch.nn.Linear) else module.weight[0].numel() * module.out_channels
        linear += 2 * weights * positions

    handles = [module.register_forward_hook(hook) for module in model.modules()
               if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))]
    with torch.no_grad():
        model(torch.zeros(1, 1, 28, 28))
    for handle in handles:
        handle.remove()
    heads = [module for module in model.modules() if isinstance(module, HeadAttention)]
    attention = sum(4 * tokens * tokens * module.head_dim * module.heads for module in heads)
    assert count_flops(model, manifest.input) == linear + attention


def reference_head_mask(contributions: torch.Tensor, stream: torch.Tensor, alpha: float, beta: float):
    """Heads kept per class, literally: R = C / max over the block's heads, votes over the stream features the
    class relies on, votes / their max > β (docs/method.md, "Locating")."""
    classes, outputs, heads = contributions.shape
    kept = torch.zeros(classes, heads, dtype=torch.bool)
    for k in range(classes):
        votes = [0.0] * heads
        for o in range(outputs):
            top = max(float(contributions[k, o, h]) for h in range(heads))
            for h in range(heads):
                if stream[k, o] and float(contributions[k, o, h]) / (top + 1e-5) > alpha:
                    votes[h] += 1
        for h in range(heads):
            kept[k, h] = votes[h] / (max(votes) + 1e-5) > beta
    return kept


@settings(max_examples=40, deadline=None)
@given(classes=st.integers(1, 3), outputs=st.integers(1, 6), heads=st.integers(1, 4), seed=st.integers(0, 10_000),
       alpha=st.sampled_from([0.0, 0.3, 0.4, 0.7]), beta=st.sampled_from([0.0, 0.3, 0.6]))
def test_heads_are_voted_on_shares_of_the_largest_head(classes, outputs, heads, seed, alpha, beta):
    generator = torch.Generator().manual_seed(seed)
    contributions = torch.rand(classes, outputs, heads, generator=generator, dtype=torch.float64)
    stream = torch.rand(classes, outputs, generator=generator) > 0.3
    kept, _ = input_mask(by_max(contributions, 2), stream, alpha, beta, by_max)
    assert torch.equal(kept, reference_head_mask(contributions, stream, alpha, beta))


def test_two_nearly_equal_heads_are_both_kept_where_minmax_drops_one():
    """minmax over two heads always sends the lesser to 0, so it is dropped at any β; a share of the largest
    keeps a head that does nearly as much."""
    contributions = torch.tensor([[[1.0, 0.9], [0.8, 1.0], [1.0, 0.95]]], dtype=torch.float64)
    stream = torch.ones(1, 3, dtype=torch.bool)
    kept, _ = input_mask(by_max(contributions, 2), stream, 0.4, 0.3, by_max)
    assert kept.tolist() == [[True, True]]
    dropped, _ = input_mask(minmax(contributions, 2), stream, 0.4, 0.3)
    assert dropped.tolist() == [[True, False]]


def labelled_by_itself(model: torch.nn.Module, count: int = 160):
    """Random digits-sized images labelled by `model`'s own predictions, its head's bias shifted so that every
    class is predicted (as the support matrix does): profiling needs correct samples of each class."""
    from torch.utils.data import TensorDataset

    images = torch.rand(count, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model.net.head.bias -= model(images).median(0).values
        labels = model(images).argmax(1)
    data = TensorDataset(images, labels)
    data.classes = [str(k) for k in range(model.net.head.out_features)]
    return data


def test_the_core_api_takes_a_transformer_apart_over_its_units():
    """`locate`, `disassemble` and `search_thresholds` on a plain nn.Module give the kind's units, not a CNN walk."""
    import modellego as ml
    from modellego.core.tokens import locate_units

    model, _ = vit()
    data = labelled_by_itself(model)
    profile = ml.profile(model, data, samples_per_class=8)
    masks = ml.locate(model, profile)
    assert all(torch.equal(masks.masks[name], mask) for name, mask in locate_units(model, profile).masks.items())
    component = ml.disassemble(model, masks, [3, 1])
    expected, _ = cut_units(model, masks, [3, 1])
    images = data.tensors[0][:6]
    with torch.no_grad():
        assert torch.equal(component(images), expected(images))
    refitted = ml.disassemble(model, masks, [3, 1], images=data.tensors[0][:32])
    assert isinstance(refitted, torch.nn.Module)
    with pytest.raises(ml.ModellegoError, match="no flatten rule"):
        ml.locate(model, profile, flatten="keep-all")
    from torch.utils.data import Subset

    task = [3, 1]
    validation = Subset(data, torch.nonzero((data.tensors[1] == 3) | (data.tensors[1] == 1)).flatten().tolist())
    result = ml.search_thresholds(model, profile, task, validation, 100.0, alphas=(0.4,), betas=(0.3, 0.9))
    assert result.grid == 2 and result.thresholds.alpha_conv == result.thresholds.alpha_fc == 0.4
    with pytest.raises(ml.ModellegoError, match="one class"):
        ml.search_thresholds(model, profile, [3], validation)


def test_a_block_with_no_voted_unit_keeps_its_most_relevant_one_not_its_first():
    """At α = 1 no unit (and no stream feature) is ever relevant, so every block falls back on one unit: the one
    whose contributions, weighted by how much the class's logit draws on each stream feature, are largest."""
    import warnings

    import modellego as ml
    from modellego.core.locate import PAPER, Thresholds
    from modellego.core.tokens import head_contributions, kept_units, locate_units

    model, _ = vit(seed=2)
    profile = ml.profile(model, labelled_by_itself(model), samples_per_class=8)
    masks = locate_units(model, profile, Thresholds(PAPER.alpha_conv, PAPER.beta_conv, 1.0, 0.3))
    reliance = profile.relative("net.head")[0, profile.output_positions[0]]  # class 0's logit on each feature
    chosen = []
    for unit in units(model):
        normalise = by_max if unit.kind == "heads" else minmax
        relative = normalise(head_contributions(profile, unit), 2)[0]
        share = [sum(float(reliance[o] * relative[o, u]) for o in range(len(reliance))) for u in range(unit.size)]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            kept = kept_units(unit, masks, [0])
        assert kept.tolist() == [max(range(unit.size), key=share.__getitem__)]
        chosen.append(kept.item())
    assert any(chosen)  # not index 0 everywhere


def test_a_plain_torchvision_vit_is_told_to_convert_and_then_taken_apart():
    import torchvision
    from torch.utils.data import TensorDataset

    import modellego as ml
    from modellego.models.vit import from_torchvision

    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                                 hidden_dim=32, mlp_dim=64, num_classes=3).eval()
    images = torch.rand(90, 3, 32, 32)
    with torch.no_grad():  # torchvision starts its head at zero: give it weights that tell the classes apart
        model.heads.head.weight.normal_()
        model.heads.head.bias -= model(images).median(0).values
        data = TensorDataset(images, model(images).argmax(1))
    with pytest.raises(ml.ModellegoError, match=r"from_torchvision\(model\)"):
        ml.profile(model, data, num_classes=3, samples_per_class=5)
    model = from_torchvision(model)
    profile = ml.profile(model, data, num_classes=3, samples_per_class=5)
    component = ml.disassemble(model, ml.locate(model, profile), [2, 0])
    with torch.no_grad():
        assert component(images[:2]).shape == (2, 2)


def test_a_units_record_that_disagrees_with_the_weights_is_refused_in_words(tmp_path):
    """A file whose architecture.units names more heads or neurons than its tensors hold is refused with the
    block and the counts, not with the reshape error of the shape check's forward pass."""
    model, manifest = vit()
    kind = kind_of(manifest.architecture)
    component, _ = cut_units(model, masks_keeping(model, 4, {"net.blocks.0.attn": [1]}), [0, 1])
    for block, count, words in (("net.blocks.0.attn", 2, "96 query/key/value rows"),
                                ("net.blocks.1.mlp", 100, "holds 128 units in its weights")):
        architecture = kind.component_architecture(manifest, component, [0, 1])
        architecture["units"][block] = count
        path = tmp_path / f"{block}.safetensors"
        save(component, path, Manifest(architecture=architecture, classes=manifest.classes[:2], input=DIGITS,
                                       kind="component"))
        assert_user_error(invoke("eval", str(path)), words)  # eval builds the model; info reads the record only
