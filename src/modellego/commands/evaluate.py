"""`modellego eval` and `modellego info`: a model file's accuracy on its test split (overall, per class, params,
FLOPs), a component against its source (Base / Restricted base / the component), and a file's manifest."""

from __future__ import annotations

import os
from dataclasses import dataclass

from modellego.commands.common import (
    Device,
    FilePath,
    assembly_base,
    open_model,
    runs_models,
    runtime_options,
    source_baselines,
)
from modellego.core.evaluate import accuracy_of, check_finite, count_params
from modellego.core.gates import PER_SAMPLE, STORED_AS
from modellego.data.subsets import per_class_slice
from modellego.data.task import DataOptions
from modellego.errors import ModellegoError
from modellego.io.manifest import Manifest, provenance_records
from modellego.io.modelfile import model_path, read_manifest
from modellego.io.profiles import PROFILE_KEY, ProfileFile
from modellego.io.safetensors import read_raw


def _limited(samples, max_per_class: int | None):
    return per_class_slice(samples, max_per_class) if max_per_class else samples


@runs_models
def evaluate_file(path: FilePath, dataset: str | None = None, classes: str | None = None,
                  data: DataOptions | None = None, batch_size: int | None = None, max_per_class: int | None = None,
                  progress: bool = False, device: Device = "auto", precision: str | None = None,
                  workers: int | None = None) -> dict:
    """Evaluate a model file on the test split of its own task (or `dataset`, matched by class names; `classes`:
    some of its classes): accuracy, per class, params, FLOPs per sample, the samples' unit; an assembly also
    reports the mean Base of its source models (recorded by its components' `disassemble --evaluate`). The
    model runs on `device` at `precision`, the data is read by `workers`."""
    data = data or DataOptions()
    (model, manifest), kind = open_model(path, device)
    kind.check_options({"--batch-size": batch_size is not None, "--image-size": data.image_size is not None,
                        "--no-verify": not data.verify, **runtime_options(precision, workers)})
    test = _limited(kind.data(manifest, "test", data, dataset=dataset, only=classes), max_per_class)
    logits, labels = kind.predict(model, test, batch_size or 256, progress)
    check_finite(logits, str(path))
    result = accuracy_of(logits.argmax(1), labels, list(test.classes))
    report = {"accuracy": result.accuracy, "per_class": result.per_class, "samples": result.samples,
              "params": count_params(model), "flops": kind.count_flops(model, manifest.input), "data": test.name,
              "unit": kind.unit}
    if manifest.kind == "assembly":
        report["base"] = assembly_base(manifest)
        if report["base"] is None:
            report["base_missing"] = ("a component was cut without --evaluate, so its source's Base was not "
                                      "recorded; `modellego disassemble ... --evaluate` records it, `modellego eval "
                                      "COMPONENT --against SOURCE` measures it")
    return report


@runs_models
def compare(component_path: FilePath, source_path: FilePath, data: DataOptions | None = None,
            batch_size: int | None = None, max_per_class: int | None = None, progress: bool = False,
            device: Device = "auto", precision: str | None = None, workers: int | None = None) -> dict:
    """A component (or any model) against its source on the component's task test samples: Base (source, argmax
    over all its classes), Restricted base (source logits restricted to the task), and the component."""
    data = data or DataOptions()
    part, kind = open_model(component_path, device)
    source, source_kind = open_model(source_path, device)
    kind.check_options({"--batch-size": batch_size is not None, "--image-size": data.image_size is not None,
                        "--no-verify": not data.verify, **runtime_options(precision, workers)})
    if source_kind is not kind:
        raise ModellegoError(f"{source_path} is not a {kind.name.upper()} model, so it is not this component's source")
    test = _limited(kind.data(part.manifest, "test", data), max_per_class)
    baselines = source_baselines(kind, source, part.manifest.classes, test, batch_size or 256, progress)
    logits, labels = kind.predict(part.model, test, batch_size or 256, progress)
    check_finite(logits, str(component_path))
    own = accuracy_of(logits.argmax(1), labels, part.manifest.class_names)
    return {**baselines, "accuracy": own.accuracy, "per_class": own.per_class, "params": count_params(part.model),
            "flops": kind.count_flops(part.model, part.manifest.input), "source_params": count_params(source.model),
            "source_flops": kind.count_flops(source.model, source.manifest.input), "samples": own.samples,
            "classes": part.manifest.class_names, "data": test.name, "unit": kind.unit}


@dataclass
class ProfileInfo:
    """What a profile file holds, from its header alone: the format, the model it profiles (hash, number of
    outputs), the layers, the dtype of its sums, the dataset and the classes held (model output, name, number of
    samples), its digest and size on disk."""

    format_version: int
    model_hash: str
    num_outputs: int
    layers: list[str]
    dtype: str
    dataset: str
    samples_per_class: int
    classes: list[tuple[int, str, int]]
    digest: str
    bytes: int


def stored_training_data(manifest: Manifest) -> list[str]:
    """What of its components' training images a model file holds, one line per assembly in its lineage that
    stores some (a `knn` or `nearest` gate); empty when it holds none. Files written before the rows were
    recorded are recognised by their calibration."""
    found: list[str] = []
    for record in provenance_records(manifest.provenance):
        assembled = record.get("assembled")
        if isinstance(assembled, dict) and assembled.get("calibration") in PER_SAMPLE:
            stored = assembled.get("stored_training_data")
            calibration = assembled["calibration"]
            found.append(f"{stored['rows']:,} {STORED_AS[calibration]} (calibration {calibration})"
                         if isinstance(stored, dict) and isinstance(stored.get("rows"), int)
                         else f"{STORED_AS[calibration]} (calibration {calibration}; rows not recorded)")
    return found


def info(path: FilePath) -> Manifest | ProfileInfo:
    """A model file's manifest, without loading its weights; for a profile file, what it holds (from its header;
    a profile of format 1 is read whole)."""
    path = model_path(path)
    if PROFILE_KEY not in read_raw(path, "modellego file", with_data=False).metadata:
        return read_manifest(path)
    with ProfileFile(path) as opened:
        header = opened.header
        classes = opened.classes()
        if header is None:
            whole = opened.read()
            return ProfileInfo(1, whole.model_hash, whole.outputs, whole.layers, "float32", whole.dataset,
                               whole.samples_per_class, classes, whole.digest(), os.path.getsize(path))
        return ProfileInfo(2, header.model_hash, header.num_outputs, header.layers, header.dtype, header.dataset,
                           header.samples_per_class, classes, header.digest(), os.path.getsize(path))
