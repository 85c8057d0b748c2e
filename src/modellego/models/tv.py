"""Adapter that builds any torchvision classifier, untrained, for modellego's inputs."""

from __future__ import annotations

import math
from typing import Any

from torch import nn

from modellego.errors import ModellegoError

__all__ = ["build_torchvision", "torchvision_classifiers"]

# Builders whose constructor takes a channel multiplier.
_WIDTH_BUILDERS = frozenset({"mobilenet_v2", "mobilenet_v3_large", "mobilenet_v3_small"})
# Builders with auxiliary classifiers: switched off so train mode returns a plain tensor.
_AUX_BUILDERS = frozenset({"googlenet", "inception_v3"})


def torchvision_classifiers() -> list[str]:
    """The names of torchvision's image-classification builders (no detection, segmentation, video...)."""
    import torchvision  # imported on use: it costs a second at start-up

    return sorted(torchvision.models.list_models(module=torchvision.models))


def build_torchvision(builder: str, in_channels: int, num_classes: int, width: float = 1.0) -> nn.Module:
    """Build torchvision classifier ``builder`` with random weights (never downloaded).

    ``width`` is passed as ``width_mult`` to the MobileNets and must be 1.0 for other builders;
    ``in_channels`` other than 3 replaces the first Conv2d with one of the same settings.
    """
    import torchvision

    classifiers = torchvision_classifiers()
    if builder not in classifiers:
        raise ModellegoError(
            f"unknown torchvision classifier {builder!r}; choose one of {', '.join(classifiers)}"
        )
    if isinstance(width, bool) or not isinstance(width, (int, float)) or not math.isfinite(width) or width <= 0:
        raise ModellegoError(f"width must be a positive number, got {width!r}")
    if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
        raise ModellegoError(f"in_channels must be an integer >= 1, got {in_channels!r}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ModellegoError(f"num_classes must be an integer >= 1, got {num_classes!r}")

    kwargs: dict[str, Any] = {"weights": None, "num_classes": num_classes}
    if builder in _WIDTH_BUILDERS:
        kwargs["width_mult"] = float(width)
    elif width != 1.0:
        raise ModellegoError(
            f"torchvision:{builder} has no width multiplier, so width must be 1.0 (got {width}); "
            f"width works with {', '.join(sorted(_WIDTH_BUILDERS))}"
        )
    if builder in _AUX_BUILDERS:
        kwargs["aux_logits"] = False
        kwargs["init_weights"] = True

    model = torchvision.models.get_model(builder, **kwargs)
    from modellego.models.vit import from_torchvision, is_transformer_builder

    if is_transformer_builder(f"torchvision:{builder}"):  # its attention heads and MLP neurons become units
        from_torchvision(model)
    if in_channels != 3:
        _replace_first_conv(model, builder, in_channels)
    return model


def _replace_first_conv(model: nn.Module, builder: str, in_channels: int) -> None:
    """Swap the first Conv2d (in registration order) for one reading ``in_channels`` channels."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            break
    else:
        raise ModellegoError(f"torchvision:{builder} has no Conv2d, so in_channels cannot be changed from 3")
    groups = module.groups
    if groups != 1 and in_channels % groups != 0:
        raise ModellegoError(
            f"torchvision:{builder}'s first conv has {groups} groups, so in_channels must be a multiple of {groups}"
        )
    conv = nn.Conv2d(
        in_channels,
        module.out_channels,
        kernel_size=module.kernel_size,
        stride=module.stride,
        padding=module.padding,
        dilation=module.dilation,
        groups=groups,
        bias=module.bias is not None,
        padding_mode=module.padding_mode,
        device=module.weight.device,
        dtype=module.weight.dtype,
    )
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, conv)
