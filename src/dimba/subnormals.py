"""Flush subnormal floats to zero on the CPU, in every intra-op thread (x86 FTZ / DAZ, Arm FZ).

A trained continuous denoiser decays its states strongly: inside the SSD scan the products of decays, readouts
and inputs fall below the smallest normal float (1.2e-38) and turn subnormal, and x86 cores compute on subnormal
operands far slower than on normal ones. The scan's within-chunk products then dominate the step: the README's
continuous model after 1,800 steps took 0.534 s a training step at 2 threads against 0.252 s with subnormals
flushed (BENCHMARKS.md, `bench/subnormals.py`), and a run slows down as it trains. Flushing changes only values
below 1.2e-38; TensorFlow flushes them on its CPU threads by default for the same reason.

``torch.set_flush_denormal`` sets the mode of the calling thread only. POSIX threads inherit the floating-point
environment of the thread that creates them, so the mode must be on before the first parallel operation creates
torch's intra-op threads. The mode is process state that also reaches Python's own float arithmetic on the
calling thread, so importing dimba leaves it alone: the ``dimba`` command runs inside :func:`flushed_subnormals`,
which restores the calling thread's mode on exit (the intra-op threads it started keep theirs); a Python user
wraps a script's work in it. ``DIMBA_KEEP_SUBNORMALS=1`` in the environment makes it a no-op.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch


def flushing() -> bool:
    """Whether the calling thread flushes subnormal results to zero now."""
    return float(torch.tensor(1e-30) * 1e-9) == 0.0  # a one-element product runs on the calling thread


@contextlib.contextmanager
def flushed_subnormals() -> Iterator[bool]:
    """Flush subnormals to zero in the calling thread, and in the intra-op threads torch starts meanwhile, until
    the block ends; the calling thread's mode is then restored. Yields whether the mode is on: False on a CPU
    without it or with ``DIMBA_KEEP_SUBNORMALS=1`` in the environment."""
    if os.environ.get("DIMBA_KEEP_SUBNORMALS", "") not in ("", "0"):
        yield False
        return
    before = flushing()
    on = bool(torch.set_flush_denormal(True))
    try:
        yield on
    finally:
        torch.set_flush_denormal(before)
