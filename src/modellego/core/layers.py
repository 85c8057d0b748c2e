"""Model introspection: the parameter layers, the per-channel modules beside them, and their execution order."""

from __future__ import annotations

import contextlib
from typing import Iterable, Iterator

import torch
from torch import nn

from modellego.errors import ModellegoError

# Modules whose parameters and buffers are indexed by channel: they follow the channels they act on.
CHANNELWISE = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm, nn.PReLU)


def parameter_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The model's Conv2d and Linear layers by qualified name, in definition order."""
    layers = {name: module for name, module in model.named_modules() if isinstance(module, (nn.Conv2d, nn.Linear))}
    if not layers:
        raise ModellegoError("the model has no Conv2d or Linear layer, so it has nothing to profile or disassemble")
    return layers


def output_channels(layer: nn.Module) -> int:
    """A Conv2d's output channels or a Linear's output features."""
    return layer.out_channels if isinstance(layer, nn.Conv2d) else layer.out_features


def input_channels(layer: nn.Module) -> int:
    """A Conv2d's input channels or a Linear's input features."""
    return layer.in_channels if isinstance(layer, nn.Conv2d) else layer.in_features


def channel_pairs(model: nn.Module) -> int:
    """(output, input) channel pairs of every Conv2d/Linear layer: the values of one class's profile sums."""
    return sum(output_channels(layer) * input_channels(layer) for layer in parameter_layers(model).values())


def is_depthwise(module: nn.Module) -> bool:
    """A grouped conv with one input channel per group (depthwise, any channel multiplier)."""
    return isinstance(module, nn.Conv2d) and module.groups > 1 and module.groups == module.in_channels


def is_grouped(module: nn.Module) -> bool:
    """A grouped conv whose groups hold several input channels (ResNeXt, RegNet): its groups must stay whole."""
    return isinstance(module, nn.Conv2d) and module.groups > 1 and not is_depthwise(module)


def example_batch(model: nn.Module, example_input: torch.Tensor | tuple[int, ...] | None,
                  fallback: tuple[int, ...] | None = None) -> torch.Tensor:
    """One input batch to trace `model` with: `example_input` itself (a batch), or zeros of a shape (C, H, W),
    or of `fallback` when none is given, on the model's device."""
    device = next(model.parameters()).device
    if isinstance(example_input, torch.Tensor):
        return example_input.to(device)
    shape = tuple(example_input) if example_input is not None else fallback
    if not shape:
        raise ModellegoError("tracing the model needs an example input: pass example_input (a batch, or its shape "
                             "without the batch dimension)")
    return torch.zeros(1, *shape, device=device)


@torch.no_grad()
def execution_order(model: nn.Module, example_input: torch.Tensor | tuple[int, ...]) -> list[str]:
    """Names of the Conv2d/Linear layers in the order they run on `example_input` (a batch, or a shape C, H, W)."""
    order: list[str] = []
    layers = parameter_layers(model)
    handles = [module.register_forward_pre_hook(lambda m, a, n=name: order.append(n) if n not in order else None)
               for name, module in layers.items()]
    was_training = model.training
    try:
        model.eval()
        model(example_batch(model, example_input))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return order


def head(model: nn.Module, example_input: torch.Tensor | tuple[int, ...]) -> tuple[str, nn.Linear]:
    """The classifier: the last Conv2d/Linear layer to run, which must be an nn.Linear."""
    name = execution_order(model, example_input)[-1]
    layer = parameter_layers(model)[name]
    if not isinstance(layer, nn.Linear):
        raise ModellegoError(f"the last layer to run, {name}, is not a Linear classifier")
    return name, layer


@contextlib.contextmanager
def recorded_inputs(model: nn.Module, names: Iterable[str]) -> Iterator[dict[str, torch.Tensor]]:
    """While the context is open, the first input of each named submodule of `model` as it last ran, by name
    (hooks that live only inside the context): how the gates and the joint head read layers without changing
    the model."""
    modules = dict(model.named_modules())
    inputs: dict[str, torch.Tensor] = {}
    handles = [modules[name].register_forward_pre_hook(lambda m, a, n=name: inputs.__setitem__(n, a[0]))
               for name in set(names)]
    try:
        yield inputs
    finally:
        for handle in handles:
            handle.remove()
