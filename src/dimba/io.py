"""Atomic file writes: a file is written beside its target under a hidden temporary name, flushed, then renamed
over it, so a crash at any moment leaves the old file or the new one, never a half-written one."""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch

TEMP_PREFIX = "."  # temporaries are hidden: ".NAME.<random>.tmp"


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], Any], sync: bool = False) -> Path:
    """Create ``path`` (and its folder) atomically from ``write(file)``, which writes bytes into an open binary
    file; with ``sync`` the bytes reach the disk before the rename (for checkpoints). Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{TEMP_PREFIX}{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "xb") as fh:  # "x": a fresh file with the usual permissions
            write(fh)
            if sync:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` as UTF-8 to ``path`` atomically."""
    return atomic_write(path, lambda fh: fh.write(text.encode("utf-8")))


def atomic_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` of ``obj`` to ``path`` atomically, synced to disk before the rename."""
    return atomic_write(path, lambda fh: torch.save(obj, fh), sync=True)


def atomic_save_figure(fig, path: str | Path) -> Path:
    """Write the matplotlib figure ``fig`` to ``path`` as a PNG atomically, and close it."""
    import matplotlib.pyplot as plt

    try:
        return atomic_write(path, lambda fh: fig.savefig(fh, format="png", dpi=120))
    finally:
        plt.close(fig)
