"""What `dimba train` and `dimba finetune` share: the run folder (a new one, or one to resume), the device check
and a new run that removes what it wrote when a user error stops it before its first checkpoint."""

from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path

import torch

from dimba.config import Config
from dimba.errors import DimbaError, UsageError

# the help of a model argument: what every command that loads a model takes (dimba.loading.load_for_inference)
MODEL_HELP = "run directory, one of its checkpoints (RUN/checkpoints/best.ckpt) or export folder"
HUB_MODEL_HELP = ("run directory, one of its checkpoints (RUN/checkpoints/best.ckpt), export folder or Hub model "
                  "OWNER/NAME")


def resolve_run_dir(args: argparse.Namespace) -> tuple[Path, bool]:
    """The run folder of ``--out`` / ``--resume`` and whether it is resumed; a one-line error for a folder that
    holds something else."""
    if args.resume is not None:
        given = args.resume if isinstance(args.resume, str) else args.out
        if not given or not (Path(given) / "config.yaml").is_file():
            raise UsageError(f"--resume: {given or '(no run given)'!r} is not a dimba run directory: "
                             "pass --resume runs/NAME (a folder with config.yaml and checkpoints/)")
        return Path(given), True
    run = Path(args.out) if args.out else Path("runs") / time.strftime("%Y%m%d-%H%M%S")
    if run.exists() and not run.is_dir():
        raise UsageError(f"--out {str(run)!r} is a file: choose a folder path for the run")
    if run.exists() and any(run.iterdir()):
        what = "another run" if (run / "config.yaml").exists() else "other files"
        raise UsageError(f"--out {str(run)!r} already holds {what}: pass --resume {run} to continue it or choose another --out")
    return run, False


def check_devices(cfg: Config, run_named: bool = True) -> None:
    """Refuse a device request this machine cannot serve, before Fabric starts one process per device; with
    several processes the run needs a named folder (each process re-runs the command, a default name would differ)."""
    tc = cfg.train
    mps = torch.backends.mps.is_available()
    kind = tc.accelerator
    if kind == "auto":
        kind = "cuda" if torch.cuda.is_available() else "mps" if mps else "cpu"
    available = {"cuda": torch.cuda.device_count(), "mps": int(mps), "cpu": os.cpu_count() or 1}[kind]
    if available == 0:
        raise UsageError(f"train.accelerator={kind} but this machine has no {kind} device: "
                         "set train.accelerator=auto (or cpu)")
    if tc.devices > available:
        raise UsageError(f"train.devices={tc.devices} but this machine has {available} {kind} device(s) "
                         f"({'cores' if kind == 'cpu' else 'GPUs'}): set train.devices={available} or fewer")
    if tc.devices * tc.num_nodes > 1 and not run_named:
        raise UsageError(f"training on {tc.devices * tc.num_nodes} devices needs a named run folder: pass --out RUN")


def fit_new_run(cfg: Config, run_dir: Path, progress: bool) -> None:
    """`fit` a new run; if a user error stops it before its first checkpoint, remove what it wrote."""
    from dimba.training import fit
    from dimba.training.files import CKPT_SUBDIR, has_checkpoint

    created = None if run_dir.exists() else run_dir  # the top-most folder that fit will create
    while created is not None and not created.parent.exists():
        created = created.parent
    try:
        fit(cfg, run_dir, resume=False, progress=progress)
    except DimbaError:
        if not has_checkpoint(run_dir / CKPT_SUBDIR):
            if created is not None:
                shutil.rmtree(created, ignore_errors=True)
            else:  # the folder was there, empty: empty it again
                for child in run_dir.iterdir():
                    if child.is_dir() and not child.is_symlink():
                        shutil.rmtree(child)
                    else:
                        child.unlink()
        raise


def launch(cfg: Config, args: argparse.Namespace, run_dir: Path, resume: bool) -> int:
    """What `dimba train` and `dimba finetune` do with their config: print it (``--print-config``), or check the
    devices and `fit` the run (resumed, or new and removed again if a user error stops it early)."""
    from dimba.config import dump_yaml
    from dimba.training import fit

    if args.print_config:
        print(dump_yaml(cfg), end="")
        return 0
    check_devices(cfg, run_named=resume or args.out is not None)
    if resume:
        fit(cfg, run_dir, resume=True, progress=not args.quiet)
    else:
        fit_new_run(cfg, run_dir, progress=not args.quiet)
    return 0
