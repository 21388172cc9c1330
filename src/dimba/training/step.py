"""One training step (`train_step`: what `dimba train` repeats and `dimba bench train` times) and the validation
loss. The objective is the model family's (`dimba.families.compute_losses`)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dimba.families import compute_losses


@dataclass
class StepResult:
    """What a step did: the loss parts of its last micro-batch (averaged over ranks), the gradient norm (None when
    the loss was not finite), whether every loss was finite and whether the update was applied."""

    parts: dict[str, torch.Tensor]
    grad_norm: torch.Tensor | None
    loss_ok: bool
    applied: bool


def random_prompt_mask(batch: int, length: int, prob: float, device: torch.device,
                       generator: torch.Generator | None = None, subset_prob: float = 0.0) -> torch.Tensor | None:
    """Per-sequence clean prompts: with probability ``prob`` a prefix of 1..L/2 tokens, or, for a share
    ``subset_prob`` of those sequences, a random subset of positions, each clean with a probability drawn uniformly
    per sequence."""
    if prob <= 0:
        return None
    has = torch.rand(batch, device=device, generator=generator) < prob  # (B,)
    n = torch.randint(1, max(2, length // 2 + 1), (batch,), device=device, generator=generator)  # (B,)
    pos = torch.arange(length, device=device)[None]  # (1, L)
    clean = pos < n[:, None]  # (B, L)
    if subset_prob > 0:
        subset = torch.rand(batch, device=device, generator=generator) < subset_prob  # (B,)
        rate = torch.rand(batch, 1, device=device, generator=generator)  # (B, 1)
        scattered = torch.rand(batch, length, device=device, generator=generator) < rate  # (B, L)
        clean = torch.where(subset[:, None], scattered, clean)
    return clean & has[:, None]  # (B, L)


def accumulate(ts) -> tuple[dict[str, torch.Tensor], bool]:
    """Forward and backward over ``grad_accum`` micro-batches of the `TrainState` ``ts`` (gradients summed in the
    parameters); returns the loss parts of the last one, averaged over ranks, and whether every loss, on every
    rank, was finite. A fine-tuning run (``ts.objective``) takes its objective's loss instead.

    In pre-training each sequence gets a random clean prompt (a prefix, or a subset of positions: ``diffusion.clean_subset_prob``)
    with probability ``diffusion.prompt_prob`` and has its prompt
    dropped with probability ``diffusion.cond_drop_prob`` (classifier-free guidance). Under FSDP every forward
    pass gathers weights from all ranks, so all ranks must run the same passes: the self-conditioning coin (an
    extra no-grad pass) is then tossed once per micro-batch for all ranks, from a generator seeded by the
    micro-batch number."""
    tc, fabric = ts.cfg.train, ts.fabric
    nonfinite = torch.zeros((), device=fabric.device)
    for micro in range(tc.grad_accum):
        batch = next(ts.batches)
        with fabric.no_backward_sync(ts.fmodel, enabled=micro < tc.grad_accum - 1):  # FSDP decides in the backward
            with fabric.autocast():
                if ts.objective is not None:  # fine-tuning: the objective moves its batch to the device
                    loss, parts = ts.objective.loss(ts.fmodel, batch)
                else:
                    loss, parts = _pretraining_loss(ts, batch.to(fabric.device), micro)
            fabric.backward(loss / tc.grad_accum)
        nonfinite += (~torch.isfinite(loss.detach())).float()
    names = list(parts)
    mean = fabric.all_reduce(torch.stack([parts[k].float() for k in names]), reduce_op="mean")  # (P,)
    return dict(zip(names, mean)), float(fabric.all_reduce(nonfinite, reduce_op="sum")) == 0


def _pretraining_loss(ts, ids: torch.Tensor, micro: int):
    """The family's objective on the blocks ``ids`` (B, L) with random clean prompts and guidance drops."""
    tc, dc = ts.cfg.train, ts.cfg.diffusion
    b, length = ids.shape
    drop = torch.rand(b, device=ids.device) < dc.cond_drop_prob  # (B,)
    prompt_mask = random_prompt_mask(b, length, dc.prompt_prob, ids.device,
                                     subset_prob=dc.clean_subset_prob)  # (B, L) or None
    self_cond = None  # each rank tosses its own coin inside the loss
    if tc.strategy == "fsdp" and ts.cfg.model.self_conditioning:
        coin = torch.Generator().manual_seed(tc.seed + ts.step * tc.grad_accum + micro)
        self_cond = float(torch.rand((), generator=coin) < dc.self_cond_prob)  # 1.0: always, 0.0: never
    return compute_losses(ts.fmodel, ids, dc, prompt_mask=prompt_mask, drop_cond=drop, self_cond_prob=self_cond)


def train_step(ts) -> StepResult:
    """One optimizer step of the `TrainState` ``ts``: accumulate, clip, AdamW, EMA, advance the clock, the
    learning-rate schedule and ``ts.step``.

    A step whose loss or gradient norm is NaN/inf (on any rank) is skipped: the weights, optimizer moments and
    EMA stay as they were, while the step counter, data position and schedule move on (``ts.bad_streak`` and
    ``ts.bad_total`` count it). Under ``16-mixed`` the gradient scaler already skips overflowing steps, so only
    the loss is checked."""
    tc = ts.cfg.train
    ts.fmodel.train()
    parts, loss_ok = accumulate(ts)
    grad_norm = None
    if loss_ok:  # without clipping, max_norm=inf only measures the norm (the gradients are scaled by 1)
        grad_norm = ts.fabric.clip_gradients(ts.fmodel, ts.optimizer, max_norm=tc.grad_clip or math.inf,
                                             error_if_nonfinite=False)
    applied = loss_ok and (ts.precision == "16-mixed" or math.isfinite(float(grad_norm)))
    if applied:
        ts.optimizer.step()
        ts.ema.update_parameters(ts.model)
        ts.bad_streak = 0
    else:
        ts.bad_streak, ts.bad_total = ts.bad_streak + 1, ts.bad_total + 1
    ts.optimizer.zero_grad(set_to_none=True)
    ts.clock.now = ts.fabric.broadcast(ts.clock.used())  # rank 0's clock on every rank: the same LR, the same stop
    ts.scheduler.step()
    ts.step += 1
    return StepResult(parts, grad_norm, loss_ok, applied)


def validate(ts) -> dict[str, float]:
    """The validation metrics of the `TrainState` ``ts`` with its EMA weights: the fine-tuning objective's, or
    `validation_loss`."""
    if ts.objective is not None:
        return ts.objective.validation(ts.ema.module, ts.data.val)
    return validation_loss(ts.ema.module, ts.data.val, ts.cfg, ts.fabric.device)


@torch.no_grad()
def validation_loss(model, val: torch.Tensor, cfg, device: torch.device) -> dict[str, float]:
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
