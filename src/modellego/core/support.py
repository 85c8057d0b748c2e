"""What modellego can take apart, decided before any work: an unsupported model is refused with one line
saying why (attention, a head that is not nn.Linear, channels torch-pruning cannot follow, an input size the
model cannot take)."""

from __future__ import annotations

import torch
from torch import nn

from modellego.core.channels import ChannelGraph
from modellego.core.layers import execution_order, input_channels, output_channels, parameter_layers
from modellego.errors import ModellegoError
from modellego.memory import available_memory

# Square sizes tried, smallest first, to tell a user which input size a model needs.
SIZES_TRIED = (16, 24, 32, 48, 64, 75, 96, 128, 160, 192, 224, 256, 299, 384, 512)


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


def _attention(model: nn.Module) -> str | None:
    for name, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention) or "Attention" in type(module).__name__:
            return (f"attention layers are not supported ({type(module).__name__} at {name}): modellego "
                    "disassembles convolutional classifiers")
    return None


def out_of_memory(error: BaseException) -> bool:
    """Whether `error` is an allocation that failed (MemoryError, or torch's "can't allocate memory")."""
    return isinstance(error, MemoryError) or "can't allocate memory" in str(error) or "out of memory" in str(error)


def _memory_error(what: str, input_shape: tuple[int, ...], error: BaseException) -> ModellegoError:
    return ModellegoError(f"there is not enough memory to {what} on one {'×'.join(map(str, input_shape))} input "
                          f"({_first_line(error)}); use smaller images (--image-size) or free some memory")


@torch.no_grad()
def runs_at(model: nn.Module, input_shape: tuple[int, ...]) -> bool:
    """Whether `model` runs a forward pass on one input of `input_shape` (C, H, W)."""
    was_training = model.training
    try:
        model.eval()
        model(torch.zeros(1, *input_shape, device=next(model.parameters()).device))
        return True
    except Exception as error:  # any failure means "not at this size"; the caller reports which size works
        if out_of_memory(error):
            raise _memory_error("run it", input_shape, error) from None
        return False
    finally:
        model.train(was_training)


def smallest_input_size(model: nn.Module, channels: int, at_least: int = 1) -> int | None:
    """The smallest square size in SIZES_TRIED (not below `at_least`) at which `model` runs, or None."""
    for size in SIZES_TRIED:
        if size >= at_least and runs_at(model, (channels, size, size)):
            return size
    return None


def unsupported_reason(model: nn.Module, input_shape: tuple[int, ...]) -> str | None:
    """Why modellego cannot profile, locate and disassemble `model` on inputs of `input_shape` (C, H, W),
    or None when it can. Cheap: one forward pass of one image and one trace of the channel graph."""
    reason = _attention(model)
    if reason:
        return reason
    layers = parameter_layers(model)
    if not runs_at(model, input_shape):
        channels, height, width = input_shape
        size = smallest_input_size(model, channels)
        try:
            execution_order(model, input_shape)
            cause = "unknown error"
        except Exception as error:  # the model's own message says what it expected
            cause = _first_line(error)
        needs = (f"the smallest size tried that works is {channels}×{size}×{size}: use images of that size "
                 f"(imagefolder --image-size {size})" if size else "no input size tried works")
        return f"it cannot run on {channels}×{height}×{width} inputs ({cause}); {needs}"
    order = execution_order(model, input_shape)
    unused = [name for name in layers if name not in order]
    if unused:
        return (f"layers {unused[:3]} never run in the forward pass, so their channels cannot be profiled")
    head_name = order[-1]
    if not isinstance(layers[head_name], nn.Linear):
        return (f"its last layer to run, {head_name}, is a {type(layers[head_name]).__name__}: modellego "
                "disassembles classifiers whose logits come from an nn.Linear")
    try:
        with torch.enable_grad():
            ChannelGraph(model, input_shape)
    except Exception as error:  # torch-pruning's tracer raises many types on graphs it cannot follow
        if out_of_memory(error):
            raise _memory_error("trace its channels", input_shape, error) from None
        return (f"torch-pruning cannot follow its channels ({_first_line(error)}); models that reorder channels, "
                "such as ShuffleNet's channel shuffle, are not supported")
    return None


def profile_bytes(model: nn.Module, num_classes: int) -> int:
    """Memory a profile of `model` holds: per class, one float64 sum and one float32 copy per (output, input)
    channel pair of every Conv2d/Linear layer."""
    pairs = sum(output_channels(layer) * input_channels(layer) for layer in parameter_layers(model).values())
    return num_classes * pairs * 12


def check_profile_fits(model: nn.Module, num_classes: int = 1, name: str = "the model") -> None:
    """Refuse, before any work, a profile whose sums for `num_classes` classes at once (profiling holds one)
    cannot fit in the memory this machine has available."""
    needed, available = profile_bytes(model, num_classes), available_memory()
    if available is not None and needed > available:
        held = "one class's sums" if num_classes == 1 else f"{num_classes} classes' sums"
        raise ModellegoError(f"profiling {name} needs about {needed / 2**30:.1f} GiB ({held}: every channel pair "
                             f"of its layers), more than the {available / 2**30:.1f} GiB available; use a machine "
                             "with more memory")


def check_supported(model: nn.Module, input_shape: tuple[int, ...], name: str = "the model") -> None:
    """Refuse, with one line, a model modellego cannot disassemble (see `unsupported_reason`)."""
    reason = unsupported_reason(model, input_shape)
    if reason:
        raise ModellegoError(f"{name} is not supported: {reason}")
