"""A model's tensor shapes as the structure to rebuild: pruned components and padded assemblies are their
architecture resized to the shapes they hold."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def layer_facts(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Structure that tensor shapes alone cannot tell: the groups of grouped convolutions."""
    return {name: {"groups": module.groups} for name, module in model.named_modules()
            if isinstance(module, nn.Conv2d) and module.groups != 1}


def resize_shape_attributes(module: nn.Module, old: int, new: int) -> None:
    """A module that keeps the view shape of its per-channel parameter, as (C, 1, 1) or (C,) in an attribute
    (timm's metaformer `Scale`), gets that shape with the parameter's new channel count."""
    if old == new or type(module).__module__.startswith("torch.nn"):
        return
    for attribute, value in list(vars(module).items()):
        if isinstance(value, tuple) and value and value[0] == old and all(isinstance(v, int) for v in value) \
                and all(v == 1 for v in value[1:]):
            setattr(module, attribute, (new, *value[1:]))


def conform(model: nn.Module, shapes: dict[str, torch.Size], layers: dict[str, dict[str, Any]]) -> None:
    """Resize every parameter and buffer of `model` to `shapes` (by state-dict key) and set the layers' sizes to
    match (`layers`: the structure shapes alone cannot tell, from `layer_facts`): how a pruned or padded model is
    rebuilt from a generic architecture. Under `torch.device("meta")` nothing is allocated."""
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        for attribute, tensor in list(module.named_parameters(recurse=False)):
            shape = shapes.get(prefix + attribute)
            if shape is not None and tuple(shape) != tuple(tensor.shape):
                setattr(module, attribute, nn.Parameter(torch.empty(shape, dtype=tensor.dtype)))
                resize_shape_attributes(module, tensor.shape[0], shape[0])
        for attribute, tensor in list(module.named_buffers(recurse=False)):
            shape = shapes.get(prefix + attribute)
            if tensor is not None and shape is not None and tuple(shape) != tuple(tensor.shape):
                setattr(module, attribute, torch.empty(shape, dtype=tensor.dtype))
        if isinstance(module, nn.Conv2d):
            module.groups = int(layers.get(name, {}).get("groups", 1))
            module.out_channels = module.weight.shape[0]
            module.in_channels = module.weight.shape[1] * module.groups
        elif isinstance(module, nn.Linear):
            module.out_features, module.in_features = module.weight.shape
        elif isinstance(module, nn.modules.batchnorm._BatchNorm):
            reference = module.running_mean if module.running_mean is not None else module.weight
            module.num_features = reference.shape[0]
        elif isinstance(module, nn.LayerNorm) and module.weight is not None:
            module.normalized_shape = tuple(module.weight.shape)
        elif isinstance(module, nn.GroupNorm) and module.weight is not None:
            module.num_channels = module.weight.shape[0]
        elif isinstance(module, nn.PReLU):
            module.num_parameters = module.weight.shape[0]
