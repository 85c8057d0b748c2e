"""What several test files share: the literal-definition references, random classifiers with their manifests,
random masks and profiles. Slow and obvious on purpose: the library is checked against these."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from modellego.data.spec import InputSpec
from modellego.masks import ComponentMasks
from modellego.modelfile import Brick, ClassRef, Manifest, weights_hash
from modellego.models.classifier import classifier
from modellego.profiles import Profile

FASHION = InputSpec(1, (28, 28), (0.286,), (0.353,))
DIGITS = InputSpec(1, (28, 28), (0.1557,), (0.2773,))


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
