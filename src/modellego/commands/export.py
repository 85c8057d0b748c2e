"""`modellego export`: a model file as a plain ONNX file, a `torch.export` program or a folder a model hub takes,
checked against the PyTorch model on the model's own test samples before anything is written."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from modellego import __version__
from modellego.commands.common import FilePath, open_model
from modellego.data.task import DataOptions
from modellego.errors import ModellegoError
from modellego.io.atomic import check_output_path, file_hash
from modellego.io.export import (
    FORMATS,
    OPSET,
    Agreement,
    onnx_metadata,
    onnx_modules,
    traceable,
    write_folder,
    write_onnx,
    write_pt2,
)
from modellego.io.modelfile import FOLDER_MODEL, model_path, read_manifest

CHECK_SAMPLES = 64  # test samples both models run on, by default


@dataclass
class Exported:
    """What `export` wrote: the file or folder, its format and size, and how the exported model agreed with the
    PyTorch model (None for a folder, whose model file is a byte-for-byte copy, checked by its hash)."""

    path: Path
    format: str
    bytes: int
    agreement: Agreement | None
    opset: int | None = None
    unit: str = "image"


def check_format(value: str) -> str:
    """The export format named by `value` (onnx, pt2, folder)."""
    name = str(value).strip().lower()
    if name not in FORMATS:
        raise ModellegoError(f"unknown export format {value!r}; choose one of {', '.join(FORMATS)}")
    return name


def export(model: FilePath, out: FilePath, format: str = "onnx", samples: int = CHECK_SAMPLES,
           data: DataOptions | None = None) -> Exported:
    """Export a model file (a source, a component or an assembly; or an exported folder) as `format`: `onnx`
    (torch.onnx, opset OPSET, dynamic batch, class names in its metadata), `pt2` (torch.export) or `folder`
    (model.safetensors, config.json, a README.md model card). The ONNX and pt2 files are run on `samples` of the
    model's test split (read as `data` says) and refused unless they agree with the PyTorch model."""
    chosen = check_format(format)
    if not 1 <= samples <= 100_000:
        raise ModellegoError(f"--samples must be between 1 and 100000, got {samples}")
    source = model_path(model)
    manifest = read_manifest(source)  # a missing file, or one not ours, is refused here
    target = Path(out)
    if chosen == "folder":  # write_folder refuses an unusable --out before it writes anything
        written = write_folder(source, manifest, target, __version__)
        if file_hash(written / FOLDER_MODEL) != file_hash(source):
            raise ModellegoError(f"the copy of {source} in {written} differs from it; the disk changed it")
        size = sum(path.stat().st_size for path in written.iterdir())
        return Exported(written, chosen, size, None)
    check_output_path(target, inputs=[source])
    if chosen == "onnx":
        onnx_modules()  # missing packages are refused before the data is read
    brick, kind = open_model(source)
    what = f"{Path(model).name} ({manifest.kind})"
    inputs = kind.export_inputs(kind.data(brick.manifest, "test", data), samples)
    network = brick.model.eval()
    with torch.no_grad():
        reference = network(*inputs.tensors)
    network = traceable(network)
    if chosen == "onnx":
        agreement = write_onnx(network, inputs, reference, target, what, onnx_metadata(brick.manifest, __version__))
    else:
        agreement = write_pt2(network, inputs, reference, target, what)
    return Exported(target, chosen, os.path.getsize(target), agreement, OPSET if chosen == "onnx" else None,
                    kind.unit)
