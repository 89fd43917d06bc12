"""glibc's malloc settings for the processes that run a model on the CPU: the training workers and the service.

glibc maps every allocation above its mmap threshold on its own and unmaps it when it is freed, and it gives the
free top of its heap back to the system above its trim threshold; the kernel then zeroes every page of the next
such allocation again at its first touch. The thresholds start at 128 KiB and rise as big blocks are freed, but not
beyond 32 MiB, and fixing one of them pins the other. A forward and backward pass allocates its activations and
gradients afresh at every step, most of them several MiB (AE1, a batch of 32 slices of 64 x 64: 16 MiB per
activation in bf16), so with the defaults a CPU training step spends much of its time in page faults.

Standard library only (ctypes), so that the bare GPU script can import `steps`, which uses it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
from typing import Any

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4
"""glibc's mallopt parameters (malloc.h)."""
TRAINING_TRIM_THRESHOLD = 256 * 2**20
"""Free heap a training process keeps at its top: more than one step's activations and gradients need."""


@functools.cache
def libc() -> Any:
    """The C library, where it is glibc (it has malloc_trim and mallopt); None elsewhere (musl, macOS)."""
    name = ctypes.util.find_library("c")
    try:
        found = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return found if found is not None and hasattr(found, "malloc_trim") and hasattr(found, "mallopt") else None


def mallopt(*settings: tuple[int, int]) -> bool:
    """Apply (parameter, value) settings in order; False where the C library is not glibc or refuses one."""
    found = libc()
    return found is not None and all(found.mallopt(parameter, value) for parameter, value in settings)


def _left_to_glibc() -> bool:
    """MRI_PLATFORM_MALLOC=default: training processes keep glibc's own malloc settings."""
    return os.environ.get("MRI_PLATFORM_MALLOC", "").strip().lower() == "default"


def keep_training_memory() -> bool:
    """For a training process on the CPU: every allocation from the heap (no mmap), and the heap's free top kept up
    to `TRAINING_TRIM_THRESHOLD`, so that each step reuses the memory of the step before.

    Measured in one process, one thread, AMD EPYC, bf16, batch 32 of 64 x 64, 8 s, three runs each: AE1 150-162
    img/s with glibc's defaults against 197-203 with these settings (0.96-1.32 M page faults against 0.14 M); the
    U-Net (32) 77-83 against 93-98. The process keeps its peak step's memory for its life, which a worker that only
    trains does anyway. Off with MRI_PLATFORM_MALLOC=default. False where nothing was set."""
    if _left_to_glibc():
        return False
    return mallopt((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, TRAINING_TRIM_THRESHOLD))


def training_worker_env() -> dict[str, str]:
    """Environment variables for a CPU training worker's process, which glibc reads as the process starts: one malloc
    arena for all its threads. Ray Train runs the training loop in a thread of its own, and glibc gives such a thread
    a secondary arena of 64 MiB heaps; in some processes, by the luck of that arena's layout, a step then maps and
    zeroes thousands of pages again in spite of `keep_training_memory`. Measured on AMD EPYC, AE1 steps of 16 slices
    in a thread, one process each: fp32, 3 processes in 8 faulted 2,500-24,000 times a step (the others under 1),
    against at most 1,636 with one arena in 6; bf16, 2 in 6 at ~6,800 a step and 305 img/s against 400, none of 5
    with one arena. Empty with MRI_PLATFORM_MALLOC=default."""
    return {} if _left_to_glibc() else {"MALLOC_ARENA_MAX": "1"}


def trim() -> None:
    """Give the free pages of every heap back to the system (glibc's malloc_trim)."""
    found = libc()
    if found is not None:
        found.malloc_trim(0)
