"""Where and how a command's passes run: the device it puts its model on (`resolve_device`), the precision of the
passes that only rank or score (`ranking`), and the DataLoader workers that decode its data (`loader`).

The method follows the device of the model it is given; commands choose that device. Precision and workers are
settings of the calling context (`settings(...)`), like `torch.autocast`: the core reads them where it ranks,
scores or loads, so that a library user sets them once around any call. Contributions, re-fits and every weight
written are always computed in float32/float64, whatever the precision asked for."""

from __future__ import annotations

import contextlib
import contextvars
import math
import os
import warnings
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader, Dataset

from modellego import distributed
from modellego.errors import ModellegoError

PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
DEVICE_FORMS = "auto, cpu, cuda, cuda:N or mps"
MAX_WORKERS = 256
# The most workers `auto` starts: beyond this, decoding is rarely the bottleneck and each worker costs memory.
AUTO_WORKERS_CAP = 8


def check_precision(precision: str) -> str:
    """`precision` if it is one modellego knows, else a one-line refusal."""
    if precision not in PRECISIONS:
        raise ModellegoError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return precision


@dataclass(frozen=True)
class Settings:
    """`precision` of the ranking and scoring passes (fp32, bf16, fp16) and DataLoader `workers` (None: auto, a
    share of the cores for data read from files, none for data held in memory)."""

    precision: str = "fp32"
    workers: int | None = None

    def __post_init__(self) -> None:
        check_precision(self.precision)
        if self.workers is not None and not (isinstance(self.workers, int) and 0 <= self.workers <= MAX_WORKERS):
            raise ModellegoError(f"--workers must be a whole number from 0 to {MAX_WORKERS}, got {self.workers!r}")


_current: contextvars.ContextVar[Settings] = contextvars.ContextVar("modellego_runtime", default=Settings())


def current() -> Settings:
    """The settings in effect here."""
    return _current.get()


@contextlib.contextmanager
def settings(precision: str | None = None, workers: int | None = None) -> Iterator[Settings]:
    """Run the enclosed calls with `precision` for ranking and scoring and `workers` DataLoader workers (each
    None: unchanged from the enclosing settings)."""
    outer = current()
    chosen = Settings(outer.precision if precision is None else precision,
                      outer.workers if workers is None else workers)
    token = _current.set(chosen)
    try:
        yield chosen
    finally:
        _current.reset(token)


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """The device `spec` names, checked to exist here: `auto` is the first CUDA device when there is one (under
    torchrun, this process's LOCAL_RANK), else the CPU. A device this machine lacks is refused in one line."""
    if isinstance(spec, torch.device):
        spec = str(spec)
    text = (spec or "auto").strip().lower()
    if text == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
        return torch.device("cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise ModellegoError(f"--device must be {DEVICE_FORMS}, got {spec!r}") from None
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ModellegoError(f"--device {spec}: this machine has no CUDA device (or this PyTorch build has no "
                                 "CUDA support); use --device cpu, or auto to take a GPU only when there is one")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ModellegoError(f"--device {spec}: this machine has {count} CUDA device{'s' * (count != 1)} "
                                 f"(cuda:0..cuda:{count - 1})")
        return torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())
    if device.type == "mps":
        if not torch.backends.mps.is_available():
            raise ModellegoError(f"--device {spec}: this machine has no Apple GPU (MPS); use --device cpu or auto")
        return device
    raise ModellegoError(f"--device must be {DEVICE_FORMS}, got {spec!r}")


def device_of(model: torch.nn.Module) -> torch.device:
    """The device of a model's parameters (the CPU for a model without any)."""
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def ranking(device: torch.device | str, precision: str | None = None) -> contextlib.AbstractContextManager:
    """A context for a forward pass that only ranks or scores (sample selection, evaluation, gate fitting, the α/β
    search's candidates): autocast to `precision` (default: the current settings'), nothing at fp32."""
    precision = check_precision(precision or current().precision)
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    device_type = torch.device(device).type
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # autocast only warns, and does nothing, where it lacks the dtype
        try:
            return torch.autocast(device_type, dtype=dtype)
        except (RuntimeError, UserWarning) as error:
            detail = (str(error).splitlines() or [""])[0]
            raise ModellegoError(f"--precision {precision} is not available on {device_type} ({detail}); use "
                                 "--precision fp32") from None


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask, which containers and taskset narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def reads_files(data: Any) -> bool:
    """Whether `data` (or a dataset it wraps) decodes its samples from files on each read (an image folder), so
    that worker processes pay off; data held in memory is faster read in the main process."""
    pending, seen = [data], set()
    while pending:
        item = pending.pop()
        if item is None or id(item) in seen:
            continue
        seen.add(id(item))
        if getattr(item, "reads_files", False):
            return True
        pending.extend([getattr(item, "dataset", None), *(getattr(item, "parts", None) or [])])
    return False


def default_workers(world_size: int = 1) -> int:
    """`auto`'s workers for data read from files: the cores this process may use (its share under torchrun),
    less one for the main process, at most AUTO_WORKERS_CAP."""
    return max(0, min(AUTO_WORKERS_CAP, usable_cores() // max(1, world_size) - 1))


def workers_for(data: Any) -> int:
    """The DataLoader workers to read `data` with under the current settings."""
    chosen = current().workers
    if chosen is not None:
        return chosen
    if not reads_files(data):
        return 0
    return default_workers(distributed.world_size())


def loader(data: Dataset, device: torch.device | str | None = None, **options: Any) -> DataLoader:
    """A DataLoader over `data` with the current settings' workers (no more than it has batches; none for one
    batch, which the main process reads as fast as a worker would start), and pinned memory when its batches go
    to a CUDA device (`options` as DataLoader's: batch_size, batch_sampler, shuffle, generator)."""
    workers = workers_for(data)
    if workers:
        sampler = options.get("batch_sampler")
        batches = len(sampler) if sampler is not None else math.ceil(len(data) / options.get("batch_size", 1))
        workers = 0 if batches <= 1 else min(workers, batches)
    pin = device is not None and torch.device(device).type == "cuda"
    return DataLoader(data, num_workers=workers, pin_memory=pin, **options)
