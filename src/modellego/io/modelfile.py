"""The model file: one `.safetensors` file holding the weights and, in its metadata, a JSON manifest.

Loading never unpickles anything and rebuilds the module from the stored tensor shapes, so models whose
channels were pruned (components) and widened ones (assemblies) load like any other.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from modellego.core.gates import Calibrated, Gate
from modellego.core.hashing import weights_hash
from modellego.core.joint import Joint, JointHead
from modellego.core.modules import MergeOutputs, Normalize
from modellego.core.shapes import conform, layer_facts
from modellego.errors import ModellegoError
from modellego.io.atomic import atomic_write
from modellego.io.fields import show
from modellego.io.manifest import METADATA_KEY, Brick, Manifest
from modellego.io.safetensors import RawFile, first_line, read_raw
from modellego.kinds import ModelKind, kind_of

__all__ = ["Brick", "Manifest", "load", "model_path", "parse_manifest", "read_manifest", "rebuild", "save",
           "weights_hash"]

# What `modellego export --format folder` writes: the model file under this name, beside config.json and README.md.
FOLDER_MODEL = "model.safetensors"


def model_path(path: str | os.PathLike) -> Path:
    """The model file `path` names: the file itself, or an exported folder's model.safetensors."""
    source = Path(path)
    if not source.is_dir():
        return source
    inside = source / FOLDER_MODEL
    if not inside.is_file():
        raise ModellegoError(f"{source} is a folder without {FOLDER_MODEL}; give a model file, or a folder that "
                             "`modellego export --format folder` wrote")
    return inside


def save(model: nn.Module, path: str | os.PathLike, manifest: Manifest) -> Path:
    """Write `model` and `manifest` to one `.safetensors` file, atomically."""
    manifest.layers = layer_facts(model)
    tensors = {key: value.detach().to("cpu").contiguous().clone() for key, value in model.state_dict().items()}
    expected = set(rebuild(manifest, {key: value.shape for key, value in tensors.items()}, device="meta").state_dict())
    if expected != set(tensors):
        missing = sorted(expected - set(tensors))[:3]
        extra = sorted(set(tensors) - expected)[:3]
        raise ModellegoError(f"model does not match its manifest's architecture "
                             f"{manifest.architecture.get('builder')!r} (missing {missing}, unexpected {extra})")
    metadata = {METADATA_KEY: manifest.to_json()}
    return atomic_write(path, lambda temp: save_file(tensors, temp, metadata=metadata))


def read_manifest(path: str | os.PathLike) -> Manifest:
    """The manifest of a model file (or an exported folder's), without loading its weights (only the header is
    read)."""
    return _manifest(read_raw(model_path(path), "modellego model file", with_data=False))


def parse_manifest(text: str, source: str = "file") -> Manifest:
    """A manifest's JSON, validated field by field (its input and architecture by the model kind it names)."""
    return Manifest.from_json(text, source, kind_of)


def _manifest(raw: RawFile) -> Manifest:
    if METADATA_KEY not in raw.metadata:
        raise ModellegoError(f"{raw.source} is a safetensors file but not a modellego model (it has no modellego manifest)")
    return parse_manifest(raw.metadata[METADATA_KEY], str(raw.source))


def rebuild(manifest: Manifest, shapes: dict[str, torch.Size], device: str | torch.device = "cpu") -> nn.Module:
    """Build the manifest's architecture, then resize every layer to the stored tensor shapes. On the `meta`
    device nothing is allocated: that is how files are checked before their tensors are trusted."""
    model = _build_on(manifest, device)
    with torch.device(device):
        conform(model, shapes, manifest.layers)
    return model


def _build_on(manifest: Manifest, device: str | torch.device) -> nn.Module:
    """The manifest's architecture on `device`, built by its model kind. A builder that computes its layout with
    tensors (torchvision's RegNet) cannot run on `meta`: it is built on the CPU, at the size its validated
    arguments allow, then moved."""
    kind = kind_of(manifest.architecture)
    try:
        with torch.device(device):
            return kind.build(manifest.architecture, manifest.input)
    except NotImplementedError:
        if torch.device(device).type != "meta":
            raise
        return kind.build(manifest.architecture, manifest.input).to("meta")


def _check_layout(model: nn.Module, raw: RawFile, manifest: Manifest) -> None:
    """Before resizing: the stored tensors are exactly the architecture's, each of the right rank, none empty."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(raw.entries))
    extra = sorted(set(raw.entries) - set(expected))
    if missing or extra:
        raise _inconsistent(raw, manifest, f"missing [{', '.join(show(k) for k in missing[:3])}], "
                                           f"unexpected [{', '.join(show(k) for k in extra[:3])}]")
    for key, (_, shape) in raw.entries.items():
        if len(shape) != expected[key].dim():
            raise _inconsistent(raw, manifest, f"{key} has {len(shape)} dimensions, expected {expected[key].dim()}")
        if 0 in shape:
            raise _inconsistent(raw, manifest, f"{key} is empty (shape {list(shape)})")


def _check_structure(model: nn.Module, manifest: Manifest, raw: RawFile, kind: ModelKind) -> None:
    """After resizing, still on the meta device: layers fit together and the model answers exactly the manifest's
    classes (the model kind checks, allocating nothing)."""
    problem = kind.structure_error(model, manifest)
    if problem:
        raise _inconsistent(raw, manifest, problem)


MIN_INPUT_STD = 1e-6  # an input normalisation's smallest deviation: images in [0, 1] stay below 1e6 once divided


def _check_values(model: nn.Module, manifest: Manifest, raw: RawFile) -> None:
    """Buffers that are data, checked against the model they belong to."""

    for name, module in model.named_modules():
        if isinstance(module, MergeOutputs):
            targets = module.targets
            if targets.dim() != 1 or targets.dtype != torch.int64 or int(targets.min()) < 0 \
                    or int(targets.max()) != len(manifest.classes) - 1:
                raise _inconsistent(raw, manifest, f"{name}.targets must map outputs to classes 0..{len(manifest.classes) - 1}")
        elif isinstance(module, Gate):
            for key, buffer in module.named_buffers():
                if buffer.dtype == torch.int64 and buffer.numel() and int(buffer.min()) < 0:
                    raise _inconsistent(raw, manifest, f"{name}.{key} holds negative positions")
                if buffer.is_floating_point() and not torch.isfinite(buffer).all():
                    raise _inconsistent(raw, manifest, f"{name}.{key} holds non-finite statistics")
            if not isinstance(model, Calibrated) or model.gate is not module:
                raise _inconsistent(raw, manifest, f"{name}: a gate sits only on the outermost assembly")
            problem = module.problem(model.assembly, (manifest.input.channels, *manifest.input.size))
            if problem:
                raise _inconsistent(raw, manifest, problem)
        elif isinstance(module, JointHead):
            if not isinstance(model, Joint) or model.head is not module:
                raise _inconsistent(raw, manifest, f"{name}: a joint head sits only on the outermost assembly")
            problem = module.problem(model.assembly)
            if problem:
                raise _inconsistent(raw, manifest, f"{name} {problem}")
        elif isinstance(module, Normalize):
            if not (torch.isfinite(module.mean).all() and module.mean.abs().max() <= 1e6 and
                    torch.isfinite(module.std).all() and (module.std >= MIN_INPUT_STD).all()):
                raise _inconsistent(raw, manifest, f"{name} has means beyond 1e6 or deviations below "
                                                   f"{MIN_INPUT_STD:g} (they would divide the input into infinities)")


def _inconsistent(raw: RawFile, manifest: Manifest, reason: str) -> ModellegoError:
    return ModellegoError(f"{raw.source} is inconsistent: its tensors do not fit architecture "
                          f"{show(manifest.architecture.get('builder'))} ({reason})")


def _materialise(model: nn.Module, tensors: dict[str, torch.Tensor], raw: RawFile, manifest: Manifest) -> nn.Module:
    expected = model.state_dict()
    for key, value in tensors.items():
        want = expected[key].dtype
        if value.dtype != want:
            if value.dtype.is_floating_point != want.is_floating_point or value.dtype == torch.bool:
                raise _inconsistent(raw, manifest, f"{key} is stored as {value.dtype}, expected {want}")
            tensors[key] = value.to(want)
    state = OrderedDict(tensors)
    # The modules' state-dict versions of this modellego's builders (torchvision's MNASNet refuses a state
    # without one): files hold tensors only, written by the same builders.
    state._metadata = getattr(expected, "_metadata", None)
    model.load_state_dict(state, strict=True, assign=True)
    if any(t.is_meta for t in [*model.parameters(), *model.buffers()]):
        # non-persistent buffers are not in the file: build for real, now that every shape is known to fit
        real = rebuild(manifest, raw.shapes())
        real.load_state_dict(state, strict=True)
        return real
    return model


def load(path: str | os.PathLike) -> Brick:
    """Read a model file written by `save` (or the folder `export --format folder` wrote); returns the model (in
    eval mode) and its manifest.

    The file is read once; the manifest is validated, the architecture built on the meta device and checked
    against the stored shapes before any tensor is created, so a hostile file costs no more memory than its size."""
    raw = read_raw(model_path(path), "modellego model file")
    manifest = _manifest(raw)
    kind = kind_of(manifest.architecture)
    try:
        model = _build_on(manifest, "meta")
        _check_layout(model, raw, manifest)
        with torch.device("meta"):
            conform(model, raw.shapes(), manifest.layers)
    except (ValueError, TypeError, RuntimeError, IndexError) as error:
        raise _inconsistent(raw, manifest, first_line(error)) from None
    _check_structure(model, manifest, raw, kind)
    model = _materialise(model, raw.tensors("modellego model file"), raw, manifest)
    _check_values(model, manifest, raw)
    return Brick(model.eval(), manifest)
