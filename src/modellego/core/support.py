"""What modellego can take apart, decided before any work: an unsupported model is refused with one line
saying why (attention, a head that is not nn.Linear, channels torch-pruning cannot follow, a trial cut that
does not compute what the model computes on the channels it keeps, an input size the model cannot take)."""

from __future__ import annotations

import warnings

import torch
from torch import nn
from torch_pruning import ops as tp_ops

from modellego.core.blocks import HeadAttention, StreamLinear, is_transformer, units
from modellego.core.channels import ChannelGraph
from modellego.core.contributions import TokenLinear
from modellego.core.cut import disassemble_with_cut, zero_removed_inputs
from modellego.core.layers import channel_pairs, execution_order, input_channels, output_channels, parameter_layers
from modellego.core.masks import ComponentMasks
from modellego.errors import ModellegoError
from modellego.memory import available_memory

# Square sizes tried, smallest first, to tell a user which input size a model needs.
SIZES_TRIED = (16, 24, 32, 48, 64, 75, 96, 128, 160, 192, 224, 256, 299, 384, 512)


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


TRANSFORMERS = "the zoo's vit and swin, torchvision's vit_*, swin_* and maxvit_t, and timm's plain ViT and DeiT blocks"
# torchvision's attention that `models.vit.from_torchvision` rebuilds as heads
CONVERTED = ("ShiftedWindowAttention", "ShiftedWindowAttentionV2", "PartitionAttentionLayer",
             "RelativePositionalMultiHeadAttention")


def _in_torchvision_vit(model: nn.Module) -> bool:
    """Whether `model` holds torchvision's ViT encoder blocks, which `models.vit.from_torchvision` converts."""
    return any(type(module).__name__ == "EncoderBlock" and type(module).__module__.startswith("torchvision")
               for module in model.modules())


def _attention(model: nn.Module) -> str | None:
    for name, module in model.named_modules():
        if any(isinstance(part, HeadAttention) for part in module.modules()):
            continue  # the Transformer kind's attention, whose heads are units (core.tokens), or a layer around it
        kind = type(module).__name__
        if isinstance(module, nn.MultiheadAttention) and _in_torchvision_vit(model):
            return (f"its attention ({kind} at {name}) is torchvision's, whose heads are one weight; convert the "
                    "model first with modellego.models.vit.from_torchvision(model) (model files and "
                    "`--model torchvision:vit_*` are converted already)")
        if kind in CONVERTED and type(module).__module__.startswith("torchvision"):
            return (f"its attention ({kind} at {name}) is torchvision's, which modellego rebuilds as heads before "
                    "it takes it apart; convert the model first with "
                    "modellego.models.vit.from_torchvision(model) (model files and `--model torchvision:swin_*` "
                    "or `maxvit_t` are converted already)")
        if isinstance(module, nn.MultiheadAttention) or "Attention" in kind:
            return (f"its attention ({kind} at {name}) is not a block modellego knows how to take apart; it "
                    f"takes apart the blocks of {TRANSFORMERS}, and convolutional networks")
    return None


# Layers with weights across channels or time that modellego neither profiles nor cuts.
FOREIGN = (nn.Conv1d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def _foreign(model: nn.Module) -> str | None:
    for name, module in model.named_modules():
        if isinstance(module, FOREIGN):
            return (f"it has a {type(module).__name__} at {name}, whose channels modellego neither profiles nor "
                    "cuts (an efficient channel attention, ECA, convolves across channels with one); modellego "
                    "disassembles networks of Conv2d and Linear layers")
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
    reason = _attention(model) or _foreign(model)
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
    if is_transformer(model):
        return _transformer_reason(model, layers, head_name)
    try:
        with torch.enable_grad():
            graph = ChannelGraph(model, input_shape)
    except Exception as error:  # torch-pruning's tracer raises many types on graphs it cannot follow
        if out_of_memory(error):
            raise _memory_error("trace its channels", input_shape, error) from None
        return (f"torch-pruning cannot follow its channels ({_first_line(error)}); models that reorder channels, "
                "such as ShuffleNet's channel shuffle, are not supported")
    return _slices_reason(graph) or _feeds_reason(model, graph, layers) or \
        _trial_cut_reason(model, input_shape, graph, order)


def _transformer_reason(model: nn.Module, layers: dict[str, nn.Module], head_name: str) -> str | None:
    """Why a Transformer's units cannot be taken apart: a Linear on tokens outside the attention heads and MLPs
    (its features would be cut by nothing), or a head on tokens."""
    in_units = {name for unit in units(model) for name in (unit.reader, unit.writer)}
    for name, layer in layers.items():
        if isinstance(layer, TokenLinear) and not isinstance(layer, StreamLinear) and name not in in_units:
            return (f"its token layer {name} is outside the attention heads and MLP blocks, the units modellego "
                    "keeps or drops")
    if isinstance(layers[head_name], TokenLinear):
        return f"its classifier {head_name} acts on every token; modellego needs a head on the class token"
    heads = [name for name, layer in layers.items() if isinstance(layer, nn.Linear) and not isinstance(layer, TokenLinear)]
    if len(heads) > 1:
        return (f"it has {len(heads)} classifier heads ({', '.join(heads[:3])}) whose logits it combines (a parallel "
                "assembly's members, or a distilled DeiT's class and distillation heads); modellego cuts a model "
                "with one head")
    return None


SPLITS = ("models that split, slice or mix channels outside torch-pruning's view (CSPNet and Res2Net blocks, "
          "MixNet's mixed kernels, ReXNet's channel slices, GhostNet's sliced concatenation, ECA's convolution "
          "across channels) are not supported")


def _slices_reason(graph: ChannelGraph) -> str | None:
    """Why a cut cannot be planned: the model slices its channels (`x[:, a:b]`, ReXNet's partial residuals).
    torch-pruning's grouping of the channels around such a slice ran for over 16 minutes on timm's rexnet_100
    without ending, so such models are refused before it is tried."""
    for module in graph.dependency.module2node:
        if isinstance(module, tp_ops._SliceOp) and module.dim == 1:
            end = "" if module.end is None or module.end >= 2**62 else module.end
            return f"it slices its channels (x[:, {module.start or ''}:{end}] in the forward pass); {SPLITS}"
    return None


def _feeds_reason(model: nn.Module, graph: ChannelGraph, layers: dict[str, nn.Module]) -> str | None:
    """Why the channel graph's links cannot be right: a link to a channel beyond its layer's width."""
    for name, layer in layers.items():
        for feed in graph.feeds(name):
            producer = layers.get(feed.producer)
            if producer is None:
                continue
            beyond = (feed.inputs.numel() and not 0 <= int(feed.inputs.min()) <= int(feed.inputs.max()) < input_channels(layer)) \
                or (feed.channels.numel() and
                    not 0 <= int(feed.channels.min()) <= int(feed.channels.max()) < output_channels(producer))
            if beyond:
                return (f"torch-pruning links channels of {feed.producer} to {name} beyond their widths; {SPLITS}")
    return None


TRIAL_TOLERANCE = 1e-3  # relative; an exact cut differs from the masked model by float rounding only (~1e-6)


def _outputs(model: nn.Module, names: list[str], images: torch.Tensor) -> dict[str, torch.Tensor]:
    """The outputs of the layers `names` of `model` on `images`, channels first (a Linear's are its last dim)."""
    captured: dict[str, torch.Tensor] = {}
    modules = dict(model.named_modules())
    handles = [modules[name].register_forward_hook(
        lambda module, inputs, output, name=name: captured.__setitem__(
            name, output if isinstance(module, nn.Conv2d) else output.movedim(-1, 1)))
        for name in names]
    try:
        model(images)
    finally:
        for handle in handles:
            handle.remove()
    return captured


@torch.no_grad()
def _trial_cut_reason(model: nn.Module, input_shape: tuple[int, ...], graph: ChannelGraph,
                      order: list[str]) -> str | None:
    """Why cutting `model` is not exact: cut a copy for its first output with about half of every layer's
    channels (seeded; all the channels a LayerNorm or GroupNorm normalises together, whose statistics a cut
    changes by design) and compare every layer's kept channels with the model's whose weights reading the
    removed channels are zeroed (what the cut must compute). Costs one copy of the model, one cut and two
    forward passes of two inputs."""
    layers = parameter_layers(model)
    generator = torch.Generator().manual_seed(0)
    head = order[-1]
    masks = {name: torch.rand(1, output_channels(layers[name]), generator=generator) < 0.5 for name in order}
    masks[head] = torch.zeros(1, output_channels(layers[head]), dtype=torch.bool)
    masks[head][0, 0] = True
    for name, module in model.named_modules():  # a norm across channels sees the channels a cut removes: keep them
        if isinstance(module, nn.LayerNorm) or (isinstance(module, nn.GroupNorm)
                                                and module.num_groups < module.num_channels):
            for feed in graph.feeds(name):
                if feed.producer in masks and feed.producer != head:
                    masks[feed.producer][0, feed.channels] = True
    scores = {name: torch.rand(mask.shape, generator=generator) for name, mask in masks.items()}
    trial = ComponentMasks(masks, scores, ["trial"], head, input_shape=tuple(input_shape))
    device = next(model.parameters()).device
    images = torch.rand(2, *input_shape, generator=generator).to(device)
    was_training = model.training
    saved = {name: layer.weight.detach().clone() for name, layer in layers.items()}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            component, cut = disassemble_with_cut(model, trial, [0], input_shape, graph)
            got = _outputs(component, order, images)
        model.eval()
        zero_removed_inputs(model, cut)
        expected = _outputs(model, order, images)
    except Exception as error:  # a cut torch-pruning cannot make raises anything from anywhere
        if out_of_memory(error):
            raise _memory_error("try cutting it", input_shape, error) from None
        return f"a trial cut of its channels fails ({_first_line(error)}); {SPLITS}"
    finally:
        for name, layer in layers.items():
            layer.weight.copy_(saved[name])
        model.train(was_training)
    errors = {}
    for name in order:
        kept = expected[name].index_select(1, cut.outputs[name].to(device))
        errors[name] = ((got[name] - kept).abs().max() / kept.abs().max().clamp(min=1e-12)).item() \
            if got[name].shape == kept.shape else float("inf")
    worst = max(errors, key=lambda name: (errors[name], -order.index(name)))  # the first of the worst
    if not errors[worst] <= TRIAL_TOLERANCE:
        return (f"a trial cut of its channels computes other outputs than the model at {worst} on the channels "
                f"it keeps (relative error {errors[worst]:.2g}); {SPLITS}")
    return None


def profile_bytes(model: nn.Module, num_classes: int) -> int:
    """Memory a profile of `model` holds: per class, one float64 sum and one float32 copy per (output, input)
    channel pair of every Conv2d/Linear layer."""
    return num_classes * channel_pairs(model) * 12


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
