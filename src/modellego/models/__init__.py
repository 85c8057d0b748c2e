"""The model zoo: CIFAR-style LeNet-5, VGG, ResNet and GoogLeNet builders, a small ViT and Swin, plus any torchvision classifier and,
with the `timm` extra, any timm model.

Every builder is ``builder(in_channels=3, num_classes=10, width=1.0) -> nn.Module`` and returns the
bare network (normalisation is added elsewhere). Channel counts are ``max(1, round(c * width))``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

from torch import nn

from modellego.errors import ModellegoError
from modellego.models.googlenet import googlenet
from modellego.models.lenet import lenet5
from modellego.models.resnet import resnet18, resnet50
from modellego.models.swin import swin
from modellego.models.timm_models import TIMM_PREFIX, build_timm
from modellego.models.tv import build_torchvision, torchvision_classifiers
from modellego.models.vgg import vgg11, vgg16
from modellego.models.vit import vit

__all__ = ["ZOO", "TIMM_PREFIX", "TORCHVISION_PREFIX", "build", "list_models", "model_names", "warn_if_oversized"]

TORCHVISION_PREFIX = "torchvision:"

ZOO: dict[str, Callable[..., nn.Module]] = {
    "lenet5": lenet5,
    "vgg11": vgg11,
    "vgg16": vgg16,
    "resnet18": resnet18,
    "resnet50": resnet50,
    "googlenet": googlenet,
    "vit": vit,
    "swin": swin,
}


def model_names() -> list[str]:
    """The zoo's model names (``torchvision:<builder>`` and ``timm:<name>`` are accepted by ``build`` too)."""
    return list(ZOO)


def list_models() -> list[str]:
    """The names `build` accepts: the zoo's, then `torchvision:<builder>` for torchvision's classifiers (and
    `timm:<name>` for any of `timm.list_models()`, not listed: there are over a thousand)."""
    return model_names() + [f"{TORCHVISION_PREFIX}{name}" for name in torchvision_classifiers()]


def build(name: str, in_channels: int = 3, num_classes: int = 10, width: float = 1.0) -> nn.Module:
    """Build model ``name`` with random weights: a zoo name, ``torchvision:<builder>`` or ``timm:<name>``."""
    if isinstance(width, bool) or not isinstance(width, (int, float)) or not math.isfinite(width) or width <= 0:
        raise ModellegoError(f"width must be a positive number, got {width!r}")
    if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
        raise ModellegoError(f"in_channels must be an integer >= 1, got {in_channels!r}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ModellegoError(f"num_classes must be an integer >= 1, got {num_classes!r}")
    if isinstance(name, str) and name.startswith(TORCHVISION_PREFIX):
        return build_torchvision(name[len(TORCHVISION_PREFIX):], in_channels, num_classes, width)
    if isinstance(name, str) and name.startswith(TIMM_PREFIX):
        return build_timm(name[len(TIMM_PREFIX):], in_channels, num_classes, width)
    if not isinstance(name, str) or name not in ZOO:
        raise ModellegoError(
            f"unknown model {name!r}; choose one of {', '.join(ZOO)} "
            f"or {TORCHVISION_PREFIX}<builder> (e.g. {TORCHVISION_PREFIX}resnet18) or {TIMM_PREFIX}<name> "
            f"(e.g. {TIMM_PREFIX}efficientnet_b0, with the timm extra)"
        )
    return ZOO[name](in_channels=in_channels, num_classes=num_classes, width=float(width))


# The zoo's networks are CIFAR-style: no early downsampling, so their feature maps (and memory, and time) grow with
# the square of the input size. They were designed for 28-32 px; above this size a warning says so.
ZOO_LARGEST_SIZE = 64
ZOO_DESIGNED_SIZE = 32
# The torchvision builder that downsamples early (ImageNet-style) for each zoo network that has one.
TORCHVISION_COUNTERPART = {"vgg11": "vgg11_bn", "vgg16": "vgg16_bn", "resnet18": "resnet18", "resnet50": "resnet50",
                           "googlenet": "googlenet"}


def warn_if_oversized(name: str, size: tuple[int, int]) -> bool:
    """Warn when zoo model `name` is about to be built for inputs larger than ZOO_LARGEST_SIZE: its feature maps
    would be (size / 32)² times as large as designed. Names `--image-size` and, where there is one, the
    torchvision builder that downsamples early. Returns whether it warned."""
    if name not in ZOO or max(size) <= ZOO_LARGEST_SIZE:
        return False
    growth = size[0] * size[1] / ZOO_DESIGNED_SIZE**2
    counterpart = TORCHVISION_COUNTERPART.get(name)
    instead = f" or --model {TORCHVISION_PREFIX}{counterpart}, which downsamples early" if counterpart else ""
    warnings.warn(f"{name} is a CIFAR-style network designed for {ZOO_DESIGNED_SIZE}×{ZOO_DESIGNED_SIZE} inputs (it "
                  f"does not downsample early): at {size[0]}×{size[1]} its feature maps are {growth:.0f} times as "
                  f"large, and so are its memory and time; use --image-size {ZOO_DESIGNED_SIZE} (up to "
                  f"{ZOO_LARGEST_SIZE}){instead}", stacklevel=3)
    return True
