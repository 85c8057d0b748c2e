"""`modellego import`: a model file from a builder and a user's pretrained weights — a torchvision `.pth` state
dict (read with `torch.load(weights_only=True)`, so no code runs) or a `.safetensors` file — with the class names
and the input normalisation that the weights' documentation gives. Nothing is downloaded."""

from __future__ import annotations

import os
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from modellego.commands.common import FilePath, write
from modellego.core.evaluate import count_flops, count_params
from modellego.data.datasets import IMAGENET_MEAN, IMAGENET_STD
from modellego.data.spec import InputSpec
from modellego.errors import ModellegoError
from modellego.io.atomic import check_output_path, file_hash
from modellego.io.manifest import Brick, ClassRef, Manifest
from modellego.io.safetensors import read_raw
from modellego.kinds import kind_for_request
from modellego.models.classifier import classifier

WRAPPERS = ("state_dict", "model", "model_state_dict", "net")  # where training scripts keep the weights
PREFIXES = ("module.", "model.", "net.")                        # what DataParallel and wrappers put before names


def read_weights(path: FilePath) -> dict[str, torch.Tensor]:
    """A state dict from `path`: safetensors, or a PyTorch file read with `weights_only=True` (no code runs;
    a checkpoint that keeps the weights under "state_dict", "model", ... is unwrapped). One line on anything
    else."""
    source = Path(path)
    if not source.is_file():
        raise ModellegoError(f"no such weights file: {source}")
    if source.suffix == ".safetensors":
        return read_raw(source, "weights file").tensors("weights file")
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols before it refuses a file
            warnings.simplefilter("ignore")
            loaded = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for files that are not (safe) state dicts
        raise ModellegoError(f"{source} is not a state dict modellego can read safely: torch.load(weights_only=True) "
                             f"refused it ({type(error).__name__}); pass a .pth saved with "
                             "torch.save(model.state_dict()) or a .safetensors file") from None
    for key in WRAPPERS:
        if isinstance(loaded, dict) and isinstance(loaded.get(key), dict):
            loaded = loaded[key]
            break
    if not isinstance(loaded, dict) or not loaded or \
            not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in loaded.items()):
        raise ModellegoError(f"{source} holds no state dict (a mapping of parameter names to tensors); pass "
                             "torch.save(model.state_dict(), PATH)")
    return dict(loaded)


def _matched(weights: dict[str, torch.Tensor], network: nn.Module) -> dict[str, torch.Tensor]:
    """`weights` renamed to `network`'s names (a common prefix such as DataParallel's "module." dropped; the
    auxiliary classifiers of GoogLeNet and Inception v3, which modellego builds without, left out)."""
    from modellego.models.vit import renamed_weights

    expected = network.state_dict()
    if not any(key.startswith("aux") for key in expected):
        weights = {key: value for key, value in weights.items() if not key.split(".", 1)[-1].startswith("aux")
                   and not key.startswith("aux")}
    for prefix in ("", *PREFIXES):
        # torchvision's names for modules modellego rebuilds (ViT blocks), once the prefix is gone
        renamed = renamed_weights(network, {key[len(prefix):]: value for key, value in weights.items()
                                            if key.startswith(prefix)})
        if len(renamed) == len(weights) and set(renamed) & set(expected):
            return renamed
    return renamed_weights(network, weights)


def load_weights(network: nn.Module, weights: dict[str, torch.Tensor], source: FilePath) -> None:
    """Load `weights` into `network` exactly: every name present, none extra, every shape equal; the first
    mismatch is named in one line."""
    weights = _matched(weights, network)
    expected = network.state_dict()
    missing = [key for key in expected if key not in weights]
    extra = [key for key in weights if key not in expected]
    if missing:
        raise ModellegoError(f"{source} lacks {missing[0]!r} (and {len(missing) - 1} more) that the builder's model "
                             "has; the weights are not this builder's" if len(missing) > 1 else
                             f"{source} lacks {missing[0]!r}, which the builder's model has")
    if extra:
        raise ModellegoError(f"{source} holds {extra[0]!r} (and {len(extra) - 1} more), which the builder's model "
                             "does not have; the weights are not this builder's" if len(extra) > 1 else
                             f"{source} holds {extra[0]!r}, which the builder's model does not have")
    for key, value in expected.items():
        if tuple(weights[key].shape) != tuple(value.shape):
            raise ModellegoError(f"{source}: {key} has shape {list(weights[key].shape)} but the builder's model has "
                                 f"{list(value.shape)}")
        if weights[key].is_floating_point() != value.is_floating_point():
            raise ModellegoError(f"{source}: {key} is stored as {weights[key].dtype}, the model needs {value.dtype}")
    state = OrderedDict((key, weights[key].to(value.dtype)) for key, value in expected.items())
    state._metadata = getattr(expected, "_metadata", None)
    network.load_state_dict(state, strict=True)


def import_model(builder: str, weights: FilePath, classes: Sequence[str], out: FilePath, image_size: int = 224,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 dataset: str = "imagefolder", width: float = 1.0) -> Brick:
    """Write a model file from `builder` (a zoo name, `torchvision:<name>` or `timm:<name>`) with `weights` (a
    state dict of the bare network, .pth or .safetensors), answering `classes` (the weights' classes, in the
    order of their outputs) from images of `image_size` normalised by `mean`/`std`. The classes are recorded as
    classes of `dataset` (an ImageFolder by default: later commands read the folders named like the classes).
    Wrong shapes, missing or extra keys, or a class count that does not match the head: one line each."""
    classes = [str(name) for name in classes]
    if not classes:
        raise ModellegoError("no class names given; --classes-file lists one per line, in the weights' output order")
    if len(set(classes)) != len(classes):
        twice = next(name for name in classes if classes.count(name) > 1)
        raise ModellegoError(f"class {twice!r} is named twice in the class list")
    if not (len(mean) == len(std) and len(mean) in (1, 3) and all(s > 0 for s in std)):
        raise ModellegoError("--mean and --std need one value per input channel (1 or 3), every std positive")
    check_output_path(out, inputs=[weights])
    if kind_for_request(builder, dataset).name != "cnn":
        raise ModellegoError(f"import brings in image classifiers; {builder!r} on {dataset!r} is not one")
    state = read_weights(weights)
    spec = InputSpec(len(mean), (image_size, image_size), tuple(float(v) for v in mean), tuple(float(v) for v in std))
    model = classifier(builder, spec, len(classes), width)
    head_rows = _head_rows(_matched(state, model.net), model.net)
    if head_rows is not None and head_rows != len(classes):
        raise ModellegoError(f"the weights' classifier has {head_rows} outputs but the class list names "
                             f"{len(classes)} classes; give one name per output, in order")
    load_weights(model.net, state, weights)
    model.eval()
    manifest = Manifest(architecture={"builder": builder, "in_channels": spec.channels, "num_classes": len(classes),
                                      "width": width},
                        classes=[ClassRef(name, dataset, index) for index, name in enumerate(classes)], input=spec,
                        provenance={"imported": {"weights": os.path.basename(os.fspath(weights)),
                                                 "weights_sha256": file_hash(weights), "builder": builder}},
                        metrics={"params": count_params(model), "flops": count_flops(model, spec)})
    write(model, out, manifest)
    return Brick(model, manifest)


def _head_rows(weights: dict[str, torch.Tensor], network: nn.Module) -> int | None:
    """How many outputs the weights' classifier has (the network's last Linear layer, by name), if they hold it."""
    linears = [name for name, module in network.named_modules() if isinstance(module, nn.Linear)]
    if not linears or f"{linears[-1]}.weight" not in weights:
        return None
    return int(weights[f"{linears[-1]}.weight"].shape[0])
