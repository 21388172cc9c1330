"""The names of a run's training checkpoints in ``RUN/checkpoints/``: ``last.ckpt``, ``step-N.ckpt`` and
``best.ckpt`` (single files), or, for FSDP runs, sharded ``step-N.dcp/`` / ``last-N-*.dcp/`` directories named by
``last.json`` and ``best.dcp/``."""

from __future__ import annotations

import shutil
from pathlib import Path

CKPT_SUBDIR = "checkpoints"
LAST_CKPT = "last.ckpt"
LAST_POINTER = "last.json"  # of FSDP runs: names the latest sharded checkpoint directory
BEST_CKPT, BEST_DCP = "best.ckpt", "best.dcp"  # the state at the best validation score (train.save_best)


def run_of_checkpoint(path: str | Path) -> tuple[Path, Path] | None:
    """(RUN, checkpoint) when ``path`` names one checkpoint in a run's checkpoints/ (``RUN/checkpoints/best.ckpt``,
    ``step-N.ckpt``, ``last.ckpt`` or an FSDP run's ``*.dcp`` directory); None for any other path."""
    given = Path(path)
    if given.parent.name == CKPT_SUBDIR and given.suffix in (".ckpt", ".dcp"):
        return given.parent.parent, given
    return None


def has_checkpoint(folder: Path) -> bool:
    """Whether ``folder`` (a run's checkpoints/) holds a training checkpoint: last.ckpt, or last.json (FSDP runs)."""
    return (folder / LAST_CKPT).is_file() or (folder / LAST_POINTER).is_file()


def remove_partial_saves(folder: Path) -> None:
    """Delete the temporaries of checkpoint saves that a crash interrupted in ``folder``: ``.NAME.ckpt.*`` files,
    ``.NAME.dcp.*`` directories of sharded checkpoints and ``.last.json.*`` pointers."""
    for tmp in [*folder.glob(".*.ckpt.*"), *folder.glob(f".{LAST_POINTER}.*")]:
        tmp.unlink(missing_ok=True)
    for tmp in folder.glob(".*.dcp.*"):
        shutil.rmtree(tmp, ignore_errors=True)
