"""One file format for every artefact (model, profile, masks): a safetensors file whose metadata holds a JSON
header under the artefact's key, written atomically (io.atomic) and read through one open handle
(io.safetensors)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from modellego.errors import ModellegoError
from modellego.io.atomic import atomic_write
from modellego.io.safetensors import RawFile, read_raw


def write_artifact(path: str | os.PathLike, tensors: dict[str, torch.Tensor], key: str, header: dict) -> Path:
    """Write `tensors` and the JSON `header` (under metadata `key`) to `path`, atomically."""
    contiguous = {name: tensor.detach().cpu().contiguous() for name, tensor in tensors.items()}
    metadata = {key: json.dumps(header)}
    return atomic_write(path, lambda temp: save_file(contiguous, temp, metadata=metadata))


def read_artifact(path: str | os.PathLike, key: str, what: str, hint: str, article: str = "a ") -> tuple[str, RawFile]:
    """The JSON header text under `key` and the file, read once; a file without that key is refused with a line
    naming `what` it should have been and `hint` (how to get one)."""
    raw = read_raw(Path(path), what)
    if key not in raw.metadata:
        raise ModellegoError(f"{path} is a safetensors file but not {article}{what}; {hint}")
    return raw.metadata[key], raw
