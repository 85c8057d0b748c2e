"""What a modellego process knows and sets up before any work, without importing torch: whether a launcher
started it, and malloc's arenas under an address-space limit."""

from __future__ import annotations

import os
import resource


def launched() -> bool:
    """Whether torchrun (or another launcher) started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


M_ARENA_MAX = -8  # glibc's mallopt parameter: the most malloc arenas the process may create


def limit_malloc_arenas() -> bool:
    """Under an address-space limit (`ulimit -v`), let every thread share one malloc arena: glibc otherwise
    reserves 64 MiB of address space per thread's arena (measured: with 2 threads, training at batch 200 ran out
    under a limit where batch 100 ran; with one arena, batch 400 ran), which the planner's estimate of allocated
    memory does not see. Returns whether it was set (glibc only; nothing to do without such a limit)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY or os.environ.get("MALLOC_ARENA_MAX"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        return bool(libc.mallopt(M_ARENA_MAX, 1))
    except (OSError, AttributeError):  # not glibc
        return False
