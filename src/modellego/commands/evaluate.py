"""`modellego eval` and `modellego info`: a model file's accuracy on its test split (overall, per class, params,
FLOPs), a component against its source (Base / Restricted base / the component), and a file's manifest."""

from __future__ import annotations

from modellego.commands.common import FilePath, assembly_base, open_model, source_baselines
from modellego.core.evaluate import accuracy_of, count_params
from modellego.data.subsets import per_class_slice
from modellego.data.task import DataOptions
from modellego.errors import ModellegoError
from modellego.io.manifest import Manifest
from modellego.io.modelfile import read_manifest


def _limited(samples, max_per_class: int | None):
    return per_class_slice(samples, max_per_class) if max_per_class else samples


def evaluate_file(path: FilePath, dataset: str | None = None, classes: str | None = None,
                  data: DataOptions | None = None, batch_size: int | None = None, max_per_class: int | None = None,
                  progress: bool = False) -> dict:
    """Evaluate a model file on the test split of its own task (or `dataset`, matched by class names; `classes`:
    some of its classes): accuracy, per class, params, FLOPs per sample, the samples' unit; an assembly also
    reports the mean Base of its source models (recorded by its components' `disassemble --evaluate`)."""
    data = data or DataOptions()
    (model, manifest), kind = open_model(path)
    kind.check_options({"--batch-size": batch_size is not None, "--image-size": data.image_size is not None,
                        "--no-verify": not data.verify})
    test = _limited(kind.data(manifest, "test", data, dataset=dataset, only=classes), max_per_class)
    logits, labels = kind.predict(model, test, batch_size or 256, progress)
    result = accuracy_of(logits.argmax(1), labels, list(test.classes))
    report = {"accuracy": result.accuracy, "per_class": result.per_class, "samples": result.samples,
              "params": count_params(model), "flops": kind.count_flops(model, manifest.input), "data": test.name,
              "unit": kind.unit}
    if manifest.kind == "assembly":
        report["base"] = assembly_base(manifest)
    return report


def compare(component_path: FilePath, source_path: FilePath, data: DataOptions | None = None,
            batch_size: int | None = None, max_per_class: int | None = None, progress: bool = False) -> dict:
    """A component (or any model) against its source on the component's task test samples: Base (source, argmax
    over all its classes), Restricted base (source logits restricted to the task), and the component."""
    data = data or DataOptions()
    part, kind = open_model(component_path)
    source, source_kind = open_model(source_path)
    kind.check_options({"--batch-size": batch_size is not None, "--image-size": data.image_size is not None,
                        "--no-verify": not data.verify})
    if source_kind is not kind:
        raise ModellegoError(f"{source_path} is not a {kind.name.upper()} model, so it is not this component's source")
    test = _limited(kind.data(part.manifest, "test", data), max_per_class)
    baselines = source_baselines(kind, source, part.manifest.classes, test, batch_size or 256, progress)
    logits, labels = kind.predict(part.model, test, batch_size or 256, progress)
    own = accuracy_of(logits.argmax(1), labels, part.manifest.class_names)
    return {**baselines, "accuracy": own.accuracy, "per_class": own.per_class, "params": count_params(part.model),
            "flops": kind.count_flops(part.model, part.manifest.input), "source_params": count_params(source.model),
            "source_flops": kind.count_flops(source.model, source.manifest.input), "samples": own.samples,
            "classes": part.manifest.class_names, "data": test.name, "unit": kind.unit}


def info(path: FilePath) -> Manifest:
    """A model file's manifest, without loading its weights."""
    return read_manifest(path)
