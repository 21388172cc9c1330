"""Output files of the `dimba bench` commands: the ``--out PREFIX`` check (figures are written with
`dimba.io.atomic_save_figure`)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from dimba.errors import UsageError


def check_out(prefix: str | Path) -> tuple[Path, Path]:
    """PREFIX.json and PREFIX.png, after checking (before any work) that they can be written and that
    matplotlib is installed; one-line `UsageError`s otherwise."""
    if importlib.util.find_spec("matplotlib") is None:
        raise UsageError("--out draws a plot, which needs matplotlib: pip install 'dimba[plot]'")
    paths = Path(f"{prefix}.json"), Path(f"{prefix}.png")
    for path in paths:
        if path.is_dir():
            raise UsageError(f"--out {str(prefix)!r}: {str(path)!r} is a folder: choose another prefix")
        if path.parent.exists() and not path.parent.is_dir():
            raise UsageError(f"--out {str(prefix)!r}: {str(path.parent)!r} is a file, not a folder: choose another prefix")
    return paths
