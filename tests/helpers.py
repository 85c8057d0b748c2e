"""What several test files share: running the command as a user does (`run_cli` in a subprocess, `invoke` in this
process, `assert_user_error`), the literal-definition references, random classifiers with their manifests, random
masks and profiles. Slow and obvious on purpose: the library is checked against these."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file
from torch import nn

from modellego.core.hashing import weights_hash
from modellego.core.locate import ComponentMasks
from modellego.core.profile import Profile
from modellego.data.spec import InputSpec
from modellego.io.manifest import Brick, ClassRef, Manifest
from modellego.io.modelfile import save
from modellego.models.classifier import classifier

FASHION = InputSpec(1, (28, 28), (0.286,), (0.353,))
DIGITS = InputSpec(1, (28, 28), (0.1557,), (0.2773,))


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run `python -m modellego ARGS` in a subprocess and capture its output."""
    env = dict(os.environ, COLUMNS="200", PYTHONWARNINGS="ignore", OMP_NUM_THREADS=str(torch.get_num_threads()))
    return subprocess.run([sys.executable, "-m", "modellego", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=timeout)


def invoke(*args: str) -> subprocess.CompletedProcess:
    """Run the `modellego` entry point in this process (fast; for the many error cases)."""
    import contextlib
    import io
    from unittest import mock

    from modellego.cli import main

    stdout, stderr = io.StringIO(), io.StringIO()
    code = 0
    with mock.patch.object(sys, "argv", ["modellego", *args]), contextlib.redirect_stdout(stdout), \
            contextlib.redirect_stderr(stderr):
        try:
            main()
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
    return subprocess.CompletedProcess(["modellego", *args], code, stdout.getvalue(), stderr.getvalue())


def assert_user_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    """Exit code 2, one readable line on stderr naming the problem, no traceback."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    for fragment in fragments:
        assert fragment.lower() in lines[0].lower(), (fragment, lines[0])


def reference_padding(conv: nn.Conv2d) -> tuple[int, int, int, int]:
    """(left, right, top, bottom) zeros as torch pads: 'same' puts total // 2 before and the rest after."""
    if conv.padding == "valid":
        return (0, 0, 0, 0)
    if conv.padding == "same":
        (th, tw) = (d * (k - 1) for k, d in zip(conv.kernel_size, conv.dilation))
        return (tw // 2, tw - tw // 2, th // 2, th - th // 2)
    ph, pw = conv.padding
    return (pw, pw, ph, ph)


def reference_signed(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """C[b,o,i] by the definition, literally. Linear: W[o,i]·x[b,i]. Conv2d: Σ_p Σ_u W[o,i,u]·xpad[b,i,s·p+d·u],
    every window, every (o, i) pair of a group."""
    weight = layer.weight.detach().to(x.dtype)
    if isinstance(layer, nn.Linear):
        return weight[None] * x[:, None, :]
    conv = layer
    kh, kw = conv.kernel_size
    cols = F.unfold(F.pad(x, reference_padding(conv)), (kh, kw), dilation=conv.dilation, stride=conv.stride)
    b, n_in, n_out, g = x.shape[0], conv.in_channels, conv.out_channels, conv.groups
    cols = cols.view(b, n_in, kh * kw, -1)  # [B, I, K, positions]
    og, ig = n_out // g, n_in // g
    out = torch.zeros(b, n_out, n_in, dtype=x.dtype)
    for o in range(n_out):
        group = o // og
        for i in range(group * ig, (group + 1) * ig):
            w = weight[o, i - group * ig].reshape(1, kh * kw, 1)
            out[:, o, i] = (w * cols[:, i]).sum(dim=(1, 2))
    return out


def reference_contribution(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """C⁺[b,o,i]: the positive part of the signed contribution (DESIGN.md, "Contributions")."""
    return reference_signed(layer, x).clamp(min=0)


def randomise_batchnorm(model: nn.Module, spread: float = 0.2,
                        variance: tuple[float, float] = (0.5, 1.5)) -> nn.Module:
    """Non-trivial BatchNorm statistics (means in ±spread, variances in `variance`), so that buffers matter in
    round trips and equalities."""
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-spread, spread)
            module.running_var.uniform_(*variance)
    return model


def random_classifier(builder: str = "lenet5", width: float = 1.0, classes: int = 4, *, seed: int = 0,
                      spec: InputSpec = FASHION, dataset: str = "fashion-mnist", spread: float = 0.2,
                      variance: tuple[float, float] = (0.5, 1.5), metrics: dict | None = None) -> Brick:
    """A zoo model with random weights (and BN statistics), in eval mode, with the manifest a trained one would
    have: classes c0, c1, … of `dataset`."""
    torch.manual_seed(seed)
    model = randomise_batchnorm(classifier(builder, spec, classes, width).eval(), spread, variance)
    manifest = Manifest(architecture={"builder": builder, "in_channels": spec.channels, "num_classes": classes,
                                      "width": width},
                        classes=[ClassRef(f"c{k}", dataset, k) for k in range(classes)], input=spec,
                        metrics=dict(metrics or {}))
    return Brick(model, manifest)


def random_masks(model: nn.Module, classes: int, keep: float = 1.0, seed: int = 0) -> ComponentMasks:
    """Masks that keep each channel for each class with probability `keep` (all of them at 1.0), random scores,
    and the classifier's identity rows."""
    generator = torch.Generator().manual_seed(seed)
    layers = [(name, module) for name, module in model.named_modules() if isinstance(module, (nn.Conv2d, nn.Linear))]
    masks, scores = {}, {}
    for name, module in layers:
        width = module.weight.shape[0]
        masks[name] = torch.rand(classes, width, generator=generator) < keep
        scores[name] = torch.rand(classes, width, generator=generator)
    classifier_name = layers[-1][0]
    masks[classifier_name] = torch.eye(classes, dtype=torch.bool)
    return ComponentMasks(masks, scores, [f"c{k}" for k in range(classes)], classifier_name)


DIGITS = InputSpec(1, (28, 28), (0.1557,), (0.2773,))


def random_component(builder: str, width: float, task: str, seed: int, spec: InputSpec = DIGITS,
                     dataset: str = "digits") -> Brick:
    """A component for `task` of an untrained 10-class `builder` on `dataset`'s classes, cut along random masks
    keeping 60% of every layer's channels (seeded): real architecture, no training."""
    import warnings

    from modellego import commands, data

    torch.manual_seed(seed)
    model = classifier(builder, spec, 10, width).eval()
    names = [str(k) for k in range(10)] if dataset == "digits" else data.load(dataset, "test").classes
    manifest = Manifest(architecture={"builder": builder, "in_channels": spec.channels, "num_classes": 10,
                                      "width": width},
                        classes=[ClassRef(name, dataset, k) for k, name in enumerate(names)], input=spec)
    masks = random_masks(model, 10, keep=0.6, seed=seed)
    masks.classes = names
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return commands.component(Brick(model, manifest), masks, task)


def load_without_data(path: Path, monkeypatch) -> Brick:
    """Load a model file while any dataset read fails the test: a file that needs no data to answer."""
    from modellego.io.modelfile import load

    def no_data(*args, **kwargs):
        raise AssertionError("a loaded model read a dataset")

    with monkeypatch.context() as patched:
        patched.setattr("modellego.data.datasets.load", no_data)
        patched.setattr("modellego.data.task.load", no_data)
        return load(path)


def synthetic_profile(model: nn.Module, shape: tuple[int, ...], num_classes: int, seed: int) -> Profile:
    """A profile of `model` with random positive sums, layers in execution order (found by running it)."""
    generator = torch.Generator().manual_seed(seed)
    order, sums = [], {}
    hooks = [module.register_forward_pre_hook(lambda m, a, n=name: order.append(n))
             for name, module in model.named_modules() if isinstance(module, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model(torch.zeros(1, *shape))
    for hook in hooks:
        hook.remove()
    modules = dict(model.named_modules())
    for name in order:
        layer = modules[name]
        in_count = layer.in_channels if isinstance(layer, nn.Conv2d) else layer.weight.shape[1]
        sums[name] = torch.rand(num_classes, layer.weight.shape[0], in_count, generator=generator) ** 2
    return Profile(contributions=sums, layers=order, classes=[f"c{k}" for k in range(num_classes)],
                   counts=torch.ones(num_classes, dtype=torch.long), samples=torch.arange(num_classes),
                   sample_labels=torch.arange(num_classes), model_hash=weights_hash(model), input_shape=shape)


def write_image_folder(root, classes=("cat", "dog"), per_class: int = 3, size=(40, 48)) -> None:
    """ROOT/train/<class>/*.png and ROOT/test/<class>/*.png; each class has its own colour, plus noise."""
    rng = np.random.RandomState(0)
    for split in ("train", "test"):
        for position, name in enumerate(classes):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                pixels = rng.randint(0, 60, (*size, 3)) + np.array([180 * (position % 2), 90 * position % 256, 60])
                Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(root / split / name / f"{i}.png")


def foreign_files(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """Files that are not modellego model files (and one that is), each with the fragment its refusal names."""
    model, manifest = random_classifier("lenet5", 1.0, 4, spread=0.5, variance=(0.5, 2.0))
    good = tmp_path / "good.safetensors"
    save(model, good, manifest)
    pickled = tmp_path / "model.pt"
    torch.save(model.state_dict(), pickled)
    random_bytes = tmp_path / "random.safetensors"
    random_bytes.write_bytes(os.urandom(4096))
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-1000])
    foreign = tmp_path / "foreign.safetensors"
    save_file({"weight": torch.zeros(3)}, foreign, metadata={"format": "pt"})
    damaged = tmp_path / "damaged.safetensors"
    save_file({key: value.contiguous() for key, value in model.state_dict().items()}, damaged,
              metadata={"modellego": "{not json"})
    mismatched = tmp_path / "mismatched.safetensors"
    save_file({"normalize.mean": torch.zeros(1, 1, 1)}, mismatched, metadata={"modellego": manifest.to_json()})
    return {"pickle": (pickled, "not a readable"), "random bytes": (random_bytes, "not a readable"),
            "truncated": (truncated, "not a readable"), "foreign safetensors": (foreign, "no modellego manifest"),
            "damaged manifest": (damaged, "damaged"), "inconsistent": (mismatched, "inconsistent"),
            "missing": (tmp_path / "absent.safetensors", "no such file")}


def reference_stream_before(relative: torch.Tensor, stream: torch.Tensor, alpha: float, beta: float,
                            fold: int = 1) -> torch.Tensor:
    """The stream features before a layer kept whole (PatchMerging's reduction, a MaxViT stage's shortcut, a
    hidden Linear), literally: votes from the features `stream` keeps after it where R > α, min-max normalised,
    above β; with `fold` copies of the stream side by side in its input, feature c is kept when any copy is."""
    classes, outputs, inputs = relative.shape
    width = inputs // fold
    before = torch.zeros(classes, width, dtype=torch.bool)
    for k in range(classes):
        votes = [sum(1.0 for o in range(outputs) if stream[k, o] and float(relative[k, o, i]) > alpha)
                 for i in range(inputs)]
        low, high = min(votes), max(votes)
        for i in range(inputs):
            if (votes[i] - low) / (high - low + 1e-5) > beta:
                before[k, i % width] = True
    return before


def assert_units_vote_with(model: nn.Module, profile: Profile, masks: ComponentMasks, stream_of) -> None:
    """Every block's heads and neurons in `masks` are those its writer votes for with the stream mask
    `stream_of(unit)` (docs/method.md, "Locating")."""
    from modellego.core.blocks import units
    from modellego.core.locate import by_max, input_mask, minmax
    from modellego.core.thresholds import PAPER
    from modellego.core.tokens import head_contributions

    alpha, beta = PAPER.pair("linear")
    count = len(profile.classes)
    for unit in units(model):
        normalise = by_max if unit.kind == "heads" else minmax
        expected, _ = input_mask(normalise(head_contributions(profile, unit), 2), stream_of(unit), alpha, beta,
                                 normalise)
        kept = masks.masks[unit.reader][:, : unit.size * unit.group].reshape(count, unit.size, unit.group)[..., 0]
        assert torch.equal(kept, expected), unit.module


def head_stream(profile: Profile, classifier: str) -> torch.Tensor:
    """The features each class's logit votes for at the classifier's input (the paper's linear α/β)."""
    from modellego.core.locate import input_mask
    from modellego.core.thresholds import PAPER

    count = len(profile.classes)
    own = torch.zeros(count, profile.contributions[classifier].shape[1], dtype=torch.bool)
    own[torch.arange(count), torch.tensor(profile.output_positions)] = True
    return input_mask(profile.relative(classifier), own, *PAPER.pair("linear"))[0]


def assert_planned_flops_are_counted(model: nn.Module, data, task: list[int], samples_per_class: int) -> None:
    """The `--auto` search's FLOPs of a cut planned from a profile on `data` (a TensorDataset with `classes`)
    equal the counted FLOPs of the component built from the same masks, at several α, and the component runs."""
    import modellego as ml
    from modellego.core.evaluate import count_flops
    from modellego.core.thresholds import Thresholds
    from modellego.core.tokens import TokenCandidates, locate_units

    profile = ml.profile(model, data, samples_per_class=samples_per_class)
    images, labels = data.tensors
    validation = torch.utils.data.Subset(data, torch.nonzero(torch.isin(labels, torch.tensor(task))).flatten().tolist())
    candidates = TokenCandidates(model, profile, task, validation)
    shape = tuple(images.shape[1:])
    for alpha in (0.0, 0.6, 0.9):
        thresholds = Thresholds(0.3, 0.2, alpha, 0.3)
        cut, _ = candidates.plan(thresholds)
        component = ml.disassemble(model, locate_units(model, profile, thresholds), task)
        assert candidates.flops(cut) == count_flops(component, shape)
        with torch.no_grad():
            assert component(images[:2]).shape == (2, len(task))
