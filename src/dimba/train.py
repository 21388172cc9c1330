"""fit(): the training loop on Lightning Fabric (AdamW, warmup + cosine, clipping, accumulation, EMA).

Checkpoints are atomic and hold all that a bitwise-identical continuation needs: weights, optimizer,
scheduler, EMA, step (the data position is ``step * grad_accum`` micro-batches, or with ``data.streaming``
the stream position) and every RNG state. FSDP runs write them sharded (`dimba.sharded`).
"""

from __future__ import annotations

import math
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning_fabric import Fabric
from torch.optim.swa_utils import AveragedModel
from tqdm.auto import tqdm

from dimba import sharded as sharded_ckpt
from dimba.checkpoint import (CKPT_SUBDIR as CKPT_DIR, LAST_CKPT, atomic_save, check_state_fits, latest_checkpoint,
                              load_training_state, remove_partial_saves)
from dimba.config import Config, dump_yaml
from dimba.data import prepare_data
from dimba.errors import DimbaError, UsageError
from dimba.fsdp import FORWARD_METHODS, PRECISIONS, shard_model, shard_optimizer_state
from dimba.fsdp import strategy as fsdp_strategy
from dimba.losses import compute_losses, random_prompt_mask
from dimba.metrics_log import MetricsLog
from dimba.model import build_model
from dimba.streaming import StreamedData
from dimba.tokenizer import Tokenizer


class DivergenceError(DimbaError):
    """Training stopped after ``train.max_bad_steps`` consecutive steps with a non-finite loss or gradient norm."""


def _ema_avg(decay: float):
    def avg(ema_p: torch.Tensor, p: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        d = min(decay, (1 + int(n)) / (10 + int(n)))  # warm-up: early EMA follows the weights closely
        return d * ema_p + (1 - d) * p
    return avg


def lr_lambda(cfg: Config, time_fraction=None):
    """Linear warmup, then cosine decay to ``min_lr_ratio`` at max_steps.

    With ``time_fraction`` (a callable giving the used fraction of ``train.max_time``) the decay
    follows whichever budget is further along, so a wall-clock-limited run still ends at the
    floor learning rate: what equal-compute comparisons between families need.
    """
    tc = cfg.train

    def f(step: int) -> float:
        if step < tc.warmup_steps:
            return (step + 1) / tc.warmup_steps
        progress = min(1.0, (step - tc.warmup_steps) / max(1, tc.max_steps - tc.warmup_steps))
        if time_fraction is not None:
            progress = max(progress, min(1.0, time_fraction()))
        return tc.min_lr_ratio + (1 - tc.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return f


def micro_batches(data: torch.Tensor, batch_size: int, seed: int, start: int = 0, rank: int = 0, world_size: int = 1):
    """Endless micro-batches of ``rank``: a fresh seeded permutation per epoch; ``start`` skips that many batches,
    so resuming at micro-batch k yields exactly the batches an uninterrupted run would.

    Each micro-step takes a global batch of ``batch_size * world_size`` blocks from the permutation and
    gives rank r the slice ``[r * batch_size, (r + 1) * batch_size)``: ranks never share a block, and
    one process yields what a single-process run always did."""
    global_batch = batch_size * world_size
    per_epoch = data.shape[0] // global_batch
    if per_epoch == 0:
        times = f" x {world_size} processes" if world_size > 1 else ""
        raise UsageError(f"train.batch_size={batch_size}{times} exceeds the {data.shape[0]} training blocks: "
                         "lower train.batch_size or data.seq_len, or use more text")
    k = start
    while True:
        epoch, pos = divmod(k, per_epoch)
        perm = torch.randperm(data.shape[0], generator=torch.Generator().manual_seed(seed + epoch))
        first = pos * global_batch + rank * batch_size
        yield data[perm[first:first + batch_size]]  # (B, L)
        k += 1


def rng_state() -> dict[str, Any]:
    """Every global RNG state (torch CPU and CUDA, Python ``random``, NumPy) as tensors, lists and
    numbers, so that ``torch.load(weights_only=True)`` reads it back."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(gauss)]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any] | torch.Tensor) -> None:
    """Restore what `rng_state` captured (CUDA only where as many devices are visible)."""
    if isinstance(state, torch.Tensor):  # a checkpoint from before the other generators were saved
        torch.set_rng_state(state)
        return
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


@torch.no_grad()
def validation_loss(model, val: torch.Tensor, cfg: Config, device: torch.device) -> dict[str, float]:
    """The training objective on fixed validation blocks, fixed times, noise and masks (no self-conditioning,
    no prompt), so that values at different steps are comparable. Uses its own generators only: the
    global RNG, and with it the training run, is the same with or without validation."""
    was_training = model.training
    model.eval()
    gen = torch.Generator().manual_seed(1234)
    n = min(val.shape[0], cfg.train.eval_batches * cfg.train.batch_size)
    totals: dict[str, float] = {}
    batches = 0
    for i in range(0, n, cfg.train.batch_size):
        ids = val[i:i + cfg.train.batch_size].to(device)  # (B, L)
        t = ((torch.arange(ids.shape[0]) + 0.5) / ids.shape[0]).to(device)  # (B,)
        noise = torch.randn(ids.shape + (model.d_x,), generator=gen).to(device)
        masks = torch.Generator(device).manual_seed(4321 + i)
        _, parts = compute_losses(model, ids, cfg.diffusion, t, self_cond_prob=0.0, noise=noise, generator=masks)
        for k, v in parts.items():
            totals[k] = totals.get(k, 0.0) + float(v)
        batches += 1
    model.train(was_training)
    return {f"val_{k}": v / batches for k, v in totals.items()}


def _accumulate(fabric: Fabric, fmodel, batches, cfg: Config, step: int = 0) -> tuple[dict[str, torch.Tensor], bool]:
    """Forward and backward over ``grad_accum`` micro-batches (gradients summed in the parameters);
    returns the loss parts of the last one, averaged over ranks, and whether every loss, on every rank, was finite.

    Under FSDP every forward pass gathers weights from all ranks, so all ranks must run the same passes: the
    self-conditioning coin (an extra no-grad pass) is then tossed once per micro-batch for all ranks, from a
    generator seeded by the micro-batch number (from ``step``, the number of steps already taken)."""
    tc, dc = cfg.train, cfg.diffusion
    shared_coin = tc.strategy == "fsdp" and cfg.model.self_conditioning
    nonfinite = torch.zeros((), device=fabric.device)
    for micro in range(tc.grad_accum):
        ids = next(batches).to(fabric.device)  # (B, L)
        b, length = ids.shape
        drop = torch.rand(b, device=ids.device) < dc.cond_drop_prob  # (B,)
        prompt_mask = random_prompt_mask(b, length, dc.prompt_prob, ids.device)  # (B, L) or None
        self_cond = None  # each rank tosses its own coin inside the loss
        if shared_coin:
            coin = torch.Generator().manual_seed(tc.seed + step * tc.grad_accum + micro)
            self_cond = float(torch.rand((), generator=coin) < dc.self_cond_prob)  # 1.0: always, 0.0: never
        with fabric.no_backward_sync(fmodel, enabled=micro < tc.grad_accum - 1):  # FSDP decides in the backward
            with fabric.autocast():
                loss, parts = compute_losses(fmodel, ids, dc, prompt_mask=prompt_mask, drop_cond=drop,
                                             self_cond_prob=self_cond)
            fabric.backward(loss / tc.grad_accum)
        nonfinite += (~torch.isfinite(loss.detach())).float()
    names = list(parts)
    mean = fabric.all_reduce(torch.stack([parts[k].float() for k in names]), reduce_op="mean")  # (P,)
    return dict(zip(names, mean)), float(fabric.all_reduce(nonfinite, reduce_op="sum")) == 0


def _apply_speed_options(model, cfg: Config) -> None:
    """``train.gradient_checkpointing`` and ``train.compile`` (each block compiled in place, so
    checkpoint keys are unchanged; CUDA only)."""
    model.backbone.gradient_checkpointing = cfg.train.gradient_checkpointing
    if cfg.train.compile:
        for block in model.backbone.blocks:
            block.compile()


def _restore(state: dict[str, Any], optimizer, scheduler, lr: float) -> None:
    """Load a checkpoint's optimizer (a single-file one's: into this rank's shards under FSDP; a sharded one's
    is loaded already), scheduler and RNG states (the weights and EMA of a single file are loaded before
    sharding). ``lr`` (this run's ``train.lr``) replaces the stored base learning rate, so that a resumed run
    can lower it."""
    if "optimizer" in state:
        optimizer.load_state_dict(shard_optimizer_state(state["optimizer"], optimizer))
    scheduler.load_state_dict(state["scheduler"])
    scheduler.base_lrs = [lr] * len(optimizer.param_groups)
    for group, f in zip(optimizer.param_groups, scheduler.lr_lambdas):
        group["lr"] = lr * f(scheduler.last_epoch)  # as LambdaLR computes it: the same float when lr is unchanged
    set_rng_state(state["rng"])


def _precision(cfg: Config) -> str:
    if cfg.train.precision != "auto":
        return cfg.train.precision
    return "bf16-mixed" if torch.cuda.is_available() and cfg.train.accelerator in ("auto", "cuda") else "32-true"


def _no_weight_decay(model) -> set[str]:
    """Names of the parameters AdamW does not decay: vectors, embeddings and those flagged ``_no_weight_decay``
    (read before FSDP replaces the parameters, and their flags, with shards)."""
    return {name for name, p in model.named_parameters()
            if p.dim() < 2 or "embedding" in name or getattr(p, "_no_weight_decay", False)}


def _load_tokenizer(cfg: Config, run_dir: Path) -> Tokenizer | None:
    if (run_dir / "tokenizer.json").is_file():
        return Tokenizer.from_file(run_dir / "tokenizer.json")
    if cfg.data.tokenizer:
        return Tokenizer.from_file(cfg.data.tokenizer)
    return None


def fit(cfg: Config, run_dir: str | Path, resume: bool = False, progress: bool = True) -> Path:
    """Train a model in ``run_dir`` (created, or continued with ``resume``); returns the run dir.

    The run dir receives config.yaml, tokenizer.json, metrics.csv and checkpoints/ (last.ckpt
    plus periodic step-N.ckpt, each written atomically; under FSDP sharded directories and last.json, their
    pointer). Generation and export use the EMA weights.
    On resume, the checkpoint's state continues bitwise exactly (on CPU), with ``train.lr`` of ``cfg``.

    A step whose loss or gradient norm is NaN/inf (on any rank) is skipped: the weights, optimizer
    moments and EMA stay as they were, while the step counter, data position and LR schedule move on
    (the step's budget is spent). It is counted in the ``bad_steps`` column; no periodic checkpoint is
    written until a good step follows; after ``train.max_bad_steps`` bad steps in a row `DivergenceError` stops
    the run, leaving the last good checkpoint. Under ``16-mixed`` precision the gradient scaler
    already skips overflowing steps, so only the loss is checked.

    With ``train.devices`` x ``train.num_nodes`` > 1 (DDP), ``train.batch_size`` is per process: each rank
    trains on its own slice of every global batch (see `micro_batches`); logged losses are averaged over
    ranks; validation, logging and checkpoints happen on rank 0. Exact resume needs the same world size.
    ``train.strategy=fsdp`` trains the same way with weights, gradients, optimizer moments and EMA sharded
    over the ranks (see `dimba.fsdp`): every rank runs the validation (the EMA gathers its weights), and
    each save is sharded: every rank writes its own shards (see `dimba.sharded`; a resume reads them back into
    the shards, nothing is gathered). An FSDP run resumes from an unsharded checkpoint too; a sharded one
    resumes under FSDP only.
    Fabric starts the extra processes by re-running the command line (``dimba train ...``), or joins
    those that ``torchrun`` / SLURM started, so call ``fit`` from a script, not an interactive session.
    """
    run_dir = Path(run_dir)
    tc = cfg.train
    if tc.num_threads:
        torch.set_num_threads(tc.num_threads)
    precision, sharded = _precision(cfg), tc.strategy == "fsdp"
    if sharded and precision not in PRECISIONS:
        raise UsageError(f"train.precision={precision} does not work with train.strategy=fsdp (no gradient scaler): "
                         f"set train.precision to one of {', '.join(PRECISIONS)}")
    fabric = Fabric(accelerator=tc.accelerator, devices=tc.devices, num_nodes=tc.num_nodes, precision=precision,
                    strategy=fsdp_strategy(tc.devices * tc.num_nodes) if sharded else tc.strategy)
    fabric.launch()
    if tc.compile and fabric.device.type != "cuda":
        raise UsageError("train.compile=true needs a CUDA device (torch.compile brings little on CPU here): "
                         "set train.compile=false")
    fabric.seed_everything(tc.seed, verbose=False)

    tokenizer = _load_tokenizer(cfg, run_dir)
    data_cfg = cfg.data
    if data_cfg.streaming:
        data = StreamedData(data_cfg.corpus, data_cfg.seq_len, data_cfg.val_blocks, tokenizer, data_cfg.vocab_size,
                            data_cfg.tokenizer_train_mb)
    else:
        data = prepare_data(data_cfg.corpus, data_cfg.seq_len, data_cfg.val_fraction, tokenizer, data_cfg.vocab_size)
    cfg.model.vocab_size = data.tokenizer.vocab_size
    cfg.model.context_length = cfg.data.seq_len
    state = load_training_state(latest_checkpoint(run_dir / CKPT_DIR)) if resume else None
    shards = state.get("sharded") if state is not None else None  # the directory of a sharded checkpoint
    if shards is not None and not sharded:
        raise UsageError(f"the checkpoint of {run_dir} is sharded (written by train.strategy=fsdp): resume it with "
                         "train.strategy=fsdp")
    if fabric.is_global_zero and not resume:
        run_dir.mkdir(parents=True, exist_ok=True)
        data.tokenizer.save(run_dir / "tokenizer.json")
        (run_dir / "config.yaml").write_text(dump_yaml(cfg))

    model = build_model(cfg.model)
    _apply_speed_options(model, cfg)
    if state is None:
        model.calibrate_latent_scale(data.train_head(tc.batch_size * fabric.world_size))  # on the global batch
    elif shards is not None:  # loaded once sharded, below
        check_state_fits(model, sharded_ckpt.stored_shapes(shards, "model."), run_dir)
    else:
        check_state_fits(model, {name: tuple(t.shape) for name, t in state["model"].items()}, run_dir)
        model.load_state_dict(state["model"])
    ema = AveragedModel(model, avg_fn=_ema_avg(tc.ema_decay), use_buffers=True)
    if state is not None and shards is None:
        ema.load_state_dict(state["ema"])
    ema.to(fabric.device)
    exempt = _no_weight_decay(model)
    fmodel = fabric.setup_module(model)  # DDP wraps the model; FSDP shards it in place
    for name in FORWARD_METHODS:  # what the losses call besides forward goes through the DDP wrapper too
        fmodel.mark_forward_method(name)
    if sharded:  # the EMA sharded like the model: ema.update_parameters pairs them up shard by shard
        shard_model(ema.module, fabric.strategy.device_mesh, reshard_root=True)
    named = list(model.named_parameters())  # the shards under FSDP: the optimizer comes after the sharding
    groups = [{"params": [p for n, p in named if n not in exempt], "weight_decay": tc.weight_decay},
              {"params": [p for n, p in named if n in exempt], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=tc.lr, betas=(tc.beta1, tc.beta2))
    clock = {"start": time.perf_counter(), "before": 0.0, "now": 0.0}  # this process, earlier sessions, last step

    def used_time() -> float:
        return clock["before"] + time.perf_counter() - clock["start"]

    time_fraction = (lambda: clock["now"] / (tc.max_time * 60)) if tc.max_time is not None else None
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, time_fraction))
    optimizer = fabric.setup_optimizers(optimizer)
    step = bad_total = bad_streak = 0
    if state is not None:
        step, bad_total, bad_streak = int(state["step"]), int(state.get("bad_steps", 0)), int(state.get("bad_streak", 0))
        clock["before"] = clock["now"] = float(state.get("elapsed_s", 0.0))
        if shards is not None:  # each rank reads its shards into the sharded model, EMA and optimizer
            sharded_ckpt.load(shards, model, ema, optimizer.optimizer)
        _restore(state, optimizer, scheduler, tc.lr)
        if fabric.is_global_zero:
            remove_partial_saves(run_dir / CKPT_DIR)
    if fabric.global_rank > 0:  # its own t, noise and masks (same initial weights everywhere); rank 0 keeps its stream
        saved_rngs = state.get("rng_ranks", []) if state is not None else []
        if len(saved_rngs) == fabric.world_size:  # resumed on as many ranks: each continues its own streams
            set_rng_state(saved_rngs[fabric.global_rank])
        else:
            fabric.seed_everything(tc.seed + 1_000_003 * fabric.global_rank + step, verbose=False)

    log = MetricsLog(run_dir / "metrics.csv", resume_step=step if resume else None, enabled=fabric.is_global_zero,
                     logger=tc.logger)
    if data_cfg.streaming:
        if state is not None and "data_position" not in state:
            raise UsageError(f"the checkpoint in {run_dir} has no stream position (trained without data.streaming): "
                             "resume with data.streaming=false")
        batches = data.batches(tc.batch_size, fabric.global_rank, fabric.world_size,
                               state["data_position"] if state is not None else None)
    else:
        batches = micro_batches(data.train, tc.batch_size, tc.seed, start=step * tc.grad_accum,
                                rank=fabric.global_rank, world_size=fabric.world_size)
    tokens_per_step = tc.batch_size * tc.grad_accum * cfg.data.seq_len * fabric.world_size
    saved_step = step if resume else None

    def save(final: bool = False) -> None:
        nonlocal saved_step
        saved_step = step
        rngs = [rng_state()]
        if fabric.world_size > 1:  # every rank's generators, so that a resume on as many ranks is exact
            rngs = [None] * fabric.world_size
            torch.distributed.all_gather_object(rngs, rng_state())
        run_state = {"scheduler": scheduler.state_dict(), "step": step, "rng": rngs[0], "rng_ranks": rngs,
                     "elapsed_s": used_time(), "bad_steps": bad_total, "bad_streak": bad_streak}
        if data_cfg.streaming:
            run_state["data_position"] = list(batches.position)  # [epoch, document, offset]
        periodic = not final and step % tc.save_every == 0
        if sharded:  # every rank writes its shards
            sharded_ckpt.save(fabric, run_dir / CKPT_DIR, periodic, step, model, ema, optimizer.optimizer, run_state)
            return
        if not fabric.is_global_zero:
            return
        blob = {"model": model.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(), **run_state}
        if periodic:  # before last.ckpt: a crash in between replays this step
            atomic_save(blob, run_dir / CKPT_DIR / f"step-{step:07d}.ckpt")
        atomic_save(blob, run_dir / CKPT_DIR / LAST_CKPT)

    validates = fabric.is_global_zero or sharded  # DDP: rank 0 alone; FSDP: all ranks (logging stays on rank 0)
    if step == 0 and validates:
        log.write(0, validation_loss(ema.module, data.val, cfg, fabric.device))
    clock["start"], start_step = time.perf_counter(), step
    bar = tqdm(total=tc.max_steps, initial=step, disable=not (progress and fabric.is_global_zero), desc="train",
               dynamic_ncols=True)
    reason = "max_steps"
    try:
        while step < tc.max_steps:
            fmodel.train()
            parts, loss_ok = _accumulate(fabric, fmodel, batches, cfg, step)
            grad_norm = None
            if loss_ok:  # without clipping, max_norm=inf only measures the norm (the gradients are scaled by 1)
                grad_norm = fabric.clip_gradients(fmodel, optimizer, max_norm=tc.grad_clip or math.inf,
                                                  error_if_nonfinite=False)
            good = loss_ok and (precision == "16-mixed" or math.isfinite(float(grad_norm)))
            if good:
                optimizer.step()
                ema.update_parameters(model)
                bad_streak = 0
            else:
                bad_streak, bad_total = bad_streak + 1, bad_total + 1
                bar.write(f"step {step + 1}: non-finite {'gradient norm' if loss_ok else 'loss'}, update skipped "
                          f"({bad_streak} in a row)", file=sys.stderr)
            optimizer.zero_grad(set_to_none=True)
            clock["now"] = fabric.broadcast(used_time())  # rank 0's clock on every rank: the same LR, the same stop
            scheduler.step()
            step += 1
            elapsed = clock["now"]
            tok_s = (step - start_step) * tokens_per_step / max(elapsed - clock["before"], 1e-9)
            bar.update(1)
            bar.set_postfix(loss=f"{float(parts['loss']):.3f}", ce=f"{float(parts['ce']):.2f}", tok_s=f"{tok_s:,.0f}")
            if step % tc.log_every == 0 or step == tc.max_steps or not good:
                row = {k: float(v) for k, v in parts.items()}
                row.update(lr=scheduler.get_last_lr()[0], tokens_per_s=tok_s, elapsed_s=elapsed, bad_steps=bad_total,
                           grad_norm=float(grad_norm) if grad_norm is not None else float("nan"))
                log.write(step, row)
            if bad_streak >= tc.max_bad_steps:
                then = (f"the last good checkpoint (step {saved_step}) is kept: resume it with "
                        f"`dimba train --resume {run_dir} train.lr=...`" if saved_step is not None else
                        "no checkpoint was written yet: train again in a new --out")
                raise DivergenceError(
                    f"training diverged: {bad_streak} consecutive steps (up to step {step}) had a non-finite loss or "
                    f"gradient norm; lower train.lr (now {tc.lr:g}) or raise train.warmup_steps; {then}")
            out_of_time = tc.max_time is not None and elapsed >= tc.max_time * 60
            if validates and (step % tc.eval_every == 0 or step == tc.max_steps or out_of_time):
                val = validation_loss(ema.module, data.val, cfg, fabric.device)
                log.write(step, val)
                if fabric.is_global_zero:
                    bar.write(f"step {step}: val_loss {val['val_loss']:.4f} (ce {val['val_ce']:.3f})", file=sys.stderr)
            if step % tc.save_every == 0 and bad_streak == 0:
                save()
            if out_of_time:
                reason = f"max_time ({tc.max_time} min)"
                break
    finally:
        bar.close()
        log.close()
    save(final=True)
    if fabric.is_global_zero and progress:
        print(f"stopped at step {step} ({reason}); run saved in {run_dir}", file=sys.stderr)
    return run_dir
