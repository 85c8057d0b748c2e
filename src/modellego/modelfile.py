"""The model file: one `.safetensors` file holding the weights and, in its metadata, a JSON manifest.

Loading never unpickles anything and rebuilds the module from the stored tensor shapes, so models whose
channels were pruned (components) and widened ones (assemblies) load like any other.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from modellego.data.spec import InputSpec
from modellego.errors import ModellegoError

FORMAT_NAME = "modellego"
FORMAT_VERSION = 1
METADATA_KEY = "modellego"


@dataclass(frozen=True)
class ClassRef:
    """One output of a model: the class `name`, the `dataset` it comes from and its `index` there."""

    name: str
    dataset: str
    index: int


@dataclass
class Manifest:
    """Everything needed to rebuild, interpret and trace a model file besides its weights."""

    architecture: dict[str, Any]
    classes: list[ClassRef]
    input: InputSpec
    kind: str = "model"
    provenance: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    layers: dict[str, dict[str, Any]] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    @property
    def class_names(self) -> list[str]:
        return [ref.name for ref in self.classes]

    @property
    def datasets(self) -> list[str]:
        """The datasets this model's classes come from, in first-seen order."""
        return list(dict.fromkeys(ref.dataset for ref in self.classes))

    def to_json(self) -> str:
        data = asdict(self)
        data["input"] = self.input.to_dict()
        data["format"] = FORMAT_NAME
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, source: str = "file") -> "Manifest":
        try:
            data = json.loads(text)
            if data.get("format") != FORMAT_NAME:
                raise ValueError("wrong format tag")
            version = int(data["format_version"])
            if version > FORMAT_VERSION:
                raise ModellegoError(f"{source} was written by a newer modellego (format {version}); upgrade modellego")
            return cls(
                architecture=dict(data["architecture"]),
                classes=[ClassRef(str(c["name"]), str(c["dataset"]), int(c["index"])) for c in data["classes"]],
                input=InputSpec.from_dict(data["input"]),
                kind=str(data.get("kind", "model")),
                provenance=dict(data.get("provenance", {})),
                metrics=dict(data.get("metrics", {})),
                layers=dict(data.get("layers", {})),
                format_version=version,
            )
        except ModellegoError:
            raise
        except (ValueError, KeyError, TypeError, IndexError) as error:
            raise ModellegoError(f"{source} has a damaged modellego manifest ({error})") from None


def file_hash(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes, for provenance records."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_output_path(path: str | os.PathLike) -> Path:
    """Fail early (before any work) when `path` cannot be written: its folder must exist."""
    target = Path(path)
    if target.is_dir():
        raise ModellegoError(f"output path {target} is a folder; give a file name such as {target}/model.safetensors")
    if not target.parent.is_dir():
        raise ModellegoError(f"output folder {target.parent} does not exist; create it first (mkdir -p {target.parent})")
    if not os.access(target.parent, os.W_OK):
        raise ModellegoError(f"output folder {target.parent} is not writable")
    return target


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Run `write(temp_path)` then rename onto `path`, so a reader never sees a half-written file."""
    target = check_output_path(path)
    handle, temp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(handle)
    try:
        write(temp)
        os.replace(temp, target)
    finally:
        if os.path.exists(temp):
            os.unlink(temp)
    return target


def _layer_facts(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Structure that tensor shapes alone cannot tell: the groups of grouped convolutions."""
    return {name: {"groups": module.groups} for name, module in model.named_modules()
            if isinstance(module, nn.Conv2d) and module.groups != 1}


def save(model: nn.Module, path: str | os.PathLike, manifest: Manifest) -> Path:
    """Write `model` and `manifest` to one `.safetensors` file, atomically."""
    manifest.layers = _layer_facts(model)
    tensors = {key: value.detach().to("cpu").contiguous().clone() for key, value in model.state_dict().items()}
    expected = set(rebuild(manifest, {key: value.shape for key, value in tensors.items()}).state_dict())
    if expected != set(tensors):
        missing = sorted(expected - set(tensors))[:3]
        extra = sorted(set(tensors) - expected)[:3]
        raise ModellegoError(f"model does not match its manifest's architecture "
                             f"{manifest.architecture.get('builder')!r} (missing {missing}, unexpected {extra})")
    metadata = {METADATA_KEY: manifest.to_json()}
    return atomic_write(path, lambda temp: save_file(tensors, temp, metadata=metadata))


def read_manifest(path: str | os.PathLike) -> Manifest:
    """The manifest of a model file, without loading its weights."""
    return _open(path)[1]


def read_safetensors(path: str | os.PathLike, what: str, with_tensors: bool = True) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """The metadata and (optionally) tensors of a safetensors file; anything else is refused, never unpickled.
    `what` names the expected kind of file in the error message."""
    source = Path(path)
    if not source.is_file():
        raise ModellegoError(f"no such file: {source}")
    try:
        with safe_open(str(source), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()} if with_tensors else {}
    except Exception as error:  # safetensors raises several types for foreign or damaged bytes
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ModellegoError(f"{source} is not a readable {what} (not a valid safetensors file: {reason})") from None
    return metadata, tensors


def _open(path: str | os.PathLike, with_tensors: bool = False) -> tuple[dict[str, torch.Tensor], Manifest]:
    source = Path(path)
    metadata, tensors = read_safetensors(source, "modellego model file", with_tensors)
    if METADATA_KEY not in metadata:
        raise ModellegoError(f"{source} is a safetensors file but not a modellego model (it has no modellego manifest)")
    return tensors, Manifest.from_json(metadata[METADATA_KEY], str(source))


def rebuild(manifest: Manifest, shapes: dict[str, torch.Size]) -> nn.Module:
    """Build the manifest's architecture, then resize every layer to the stored tensor shapes."""
    model = _build(manifest.architecture, manifest.input)
    _conform(model, shapes, manifest.layers)
    return model


def _build(architecture: dict[str, Any], spec: InputSpec) -> nn.Module:
    from modellego.models.classifier import MergeOutputs, Parallel, classifier

    builder = architecture.get("builder")
    if not isinstance(builder, str):
        raise ModellegoError("the manifest names no architecture builder")
    if builder == "parallel":
        members = [_build(member, InputSpec.from_dict(member["input"])) for member in architecture["members"]]
        return Parallel(members, [0])
    model = classifier(builder, spec, int(architecture.get("num_classes", 1)), float(architecture.get("width", 1.0)))
    if architecture.get("merge_outputs"):
        model.add_module("merge", MergeOutputs([0]))
    return model


def _conform(model: nn.Module, shapes: dict[str, torch.Size], layers: dict[str, dict[str, Any]]) -> None:
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        for attribute, tensor in list(module.named_parameters(recurse=False)):
            shape = shapes.get(prefix + attribute)
            if shape is not None and tuple(shape) != tuple(tensor.shape):
                setattr(module, attribute, nn.Parameter(torch.empty(shape, dtype=tensor.dtype)))
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


def load(path: str | os.PathLike) -> tuple[nn.Module, Manifest]:
    """Read a model file written by `save`; returns the model (in eval mode) and its manifest."""
    tensors, manifest = _open(path, with_tensors=True)
    model = rebuild(manifest, {key: value.shape for key, value in tensors.items()})
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as error:
        raise ModellegoError(f"{path} is inconsistent: its tensors do not fit architecture "
                             f"{manifest.architecture.get('builder')!r} ({str(error).splitlines()[0]})") from None
    return model.eval(), manifest


def weights_hash(model: nn.Module) -> str:
    """SHA-256 over a model's tensors (names, shapes and bytes): ties profiles and components to their source."""
    digest = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        tensor = value.detach().to("cpu").contiguous()
        digest.update(f"{key}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()
