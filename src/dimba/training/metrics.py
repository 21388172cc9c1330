"""Metrics of a run: one ``metrics.csv`` (always) plus TensorBoard or W&B when asked for."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from dimba.errors import UsageError
from dimba.io import atomic_write_text, disk_errors


def columns(metrics: tuple[str, ...]) -> list[str]:
    """The CSV columns of a run whose family logs the loss parts ``metrics`` (`Family.metrics`)."""
    return ["step", *metrics, "lr", "grad_norm", "tokens_per_s", "elapsed_s", *(f"val_{m}" for m in metrics),
            "bad_steps"]


class MetricsLog:
    """Appends rows ``{step, metric: value}`` under the columns of the family's ``metrics``; unknown metric names
    are an error (a typo must not vanish).

    ``resume_step`` continues an existing file: the rows up to that step are kept (rewritten under
    the current columns), later ones, logged by a run that died after its last checkpoint, dropped.
    """

    def __init__(self, path: Path, metrics: tuple[str, ...], resume_step: int | None = None, enabled: bool = True,
                 logger: str = "none"):
        self.enabled = enabled
        self.columns = columns(metrics)
        self._file = None
        self._tracker = None
        if not enabled:
            return
        rows = []
        if resume_step is not None and path.is_file():
            with open(path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if (r.get("step") or "").isdigit() and int(r["step"]) <= resume_step]
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, fieldnames=self.columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(path, text.getvalue())
        self.path = path
        self._file = open(path, "a", newline="")
        self._writer = csv.DictWriter(self._file, fieldnames=self.columns)
        if logger != "none":
            self._tracker = _make_tracker(logger, path.parent)

    def write(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        unknown = set(values) - set(self.columns)
        if unknown:
            raise KeyError(f"metrics not in the CSV schema: {sorted(unknown)}")
        with disk_errors(self.path):
            self._writer.writerow({"step": step, **{k: f"{v:.6g}" for k, v in values.items()}})
            self._file.flush()
        if self._tracker is not None:
            self._tracker.log_metrics(values, step=step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tracker is not None:
            self._tracker.finalize("success")


def _make_tracker(kind: str, run_dir: Path):
    try:
        if kind == "tensorboard":
            from lightning_fabric.loggers import TensorBoardLogger

            return TensorBoardLogger(root_dir=str(run_dir), name="tensorboard")
        import wandb

        class _WandB:
            def __init__(self):
                self.run = wandb.init(project="dimba", dir=str(run_dir))

            def log_metrics(self, values, step):
                self.run.log(values, step=step)

            def finalize(self, status):
                self.run.finish()

        return _WandB()
    except ImportError:
        raise UsageError(f"train.logger={kind} needs its package: pip install 'dimba[track]'") from None
