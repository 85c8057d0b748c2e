"""Masks files: the located masks and scores of every layer (one safetensors file, like models and profiles)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from modellego.core.locate import ComponentMasks
from modellego.errors import ModellegoError
from modellego.io.artifacts import read_artifact, write_artifact
from modellego.io.fields import Invalid, integer, mapping, number, parse_json, sequence, string

MASKS_FORMAT = "modellego-masks"
MAX_CHANNELS = 1 << 20  # a layer's outputs in a masks file


def save_masks(masks: ComponentMasks, path: str | os.PathLike) -> Path:
    """Write the masks and scores to one safetensors file (atomically)."""
    tensors = {f"mask/{name}": mask.to(torch.uint8) for name, mask in masks.masks.items()}
    tensors |= {f"score/{name}": score.float() for name, score in masks.scores.items()}
    header = {"format": MASKS_FORMAT, "format_version": 1, "layers": list(masks.masks), "classes": masks.classes,
              "classifier": masks.classifier, "settings": masks.settings, "profile_hash": masks.profile_hash,
              "input_shape": list(masks.input_shape)}
    return write_artifact(path, tensors, MASKS_FORMAT, header)


def load_masks(path: str | os.PathLike) -> ComponentMasks:
    """Read masks written by `save_masks`; anything else is refused with one line, never unpickled."""
    header, raw = read_artifact(path, MASKS_FORMAT, "modellego masks", "pass a file written by save_masks",
                                article="")
    try:
        meta = mapping(parse_json(header, "the header", 4 << 20, 8), "the header")
        layers = [string(name, "layers[]", 1_000) for name in sequence(meta.get("layers"), "layers", 1, 10_000)]
        classes = [string(name, "classes[]", 1_000, empty=True)
                   for name in sequence(meta.get("classes"), "classes", 1, 100_000)]
        expected = {f"{kind}/{name}" for kind in ("mask", "score") for name in layers}
        if set(raw.entries) != expected:
            raise Invalid("its tensors do not match its layers")
        if any(len(shape) != 2 or shape[0] != len(classes) or not 0 < shape[1] <= MAX_CHANNELS
               for _, shape in raw.entries.values()):
            raise Invalid(f"every mask and score must be classes × channels (1 to {MAX_CHANNELS:,} channels)")
        if any(raw.entries[f"mask/{name}"][1] != raw.entries[f"score/{name}"][1] for name in layers):
            raise Invalid("a layer's mask and score differ in shape")
        settings = {str(key): number(value, f"settings.{key}", -1e6, 1e6)
                    for key, value in mapping(meta.get("settings", {}), "settings").items()}
        shape = tuple(integer(side, "input_shape[]", 1, 4_096)
                      for side in sequence(meta.get("input_shape", []), "input_shape", 0, 3))
        classifier = string(meta.get("classifier"), "classifier", 1_000)
    except (Invalid, TypeError, ValueError) as error:
        raise ModellegoError(f"{path} holds damaged modellego masks ({error})") from None
    tensors = raw.tensors("modellego masks")
    if not all(torch.isfinite(tensors[f"score/{name}"]).all() for name in layers):
        raise ModellegoError(f"{path} holds damaged modellego masks (a score is not finite)")
    return ComponentMasks(masks={name: tensors[f"mask/{name}"].bool() for name in layers},
                          scores={name: tensors[f"score/{name}"] for name in layers}, classes=classes,
                          classifier=classifier, settings=settings, profile_hash=str(meta.get("profile_hash", "")),
                          input_shape=shape)
