"""Atomic file writes: a file is written beside its target under a hidden temporary name, flushed, then renamed
over it, so a crash at any moment leaves the old file or the new one, never a half-written one."""

from __future__ import annotations

import errno
import os
import secrets
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import torch

from dimba.errors import DiskError

TEMP_PREFIX = "."  # temporaries are hidden: ".NAME.<random>.tmp"
_FULL = "free some disk space"
_LOCKED = "make the folder writable"
# errno -> (what happened, the remedy) of a write that failed for want of space or permission
DISK_ERRORS = {errno.ENOSPC: ("no space left on the device", _FULL), errno.EDQUOT: ("disk quota exceeded", _FULL),
               errno.EROFS: ("the file system is read-only", _LOCKED), errno.EACCES: ("permission denied", _LOCKED),
               errno.EPERM: ("operation not permitted", _LOCKED)}


def as_disk_error(exc: OSError, path: str | Path | None = None, then: str = "or write elsewhere") -> DiskError | None:
    """The one-line `DiskError` of an OSError of `DISK_ERRORS` raised while writing ``path`` (default: the file the
    error names), naming the problem and the remedy, followed by ``then`` (what else to do, or what was kept);
    None for another OSError."""
    if exc.errno not in DISK_ERRORS:
        return None
    what, remedy = DISK_ERRORS[exc.errno]
    where = path if path is not None else exc.filename
    return DiskError(f"cannot write {str(where)!r}: {what} ({errno.errorcode[exc.errno]}): {remedy}, {then}")


@contextmanager
def disk_errors(path: str | Path, then: str = "or write elsewhere") -> Iterator[None]:
    """Raise an OSError of `DISK_ERRORS` from inside the block, which writes ``path``, as its `DiskError`
    (`as_disk_error`)."""
    try:
        yield
    except OSError as exc:
        error = as_disk_error(exc, path, then)
        if error is None:
            raise
        raise error from None


class _KeptErrors:
    """A binary file that keeps the OSError of a failed write: torch.save reports a full disk as a RuntimeError
    ("unexpected pos"), which would hide it."""

    def __init__(self, fh: IO[bytes]):
        self.fh, self.error = fh, None

    def write(self, data) -> int:
        try:
            return self.fh.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        self.fh.flush()


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], Any], sync: bool = False) -> Path:
    """Create ``path`` (and its folder) atomically from ``write(file)``, which writes bytes into an open binary
    file; with ``sync`` the bytes reach the disk before the rename (for checkpoints). Returns the path. A full disk
    or a read-only folder is a one-line `DiskError`, the old file (if any) left as it was."""
    path = Path(path)
    tmp = path.with_name(f"{TEMP_PREFIX}{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    with disk_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with open(tmp, "xb") as fh:  # "x": a fresh file with the usual permissions
                kept = _KeptErrors(fh)
                try:
                    write(kept)
                except Exception:
                    if kept.error is not None:
                        raise kept.error from None
                    raise
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
