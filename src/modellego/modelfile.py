"""The model file: one `.safetensors` file holding the weights and, in its metadata, a JSON manifest.

Loading never unpickles anything and rebuilds the module from the stored tensor shapes, so models whose
channels were pruned (components) and widened ones (assemblies) load like any other.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import tempfile
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, NamedTuple

import torch
from safetensors.torch import load as load_tensors_from_bytes
from safetensors.torch import save_file
from torch import nn

from modellego.checks import Invalid, integer, mapping, number, parse_json, probe_folder, sequence, show, string
from modellego.data.spec import InputSpec
from modellego.errors import ModellegoError
from modellego.graphs.spec import graph_architecture, graph_input_spec, is_graph_architecture
from modellego.models.classifier import MergeOutputs, Normalize, Parallel, classifier

FORMAT_NAME = "modellego"
FORMAT_VERSION = 1
METADATA_KEY = "modellego"

# Bounds on what a file may ask for. They sit far above anything modellego writes and far below what would
# exhaust memory or time; a file beyond them is refused before anything is built from it.
MAX_HEADER_BYTES = 16 << 20      # the safetensors JSON header (tensor index + metadata)
MAX_MANIFEST_CHARS = 4 << 20     # the manifest inside it
MAX_JSON_DEPTH = 32
MAX_TENSORS = 100_000
MAX_CLASSES = 100_000
MAX_CLASS_INDEX = 10**6
MAX_NAME = 1_000
MAX_CHANNELS = 1_024
MAX_SIDE = 4_096
MAX_WIDTH = 16.0
MAX_MEMBERS = 256
MAX_PARALLEL_NESTING = 4
MAX_GROUPS = 100_000

_PROCESS_STARTED = time.time()


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
        """Parse and validate a manifest (types, ranges, sizes, nesting) before anything is built from it."""
        try:
            data = mapping(parse_json(text, "the manifest", MAX_MANIFEST_CHARS, MAX_JSON_DEPTH), "the manifest")
            if data.get("format") != FORMAT_NAME:
                raise Invalid("wrong format tag")
            version = integer(data.get("format_version"), "format_version", 1, 10**9)
            if version > FORMAT_VERSION:
                raise ModellegoError(f"{source} was written by a newer modellego (format {version}); upgrade modellego")
            classes = [_class_ref(ref, f"classes[{k}]")
                       for k, ref in enumerate(sequence(data.get("classes"), "classes", 1, MAX_CLASSES))]
            if is_graph_architecture(data.get("architecture")):  # a GCN (modellego.graphs): nodes, not images
                spec = graph_input_spec(data.get("input"), "input")
                architecture = graph_architecture(data.get("architecture"), "architecture", spec)
            else:
                spec = _input_spec(data.get("input"), "input")
                architecture = _architecture(data.get("architecture"), "architecture", spec, [0])
            return cls(architecture=architecture, classes=classes, input=spec,
                       kind=string(data.get("kind", "model"), "kind", 100),
                       provenance=mapping(data.get("provenance", {}), "provenance"),
                       metrics=mapping(data.get("metrics", {}), "metrics"),
                       layers=_layers(data.get("layers", {})),
                       format_version=version)
        except Invalid as error:
            raise ModellegoError(f"{source} has a damaged modellego manifest ({error})") from None


def _input_spec(value: Any, field: str) -> InputSpec:
    data = mapping(value, field)
    channels = integer(data.get("channels"), f"{field}.channels", 1, MAX_CHANNELS)
    size = sequence(data.get("size"), f"{field}.size", 2, 2)
    side = [integer(v, f"{field}.size[{i}]", 1, MAX_SIDE) for i, v in enumerate(size)]
    stats = {}
    for name, low in (("mean", -1e6), ("std", 0.0)):
        values = sequence(data.get(name), f"{field}.{name}", 1, channels * MAX_MEMBERS)
        if len(values) % channels:
            raise Invalid(f"{field}.{name} has {len(values)} values; it needs one per input channel "
                          f"({channels}), or a multiple for stacked normalisations")
        stats[name] = tuple(number(v, f"{field}.{name}[{i}]", low, 1e6, low_open=name == "std")
                            for i, v in enumerate(values))
    if len(stats["mean"]) != len(stats["std"]):
        raise Invalid(f"{field}.mean and {field}.std have different lengths")
    return InputSpec(channels, (side[0], side[1]), stats["mean"], stats["std"])


def _class_ref(value: Any, field: str) -> ClassRef:
    data = mapping(value, field)
    return ClassRef(string(data.get("name"), f"{field}.name", MAX_NAME, empty=True),
                    string(data.get("dataset"), f"{field}.dataset", MAX_NAME),
                    integer(data.get("index"), f"{field}.index", 0, MAX_CLASS_INDEX))


def _architecture(value: Any, field: str, spec: InputSpec, members_seen: list[int], level: int = 0) -> dict[str, Any]:
    """Check an architecture record; `members_seen` counts parallel members over the whole tree."""
    data = mapping(value, field)
    builder = string(data.get("builder"), f"{field}.builder", MAX_NAME)
    if builder == "parallel":
        if level >= MAX_PARALLEL_NESTING:
            raise Invalid(f"{field} nests parallel assemblies more than {MAX_PARALLEL_NESTING} deep")
        members = sequence(data.get("members"), f"{field}.members", 1, MAX_MEMBERS)
        members_seen[0] += len(members)
        if members_seen[0] > MAX_MEMBERS:
            raise Invalid(f"{field} has more than {MAX_MEMBERS} parallel members in all")
        for i, member in enumerate(members):
            member_spec = _input_spec(mapping(member, f"{field}.members[{i}]").get("input"), f"{field}.members[{i}].input")
            _architecture(member, f"{field}.members[{i}]", member_spec, members_seen, level + 1)
    else:
        integer(data.get("num_classes", 1), f"{field}.num_classes", 1, MAX_CLASSES)
        number(data.get("width", 1.0), f"{field}.width", 0.0, MAX_WIDTH, low_open=True)
        if "in_channels" in data:
            integer(data["in_channels"], f"{field}.in_channels", 1, MAX_CHANNELS)
        if not isinstance(data.get("merge_outputs", False), bool):
            raise Invalid(f"{field}.merge_outputs must be true or false, got {show(data['merge_outputs'])}")
    if "gate" in data:
        if level > 0:
            raise Invalid(f"{field}.gate: only the outermost assembly may carry a gate")
        _gate(data["gate"], f"{field}.gate", data)
    return data


def _gate(value: Any, field: str, architecture: dict[str, Any]) -> None:
    """Check a calibrated assembly's gate record: a known method, a positive temperature, and per component an
    output range and the layers it reads (names only; that they exist is checked by the meta forward pass)."""
    from modellego.gates import GATES

    data = mapping(value, field)
    if data.get("method") not in GATES:
        raise Invalid(f"{field}.method must be one of {', '.join(GATES)}, got {show(data.get('method'))}")
    number(data.get("temperature", 1.0), f"{field}.temperature", 0.0, 1e6, low_open=True)
    integer(data.get("neighbours", 1), f"{field}.neighbours", 1, MAX_TENSORS)
    components = sequence(data.get("components"), f"{field}.components", 2, MAX_MEMBERS)
    if not architecture.get("merge_outputs") and architecture.get("builder") != "parallel":
        raise Invalid(f"{field}: a gate needs an assembly (merged outputs) to sit in")
    for c, component in enumerate(components):
        where = f"{field}.components[{c}]"
        record = mapping(component, where)
        start = integer(record.get("start"), f"{where}.start", 0, MAX_CLASSES)
        integer(record.get("stop"), f"{where}.stop", start + 1, MAX_CLASSES)
        for t, tap in enumerate([record.get("features"), *sequence(record.get("pattern", []), f"{where}.pattern", 0, 64)]):
            tap = mapping(tap, f"{where}.taps[{t}]")
            string(tap.get("layer"), f"{where}.taps[{t}].layer", MAX_NAME)
            for part in ("rows", "columns"):
                if not isinstance(tap.get(part, False), bool):
                    raise Invalid(f"{where}.taps[{t}].{part} must be true or false")


def _layers(value: Any) -> dict[str, dict[str, Any]]:
    data = mapping(value, "layers")
    if len(data) > MAX_TENSORS:
        raise Invalid(f"layers has {len(data):,} entries; at most {MAX_TENSORS:,} are accepted")
    for name, facts in data.items():
        string(name, "a layers key", MAX_NAME)
        integer(mapping(facts, f"layers[{name!r}]").get("groups", 1), f"layers[{name!r}].groups", 1, MAX_GROUPS)
    return data


class Brick(NamedTuple):
    """A model and its manifest: what load, train, disassemble, assemble and finetune return (unpacks as a pair)."""

    model: nn.Module
    manifest: Manifest


def file_hash(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes, for provenance records."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_folder(target: Path) -> None:
    if target.is_dir():
        raise ModellegoError(f"output path {target} is a folder; give a file name such as {target}/model.safetensors")
    if not target.parent.is_dir():
        raise ModellegoError(f"output folder {target.parent} does not exist; create it first (mkdir -p {target.parent})")
    if not os.access(target.parent, os.W_OK):
        raise ModellegoError(f"output folder {target.parent} is not writable")


def check_output_path(path: str | os.PathLike, inputs: Iterable[str | os.PathLike | None] = ()) -> Path:
    """Fail early (before any work) when `path` cannot be written: its folder must exist and take a new file,
    and it must not be one of the command's `inputs` (same file, also through links), which it would destroy."""
    target = Path(path)
    _check_folder(target)
    probe_folder(target.parent)
    for source in inputs:
        if source is not None and _same_file(target, Path(source)):
            raise ModellegoError(f"--out {target} is the input file {source}; writing it would destroy the input. "
                                 "Give another output name")
    return target


def _same_file(first: Path, second: Path) -> bool:
    try:
        return os.path.samefile(first, second)
    except OSError:  # one of them does not exist (yet)
        return False


def _temp_pattern(target: Path) -> re.Pattern:
    return re.compile(rf"^\.{re.escape(target.name)}\.(?:(\d+)-)?[^.]+\.tmp$")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def remove_stale_temps(target: Path) -> list[Path]:
    """Delete temp files a killed write to `target` left behind: ours carry the writer's pid (removed once that
    process is gone); older unnamed ones are removed when they predate this process."""
    removed = []
    pattern = _temp_pattern(target)
    try:
        candidates = list(target.parent.iterdir())
    except OSError:
        return removed
    for candidate in candidates:
        match = pattern.match(candidate.name)
        if not match:
            continue
        try:
            if match.group(1) is not None:
                pid = int(match.group(1))
                if pid == os.getpid() or _alive(pid):
                    continue
            elif candidate.stat().st_mtime >= _PROCESS_STARTED:
                continue
            candidate.unlink()
            removed.append(candidate)
        except OSError:
            continue
    return removed


def _fsync_path(path: str | os.PathLike, directory: bool = False) -> None:
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    try:
        handle = os.open(path, flags)
    except OSError:
        if directory:
            return  # some filesystems cannot open folders; the rename is still atomic
        raise
    try:
        os.fsync(handle)
    except OSError:
        if not directory:
            raise
    finally:
        os.close(handle)


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Run `write(temp_path)`, fsync it, rename it onto `path` and fsync the folder, so a reader never sees a
    half-written file and a crash leaves the old file or the new one. A full disk is one clear error."""
    target = Path(path)
    _check_folder(target)
    remove_stale_temps(target)
    try:
        handle, temp = tempfile.mkstemp(prefix=f".{target.name}.{os.getpid()}-", suffix=".tmp", dir=target.parent)
    except OSError as error:
        raise _write_error(target, error) from None
    os.close(handle)
    try:
        write(temp)
        os.chmod(temp, 0o666 & ~_umask())  # mkstemp makes owner-only files; a model file is as readable as any
        _fsync_path(temp)
        os.replace(temp, target)
        _fsync_path(target.parent, directory=True)
    except OSError as error:
        if error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES):
            raise _write_error(target, error) from None
        raise
    finally:
        if os.path.exists(temp):
            os.unlink(temp)
    return target


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _write_error(target: Path, error: OSError) -> ModellegoError:
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return ModellegoError(f"no space left on the device to write {target}; free some space and run again "
                              "(nothing was written)")
    return ModellegoError(f"cannot write {target} ({error.strerror or error})")


def _layer_facts(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Structure that tensor shapes alone cannot tell: the groups of grouped convolutions."""
    return {name: {"groups": module.groups} for name, module in model.named_modules()
            if isinstance(module, nn.Conv2d) and module.groups != 1}


def save(model: nn.Module, path: str | os.PathLike, manifest: Manifest) -> Path:
    """Write `model` and `manifest` to one `.safetensors` file, atomically."""
    manifest.layers = _layer_facts(model)
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
    """The manifest of a model file, without loading its weights (only the header is read)."""
    return _manifest(read_raw(path, "modellego model file", with_data=False))


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


@dataclass
class RawFile:
    """A safetensors file read through one open handle: its metadata, the index of its tensors (dtype name and
    shape, from the header) and, when asked for, all its bytes, so that header and tensors come from the same
    version of the file even while another process replaces it."""

    source: Path
    metadata: dict[str, str]
    entries: dict[str, tuple[str, tuple[int, ...]]]
    data: bytes | None = None

    def shapes(self) -> dict[str, torch.Size]:
        return {key: torch.Size(shape) for key, (_, shape) in self.entries.items()}

    def tensors(self, what: str) -> dict[str, torch.Tensor]:
        """Materialise the tensors from the bytes read with the header."""
        if self.data is None:
            raise ValueError("the file was read without its data")
        try:
            return load_tensors_from_bytes(self.data)
        except Exception as error:  # safetensors raises several types for damaged bytes
            raise ModellegoError(f"{self.source} is not a readable {what} (not a valid safetensors file: "
                                 f"{_first_line(error)})") from None


def _first_line(error: BaseException) -> str:
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    return text[:200]


def read_raw(path: str | os.PathLike, what: str, with_data: bool = True) -> RawFile:
    """Read a safetensors file's header (bounded in size) and, with `with_data`, the rest of its bytes, all
    through one open handle. Nothing is unpickled and no tensor is created. `what` names the expected kind of
    file in error messages."""
    source = Path(path)
    if not source.is_file():
        raise ModellegoError(f"no such file: {source}")

    def refuse(reason: str) -> ModellegoError:
        return ModellegoError(f"{source} is not a readable {what} (not a valid safetensors file: {reason})")

    with open(source, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise refuse("shorter than a header")
        size = int.from_bytes(prefix, "little")
        if size > MAX_HEADER_BYTES:
            raise refuse(f"its header claims {size:,} bytes; modellego reads headers of at most {MAX_HEADER_BYTES:,}")
        header_bytes = handle.read(size)
        if len(header_bytes) < size:
            raise refuse("truncated header")
        data_size = os.fstat(handle.fileno()).st_size - 8 - size
        rest = handle.read() if with_data else None
    try:
        header = mapping(parse_json(header_bytes.decode("utf-8"), "the header", MAX_HEADER_BYTES, 3), "the header")
    except (Invalid, UnicodeDecodeError) as error:
        raise refuse(_first_line(error)) from None
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise refuse("its metadata is not a map of strings")
    if len(header) > MAX_TENSORS:
        raise refuse(f"it indexes {len(header):,} tensors")
    entries: dict[str, tuple[str, tuple[int, ...]]] = {}
    end = 0
    for key, entry in header.items():
        if not isinstance(entry, dict) or entry.get("dtype") not in _DTYPES or not isinstance(entry.get("shape"), list) \
                or len(entry["shape"]) > 8 or not all(isinstance(n, int) and not isinstance(n, bool) and 0 <= n < 2**40
                                                      for n in entry["shape"]):
            raise refuse(f"tensor {show(key)} has a damaged index entry")
        entries[key] = (entry["dtype"], tuple(entry["shape"]))
        offsets = entry.get("data_offsets")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(n, int) for n in offsets)):
            raise refuse(f"tensor {show(key)} has a damaged index entry")
        end = max(end, offsets[1])
    if end != data_size:
        raise refuse(f"the header indexes {end:,} bytes of tensors but the file holds {data_size:,} (truncated or damaged)")
    return RawFile(source, metadata, entries, prefix + header_bytes + rest if rest is not None else None)


def read_safetensors(path: str | os.PathLike, what: str, with_tensors: bool = True) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """The metadata and (optionally) tensors of a safetensors file, read through one open handle; anything
    else is refused, never unpickled. `what` names the expected kind of file in the error message."""
    raw = read_raw(path, what, with_data=with_tensors)
    return raw.metadata, raw.tensors(what) if with_tensors else {}


def _manifest(raw: RawFile) -> Manifest:
    if METADATA_KEY not in raw.metadata:
        raise ModellegoError(f"{raw.source} is a safetensors file but not a modellego model (it has no modellego manifest)")
    return Manifest.from_json(raw.metadata[METADATA_KEY], str(raw.source))


def rebuild(manifest: Manifest, shapes: dict[str, torch.Size], device: str | torch.device = "cpu") -> nn.Module:
    """Build the manifest's architecture, then resize every layer to the stored tensor shapes. On the `meta`
    device nothing is allocated: that is how files are checked before their tensors are trusted."""
    model = _build_on(manifest, device)
    with torch.device(device):
        _conform(model, shapes, manifest.layers)
    return model


def _build_on(manifest: Manifest, device: str | torch.device) -> nn.Module:
    """The manifest's architecture on `device`. A builder that computes its layout with tensors (torchvision's
    RegNet) cannot run on `meta`: it is built on the CPU, at the size its validated arguments allow, then moved."""
    try:
        with torch.device(device):
            return _build(manifest.architecture, manifest.input)
    except NotImplementedError:
        if torch.device(device).type != "meta":
            raise
        return _build(manifest.architecture, manifest.input).to("meta")


def _build(architecture: dict[str, Any], spec: InputSpec) -> nn.Module:
    if "gate" in architecture:  # a calibrated assembly: the assembly itself, and the gate between logits and merge
        from modellego.gates import Calibrated, Gate

        inner = _build({key: value for key, value in architecture.items() if key != "gate"}, spec)
        return Calibrated(inner, Gate(architecture["gate"]))
    builder = architecture.get("builder")
    if not isinstance(builder, str):
        raise ModellegoError("the manifest names no architecture builder")
    if is_graph_architecture(architecture):
        from modellego.graphs.model import build as build_graph_model  # needs the optional torch_geometric
        return build_graph_model(architecture)
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


def _check_structure(model: nn.Module, manifest: Manifest, raw: RawFile) -> None:
    """After resizing, still on the meta device: layers fit together (one forward pass that allocates nothing)
    and the model answers exactly the manifest's classes."""

    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d) and module.out_channels % module.groups:
            raise _inconsistent(raw, manifest, f"{name} has {module.out_channels} output channels, not a multiple "
                                               f"of its {module.groups} groups")
    own_check = getattr(model, "structure_error", None)  # models that do not take images (GCNs) check themselves
    if callable(own_check):
        problem = own_check(len(manifest.classes))
        if problem:
            raise _inconsistent(raw, manifest, problem)
        return
    merges = [module for module in model.modules() if isinstance(module, MergeOutputs)]

    def merged(module: MergeOutputs, logits: torch.Tensor) -> torch.Tensor:
        if logits.dim() != 2 or logits.shape[1] != module.targets.shape[0]:
            raise ValueError(f"merge.targets has {module.targets.shape[0]} entries for {list(logits.shape)} logits")
        return logits.new_empty(logits.shape[0], len(manifest.classes))

    for module in merges:  # the class count is data (targets' values), unknown on meta: checked after loading
        module.forward = lambda logits, module=module: merged(module, logits)
    spec = manifest.input
    try:
        output = model.eval()(torch.empty(1, spec.channels, *spec.size, device="meta"))
    except NotImplementedError:
        return  # an operation without a meta kernel: the shapes were checked one by one already
    except Exception as error:  # shape mismatches surface as RuntimeError/ValueError/IndexError from torch
        raise _inconsistent(raw, manifest, _first_line(error)) from None
    finally:
        for module in merges:
            del module.forward
    if not isinstance(output, torch.Tensor) or tuple(output.shape) != (1, len(manifest.classes)):
        shape = list(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
        raise _inconsistent(raw, manifest, f"it outputs {shape} for one image but the manifest lists "
                                           f"{len(manifest.classes)} classes")


def _check_values(model: nn.Module, manifest: Manifest, raw: RawFile) -> None:
    """Buffers that are data, checked against the model they belong to."""

    for name, module in model.named_modules():
        if isinstance(module, MergeOutputs):
            targets = module.targets
            if targets.dim() != 1 or targets.dtype != torch.int64 or int(targets.min()) < 0 \
                    or int(targets.max()) != len(manifest.classes) - 1:
                raise _inconsistent(raw, manifest, f"{name}.targets must map outputs to classes 0..{len(manifest.classes) - 1}")
        elif type(module).__name__ == "Gate":
            for key, buffer in module.named_buffers():
                if buffer.dtype == torch.int64 and buffer.numel() and int(buffer.min()) < 0:
                    raise _inconsistent(raw, manifest, f"{name}.{key} holds negative positions")
                if buffer.is_floating_point() and not torch.isfinite(buffer).all():
                    raise _inconsistent(raw, manifest, f"{name}.{key} holds non-finite statistics")
        elif isinstance(module, Normalize):
            if not (torch.isfinite(module.mean).all() and torch.isfinite(module.std).all() and (module.std > 0).all()):
                raise _inconsistent(raw, manifest, f"{name} has non-finite means or non-positive deviations")


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
    """Read a model file written by `save`; returns the model (in eval mode) and its manifest.

    The file is read once; the manifest is validated, the architecture built on the meta device and checked
    against the stored shapes before any tensor is created, so a hostile file costs no more memory than its size."""
    raw = read_raw(path, "modellego model file")
    manifest = _manifest(raw)
    try:
        model = _build_on(manifest, "meta")
        _check_layout(model, raw, manifest)
        with torch.device("meta"):
            _conform(model, raw.shapes(), manifest.layers)
    except (ValueError, TypeError, RuntimeError, IndexError) as error:
        raise _inconsistent(raw, manifest, _first_line(error)) from None
    _check_structure(model, manifest, raw)
    model = _materialise(model, raw.tensors("modellego model file"), raw, manifest)
    _check_values(model, manifest, raw)
    return Brick(model.eval(), manifest)


def weights_hash(model: nn.Module) -> str:
    """SHA-256 over a model's tensors (names, shapes and bytes): ties profiles and components to their source."""
    digest = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        tensor = value.detach().to("cpu").contiguous()
        digest.update(f"{key}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()
