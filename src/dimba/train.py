"""fit(): the training loop on Lightning Fabric (AdamW, warmup + cosine, clipping, accumulation, EMA)."""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import torch
from lightning_fabric import Fabric
from torch.optim.swa_utils import AveragedModel
from tqdm.auto import tqdm

from dimba.checkpoint import CKPT_SUBDIR as CKPT_DIR, LAST_CKPT, atomic_save, load_training_state
from dimba.config import Config, dump_yaml
from dimba.data import prepare_data
from dimba.errors import UsageError
from dimba.losses import compute_losses, random_prompt_mask
from dimba.metrics_log import MetricsLog
from dimba.model import build_model
from dimba.tokenizer import Tokenizer



def _ema_avg(decay: float):
    def avg(ema_p: torch.Tensor, p: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        d = min(decay, (1 + int(n)) / (10 + int(n)))  # warm-up: early EMA follows the weights closely
        return d * ema_p + (1 - d) * p
    return avg


def lr_lambda(cfg: Config):
    """Linear warmup, then cosine decay to ``min_lr_ratio`` at max_steps."""
    tc = cfg.train

    def f(step: int) -> float:
        if step < tc.warmup_steps:
            return (step + 1) / tc.warmup_steps
        progress = min(1.0, (step - tc.warmup_steps) / max(1, tc.max_steps - tc.warmup_steps))
        return tc.min_lr_ratio + (1 - tc.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return f


def micro_batches(data: torch.Tensor, batch_size: int, seed: int, start: int = 0):
    """Endless micro-batches: a fresh seeded permutation per epoch; ``start`` skips that many batches,
    so resuming at micro-batch k yields exactly the batches an uninterrupted run would."""
    per_epoch = data.shape[0] // batch_size
    if per_epoch == 0:
        raise UsageError(f"train.batch_size={batch_size} exceeds the {data.shape[0]} training blocks: "
                         "lower train.batch_size or data.seq_len, or use more text")
    k = start
    while True:
        epoch, pos = divmod(k, per_epoch)
        perm = torch.randperm(data.shape[0], generator=torch.Generator().manual_seed(seed + epoch))
        yield data[perm[pos * batch_size:(pos + 1) * batch_size]]  # (B, L)
        k += 1


@torch.no_grad()
def validation_loss(model, val: torch.Tensor, cfg: Config, device: torch.device) -> dict[str, float]:
    """The training objective on fixed validation blocks, fixed times, noise and masks (no self-conditioning,
    no prompt), so that values at different steps are comparable."""
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


def _precision(cfg: Config) -> str:
    if cfg.train.precision != "auto":
        return cfg.train.precision
    return "bf16-mixed" if torch.cuda.is_available() and cfg.train.accelerator in ("auto", "cuda") else "32-true"


def _load_tokenizer(cfg: Config, run_dir: Path) -> Tokenizer | None:
    if (run_dir / "tokenizer.json").is_file():
        return Tokenizer.from_file(run_dir / "tokenizer.json")
    if cfg.data.tokenizer:
        return Tokenizer.from_file(cfg.data.tokenizer)
    return None


def fit(cfg: Config, run_dir: str | Path, resume: bool = False, progress: bool = True) -> Path:
    """Train a model in ``run_dir`` (created, or continued with ``resume``); returns the run dir.

    The run dir receives config.yaml, tokenizer.json, metrics.csv and checkpoints/ (last.ckpt
    plus periodic step-N.ckpt, each written atomically). Generation and export use the EMA weights.
    """
    run_dir = Path(run_dir)
    tc = cfg.train
    if tc.num_threads:
        torch.set_num_threads(tc.num_threads)
    fabric = Fabric(accelerator=tc.accelerator, devices=tc.devices, precision=_precision(cfg))
    fabric.launch()
    fabric.seed_everything(tc.seed, verbose=False)

    tokenizer = _load_tokenizer(cfg, run_dir)
    data = prepare_data(cfg.data.corpus, cfg.data.seq_len, cfg.data.val_fraction, tokenizer, cfg.data.vocab_size)
    cfg.model.vocab_size = data.tokenizer.vocab_size
    cfg.model.context_length = cfg.data.seq_len
    state = load_training_state(run_dir / CKPT_DIR / LAST_CKPT) if resume else None
    if fabric.is_global_zero and not resume:
        run_dir.mkdir(parents=True, exist_ok=True)
        data.tokenizer.save(run_dir / "tokenizer.json")
        (run_dir / "config.yaml").write_text(dump_yaml(cfg))

    model = build_model(cfg.model)
    if state is None:
        model.calibrate_latent_scale(data.train[: tc.batch_size])
    ema = AveragedModel(model, avg_fn=_ema_avg(tc.ema_decay), use_buffers=True)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        exempt = p.dim() < 2 or "embedding" in name or getattr(p, "_no_weight_decay", False)
        (no_decay if exempt else decay).append(p)
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": tc.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=tc.lr, betas=(tc.beta1, tc.beta2))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    step = 0
    if state is not None:
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step = int(state["step"])
        torch.set_rng_state(state["rng"])
    fmodel, optimizer = fabric.setup(model, optimizer)
    ema.to(fabric.device)

    log = MetricsLog(run_dir / "metrics.csv", append=resume, enabled=fabric.is_global_zero, logger=tc.logger)
    batches = micro_batches(data.train, tc.batch_size, tc.seed, start=step * tc.grad_accum)
    tokens_per_step = tc.batch_size * tc.grad_accum * cfg.data.seq_len * fabric.world_size
    dc = cfg.diffusion

    def save(final: bool = False) -> None:
        if not fabric.is_global_zero:
            return
        blob = {"model": model.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "step": step, "rng": torch.get_rng_state()}
        atomic_save(blob, run_dir / CKPT_DIR / LAST_CKPT)
        if not final and step % tc.save_every == 0:
            atomic_save(blob, run_dir / CKPT_DIR / f"step-{step:07d}.ckpt")

    if step == 0:
        log.write(0, validation_loss(ema.module, data.val, cfg, fabric.device))
    start, start_step = time.perf_counter(), step
    bar = tqdm(total=tc.max_steps, initial=step, disable=not (progress and fabric.is_global_zero), desc="train",
               dynamic_ncols=True)
    reason = "max_steps"
    while step < tc.max_steps:
        fmodel.train()
        for micro in range(tc.grad_accum):
            ids = next(batches).to(fabric.device)  # (B, L)
            b, length = ids.shape
            drop = torch.rand(b, device=ids.device) < dc.cond_drop_prob  # (B,)
            prompt_mask = random_prompt_mask(b, length, dc.prompt_prob, ids.device)
            with fabric.no_backward_sync(fmodel, enabled=micro < tc.grad_accum - 1), fabric.autocast():
                loss, parts = compute_losses(fmodel, ids, dc, prompt_mask=prompt_mask, drop_cond=drop)
            fabric.backward(loss / tc.grad_accum)
        grad_norm = fabric.clip_gradients(fmodel, optimizer, max_norm=tc.grad_clip) if tc.grad_clip > 0 else None
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        ema.update_parameters(model)
        step += 1
        elapsed = time.perf_counter() - start
        tok_s = (step - start_step) * tokens_per_step / max(elapsed, 1e-9)
        bar.update(1)
        bar.set_postfix(loss=f"{float(parts['loss']):.3f}", ce=f"{float(parts['ce']):.2f}", tok_s=f"{tok_s:,.0f}")
        if step % tc.log_every == 0 or step == tc.max_steps:
            row = {k: float(v) for k, v in parts.items()}
            row.update(lr=scheduler.get_last_lr()[0], tokens_per_s=tok_s, elapsed_s=elapsed,
                       grad_norm=float(grad_norm) if grad_norm is not None else float("nan"))
            log.write(step, row)
        out_of_time = tc.max_time is not None and elapsed >= tc.max_time * 60
        if step % tc.eval_every == 0 or step == tc.max_steps or out_of_time:
            val = validation_loss(ema.module, data.val, cfg, fabric.device)
            log.write(step, val)
            bar.write(f"step {step}: val_loss {val['val_loss']:.4f} (ce {val['val_ce']:.3f})", file=sys.stderr)
        if step % tc.save_every == 0:
            save()
        if out_of_time:
            reason = f"max_time ({tc.max_time} min)"
            break
    bar.close()
    save(final=True)
    log.close()
    if fabric.is_global_zero and progress:
        print(f"stopped at step {step} ({reason}); run saved in {run_dir}", file=sys.stderr)
    return run_dir

