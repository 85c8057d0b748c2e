"""Several processes through torch.distributed, launched by torchrun (gloo on CPU, nccl on GPU): which process
this is, which batches are its own, and the reductions that make a sharded result equal the one-process result.
Without torchrun, or with one process, every function here is the identity and nothing is initialised."""

from __future__ import annotations

import os
from typing import Any, Sequence, TypeVar

import torch
import torch.distributed as dist

from modellego.errors import ModellegoError
from modellego.startup import launched

Item = TypeVar("Item")


def setup(backend: str | None = None) -> None:
    """Join the process group torchrun describes in the environment (RANK, WORLD_SIZE, MASTER_ADDR, ...);
    nothing when not launched or already joined. gloo on CPU, nccl when CUDA is there."""
    if not launched() or dist.is_initialized():
        return
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    try:
        dist.init_process_group(backend)
    except (RuntimeError, ValueError) as error:
        raise ModellegoError(f"could not join the torchrun process group ({error}); check --nnodes, "
                             "--node-rank and --rdzv-endpoint") from None


def check_device(device: torch.device) -> None:
    """Under torchrun, refuse a device the process group cannot use: NCCL (chosen when CUDA is there) moves CUDA
    tensors only, and each process has the GPU of its LOCAL_RANK."""
    if not active():
        return
    if dist.get_backend() == "nccl" and device.type != "cuda":
        raise ModellegoError(f"under torchrun on a machine with CUDA the processes talk through NCCL, which needs "
                             f"their models on their GPUs, not {device}; use --device auto, or hide the GPUs "
                             "(CUDA_VISIBLE_DEVICES=) to run on CPUs")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda" and device.index is not None and device.index != local % torch.cuda.device_count():
        raise ModellegoError(f"under torchrun each process takes the GPU of its LOCAL_RANK ({local} here), not "
                             f"{device}; use --device auto or cuda, and CUDA_VISIBLE_DEVICES to choose the GPUs")


def teardown() -> None:
    """Leave the process group (at the end of a command)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def active() -> bool:
    """Whether several processes share the work now."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Rank 0 writes files and prints; the others compute their share."""
    return rank() == 0


def own(items: Sequence[Item]) -> list[Item]:
    """This process's share of `items` (every world_size-th, from its rank): batches keep their composition,
    so each sample gives the same numbers as in one process."""
    return list(items[rank()::world_size()])


def sum_(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of `tensor` over all processes, in place (and returned)."""
    if active():
        device = tensor.device
        if dist.get_backend() == "nccl" and device.type != "cuda":
            moved = tensor.cuda()
            dist.all_reduce(moved)
            tensor.copy_(moved.to(device))
        else:
            dist.all_reduce(tensor)
    return tensor


def gather(value: Any) -> list[Any]:
    """Every process's `value`, in rank order (picklable objects; small ones: candidates, counts, errors)."""
    if not active():
        return [value]
    values: list[Any] = [None] * world_size()
    dist.all_gather_object(values, value)
    return values


def smallest(value: int) -> int:
    """The smallest of every process's `value`: a batch size each process sized to its own memory becomes one
    that fits all of them, so that the batches stay those of one process."""
    return min(gather(value)) if active() else value


def agree(error: Exception | None) -> None:
    """Raise on every process when any of them failed, so that none waits forever in a collective call."""
    if not active():
        if error is not None:
            raise error
        return
    messages = gather(None if error is None else str(error))
    failed = [message for message in messages if message is not None]
    if failed:
        if error is not None:
            raise error
        raise ModellegoError(failed[0])


def barrier() -> None:
    if active():
        dist.barrier()

