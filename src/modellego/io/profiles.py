"""Profile files: one safetensors file of per-layer class sums (float32, classes × outputs × inputs), the counts,
samples and labels, and a JSON header; read without unpickling, every field and tensor checked before use."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from modellego.core.profile import Profile
from modellego.errors import ModellegoError
from modellego.io.artifacts import read_artifact, write_artifact
from modellego.io.fields import Invalid, integer, mapping, parse_json, sequence, show, string

PROFILE_FORMAT = "modellego-profile"
PROFILE_KEY = "modellego-profile"
PROFILE_VERSION = 1
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
        sums = tensors[f"A/{name}"]
        if not torch.isfinite(sums).all():
            raise Invalid(f"sums of layer {name} hold NaN or infinite values")
        if (sums < 0).any():
            raise Invalid(f"sums of layer {name} hold negative values; contributions are sums of positive parts")
        if not (sums > 0).any():
            raise Invalid(f"sums of layer {name} are all zero")
    counts, labels = tensors["counts"], tensors["sample_labels"]
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= len(meta["classes"])):
        raise Invalid("sample_labels name classes the profile does not have")
    if (counts < 0).any() or int(counts.sum()) != len(labels) or (tensors["samples"] < 0).any():
        raise Invalid("counts do not add up to the samples")


def save_profile(profile: Profile, path: str | os.PathLike) -> Path:
    """Write a profile to one safetensors file (atomically)."""
    tensors = {f"A/{name}": value.contiguous() for name, value in profile.contributions.items()}
    tensors.update(counts=profile.counts.contiguous(), samples=profile.samples.contiguous(),
                   sample_labels=profile.sample_labels.contiguous())
    meta = {"format": PROFILE_FORMAT, "format_version": PROFILE_VERSION, "layers": profile.layers,
            "classes": profile.classes, "model_hash": profile.model_hash, "dataset": profile.dataset,
            "input_shape": list(profile.input_shape), "samples_per_class": profile.samples_per_class,
            "notes": profile.notes, "world_size": profile.world_size}
    if profile.kinds:
        meta["layer_kinds"] = profile.kinds
    return write_artifact(path, tensors, PROFILE_KEY, meta)


def load_profile(path: str | os.PathLike) -> Profile:
    """Read a profile written by `save_profile`; anything else is refused without unpickling. The header is
    validated (types, ranges, sizes) and every tensor's dtype and shape checked against it before the
    tensors are created; the sums must be finite, non-negative and not all zero."""
    source = Path(path)
    header, raw = read_artifact(source, PROFILE_KEY, "modellego profile",
                                "pass the file that `modellego profile` wrote")
    try:
        meta = _validate_header(header)
        _validate_index(meta, raw.entries)
    except Invalid as error:
        raise ModellegoError(f"{source} is not a modellego profile (missing or damaged profile header: {error})") from None
    tensors = raw.tensors("modellego profile")
    try:
        _validate_values(meta, tensors)
    except Invalid as error:
        raise ModellegoError(f"{source} is a damaged modellego profile ({error})") from None
    layers = meta["layers"]
    return Profile(contributions={name: tensors[f"A/{name}"] for name in layers}, layers=layers,
                   classes=meta["classes"], counts=tensors["counts"], samples=tensors["samples"],
                   sample_labels=tensors["sample_labels"], model_hash=meta["model_hash"],
                   input_shape=tuple(meta["input_shape"]), dataset=meta.get("dataset", ""),
                   samples_per_class=meta["samples_per_class"], notes=meta.get("notes", []),
                   kinds=meta["layer_kinds"], world_size=meta["world_size"])
