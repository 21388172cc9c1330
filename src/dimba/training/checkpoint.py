"""Training checkpoints: everything a bitwise-identical continuation needs (weights, EMA, optimizer, scheduler,
step, every rank's RNG states, the clock, bad-step counts, the stream position), written atomically, and read back
for a resume.

Nothing here unpickles arbitrary objects: the state is read with ``torch.load(weights_only=True)``. FSDP runs
write sharded checkpoints (`dimba.training.sharded`), whose pickled DCP ``.metadata`` is read with an unpickler
restricted to DCP's own classes.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from dimba.errors import CheckpointError, DiskError
from dimba.export import mismatch
from dimba.io import atomic_save
from dimba.training import sharded
from dimba.training.files import BEST_CKPT, BEST_DCP, CKPT_SUBDIR, LAST_CKPT, remove_partial_saves
from dimba.training.fsdp import shard_optimizer_state
from dimba.training.optimizers import peak_lrs
from dimba.training.rng import rng_state, set_rng_state


def latest_checkpoint(folder: Path) -> Path:
    """The latest training checkpoint in ``folder`` (a run's checkpoints/): the sharded checkpoint directory that
    last.json points to (FSDP runs), otherwise last.ckpt (which may not exist)."""
    return sharded.latest(folder) or folder / LAST_CKPT


_STATE_KEYS = ("model", "ema", "optimizer", "scheduler", "step", "rng")


def load_training_state(path: Path) -> dict[str, Any]:
    """Read a training checkpoint written by `atomic_save` (tensors and plain containers only: a file
    that would run code when unpickled is refused without running it). For a sharded checkpoint (a directory)
    it reads the per-run state only, with ``"sharded"``: its path; the shards are loaded by `dimba.training.sharded.load`."""
    if path.is_dir() and path.suffix == ".dcp":
        return sharded.read_run_state(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} not found: pass a run directory that holds checkpoints/{LAST_CKPT}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user-facing problem
        raise CheckpointError(f"checkpoint {str(path)!r} is unreadable or not a dimba checkpoint ({type(exc).__name__}): "
                              "resume from another checkpoint") from None
    missing = [key for key in _STATE_KEYS if not isinstance(state, dict) or key not in state]
    if missing:
        raise CheckpointError(f"checkpoint {str(path)!r} is not a dimba training checkpoint (no {missing[0]!r} entry): "
                              "resume from another checkpoint")
    return state


def check_state_fits(model, shapes: dict[str, tuple[int, ...]], run: str | Path) -> None:
    """Raise a one-line `CheckpointError` unless a state dict with ``shapes`` (name -> shape) of run ``run`` loads
    strictly into ``model`` (built from the run's config.yaml)."""
    problem = mismatch(model, shapes, complete=True)
    if problem:
        raise CheckpointError(f"the checkpoint of {str(run)!r} does not fit its config.yaml ({problem}; was "
                              "config.yaml edited, e.g. model.family?): restore the run's config.yaml or retrain")


def _restore(state: dict[str, Any], optimizer, scheduler, tc) -> None:
    """Load a checkpoint's optimizer (a single-file one's: into this rank's shards under FSDP; a sharded one's
    is loaded already), scheduler and RNG states (the weights and EMA of a single file are loaded before
    sharding). This run's peak learning rates (``train.lr``, ``train.muon_lr`` of the `TrainConfig` ``tc``)
    replace the stored ones, so that a resumed run can lower them."""
    if "optimizer" in state:
        optimizer.load_state_dict(shard_optimizer_state(state["optimizer"], optimizer))
    scheduler.load_state_dict(state["scheduler"])
    scheduler.base_lrs = peak_lrs(tc, optimizer)
    for group, lr, f in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = lr * f(scheduler.last_epoch)  # as LambdaLR computes it: the same float when lr is unchanged
    set_rng_state(state["rng"])


def resume_training(ts, state: dict) -> None:
    """Continue the `TrainState` ``ts`` from checkpoint ``state``: counters, clock, sharded weights (a single
    file's are loaded before sharding), optimizer, schedule and RNG; then remove the temporaries of saves that a
    crash interrupted."""
    ts.step, ts.bad_total, ts.bad_streak = int(state["step"]), int(state.get("bad_steps", 0)), \
        int(state.get("bad_streak", 0))
    ts.saved_step = ts.step
    ts.best = state["best"] if isinstance(state.get("best"), dict) else None
    ts.clock.before = ts.clock.now = float(state.get("elapsed_s", 0.0))
    if state.get("sharded") is not None:  # each rank reads its shards into the sharded model, EMA and optimizer
        sharded.load(state["sharded"], ts.model, ts.ema, ts.optimizer.optimizer)
    _restore(state, ts.optimizer, ts.scheduler, ts.cfg.train)
    if ts.fabric.is_global_zero:
        remove_partial_saves(ts.run_dir / CKPT_SUBDIR)



def _run_state(ts, gather: bool) -> dict[str, Any]:
    """The per-run part of a checkpoint of the `TrainState` ``ts``: schedule, counters, clock, stream position, the
    best validation score so far and the RNG states (every rank's when ``gather``, a collective; else this rank's)."""
    rngs = [rng_state()]
    if gather and ts.fabric.world_size > 1:  # every rank's generators, so that a resume on as many ranks is exact
        rngs = [None] * ts.fabric.world_size
        torch.distributed.all_gather_object(rngs, rng_state())
    run_state = {"scheduler": ts.scheduler.state_dict(), "step": ts.step, "rng": rngs[0], "rng_ranks": rngs,
                 "elapsed_s": ts.clock.used(), "bad_steps": ts.bad_total, "bad_streak": ts.bad_streak}
    if ts.best is not None:
        run_state["best"] = dict(ts.best)
    position = ts.batches.saved_position()
    if position is not None:
        run_state["data_position"] = position  # streamed data: [epoch, document, offset]
    return run_state


def _blob(ts, run_state: dict[str, Any]) -> dict[str, Any]:
    """A single-file checkpoint of the `TrainState` ``ts``: weights, EMA, optimizer and ``run_state``."""
    return {"model": ts.model.state_dict(), "ema": ts.ema.state_dict(), "optimizer": ts.optimizer.state_dict(),
            **run_state}


def save_checkpoint(ts, final: bool = False) -> None:
    """Save the `TrainState` ``ts`` (collective: every rank calls it): ``last.ckpt``, and before it
    ``step-N.ckpt`` when the step is a multiple of ``train.save_every`` and the save is not the ``final`` one.
    FSDP runs write sharded checkpoints instead (every rank its shards)."""
    kept, ts.saved_step = ts.saved_step, ts.step
    run_state = _run_state(ts, gather=True)
    periodic = not final and ts.step % ts.cfg.train.save_every == 0
    folder = ts.run_dir / CKPT_SUBDIR
    if ts.sharded:  # every rank writes its shards
        sharded.save(ts.fabric, folder, periodic, ts.step, ts.model, ts.ema, ts.optimizer.optimizer, run_state)
        return
    if not ts.fabric.is_global_zero:
        return
    blob = _blob(ts, run_state)
    try:
        if periodic:  # before last.ckpt: a crash in between replays this step
            atomic_save(blob, folder / f"step-{ts.step:07d}.ckpt")
        atomic_save(blob, folder / LAST_CKPT)
    except DiskError as exc:  # the previous last.ckpt is untouched
        raise _disk_error(exc, kept, ts.run_dir) from None


def _disk_error(exc: DiskError, kept: int | None, run_dir: Path) -> DiskError:
    """``exc`` (a failed checkpoint write), saying which checkpoint of ``run_dir`` is intact (step ``kept``)."""
    then = (f"the checkpoint of step {kept} is intact: continue from it with `dimba train --resume {run_dir}`"
            if kept is not None else "no checkpoint was written")
    return DiskError(f"{exc}; {then}")


def best_score(val: dict[str, float]) -> tuple[str, float] | None:
    """The metric that ranks checkpoints among validation metrics ``val`` and its score (lower is better):
    ``val_loss``, or for a run without a loss (GRPO) ``val_reward``, negated; None if neither is there."""
    if "val_loss" in val:
        return "val_loss", float(val["val_loss"])
    if "val_reward" in val:
        return "val_reward", -float(val["val_reward"])
    return None


def save_if_best(ts, val: dict[str, float]) -> bool:
    """Write ``best.ckpt`` (FSDP: ``best.dcp/``, collective) in the run's checkpoints/ when the validation metrics
    ``val`` of step ``ts.step`` score better than every earlier validation of the run (`best_score`; a non-finite
    score never does), and remember the score in ``ts.best`` (saved with every later checkpoint, so that a
    resumed run goes on comparing). Called by every rank that validated; returns whether it wrote."""
    scored = best_score(val)
    better = scored is not None and math.isfinite(scored[1]) and (ts.best is None or scored[1] < ts.best["score"])
    if ts.sharded:  # every rank saves, or none
        better = ts.fabric.broadcast(better)
    if not better:
        return False
    ts.best = {"metric": scored[0], "score": scored[1], "step": ts.step}
    folder = ts.run_dir / CKPT_SUBDIR
    run_state = _run_state(ts, gather=False)  # not for resuming: this rank's generators are enough
    if ts.sharded:
        sharded.save(ts.fabric, folder, False, ts.step, ts.model, ts.ema, ts.optimizer.optimizer, run_state,
                     name=BEST_DCP)
    elif ts.fabric.is_global_zero:
        try:
            atomic_save(_blob(ts, run_state), folder / BEST_CKPT)
        except DiskError as exc:  # best.ckpt and last.ckpt as they were
            raise _disk_error(exc, ts.saved_step, ts.run_dir) from None
    return True
