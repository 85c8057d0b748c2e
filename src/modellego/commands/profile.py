"""`modellego profile`: the per-class contributions of every parameter layer, summed over each class's most
confident correct training samples, written to a profile file one class's record at a time — all the model's
classes or some of them (`classes`), into a new file or added to one (`append`) — for any model kind."""

from __future__ import annotations

from typing import Sequence

from modellego import distributed
from modellego.commands.common import Device, FilePath, open_model, runs_models, runtime_options
from modellego.core.samples import resolve_classes
from modellego.data.task import DataOptions
from modellego.errors import ModellegoError
from modellego.io.atomic import check_output_path
from modellego.io.profiles import (
    DTYPES,
    ProfileFile,
    ProfileHeader,
    append_profile,
    check_disk,
    header_of,
    write_profile,
)


@runs_models
def profile(model_path: FilePath, out: FilePath, samples_per_class: int = 50, dataset: str | None = None,
            data: DataOptions | None = None, batch_size: int | None = None, progress: bool = True,
            classes: str | Sequence[str | int] | None = None, append: bool = False,
            dtype: str | None = None, device: Device = "auto", precision: str | None = None,
            workers: int | None = None) -> ProfileHeader:
    """Profile a model file on its training data (or `dataset`'s, matched by class names) and write the profile:
    every class, or `classes` (names or output positions; only their samples are read where the data knows its
    labels); with `append`, `out` is an existing profile of the model and gains these classes. `dtype` stores the
    sums as float32 (a new file's default) or float16 (half the file; appended classes take the file's). Returns
    the profile's header (layers, classes held). The model runs on `device`; `precision` applies to the choice
    of samples only (the sums are float64 whatever it is), `workers` to data loading."""
    data = data or DataOptions()
    if dtype is not None and dtype not in DTYPES:
        raise ModellegoError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if append:
        with ProfileFile(out) as existing:  # refused before any work: not a profile, or of format 1
            if existing.header is None:
                raise ModellegoError(f"{out} is a profile of format 1 (before per-class records); profile again to "
                                     "append classes to it")
            if dtype not in (None, existing.header.dtype):
                raise ModellegoError(f"{out} stores {existing.header.dtype} sums; drop --dtype or pass "
                                     f"--dtype {existing.header.dtype}")
            dtype = existing.header.dtype
    dtype = dtype or "float32"
    check_output_path(out, inputs=[model_path])
    (model, manifest), kind = open_model(model_path, device)
    kind.check_options({"--batch-size": batch_size is not None, "--image-size": data.image_size is not None,
                        "--no-verify": not data.verify, **runtime_options(precision, workers)})
    asked = len(manifest.classes) if classes is None else \
        len(resolve_classes(manifest.class_names, classes, "the model's classes"))
    check_disk(out, asked * (kind.pairs(model) * DTYPES[dtype][1].itemsize + 8 * samples_per_class))
    # the model's whole training set, so that sample positions mean the same in every profile of the model; only
    # the asked classes' samples are read (the data's targets say which)
    train = kind.data(manifest, "train", data, dataset=dataset)
    plan, records = kind.profile_stream(model, train, samples_per_class, batch_size or 64, progress, classes)
    if not distributed.is_main():  # under torchrun every process computes each class's (all-reduced) sums
        for _ in records:
            pass
        return header_of(plan, dtype)
    return append_profile(out, plan, records) if append else write_profile(out, plan, records, dtype)
