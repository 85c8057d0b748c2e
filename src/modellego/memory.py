"""Peak memory of a command's loop, estimated before the loop starts and compared with the memory this process may
still take, so that work too big for the machine is sized down (inference) or refused with one line (training)
instead of being killed by the kernel's out-of-memory killer without a word.

How: one step of the loop (a forward pass; for training also the loss and the backward pass) runs on the `meta`
device — shapes only, no arithmetic, no memory — under a dispatch mode that adds up the bytes of every tensor
storage alive after each operation. Its peak, at the real input size and batch size, is exact for the tensors
PyTorch allocates; what the allocator and oneDNN keep on top is covered by a factor and a fixed margin measured by
`benchmarks/memory.py` (docs/memory.md). Training adds Adam's two moment buffers per parameter. A model that cannot
run on `meta` (one that reads a tensor's value in its forward) is traced with real tensors at batches 2 and 4 and
the straight line through the two peaks is extended to the batch size asked for."""

from __future__ import annotations

import logging
import resource
import warnings
import weakref
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from modellego.errors import ModellegoError

log = logging.getLogger("modellego.memory")

GiB = 2**30
# Measured by benchmarks/memory.py (docs/memory.md): resident memory grows by up to this factor times the tensors
# alive at the peak (malloc keeps freed small blocks, oneDNN keeps reordered copies), plus this many bytes.
OVERHEAD_FACTOR = 2.0
OVERHEAD_BYTES = 64 * 2**20
# Only this share of the memory available is planned for: other processes and page cache move under our feet.
USABLE_SHARE = 0.9
SUGGESTION_HEADROOM = 32 * 2**20  # under ulimit -v, a refusal's --batch-size leaves this much more free (plan_training)


class _LiveTensors(TorchDispatchMode):
    """Bytes of the tensor storages created under this mode that are still alive, and their peak."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._sizes: dict[int, int] = {}

    def exclude(self, tensors) -> None:
        """Count no bytes for the storages of `tensors` (alive before the step), nor for views of them."""
        for tensor in tensors:
            self._sizes.setdefault(id(tensor.untyped_storage()), 0)

    def _freed(self, key: int) -> None:
        self.live -= self._sizes.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                key = id(storage)
                if key not in self._sizes:
                    self._sizes[key] = storage.nbytes()
                    self.live += self._sizes[key]
                    weakref.finalize(storage, self._freed, key)
        self.peak = max(self.peak, self.live)
        return out


def _step_peak(model: nn.Module, sample_shape: Sequence[int], batch_size: int, training: bool,
               device: str) -> int:
    """Peak bytes of tensors alive during one step at `batch_size`, on `device` ('meta': nothing computed; 'cpu':
    on copies of the parameters, so the model itself is untouched). The model's own parameters are not counted
    (they exist already); gradients are."""
    def twin(tensor: torch.Tensor) -> torch.Tensor:
        if device == "meta":
            return torch.empty_like(tensor, device="meta")
        return tensor.detach().to(device, copy=True)

    state = {name: twin(p).requires_grad_(training and p.requires_grad) for name, p in model.named_parameters()}
    state.update({name: twin(b) for name, b in model.named_buffers()})
    modes = {module: module.training for module in model.modules()}
    model.train(training)
    tracker = _LiveTensors()
    tracker.exclude(state.values())
    try:
        with torch.set_grad_enabled(training), tracker:
            images = torch.zeros(batch_size, *sample_shape, device=device)
            logits = torch.func.functional_call(model, state, (images,))
            if training:
                labels = torch.zeros(batch_size, dtype=torch.long, device=device)
                nn.functional.cross_entropy(logits, labels).backward()
            del logits
    finally:
        for module, mode in modes.items():
            module.training = mode
    return tracker.peak


@dataclass(frozen=True)
class _Line:
    """Tensor bytes at the peak as a straight line in the batch size: `fixed + per_sample * batch`."""

    fixed: int
    per_sample: int
    method: str

    def at(self, batch_size: int) -> int:
        return max(0, self.fixed + self.per_sample * batch_size)


_lines: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def _model_key(model: nn.Module) -> tuple:
    return tuple((name, tuple(p.shape)) for name, p in model.named_parameters())


def _line(model: nn.Module, sample_shape: Sequence[int], training: bool) -> _Line | None:
    """The tensor-bytes line of one step, cached per model, input shape and mode; None when the model cannot
    run a step here (the command's own loop then reports why)."""
    key = (tuple(sample_shape), training, _model_key(model))
    cached = _lines.setdefault(model, {})
    if key in cached:
        return cached[key]
    line = None
    for device, small, large in (("meta", 2, 4), ("cpu", 2, 4)):
        try:
            low = _step_peak(model, sample_shape, small, training, device)
            high = _step_peak(model, sample_shape, large, training, device)
        except Exception:  # noqa: BLE001 - a forward that needs real values fails on meta; try real tensors
            continue
        per_sample = max(0, (high - low) // (large - small))
        line = _Line(low - per_sample * small, per_sample, "meta device" if device == "meta" else "probe at batch 2 and 4")
        break
    cached[key] = line
    return line


def _parameter_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


@dataclass
class MemoryEstimate:
    """What a loop is estimated to add to this process's memory at its peak, and what the machine has.

    `peak_bytes` = OVERHEAD_FACTOR × (`tensor_bytes` + `state_bytes`) + OVERHEAD_BYTES, where `tensor_bytes` are the
    tensors alive at the peak of one step (activations kept for the backward pass, gradients, the batch) and
    `state_bytes` what lives across steps (Adam's moments; a profile's sums)."""

    work: str
    batch_size: int
    requested_batch_size: int
    input_shape: tuple[int, ...]
    tensor_bytes: int
    state_bytes: int
    peak_bytes: int
    method: str
    available_bytes: int | None = None
    limit: str | None = None
    device: str = "cpu"

    @property
    def fits(self) -> bool:
        return self.available_bytes is None or self.peak_bytes <= USABLE_SHARE * self.available_bytes

    def describe(self) -> str:
        """One line: the estimate, the memory available and how it was obtained."""
        available = ("no memory limit known" if self.available_bytes is None
                     else f"{gib(self.available_bytes)} available ({self.limit})")
        where = f" on {self.device}" if self.device != "cpu" else ""
        shape = "×".join(str(n) for n in self.input_shape)
        changed = (f" (lowered from {self.requested_batch_size})"
                   if self.batch_size != self.requested_batch_size else "")
        return (f"memory{where}: {self.work} at batch size {self.batch_size}{changed} on {shape} inputs needs about "
                f"{gib(self.peak_bytes)} at its peak ({gib(self.tensor_bytes)} of tensors by {self.method}, "
                f"{gib(self.state_bytes)} kept across steps, allocator overhead); {available}")

    def record(self) -> dict:
        """The machine-independent part, for a manifest's provenance (a file must not depend on free memory)."""
        data = asdict(self)
        for machine_dependent in ("available_bytes", "limit", "device"):
            data.pop(machine_dependent)
        data["input_shape"] = list(self.input_shape)
        return data


# --- what this process may still allocate ---------------------------------------------------------------------

def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
        return None if text == "max" else int(text)
    except (OSError, ValueError):
        return None


def _own_cgroup_dirs(root: Path, hierarchy: str) -> list[Path]:
    """This process's cgroup folder and its ancestors under `root`, from /proc/self/cgroup ("0::/path" for v2,
    "N:memory:/path" for v1's memory controller)."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if (hierarchy == "v2" and controllers == "") or (hierarchy == "v1" and "memory" in controllers.split(",")):
            folder = root / path.strip("/")
            return [folder, *[parent for parent in folder.parents if parent.is_relative_to(root)]]
    return [root]


def _process_bytes(field: str) -> int | None:
    """A `Vm...` line of /proc/self/status in bytes (VmSize: the address space this process has mapped)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def memory_limits(cgroup_root: Path = Path("/sys/fs/cgroup")) -> dict[str, int]:
    """Bytes this process may still allocate under each limit that applies, by name: `MemAvailable` (the
    kernel's estimate for the whole machine), the cgroup's limit minus its usage (v2 `memory.max`, at this
    process's cgroup and every ancestor; v1 `memory.limit_in_bytes`), and `ulimit -v` (`RLIMIT_AS` minus the
    address space already mapped) / `ulimit -d` (`RLIMIT_DATA`)."""

    limits: dict[str, int] = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                limits["MemAvailable"] = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    for folder in _own_cgroup_dirs(cgroup_root, "v2"):
        limit, used = _read_int(folder / "memory.max"), _read_int(folder / "memory.current")
        if limit is not None and used is not None:
            limits["cgroup memory.max"] = min(limits.get("cgroup memory.max", limit - used), limit - used)
    for folder in _own_cgroup_dirs(cgroup_root / "memory", "v1"):
        limit, used = _read_int(folder / "memory.limit_in_bytes"), _read_int(folder / "memory.usage_in_bytes")
        if limit is not None and used is not None and limit < 2**60:  # v1 writes "no limit" as a huge number
            limits["cgroup memory.limit_in_bytes"] = limit - used
    for name, which, field in (("ulimit -v", resource.RLIMIT_AS, "VmSize"),
                               ("ulimit -d", resource.RLIMIT_DATA, "VmData")):
        soft, _ = resource.getrlimit(which)
        mapped = _process_bytes(field)
        if soft != resource.RLIM_INFINITY and mapped is not None:
            limits[name] = soft - mapped
    return {name: max(0, value) for name, value in limits.items()}


def available_memory() -> int | None:
    """Bytes this process may still allocate: the smallest of `memory_limits()`, or None when none is known."""
    limits = memory_limits()
    return min(limits.values()) if limits else None


def gib(count: int) -> str:
    """Bytes as GiB with one decimal (MiB below 1 GiB), for messages."""
    return f"{count / GiB:.1f} GiB" if count >= GiB else f"{count / 2**20:.0f} MiB"


def device_memory(device: torch.device) -> tuple[int | None, str | None]:
    """Bytes a CUDA device can still give this process — free on the device (`torch.cuda.mem_get_info`) plus
    what PyTorch's caching allocator holds unused — and what the number is; (None, None) for other devices (the
    CPU's limits are `memory_limits`; an Apple GPU's memory is the machine's and is not planned for)."""
    if device.type != "cuda":
        return None, None
    free, _ = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return free + cached, f"free on {device}"


def _available(device: torch.device | None = None) -> tuple[int | None, str | None]:
    if device is not None and device.type != "cpu":
        return device_memory(device)
    limits = memory_limits()
    if not limits:
        return None, None
    name = min(limits, key=limits.get)
    return limits[name], name


def _estimate(work: str, line: _Line, batch_size: int, requested: int, sample_shape: Sequence[int],
              state: int, extra: Callable[[int], int], available: tuple[int | None, str | None],
              device: str = "cpu") -> MemoryEstimate:
    tensors = line.at(batch_size) + extra(batch_size)
    peak = int(OVERHEAD_FACTOR * (tensors + state)) + OVERHEAD_BYTES
    return MemoryEstimate(work, batch_size, requested, tuple(sample_shape), tensors, state, peak, line.method,
                          *available, device=device)


def _no_extra(batch_size: int) -> int:
    return 0


def estimate(model: nn.Module, sample_shape: Sequence[int], batch_size: int, work: str = "inference",
             training: bool = False, state_bytes: int = 0,
             extra: Callable[[int], int] = _no_extra) -> MemoryEstimate | None:
    """The estimated peak of `work` on `model` at `batch_size` for inputs of `sample_shape` (C, H, W); with
    `training`, one Adam step (forward, loss, backward, two moments per parameter). `extra(batch)` adds tensors
    the loop makes besides the model's (a profile's per-batch contributions). Planned against the memory of the
    model's device: the CPU's limits, or what a CUDA device has free (the same trace on `meta`; the allocator
    factor measured on the CPU is kept, which errs on the safe side). None when the model cannot run here, or
    lives on a device whose memory is not known (an Apple GPU)."""
    devices = {p.device for p in model.parameters()} or {torch.device("cpu")}
    if len(devices) > 1 or next(iter(devices)).type not in ("cpu", "cuda"):
        return None
    device = next(iter(devices))
    line = _line(model, sample_shape, training)
    if line is None:
        return None
    state = state_bytes + (2 * _parameter_bytes(model) if training else 0)
    # The DataLoader stacks a batch from the samples: the list and the batch are both alive for a moment.
    sample_bytes = 4 * int(torch.Size(sample_shape).numel())
    result = _estimate(work, line, batch_size, batch_size, sample_shape, state,
                       lambda batch: extra(batch) + sample_bytes * batch, _available(device), str(device))
    log.info(result.describe())
    return result


def largest_fitting_batch(result: MemoryEstimate, model: nn.Module, training: bool,
                          extra: Callable[[int], int] = _no_extra, headroom: int = 0) -> int:
    """The largest batch size up to `result.batch_size` whose estimate fits the memory available, less
    `headroom` bytes (0: none)."""
    if result.available_bytes is None:
        return result.batch_size
    line = _line(model, result.input_shape, training)
    sample_bytes = 4 * int(torch.Size(result.input_shape).numel())
    budget = USABLE_SHARE * result.available_bytes - headroom

    def peak(batch: int) -> int:
        tensors = line.at(batch) + extra(batch) + sample_bytes * batch
        return int(OVERHEAD_FACTOR * (tensors + result.state_bytes)) + OVERHEAD_BYTES

    low, high = 0, result.batch_size  # peak(low) fits (0 trivially), find the last batch that does
    while low < high:
        middle = (low + high + 1) // 2
        if peak(middle) <= budget:
            low = middle
        else:
            high = middle - 1
    return low


def _resized(result: MemoryEstimate, model: nn.Module, batch_size: int, training: bool,
             extra: Callable[[int], int]) -> MemoryEstimate:
    line = _line(model, result.input_shape, training)
    sample_bytes = 4 * int(torch.Size(result.input_shape).numel())
    return _estimate(result.work, line, batch_size, result.requested_batch_size, result.input_shape,
                     result.state_bytes, lambda batch: extra(batch) + sample_bytes * batch,
                     (result.available_bytes, result.limit), result.device)


def plan_training(model: nn.Module, sample_shape: Sequence[int], batch_size: int, auto_batch: bool = False,
                  name: str = "the model", samples: int | None = None) -> MemoryEstimate | None:
    """Check, before training starts, that a training step at `batch_size` (at most `samples`, the size of the
    training data) fits in memory. When it does not: with `auto_batch`, the largest batch size that fits is
    chosen (and logged); without, a ModellegoError says the estimate, what is available and which `--batch-size`
    would fit. Returns the estimate used (None when none could be made)."""
    requested = batch_size
    batch_size = min(batch_size, samples) if samples else batch_size
    result = estimate(model, sample_shape, batch_size, f"training {name}", training=True)
    if result is None or result.fits:
        return result
    shape = "×".join(map(str, sample_shape))
    batch = f"batch size {batch_size}" + (f" (all {samples} training images)" if batch_size < requested else "")
    available = f"the {gib(result.available_bytes)} available ({result.limit})"
    fitting = largest_fitting_batch(result, model, training=True)
    # The batch size suggested for a rerun leaves room: a new process finds a little more or less free (measured:
    # 78 to 95 MiB under `ulimit -v 4000000`), and must still pass this check. --auto-batch, which is not checked
    # again, takes half the largest that fits where that room is not there (oneDNN's workspaces come on top:
    # measured, batch 84 failed where 46 ran).
    headroom = SUGGESTION_HEADROOM if result.limit == "ulimit -v" else 0  # where the variation was measured
    suggested = largest_fitting_batch(result, model, training=True, headroom=headroom)
    if fitting < 1:
        raise ModellegoError(
            f"training {name} on {shape} inputs needs about {gib(result.peak_bytes)} of memory at {batch} and still "
            f"about {gib(_resized(result, model, 1, True, _no_extra).peak_bytes)} at batch size 1, more than "
            f"{available}; use smaller images (--image-size), a smaller --width, or a machine with more memory")
    if not auto_batch:
        advice = (f"--batch-size {suggested} fits (about "
                  f"{gib(_resized(result, model, suggested, True, _no_extra).peak_bytes)}), or --auto-batch chooses "
                  "the same" if suggested else
                  f"memory is too tight to name a --batch-size that will still fit when rerun (about {fitting} fits "
                  "now): --auto-batch chooses one as training starts")
        raise ModellegoError(f"training {name} on {shape} inputs needs about {gib(result.peak_bytes)} of memory at "
                             f"{batch}, more than {available}; {advice}")
    chosen = _resized(result, model, suggested or max(1, fitting // 2), True, _no_extra)
    log.info(chosen.describe())
    return chosen


def fit_inference(model: nn.Module, sample_shape: Sequence[int], batch_size: int, work: str = "inference",
                  state_bytes: int = 0, extra: Callable[[int], int] = _no_extra, samples: int | None = None) -> int:
    """The batch size to run inference (`model` in eval mode, no gradients) with: `batch_size` (at most
    `samples`, the number of inputs) when its estimate fits the memory available, else the largest that fits,
    with a one-line warning. Never below 1: a batch of one that does not fit is tried anyway (there is nothing
    smaller to fall back on)."""
    if samples:
        batch_size = min(batch_size, samples)
    result = estimate(model, sample_shape, batch_size, work, state_bytes=state_bytes, extra=extra)
    if result is None or result.fits:
        return batch_size
    fitting = max(1, largest_fitting_batch(result, model, training=False, extra=extra))
    chosen = _resized(result, model, fitting, False, extra)
    warnings.warn(f"{work} at batch size {batch_size} needs about {gib(result.peak_bytes)}, more than the "
                  f"{gib(result.available_bytes)} available ({result.limit}); using batch size {fitting} "
                  f"(about {gib(chosen.peak_bytes)})", stacklevel=3)
    log.info(chosen.describe())
    return fitting


def sample_shape_of(dataset) -> tuple[int, ...] | None:
    """The shape of one input of a map-style dataset (reads its first sample), or None when it has none."""
    try:
        if len(dataset) == 0:
            return None
        sample = dataset[0][0]
    except Exception:  # noqa: BLE001 - an unreadable dataset is reported by the loop that reads it
        return None
    return tuple(sample.shape) if isinstance(sample, torch.Tensor) else None

