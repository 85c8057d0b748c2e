"""The end-to-end self-check behind the support matrix: a randomly initialised classifier whose labels are its own
predictions goes through profile → locate → disassemble → save/load → assemble (padded and parallel), and every
step is checked against the source. `check_builder` gives one row of the README's table."""

from __future__ import annotations

import dataclasses
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import TensorDataset

from modellego.commands.assemble import assembly
from modellego.commands.disassemble import component
from modellego.core.layers import CHANNELWISE, execution_order, parameter_layers
from modellego.core.locate import DEFAULT_FLATTEN, PAPER, ComponentMasks
from modellego.core.profile import profile
from modellego.core.reconstruct import reestimate_batchnorm
from modellego.core.support import check_profile_fits, smallest_input_size, unsupported_reason
from modellego.data.datasets import TensorImages
from modellego.data.spec import InputSpec
from modellego.errors import ModellegoError
from modellego.io.manifest import Brick, ClassRef, Manifest
from modellego.io.modelfile import load, save
from modellego.kinds import kind_of
from modellego.models import model_names
from modellego.models.classifier import classifier
from modellego.models.timm_models import TIMM_FAMILIES, TIMM_PREFIX, timm_classifiers
from modellego.models.tv import torchvision_classifiers

STATUSES = ("supported", "parallel only", "refused", "failed")


def matrix_builders() -> list[str]:
    """Every builder the support matrix checks: the zoo, every torchvision classifier and, with the timm extra
    installed, one timm model per family."""
    timm = [f"{TIMM_PREFIX}{name}" for name in TIMM_FAMILIES] if timm_classifiers() else []
    return model_names() + [f"torchvision:{name}" for name in torchvision_classifiers()] + timm


@dataclass
class SupportResult:
    """One builder's row: `status` is one of STATUSES, `detail` says why (a refusal's reason, a failure's error)."""

    builder: str
    status: str
    detail: str
    input_size: int
    seconds: float


def _randomise_norms(model: nn.Module, images: torch.Tensor, generator: torch.Generator) -> None:
    """Distinct per-channel affine parameters, and BatchNorm statistics measured on `images` (random statistics
    saturate deep networks into constant outputs), so that a channel put in the wrong place changes the outputs."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, CHANNELWISE) and getattr(module, "weight", None) is not None:
                module.weight.uniform_(0.5, 1.5, generator=generator)
                if getattr(module, "bias", None) is not None:
                    module.bias.uniform_(-0.2, 0.2, generator=generator)
    reestimate_batchnorm(model, TensorDataset(images, torch.zeros(len(images), dtype=torch.long)),
                         batch_size=len(images))


@torch.no_grad()
def head_inputs(model: nn.Module, head: nn.Linear, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """What `head` receives (flattened) when `model` runs on `images`, batch by batch."""
    features: list[torch.Tensor] = []
    handle = head.register_forward_pre_hook(lambda module, inputs: features.append(inputs[0].flatten(1)))
    try:
        for start in range(0, len(images), batch_size):
            model(images[start:start + batch_size])
    finally:
        handle.remove()
    return torch.cat(features)


@torch.no_grad()
def balance_head(head: nn.Linear, inputs: torch.Tensor, per_class: int, steps: int = 400) -> torch.Tensor:
    """Point the head at the principal directions of its `inputs` (decorrelated, centred, scaled; classes beyond
    their number at random unit mixtures of them), then nudge the biases, at most `steps` times, until every
    class is the prediction of at least `per_class` inputs; returns the head's predictions, which become the
    labels (so every class has confident, correct samples without training)."""
    centre = inputs.mean(0)
    directions = torch.linalg.svd(inputs - centre, full_matrices=False).Vh[:head.out_features]
    scale = ((inputs - centre) @ directions.T).std(0).clamp(min=1e-12)
    # whitened coordinates z = (x - centre) @ directions.T / scale; class k's logit is mixture[k] · z
    mixture = torch.eye(head.out_features, len(directions))
    extra = head.out_features - len(directions)
    if extra > 0:  # more classes than features (ResNet-18's 512 for 1000 classes)
        mixture[len(directions):] = torch.randn(extra, len(directions), generator=torch.Generator().manual_seed(0))
        mixture[len(directions):] /= mixture[len(directions):].norm(dim=1, keepdim=True)
    head.weight.copy_(mixture @ (directions / scale[:, None]))
    _shift_logits(head, -(mixture @ ((centre @ directions.T) / scale)), centre)
    for _ in range(steps):
        predictions = head(inputs).argmax(1)
        counts = torch.bincount(predictions, minlength=head.out_features)
        if counts.min() >= per_class:
            break
        _shift_logits(head, -0.05 * torch.log((counts.float() + 1) / (len(inputs) / head.out_features)), centre)
    return head(inputs).argmax(1)


def _shift_logits(head: nn.Linear, amounts: torch.Tensor, centre: torch.Tensor) -> None:
    """Add `amounts` to the head's logits: to its bias, or, for a head without one (MaxViT's; adding one would
    change its architecture), along its inputs' mean `centre`, which shifts every input near the mean alike."""
    if head.bias is not None:
        head.bias.add_(amounts)
    else:
        head.weight.add_(amounts[:, None] * centre / centre.dot(centre).clamp(min=1e-12))


@torch.no_grad()
def _balance_head(model: nn.Module, head: nn.Linear, images: torch.Tensor, per_class: int) -> torch.Tensor:
    """`balance_head` on what the head receives from `images`; the labels are the whole model's predictions."""
    balance_head(head, head_inputs(model, head, images, batch_size=len(images)), per_class)
    return model(images).argmax(1)


def _keep_all(masks: ComponentMasks) -> ComponentMasks:
    kept = {name: torch.ones_like(mask) for name, mask in masks.masks.items()}
    return dataclasses.replace(masks, masks=kept | {masks.classifier: masks.masks[masks.classifier]})


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max().clamp(min=1e-12)).item()


def check_builder(builder: str, num_classes: int = 4, samples_per_class: int = 4, seed: int = 0,
                  size: int = 32, tolerance: float = 1e-4) -> SupportResult:
    """Run the whole chain on `builder` (a zoo name or `torchvision:<name>`), at the smallest square input of at
    least `size` it takes, and say whether it is supported, supported in parallel mode only, refused up front
    (with the capability check's reason) or failed (a bug: the error)."""
    started = time.perf_counter()
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    probe = classifier(builder, InputSpec(3, (size, size), (0.5,) * 3, (0.25,) * 3), num_classes).eval()
    size = smallest_input_size(probe, 3, at_least=size) or size
    spec = InputSpec(3, (size, size), (0.5,) * 3, (0.25,) * 3)
    shape = (3, size, size)

    def result(status: str, detail: str) -> SupportResult:
        return SupportResult(builder, status, detail, size, time.perf_counter() - started)

    reason = unsupported_reason(probe, shape)
    if reason:
        return result("refused", reason)
    try:
        check_profile_fits(probe, num_classes, builder)
    except ModellegoError as refusal:
        return result("refused", str(refusal))
    model = probe
    stage = "prepare"
    try:
        head = parameter_layers(model)[execution_order(model, shape)[-1]]
        images = (torch.rand(16 * num_classes, *shape, generator=generator) * 255).to(torch.uint8)
        _randomise_norms(model, images.float() / 255, generator)
        labels = _balance_head(model, head, images.float() / 255, samples_per_class)
        data = TensorImages("random", "train", images, labels, [f"c{k}" for k in range(num_classes)],
                            spec.mean, spec.std)
        manifest = Manifest(architecture={"builder": builder, "in_channels": 3, "num_classes": num_classes,
                                          "width": 1.0},
                            classes=[ClassRef(f"c{k}", "random", k) for k in range(num_classes)], input=spec)
        probe_images = torch.rand(3, *shape, generator=generator)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            stage = "profile"
            class_profile = profile(model, data, samples_per_class=samples_per_class)
            stage = "locate"
            kind = kind_of(manifest.architecture)
            masks = kind.locate(model, class_profile, PAPER, kind.channels(model, spec), DEFAULT_FLATTEN)
            stage = "disassemble (keep all)"
            whole = component(Brick(model, manifest), _keep_all(masks), list(range(num_classes)))
            with torch.no_grad():
                error = _relative_error(whole.model(probe_images), model(probe_images))
            if error > tolerance:
                return result("failed", f"keeping every channel changes the logits (relative error {error:.2g})")
            stage = "disassemble"
            half = num_classes // 2
            parts = [component(Brick(model, manifest), masks, list(range(half))),
                     component(Brick(model, manifest), masks, list(range(half, num_classes)))]
            members = []
            with tempfile.TemporaryDirectory() as folder:
                for index, part in enumerate(parts):
                    stage = "save/load"
                    path = Path(folder) / f"component{index}.safetensors"
                    save(part.model, path, part.manifest)
                    reloaded, reloaded_manifest = load(path)
                    with torch.no_grad():
                        if not torch.equal(reloaded(probe_images), part.model.eval()(probe_images)):
                            return result("failed", "a saved component loads with other outputs")
                    members.append((reloaded, reloaded_manifest))
                stage = "assemble parallel"
                parallel, _ = assembly(members, "parallel", scale_logits=False)
                stage = "assemble padded"
                try:
                    padded, padded_manifest = assembly(members, "padded", scale_logits=False)
                except ModellegoError as refusal:
                    return result("parallel only", str(refusal))
                with torch.no_grad():
                    error = _relative_error(padded(probe_images), parallel(probe_images))
                if error > tolerance:
                    return result("failed", f"padded and parallel assemblies differ (relative error {error:.2g})")
                stage = "save/load assembly"
                path = Path(folder) / "assembly.safetensors"
                save(padded, path, padded_manifest)
                with torch.no_grad():
                    if not torch.equal(load(path)[0](probe_images), padded(probe_images)):
                        return result("failed", "a saved padded assembly loads with other outputs")
    except Exception as error:  # the matrix reports every failure as a row instead of stopping
        lines = str(error).strip().splitlines()
        return result("failed", f"{stage}: {type(error).__name__}: {lines[0] if lines else ''}")
    return result("supported", "padded equals parallel; components save and load exactly")
