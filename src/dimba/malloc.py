"""Keep freed tensor memory in the process instead of handing it back to the OS (glibc only).

glibc's ``malloc`` serves blocks above its mmap threshold (dynamic, at most 32 MiB) with a fresh
``mmap`` and unmaps them on ``free``. A CPU training step allocates and frees many such blocks
(activations, gradients, the scan's work tensors), so every one of them is page-faulted in again,
4 KiB at a time, on each step: one bidirectional Mamba-2 layer at batch 8 x 2048 tokens spent
about a third of its forward+backward time there. :func:`keep_freed_memory` tells glibc to serve
every block from its heap and to return only very large free tails, which is what the jemalloc /
tcmalloc preloads recommended for PyTorch on CPU achieve. The cost is that the resident size
stays near its peak after large transient allocations.

Importing ``dimba.backbones`` (which ``import dimba`` does) calls it, so library users get it as
the ``dimba`` command does; ``DIMBA_SYSTEM_MALLOC=1`` in the environment before the import leaves
glibc's defaults alone. Its cost is memory: one SharedBiMamba2 layer at batch 8 x 2048 tokens
(forward+backward, 1 thread) peaks at 1,294 MiB RSS against 1,086 with glibc's defaults (+19%),
and runs in 1.02 s against 1.64 s; BENCHMARKS.md has the figures at other lengths.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_TRIM_THRESHOLD = 2**31 - 1  # bytes (the largest int mallopt takes): free heap tails below ~2 GiB stay mapped


def freed_memory_kept() -> bool:
    """Whether :func:`keep_freed_memory` has applied its setting in this process."""
    return keep_freed_memory.cache_info().currsize > 0 and keep_freed_memory()


@functools.cache
def keep_freed_memory() -> bool:
    """Configures glibc malloc to reuse freed memory (see the module docstring); idempotent.

    Returns True when the setting was applied, False where it does not apply: not glibc (macOS,
    Windows, musl), or ``DIMBA_SYSTEM_MALLOC=1`` in the environment.
    """
    if os.environ.get("DIMBA_SYSTEM_MALLOC", "") not in ("", "0") or not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None)  # the symbols already loaded into this process, the C library's among them
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):  # not glibc (musl)
        return False
    libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    # No mmap-served blocks: glibc still maps memory itself if the heap cannot grow.
    return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))
