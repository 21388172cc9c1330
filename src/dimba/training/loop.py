"""fit(): the training loop on Lightning Fabric (AdamW, warmup + cosine, clipping, accumulation, EMA).

`dimba.training.setup.setup` builds the `TrainState`, `dimba.training.step.train_step` takes one step,
`dimba.training.checkpoint.save_checkpoint` writes what a bitwise-identical continuation needs; this module
repeats them, validates and logs.
"""

from __future__ import annotations

import sys
from pathlib import Path

from tqdm.auto import tqdm

from dimba.config import Config
from dimba.errors import DimbaError
from dimba.training.checkpoint import save_checkpoint, save_if_best
from dimba.training.finetune import finetune_config
from dimba.training.metrics import MetricsLog
from dimba.training.setup import TrainState, setup
from dimba.training.step import StepResult, train_step, validate


class DivergenceError(DimbaError):
    """Training stopped after ``train.max_bad_steps`` consecutive steps with a non-finite loss or gradient norm."""


def fit(cfg: Config, run_dir: str | Path, resume: bool = False, progress: bool = True) -> Path:
    """Train a model in ``run_dir`` (created, or continued with ``resume``); returns the run dir.

    The run dir receives config.yaml, tokenizer.json, metrics.csv and checkpoints/ (last.ckpt plus periodic
    step-N.ckpt and, with ``train.save_best``, best.ckpt at the best validation score, each written atomically;
    under FSDP sharded directories and last.json, their pointer).
    Generation and export use the EMA weights. On resume, the checkpoint's state continues bitwise exactly (on
    CPU), with ``train.lr`` of ``cfg``; ``cfg`` itself is never changed.

    Skipped steps (a non-finite loss or gradient norm on any rank, see `train_step`) are counted in the
    ``bad_steps`` column; no periodic checkpoint is written until a good step follows; after
    ``train.max_bad_steps`` bad steps in a row `DivergenceError` stops the run, leaving the last good checkpoint.

    With ``train.devices`` x ``train.num_nodes`` > 1, ``train.batch_size`` is per process: each rank trains on its
    own slice of every global batch; logged losses are averaged over ranks; validation, logging and checkpoints
    happen on rank 0 (``train.strategy=fsdp``: every rank validates, and writes its own shards). Fabric starts
    the extra processes by re-running the command line, or joins those that ``torchrun`` / SLURM started, so call
    ``fit`` from a script, not an interactive session.
    """
    ts = setup(cfg, run_dir, resume)
    tc, zero = ts.cfg.train, ts.fabric.is_global_zero
    log = MetricsLog(ts.run_dir / "metrics.csv", ts.metrics, resume_step=ts.step if resume else None,
                     enabled=zero, logger=tc.logger)
    validates = zero or ts.sharded  # DDP: rank 0 alone; FSDP: all ranks (logging stays on rank 0)
    if ts.step == 0 and validates:
        log.write(0, validate(ts))
    ts.clock.restart()
    bar = tqdm(total=tc.max_steps, initial=ts.step, disable=not (progress and zero), desc="train", dynamic_ncols=True)
    reason, start_step = "max_steps", ts.step
    try:
        while ts.step < tc.max_steps:
            result = train_step(ts)
            _report(ts, result, start_step, bar, log)
            out_of_time = tc.max_time is not None and ts.clock.now >= tc.max_time * 60
            if validates and (ts.step % tc.eval_every == 0 or ts.step == tc.max_steps or out_of_time):
                val = validate(ts)
                log.write(ts.step, val)
                if tc.save_best:
                    save_if_best(ts, val)
                if zero:
                    shown = ", ".join(f"{k} {v:.4f}" for k, v in val.items())
                    bar.write(f"step {ts.step}: {shown}", file=sys.stderr)
            if ts.step % tc.save_every == 0 and ts.bad_streak == 0:
                save_checkpoint(ts)
            if out_of_time:
                reason = f"max_time ({tc.max_time} min)"
                break
    finally:
        bar.close()
        log.close()
    save_checkpoint(ts, final=True)
    if zero and progress:
        print(f"stopped at step {ts.step} ({reason}); run saved in {ts.run_dir}", file=sys.stderr)
    return ts.run_dir


def _report(ts: TrainState, result: StepResult, start_step: int, bar, log: MetricsLog) -> None:
    """Progress bar and metrics of a step; a skipped step is announced, and too many in a row stop the run."""
    tc = ts.cfg.train
    if not result.applied:
        bar.write(f"step {ts.step}: non-finite {'gradient norm' if result.loss_ok else 'loss'}, update skipped "
                  f"({ts.bad_streak} in a row)", file=sys.stderr)
    tokens_per_step = tc.batch_size * tc.grad_accum * ts.cfg.data.seq_len * ts.fabric.world_size
    tok_s = (ts.step - start_step) * tokens_per_step / max(ts.clock.now - ts.clock.before, 1e-9)
    parts = result.parts
    bar.update(1)
    bar.set_postfix(loss=f"{float(parts['loss']):.3f}", ce=f"{float(parts['ce']):.2f}", tok_s=f"{tok_s:,.0f}")
    if ts.step % tc.log_every == 0 or ts.step == tc.max_steps or not result.applied:
        row = {k: float(v) for k, v in parts.items()}
        lr = ts.scheduler.get_last_lr()[-1]  # train.lr's schedule (with Muon, AdamW's groups come last)
        row.update(lr=lr, tokens_per_s=tok_s, elapsed_s=ts.clock.now, bad_steps=ts.bad_total,
                   grad_norm=float(result.grad_norm) if result.grad_norm is not None else float("nan"))
        log.write(ts.step, row)
    if ts.bad_streak >= tc.max_bad_steps:
        then = (f"the last good checkpoint (step {ts.saved_step}) is kept: resume it with "
                f"`dimba train --resume {ts.run_dir} train.lr=...`" if ts.saved_step is not None else
                "no checkpoint was written yet: train again in a new --out")
        raise DivergenceError(
            f"training diverged: {ts.bad_streak} consecutive steps (up to step {ts.step}) had a non-finite loss or "
            f"gradient norm; lower train.lr (now {tc.lr:g}) or raise train.warmup_steps; {then}")


def finetune(init: str | Path, method: str, data: str, out: str | Path, overrides: list[str] = (),
             progress: bool = True) -> Path:
    """Fine-tune the run ``init`` with ``method`` (sft, dpo, ipo, simpo, grpo) on ``data`` (a JSON-lines file or
    ``task:NAME``) into the new run ``out`` (`fit` with the config of `finetune_config`); returns it. Continue an
    interrupted one with ``fit(load_run_config(out / "config.yaml"), out, resume=True)``."""
    return fit(finetune_config(init, method, data, overrides), out, progress=progress)
