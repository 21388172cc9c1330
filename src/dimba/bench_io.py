"""Output files of the `dimba bench` commands: the ``--out PREFIX`` check and atomic PNG writes."""

from __future__ import annotations

import importlib.util
import os
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


def save_figure(fig, path: Path) -> None:
    """Write the matplotlib figure ``fig`` to ``path`` as a PNG, atomically (drawn beside the target, then
    renamed over it), and close it."""
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fig.savefig(tmp, format="png", dpi=120)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
