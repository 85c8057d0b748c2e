"""Profile files: one safetensors file holding one record per class — the class's sums of every layer (one flat
float32 or float16 tensor `A/<output>`) and its samples (`samples/<output>`) — and a JSON header naming the layers,
their sizes and the classes held, each with its record's SHA-256. A class's record is read alone (never the whole
file), checked against its digest; records are written one class at a time as profiling computes them, so a
profile of any number of classes needs the memory of one; classes are added to a file with `append`.

Files of format 1 (before per-class records: one K×O×I float32 tensor per layer) keep loading, whole. Nothing is
ever unpickled; every field and every tensor's dtype, shape and place are checked before use."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from modellego import distributed
from modellego.core.profile import ClassRecord, Profile, ProfilePlan, as_records, profile_digest, record_digest
from modellego.errors import ModellegoError
from modellego.io.atomic import atomic_write
from modellego.io.fields import Invalid, integer, mapping, parse_json, sequence, show, string
from modellego.io.safetensors import OpenFile

PROFILE_FORMAT = "modellego-profile"
PROFILE_KEY = "modellego-profile"
PROFILE_VERSION = 2
DTYPES = {"float32": ("F32", torch.float32), "float16": ("F16", torch.float16)}
MAX_CLASSES = 100_000
MAX_PROFILE_HEADER = 4 << 20
LAYER_KINDS = ("conv", "linear")
MAX_LAYERS = 10_000


def _validate_header(text: str) -> dict:
    """Types and ranges of a profile's JSON header."""
    meta = mapping(parse_json(text, "the header", MAX_PROFILE_HEADER, 8), "the header")
    if meta.get("format") != PROFILE_FORMAT:
        raise Invalid("unknown format")
    if integer(meta.get("format_version"), "format_version", 1, 10**9) > PROFILE_VERSION:
        raise Invalid("written by a newer modellego; upgrade modellego")
    return _validate_common(meta)


def _validate_common(meta: dict) -> dict:
    """The fields both formats have."""
    layers = [string(name, f"layers[{i}]", 1_000)
              for i, name in enumerate(sequence(meta.get("layers"), "layers", 1, MAX_LAYERS))]
    if len(set(layers)) != len(layers):
        raise Invalid("layers lists a layer twice")
    classes = [string(name, f"classes[{i}]", 1_000, empty=True)
               for i, name in enumerate(sequence(meta.get("classes"), "classes", 1, 100_000))]
    model_hash = string(meta.get("model_hash"), "model_hash", 64)
    shape = [integer(side, f"input_shape[{i}]", 1, 4_096)
             for i, side in enumerate(sequence(meta.get("input_shape"), "input_shape", 1, 3))]
    if len(shape) == 3 and shape[0] > 1_024:
        raise Invalid(f"input_shape[0] (channels) must be at most 1,024, got {shape[0]:,}")
    notes = [string(note, f"notes[{i}]", 10_000, empty=True)
             for i, note in enumerate(sequence(meta.get("notes", []), "notes", 0, 100_000))]
    kinds = mapping(meta.get("layer_kinds", {}), "layer_kinds")
    if kinds and set(kinds) != set(layers):
        raise Invalid("layer_kinds does not name the same layers as layers")
    if any(kind not in LAYER_KINDS for kind in kinds.values()):
        raise Invalid(f"layer_kinds must map each layer to one of {', '.join(LAYER_KINDS)}")
    return {"layers": layers, "classes": classes, "model_hash": model_hash, "input_shape": shape, "notes": notes,
            "layer_kinds": dict(kinds),
            "dataset": string(meta.get("dataset", ""), "dataset", 1_000, empty=True),
            "samples_per_class": integer(meta.get("samples_per_class"), "samples_per_class", 1, 10**7),
            "world_size": integer(meta.get("world_size", 1), "world_size", 1, 10**6)}


def _validate_index(meta: dict, entries: dict[str, tuple[str, tuple[int, ...]]]) -> None:
    """Dtypes and shapes of the stored tensors, from the file's index, before any tensor is created."""
    k = len(meta["classes"])
    expected = {f"A/{name}" for name in meta["layers"]} | {"counts", "samples", "sample_labels"}
    if set(entries) != expected:
        odd = sorted((set(entries) ^ expected))[:3]
        raise Invalid(f"its tensors do not match its layers ({', '.join(show(name) for name in odd)})")
    for name in meta["layers"]:
        dtype, shape = entries[f"A/{name}"]
        if dtype != "F32":
            raise Invalid(f"sums of layer {name} are stored as {dtype}; profiles hold float32 sums")
        if len(shape) != 3 or shape[0] != k or 0 in shape:
            raise Invalid(f"sums of layer {name} have shape {list(shape)}; expected classes×outputs×inputs with "
                          f"{k} classes")
    for key in ("counts", "samples", "sample_labels"):
        if entries[key][0] != "I64" or len(entries[key][1]) != 1:
            raise Invalid(f"{key} must be a 1-d int64 tensor, got {entries[key][0]} {list(entries[key][1])}")
    if entries["counts"][1][0] != k or entries["samples"][1] != entries["sample_labels"][1]:
        raise Invalid("counts, samples and sample_labels do not agree with the classes")


def _validate_values(meta: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Sums are sums of positive parts: finite, never negative, not all zero. Labels and counts agree."""
    for name in meta["layers"]:
        _check_sums(tensors[f"A/{name}"], f"sums of layer {name}")
    counts, labels = tensors["counts"], tensors["sample_labels"]
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= len(meta["classes"])):
        raise Invalid("sample_labels name classes the profile does not have")
    if (counts < 0).any() or int(counts.sum()) != len(labels) or (tensors["samples"] < 0).any():
        raise Invalid("counts do not add up to the samples")




def _validate_v2(meta: dict) -> dict:
    """Format 2's fields: the layers' sizes, the dtype, the model's outputs and the classes held (each with its
    count and its record's digest)."""
    common = {key: value for key, value in meta.items() if key != "classes"}
    checked = _validate_common({**common, "classes": ["-"]})
    sizes = sequence(meta.get("layer_sizes"), "layer_sizes", len(checked["layers"]), len(checked["layers"]))
    checked["sizes"] = [tuple(integer(n, f"layer_sizes[{i}]", 1, 1 << 24)
                              for n in sequence(size, f"layer_sizes[{i}]", 2, 2)) for i, size in enumerate(sizes)]
    dtype = string(meta.get("dtype"), "dtype", 10)
    if dtype not in DTYPES:
        raise Invalid(f"dtype must be one of {', '.join(DTYPES)}, got {show(dtype)}")
    checked["dtype"] = dtype
    checked["num_outputs"] = integer(meta.get("num_outputs"), "num_outputs", 1, MAX_CLASSES)
    if checked["sizes"][-1][0] != checked["num_outputs"]:
        raise Invalid("the classifier's outputs in layer_sizes differ from num_outputs")
    records = []
    for i, record in enumerate(sequence(meta.get("classes"), "classes", 1, MAX_CLASSES)):
        record = mapping(record, f"classes[{i}]")
        digest = string(record.get("sha256"), f"classes[{i}].sha256", 64)
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise Invalid(f"classes[{i}].sha256 is not a SHA-256 digest")
        records.append((integer(record.get("position"), f"classes[{i}].position", 0, checked["num_outputs"] - 1),
                        string(record.get("name"), f"classes[{i}].name", 1_000, empty=True),
                        integer(record.get("count"), f"classes[{i}].count", 1, 10**7), digest))
    if len({position for position, *_ in records}) != len(records):
        raise Invalid("classes lists a class twice")
    checked["records"] = records
    return checked


@dataclass
class ProfileHeader:
    """What a profile file says before any record is read: the layers (execution order), their kinds and sizes
    (outputs, inputs), the model it profiles, its data and settings, the dtype, and the classes held — per class
    its model output, name, number of samples and record digest, in the file's order."""

    layers: list[str]
    kinds: dict[str, str]
    sizes: list[tuple[int, int]]
    model_hash: str
    input_shape: tuple[int, ...]
    dataset: str
    samples_per_class: int
    notes: list[str]
    world_size: int
    num_outputs: int
    dtype: str
    records: list[tuple[int, str, int, str]]

    @property
    def pairs(self) -> int:
        return sum(outputs * inputs for outputs, inputs in self.sizes)

    @property
    def positions(self) -> list[int]:
        return [position for position, *_ in self.records]

    def digest(self) -> str:
        """The profile's digest (`profile_digest`): that of the same profile held in memory, for float32 sums."""
        return profile_digest(self.model_hash, self.layers, self.sizes, self.dtype, self.records)

    def record_bytes(self, count: int) -> int:
        """Bytes of one class's record (its sums and `count` sample positions)."""
        return self.pairs * DTYPES[self.dtype][1].itemsize + 8 * count

    def meta(self) -> dict:
        return {"format": PROFILE_FORMAT, "format_version": PROFILE_VERSION, "layers": self.layers,
                "layer_kinds": self.kinds, "layer_sizes": [list(size) for size in self.sizes],
                "model_hash": self.model_hash, "dataset": self.dataset, "input_shape": list(self.input_shape),
                "samples_per_class": self.samples_per_class, "notes": self.notes, "world_size": self.world_size,
                "num_outputs": self.num_outputs, "dtype": self.dtype,
                "classes": [{"position": position, "name": name, "count": count, "sha256": sha}
                            for position, name, count, sha in self.records]}


def header_of(plan: ProfilePlan, dtype: str = "float32") -> ProfileHeader:
    """The header a profile of `plan` will have (digests still to be filled in as records are written)."""
    if dtype not in DTYPES:
        raise ModellegoError(f"unknown profile dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    selection = plan.selection
    counts = torch.bincount(selection.labels, minlength=len(selection.wanted)).tolist()
    return ProfileHeader(list(plan.layers), dict(plan.kinds), [plan.sizes[name] for name in plan.layers],
                         plan.model_hash, tuple(plan.input_shape), plan.dataset, plan.samples_per_class,
                         list(selection.notes), distributed.world_size(), plan.num_outputs, dtype,
                         [(position, name, count, "0" * 64)
                          for position, name, count in zip(selection.wanted, selection.classes, counts)])


def _entries(header: ProfileHeader) -> list[tuple[str, str, list[int], int]]:
    """The tensors of a format-2 file in order: (name, dtype, shape, bytes)."""
    code, torch_dtype = DTYPES[header.dtype]
    entries = []
    for position, _, count, _ in header.records:
        entries.append((f"A/{position}", code, [header.pairs], header.pairs * torch_dtype.itemsize))
        entries.append((f"samples/{position}", "I64", [count], 8 * count))
    return entries


def _header_bytes(header: ProfileHeader) -> bytes:
    """The safetensors header (8-byte length, JSON padded with spaces to a multiple of 8)."""
    index: dict = {"__metadata__": {PROFILE_KEY: json.dumps(header.meta())}}
    offset = 0
    for name, code, shape, size in _entries(header):
        index[name] = {"dtype": code, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(index, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text


def _record_bytes(record: ClassRecord, layers: list[str], dtype: str) -> tuple[bytes, bytes]:
    torch_dtype = DTYPES[dtype][1]
    flat = torch.cat([record.sums[name].reshape(-1) for name in layers]).to(torch_dtype).contiguous()
    return flat.numpy().tobytes(), record.samples.long().contiguous().numpy().tobytes()


def _stream(temp: str, header: ProfileHeader, parts: Iterator[tuple[int, bytes, bytes]]) -> None:
    """Write a format-2 file: the header with placeholder digests, then each class's record as `parts` yields
    it (output position, sums bytes, samples bytes), then the header again with the records' digests (the same
    length: a digest is 64 hexadecimal characters)."""
    expected = {position: (header.pairs * DTYPES[header.dtype][1].itemsize, 8 * count)
                for position, _, count, _ in header.records}
    order = header.positions
    digests: dict[int, str] = {}
    placeholder = _header_bytes(header)
    with open(temp, "wb") as handle:
        handle.write(placeholder)
        for position, sums, samples in parts:
            if position != order[len(digests)] or (len(sums), len(samples)) != expected[position]:
                raise ModellegoError(f"profile record of class {position} does not fit the profile's header")
            handle.write(sums)
            handle.write(samples)
            digests[position] = record_digest(sums, samples)
        if len(digests) != len(order):
            raise ModellegoError("profiling ended before every class's record was written")
        header.records = [(position, name, count, digests[position]) for position, name, count, _ in header.records]
        final = _header_bytes(header)
        if len(final) != len(placeholder):
            raise AssertionError("a profile header changed length when its digests were filled in")
        handle.seek(0)
        handle.write(final)


def check_disk(path: str | os.PathLike, needed: int) -> None:
    """Refuse, before any work, a file of `needed` bytes that the disk holding `path` cannot take."""
    folder = Path(path).resolve().parent
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise ModellegoError(f"the profile needs about {needed / 2**30:.1f} GiB on disk and {folder} has "
                             f"{free / 2**30:.1f} GiB free; profile fewer classes, use --dtype float16 or free space")


def write_profile(path: str | os.PathLike, plan: ProfilePlan, records: Iterator[ClassRecord],
                  dtype: str = "float32") -> ProfileHeader:
    """Write a profile of `plan` to `path` (atomically), each class's record as `records` computes it: memory
    holds one class. The bytes it will take are checked against the free disk first."""
    header = header_of(plan, dtype)
    check_disk(path, len(_header_bytes(header)) + sum(header.record_bytes(count) for _, _, count, _ in header.records))
    parts = ((record.position, *_record_bytes(record, header.layers, dtype)) for record in records)
    atomic_write(path, lambda temp: _stream(temp, header, parts))
    return header


def append_profile(path: str | os.PathLike, plan: ProfilePlan, records: Iterator[ClassRecord]) -> ProfileHeader:
    """Add the classes of `plan` to the profile file at `path` (of the same model and layers; format 2), by
    copying its records as they are (never loading them all) and writing the new ones after them; atomic."""
    with ProfileFile(path) as existing:
        old = existing.header
        if old is None:
            raise ModellegoError(f"{path} is a profile of format 1 (before per-class records); profile again to "
                                 "append classes to it")
        new = header_of(plan, old.dtype)
        if (new.model_hash, new.layers, new.sizes) != (old.model_hash, old.layers, old.sizes):
            raise ModellegoError(f"{path} profiles another model (or other layers); append classes of the same model")
        held = set(old.positions)
        twice = [name for position, name, *_ in new.records if position in held]
        if twice:
            raise ModellegoError(f"{path} holds class {twice[0]!r} already; leave it out of --classes")
        merged = ProfileHeader(old.layers, old.kinds, old.sizes, old.model_hash, old.input_shape, old.dataset,
                               old.samples_per_class, old.notes + new.notes, max(old.world_size, new.world_size),
                               old.num_outputs, old.dtype, old.records + new.records)
        check_disk(path, len(_header_bytes(merged)) + sum(merged.record_bytes(count)
                                                           for _, _, count, _ in merged.records))

        def parts() -> Iterator[tuple[int, bytes, bytes]]:
            for position, _, _, _ in old.records:
                yield (position, *existing.record_bytes(position))
            for record in records:
                yield (record.position, *_record_bytes(record, merged.layers, merged.dtype))
        atomic_write(path, lambda temp: _stream(temp, merged, parts()))
    return merged


def save_profile(profile: Profile, path: str | os.PathLike, dtype: str = "float32") -> Path:
    """Write a profile held in memory to one file (format 2, atomically)."""
    write_profile(path, *as_records(profile), dtype)
    return Path(path)


class ProfileFile:
    """A profile file held open: its header (format 2) checked, any class's record read alone and checked
    against its digest (`read`), `bytes_read` counting what was read. A format-1 file is read whole. Use as a
    context manager."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.source = Path(path)
        self.file = OpenFile(path, "modellego profile")
        try:
            if PROFILE_KEY not in self.file.metadata:
                raise ModellegoError(f"{path} is a safetensors file but not a modellego profile; pass the file that "
                                     "`modellego profile` wrote")
            try:
                meta = mapping(parse_json(self.file.metadata[PROFILE_KEY], "the header", MAX_PROFILE_HEADER, 8),
                               "the header")
                if meta.get("format") != PROFILE_FORMAT:
                    raise Invalid("unknown format")
                version = integer(meta.get("format_version"), "format_version", 1, 10**9)
                if version > PROFILE_VERSION:
                    raise Invalid("written by a newer modellego; upgrade modellego")
                self.header = _header(_validate_v2(meta)) if version == 2 else None
                self.v1 = _validate_header(self.file.metadata[PROFILE_KEY]) if version == 1 else None
                if self.header is not None:
                    self._check_index()
                else:
                    _validate_index(self.v1, self.file.entries)
            except Invalid as error:
                raise ModellegoError(f"{path} is not a modellego profile (missing or damaged profile header: "
                                     f"{error})") from None
        except BaseException:
            self.file.close()
            raise

    def __enter__(self) -> "ProfileFile":
        return self

    def __exit__(self, *exc) -> None:
        self.file.close()

    @property
    def bytes_read(self) -> int:
        return self.file.bytes_read

    def _check_index(self) -> None:
        expected = {name: (code, tuple(shape)) for name, code, shape, _ in _entries(self.header)}
        if self.file.entries != expected:
            odd = sorted(set(self.file.entries) ^ set(expected)) or sorted(
                name for name in expected if self.file.entries.get(name) != expected[name])
            raise Invalid(f"its tensors do not match its classes and layers ({', '.join(show(n) for n in odd[:3])})")

    def classes(self) -> list[tuple[int, str, int]]:
        """The classes held: (model output, name, number of samples), in the file's order."""
        if self.header is None:
            return [(k, name, int(count)) for k, (name, count) in
                    enumerate(zip(self.v1["classes"], self.file.tensor("counts").tolist()))]
        return [(position, name, count) for position, name, count, _ in self.header.records]

    def record_bytes(self, position: int) -> tuple[bytes, bytes]:
        """Class `position`'s record as stored, checked against its digest."""
        sums, samples = self.file.raw(f"A/{position}"), self.file.raw(f"samples/{position}")
        digest = next(sha for held, _, _, sha in self.header.records if held == position)
        if record_digest(sums, samples) != digest:
            raise ModellegoError(f"{self.source} is a damaged modellego profile (the record of class {position} does "
                                 "not match its digest)")
        return sums, samples

    def read(self, positions: list[int] | None = None, names: list[str] | None = None) -> Profile:
        """The profile of classes `positions` (model outputs, in this order; default: every class held), reading
        only their records; `names`: what to call them if one is missing."""
        if self.header is None:
            return self._read_v1(positions, names)
        header = self.header
        held = header.positions
        asked = names
        positions = held if positions is None else list(positions)
        names = {position: name for position, name, *_ in header.records}
        missing = [row for row, position in enumerate(positions) if position not in held]
        if missing:
            _missing(positions, missing, asked)
        sums, samples, labels = [], [], []
        for row, position in enumerate(positions):
            flat_bytes, sample_bytes = self.record_bytes(position)
            flat = self.file.tensor(f"A/{position}", flat_bytes).float()
            try:
                _check_record(flat, position)
            except Invalid as error:
                raise ModellegoError(f"{self.source} is a damaged modellego profile ({error})") from None
            sums.append(flat)
            chosen = self.file.tensor(f"samples/{position}", sample_bytes)
            if (chosen < 0).any():
                raise ModellegoError(f"{self.source} is a damaged modellego profile (negative sample positions)")
            samples.append(chosen)
            labels.append(torch.full((len(chosen),), row, dtype=torch.long))
        stacked = torch.stack(sums)
        contributions, start = {}, 0
        for name, (outputs, inputs) in zip(header.layers, header.sizes):
            contributions[name] = stacked[:, start:start + outputs * inputs].reshape(len(positions), outputs, inputs)
            start += outputs * inputs
        whole = positions == list(range(header.num_outputs))
        return Profile(contributions=contributions, layers=list(header.layers), classes=[names[k] for k in positions],
                       counts=torch.tensor([len(chosen) for chosen in samples]), samples=torch.cat(samples),
                       sample_labels=torch.cat(labels), model_hash=header.model_hash,
                       input_shape=tuple(header.input_shape), dataset=header.dataset,
                       samples_per_class=header.samples_per_class, notes=list(header.notes), kinds=dict(header.kinds),
                       world_size=header.world_size, positions=None if whole else positions,
                       num_outputs=None if whole else header.num_outputs, file_digest=header.digest())

    def _read_v1(self, positions: list[int] | None, names: list[str] | None = None) -> Profile:
        tensors = {name: self.file.tensor(name) for name in self.file.entries}
        try:
            _validate_values(self.v1, tensors)
        except Invalid as error:
            raise ModellegoError(f"{self.source} is a damaged modellego profile ({error})") from None
        meta = self.v1
        layers = meta["layers"]
        profile = Profile(contributions={name: tensors[f"A/{name}"] for name in layers}, layers=layers,
                          classes=meta["classes"], counts=tensors["counts"], samples=tensors["samples"],
                          sample_labels=tensors["sample_labels"], model_hash=meta["model_hash"],
                          input_shape=tuple(meta["input_shape"]), dataset=meta.get("dataset", ""),
                          samples_per_class=meta["samples_per_class"], notes=meta.get("notes", []),
                          kinds=meta["layer_kinds"], world_size=meta["world_size"])
        return profile if positions is None else profile.subset(profile.rows(list(positions), names))


def _missing(positions: list[int], rows: list[int], names: list[str] | None) -> None:
    shown = ", ".join(repr(names[row]) if names else str(positions[row]) for row in rows[:5])
    raise ModellegoError(f"the profile holds no record of class {shown}; add it (modellego profile MODEL --classes "
                         "... --append PROFILE) or use a profile of all the model's classes")


def _header(checked: dict) -> ProfileHeader:
    return ProfileHeader(checked["layers"], checked["layer_kinds"], checked["sizes"], checked["model_hash"],
                         tuple(checked["input_shape"]), checked["dataset"], checked["samples_per_class"],
                         checked["notes"], checked["world_size"], checked["num_outputs"], checked["dtype"],
                         checked["records"])


def _check_sums(sums: torch.Tensor, what: str) -> None:
    """Sums of positive parts (`what`: whose, for the message) are finite, never negative, not all zero."""
    if not torch.isfinite(sums).all():
        raise Invalid(f"{what} hold NaN or infinite values")
    if (sums < 0).any():
        raise Invalid(f"{what} hold negative values; contributions are sums of positive parts")
    if not (sums > 0).any():
        raise Invalid(f"{what} are all zero")


def _check_record(flat: torch.Tensor, position: int) -> None:
    """A class's sums are sums of positive parts: finite, never negative, not all zero."""
    _check_sums(flat, f"the sums of class {position}")


def load_profile(path: str | os.PathLike, positions: list[int] | None = None,
                 names: list[str] | None = None) -> Profile:
    """Read a profile file; anything else is refused without unpickling. `positions` (model outputs): read only
    those classes' records (a format-2 file is never read whole for them); `names`: what to call them if the
    profile lacks one. Every field, tensor index and record is checked before use; the sums must be finite and
    non-negative."""
    with ProfileFile(path) as opened:
        return opened.read(positions, names)
