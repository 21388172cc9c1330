"""`setup`: from a config and a run folder to a `TrainState` ready for `dimba.training.step.train_step`: the
Fabric strategy, the data, the model (calibrated, or loaded from the run's checkpoint), its EMA, the optimizer
(AdamW, or Muon with AdamW) and the learning-rate schedule, with a resumed run's state restored exactly."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lightning_fabric import Fabric
from torch.optim.swa_utils import AveragedModel

from dimba.config import Config, dump_yaml
from dimba.data import open_data
from dimba.data.tokenizer import Tokenizer
from dimba.errors import UsageError
from dimba.io import atomic_write_text, disk_errors
from dimba.model import build_model
from dimba.training import sharded as sharded_ckpt
from dimba.training.checkpoint import check_state_fits, latest_checkpoint, load_training_state, resume_training
from dimba.training.files import CKPT_SUBDIR
from dimba.training.finetune import init_weights, make_objective, open_finetune_data, prepare_model
from dimba.training.fsdp import FORWARD_METHODS, PRECISIONS, shard_model
from dimba.training.fsdp import strategy as fsdp_strategy
from dimba.training.optimizers import build_optimizer, muon_names
from dimba.training.rng import init_seed, set_rng_state
from dimba.training.schedule import Clock, ema_avg, lr_lambda
from dimba.training.vae import freeze_token_vae, load_token_vae, vae_tokenizer_path


@dataclass
class TrainState:
    """Everything a training run holds between steps.

    cfg: the resolved config (vocabulary size and context filled in; the caller's is never changed).
    run_dir: the run folder (None: nothing is written, e.g. `dimba bench train`).
    fabric, precision, sharded: the strategy, its precision and whether weights are FSDP-sharded.
    model: the network (its shards under FSDP); fmodel: the same, wrapped by Fabric (DDP), for the losses.
    ema: the `AveragedModel` used for validation, generation and export.
    optimizer (Fabric-wrapped AdamW or `MuonAdamW`), scheduler (LambdaLR), data (see `dimba.data.open_data`),
    batches (its micro-batches for this rank), clock (`dimba.training.schedule.Clock`).
    step, bad_total, bad_streak: optimizer steps taken, skipped steps in all and in a row.
    saved_step: the step of the last checkpoint (None before any).
    best: the best validation score so far, {"metric", "score" (lower is better), "step"} (None before any; see
    `dimba.training.checkpoint.save_if_best`).
    objective: a fine-tuning run's loss (`dimba.training.objectives.Objective`); None: the family's pre-training.
    """

    cfg: Config
    run_dir: Path | None
    fabric: Fabric
    precision: str
    sharded: bool
    model: torch.nn.Module
    fmodel: Any
    ema: AveragedModel
    optimizer: Any
    scheduler: torch.optim.lr_scheduler.LambdaLR
    data: Any
    batches: Any
    clock: Clock
    step: int = 0
    bad_total: int = 0
    bad_streak: int = 0
    saved_step: int | None = None
    best: dict | None = None
    objective: Any = None

    @property
    def metrics(self) -> tuple[str, ...]:
        """The loss parts logged in metrics.csv: the objective's, or the family's."""
        return self.objective.metrics if self.objective is not None else self.model.family.metrics


def precision_of(cfg: Config) -> str:
    """``train.precision``, with ``auto`` resolved: bf16-mixed on CUDA and on a CPU with native bf16 products
    (AVX512-BF16 or AMX: 1.6-1.7x the tiny preset's float32 steps in the same time, BENCHMARKS.md), 32-true
    elsewhere."""
    if cfg.train.precision != "auto":
        return cfg.train.precision
    on_cuda = torch.cuda.is_available() and cfg.train.accelerator in ("auto", "cuda")
    return "bf16-mixed" if on_cuda or cpu_has_bf16() else "32-true"


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX-BF16), so that bf16 autocast is faster; False
    where torch does not say."""
    probe = getattr(torch._C._cpu, "_get_cpu_capability", None)  # the CPU features torch detected
    flags = probe() if probe is not None else {}
    return bool(flags.get("avx512_bf16") or flags.get("amx_bf16"))


def _no_weight_decay(model) -> set[str]:
    """Names of the parameters AdamW does not decay: vectors, embeddings and those flagged ``_no_weight_decay``
    (read before FSDP replaces the parameters, and their flags, with shards)."""
    return {name for name, p in model.named_parameters()
            if p.dim() < 2 or "embedding" in name or getattr(p, "_no_weight_decay", False)}


def _tokenizer(cfg: Config, run_dir: Path | None) -> Tokenizer | None:
    """The run's own tokenizer (a resumed run), else ``data.tokenizer``, else that of ``model.vae_checkpoint_path``,
    else None (one is trained)."""
    if run_dir is not None and (run_dir / "tokenizer.json").is_file():
        return Tokenizer.from_file(run_dir / "tokenizer.json")
    if cfg.data.tokenizer:
        return Tokenizer.from_file(cfg.data.tokenizer)
    if cfg.model.vae_checkpoint_path:
        return Tokenizer.from_file(vae_tokenizer_path(cfg.model.vae_checkpoint_path))
    return None


def _launch(cfg: Config) -> tuple[Fabric, str, bool]:
    """Fabric (processes launched, seeded) for ``cfg.train``, its precision and whether it shards (FSDP)."""
    tc = cfg.train
    if tc.num_threads:
        torch.set_num_threads(tc.num_threads)
    precision, sharded = precision_of(cfg), tc.strategy == "fsdp"
    if sharded and precision not in PRECISIONS:
        raise UsageError(f"train.precision={precision} does not work with train.strategy=fsdp (no gradient scaler): "
                         f"set train.precision to one of {', '.join(PRECISIONS)}")
    if sharded and tc.optimizer == "muon":
        raise UsageError("train.optimizer=muon does not work with train.strategy=fsdp (Muon orthogonalises whole "
                         "weight matrices, FSDP shards them): use train.strategy=ddp or train.optimizer=adamw")
    fabric = Fabric(accelerator=tc.accelerator, devices=tc.devices, num_nodes=tc.num_nodes, precision=precision,
                    strategy=fsdp_strategy(tc.devices * tc.num_nodes) if sharded else tc.strategy)
    fabric.launch()
    if tc.compile and fabric.device.type != "cuda":
        raise UsageError("train.compile=true needs a CUDA device (torch.compile brings little on CPU here): "
                         "set train.compile=false")
    fabric.seed_everything(tc.seed, verbose=False)
    return fabric, precision, sharded


def _build_model(cfg: Config, data, state: dict | None, run_dir: Path | None, world_size: int):
    """The model of ``cfg.model``: calibrated on the first global batch, or with the weights of checkpoint
    ``state`` (a sharded checkpoint's are loaded after sharding), or of a fine-tuning run's ``finetune.init``
    (with its LoRA adapters); speed options applied."""
    with torch.random.fork_rng(devices=[]):  # initial weights from their own stream (`init_seed`)
        torch.manual_seed(init_seed(cfg.train.seed))
        model = build_model(cfg.model)
    finetuning, starts_from = cfg.finetune.method != "none", cfg.finetune.init is not None
    if cfg.model.vae_checkpoint_path:  # a pre-trained latent space: loaded in a new run, frozen in every session
        if state is None and not starts_from:
            load_token_vae(model, cfg.model.vae_checkpoint_path)
        freeze_token_vae(model)
    if starts_from:  # the init run's weights in a new run; LoRA adapters before a checkpoint that holds them
        prepare_model(model, cfg, init_weights(cfg) if state is None else None)
    model.backbone.gradient_checkpointing = cfg.train.gradient_checkpointing
    if cfg.train.compile:  # each block compiled in place: checkpoint keys are unchanged
        for block in model.backbone.blocks:
            block.compile()
    shards = state.get("sharded") if state is not None else None
    if state is None:
        if cfg.model.latent_scale is None and not finetuning:  # an adaptation calibrates on its loaded embedding
            model.calibrate_latent_scale(data.train_head(cfg.train.batch_size * world_size))  # on the global batch
    elif shards is not None:
        check_state_fits(model, sharded_ckpt.stored_shapes(shards, "model."), run_dir)
    else:
        check_state_fits(model, {name: tuple(t.shape) for name, t in state["model"].items()}, run_dir)
        model.load_state_dict(state["model"])
    return model


def _optimizer(cfg: Config, model, exempt: set[str], muon: set[str], clock: Clock):
    """The optimizer of ``train.optimizer`` (`dimba.training.optimizers.build_optimizer`) and its warmup + cosine
    schedule, which follows the clock when ``train.max_time`` is set."""
    tc = cfg.train
    optimizer = build_optimizer(tc, model, exempt, muon)
    time_fraction = (lambda: clock.now / (tc.max_time * 60)) if tc.max_time is not None else None
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, time_fraction))


def setup(cfg: Config, run_dir: str | Path | None, resume: bool = False) -> TrainState:
    """Launch, read the data, build (or load) the model, EMA and optimizer: a `TrainState` at the run's step.

    A new run writes config.yaml (resolved) and tokenizer.json into ``run_dir`` (rank 0); ``resume`` continues
    from the run's latest checkpoint. ``run_dir=None`` writes nothing (for benchmarks)."""
    run_dir = Path(run_dir) if run_dir is not None else None
    fabric, precision, sharded = _launch(cfg)
    tokenizer = _tokenizer(cfg, run_dir)
    data = open_data(cfg.data, tokenizer) if cfg.finetune.method == "none" else open_finetune_data(cfg, tokenizer)
    cfg = cfg.model_copy(update={"model": cfg.model.model_copy(
        update={"vocab_size": data.tokenizer.vocab_size, "context_length": cfg.data.seq_len})})
    if cfg.model.block_size and cfg.data.seq_len % cfg.model.block_size:
        raise UsageError(f"data.seq_len={cfg.data.seq_len} is not a multiple of model.block_size="
                         f"{cfg.model.block_size}: change one of them")
    state = load_training_state(latest_checkpoint(run_dir / CKPT_SUBDIR)) if resume else None
    shards = state.get("sharded") if state is not None else None  # the directory of a sharded checkpoint
    if shards is not None and not sharded:
        raise UsageError(f"the checkpoint of {run_dir} is sharded (written by train.strategy=fsdp): resume it with "
                         "train.strategy=fsdp")
    if fabric.is_global_zero and not resume and run_dir is not None:
        with disk_errors(run_dir, "or choose another --out"):
            run_dir.mkdir(parents=True, exist_ok=True)
        data.tokenizer.save(run_dir / "tokenizer.json")
        atomic_write_text(run_dir / "config.yaml", dump_yaml(cfg))

    model = _build_model(cfg, data, state, run_dir, fabric.world_size)
    ema = AveragedModel(model, avg_fn=ema_avg(cfg.train.ema_decay), use_buffers=True)
    if state is not None and shards is None:
        ema.load_state_dict(state["ema"])
    ema.to(fabric.device)
    exempt = _no_weight_decay(model)
    muon = muon_names(model, exempt)  # read before FSDP, like exempt
    fmodel = fabric.setup_module(model)  # DDP wraps the model; FSDP shards it in place
    for name in FORWARD_METHODS:  # what the losses call besides forward goes through the DDP wrapper too
        fmodel.mark_forward_method(name)
    if sharded:  # the EMA sharded like the model: ema.update_parameters pairs them up shard by shard
        shard_model(ema.module, fabric.strategy.device_mesh, reshard_root=True)
    clock = Clock()
    optimizer, scheduler = _optimizer(cfg, model, exempt, muon, clock)
    ts = TrainState(cfg, run_dir, fabric, precision, sharded, model, fmodel, ema, fabric.setup_optimizers(optimizer),
                    scheduler, data, None, clock)
    if cfg.finetune.method != "none":
        ts.objective = make_objective(cfg, model, data.tokenizer, fabric.device)
    if state is not None:
        resume_training(ts, state)
    _seed_other_ranks(ts, state)
    position = data.resume_position(state, ts.step * cfg.train.grad_accum)
    ts.batches = data.batches(cfg.train.batch_size, cfg.train.seed, fabric.global_rank, fabric.world_size, position)
    return ts


def _seed_other_ranks(ts: TrainState, state: dict | None) -> None:
    """Ranks > 0 draw their own t, noise and masks (same initial weights everywhere); rank 0 keeps its stream.
    Resumed on as many ranks, each continues its own saved streams."""
    fabric = ts.fabric
    if fabric.global_rank == 0:
        return
    saved_rngs = state.get("rng_ranks", []) if state is not None else []
    if len(saved_rngs) == fabric.world_size:
        set_rng_state(saved_rngs[fabric.global_rank])
    else:
        fabric.seed_everything(ts.cfg.train.seed + 1_000_003 * fabric.global_rank + ts.step, verbose=False)
