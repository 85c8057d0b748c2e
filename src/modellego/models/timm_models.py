"""Adapter that builds a timm classifier, untrained, for modellego's inputs: `timm:<name>` next to
`torchvision:<name>`. timm is an optional extra (`pip install 'modellego[timm]'`); nothing is downloaded
(`pretrained=False`): pretrained weights come in through `modellego import`."""

from __future__ import annotations

import math

from torch import nn

from modellego.errors import ModellegoError

__all__ = ["TIMM_FAMILIES", "TIMM_PREFIX", "build_timm", "timm_classifiers"]

TIMM_PREFIX = "timm:"
# One timm model per family (a small variant), as the support matrix checks them: convolutional families
# torch-pruning can follow, the ones whose channel splits it cannot (refused up front), and attention families
# (the plain ViT blocks of DeiT taken apart as Transformers; the others refused).
TIMM_FAMILIES = ["resnet18", "resnext26ts", "seresnext26d_32x4d", "ecaresnet26t", "resnetv2_50", "regnety_002",
                 "regnetx_002", "efficientnet_b0", "efficientnetv2_rw_t", "mobilenetv2_050", "mobilenetv3_small_050",
                 "mnasnet_050", "fbnetc_100", "tinynet_e", "lcnet_050", "hardcorenas_a", "rexnet_100", "ghostnet_100",
                 "mixnet_s", "densenet121", "dla34", "dpn48b", "vgg11", "repvgg_a0", "mobileone_s0", "gernet_s",
                 "selecsls42b", "ese_vovnet19b_dw", "hrnet_w18_small", "xception41", "inception_v3", "cspresnet50",
                 "cspdarknet53", "res2net50_14w_8s", "skresnet18", "resnest14d", "nf_resnet26", "tresnet_m",
                 "convnext_atto", "hgnetv2_b0", "poolformer_s12", "mobilevit_xxs", "efficientvit_b0",
                 "edgenext_xx_small", "levit_128s", "deit_tiny_patch16_224"]


def _timm():
    try:
        import timm
    except ImportError:
        raise ModellegoError("timm:<name> models need timm, an optional extra: pip install 'modellego[timm]'") from None
    return timm


def timm_classifiers() -> list[str]:
    """The names of timm's models (`timm.list_models()`), or none when timm is not installed."""
    try:
        import timm
    except ImportError:
        return []
    return list(timm.list_models())


def build_timm(name: str, in_channels: int, num_classes: int, width: float = 1.0) -> nn.Module:
    """Build timm model `name` with random weights (`pretrained=False`, never downloaded), `num_classes` outputs,
    `in_channels` input channels. timm's models have no common width multiplier, so `width` must be 1.0."""
    timm = _timm()
    if not timm.is_model(name):
        close = timm.list_models(f"*{name}*")[:8]
        hint = f"; did you mean {', '.join(close)}?" if close else "; `timm.list_models()` lists them"
        raise ModellegoError(f"unknown timm model {name!r}{hint}")
    if isinstance(width, bool) or not isinstance(width, (int, float)) or not math.isfinite(width) or width != 1.0:
        raise ModellegoError(f"timm:{name} has no width multiplier, so width must be 1.0 (got {width})")
    try:
        model = timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_channels)
    except Exception as error:  # timm raises many types for arguments a model does not take
        text = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ModellegoError(f"timm could not build {name!r} with {num_classes} classes and {in_channels} input "
                             f"channels ({type(error).__name__}: {text})") from None
    from modellego.models.vit import from_timm, is_transformer_builder

    # a ViT's plain attention blocks as heads and neurons, for the builders the Transformer kind takes
    return from_timm(model) if is_transformer_builder(f"{TIMM_PREFIX}{name}") else model
