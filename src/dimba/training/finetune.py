"""Fine-tuning is `fit` with a starting checkpoint and another loss: `finetune` builds the config of such a run
(the model, tokenizer and context of the ``init`` run; a ``finetune`` section naming the method and the data) and
calls `fit`, which then inherits checkpoints, exact resume, hostile-input guarantees, the progress bar and
metrics.csv. `setup` asks this module for the data (`open_finetune_data`), the starting weights (`init_weights`)
and the objective (`make_objective`).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from dimba.backbones.adapt import bidirectional_from_causal
from dimba.config import Config, FINETUNE_METHODS, apply_overrides, load_run_config
from dimba.data.finetune import FinetuneData
from dimba.data.tokenizer import FILE_NAME
from dimba.errors import UsageError
from dimba.evaluation.rewards import get_reward
from dimba.families import get_family
from dimba.training.grpo import GRPO
from dimba.training.files import run_of_checkpoint
from dimba.training.lora import add_lora
from dimba.training.objectives import SFT, Preference

# the kind of rows (dimba.data.finetune.KINDS) each method reads
ROW_KIND = {"sft": "sft", "dpo": "preference", "ipo": "preference", "simpo": "preference", "grpo": "answer"}


def finetune_config(init: str | Path, method: str, data: str, overrides: list[str] = ()) -> Config:
    """The config of a fine-tuning run from the run ``init``: its model (same family and shapes), tokenizer and
    context; its train settings unless overridden, with the fine-tuning defaults below (a short EMA, 0.9: the EMA
    weights are what is evaluated, and a pre-training decay of 0.999 would leave them near the init weights after a
    few hundred steps; AdamW, whatever optimizer pre-trained the model: fine-tuning was measured with it);
    ``finetune.method`` and ``finetune.data`` set. ``overrides`` are ``KEY=VALUE`` (e.g. ``train.lr=1e-4``,
    ``finetune.beta=0.2``)."""
    if method not in FINETUNE_METHODS:
        raise UsageError(f"unknown fine-tuning method {method!r}: choose one of {', '.join(FINETUNE_METHODS)}")
    folder = _run_folder(init)
    base = load_run_config(folder / "config.yaml")
    if base.model.block_size is not None:  # response_nll scores whole sequences: it would read future blocks
        raise UsageError(f"{str(init)!r} is a block-diffusion model (model.block_size={base.model.block_size}), "
                         "which fine-tuning does not support yet: fine-tune a full-sequence model")
    defaults = ["train.max_steps=300", "train.warmup_steps=10", "train.lr=3e-4", "train.ema_decay=0.9",
                "train.eval_every=50", "train.optimizer=adamw",
                "train.save_every=100", "train.log_every=10", "train.max_time=null",
                "finetune.lora_rank=0", f"finetune.init={init}", f"finetune.data={data}", f"finetune.method={method}",
                f"data.tokenizer={folder / FILE_NAME}"]
    return apply_overrides(base, defaults + list(overrides))


def adaptation_config(init: str | Path, overrides: list[str] = ()) -> Config:
    """The config of a pre-training run that starts from the weights of run ``init`` (``finetune.init`` with
    ``finetune.method=none``): the init run's config and tokenizer with ``overrides`` applied, e.g.
    ``model.family=masked`` to adapt an ar model into a diffusion model (DiffuLLaMA / Dream's a2d)."""
    folder = _run_folder(init)
    base = load_run_config(folder / "config.yaml")
    return apply_overrides(base, ["finetune.method=none", "finetune.lora_rank=0", f"finetune.init={init}",
                                  f"data.tokenizer={folder / FILE_NAME}", *overrides])


def _run_folder(init: str | Path) -> Path:
    """The run of ``init``: a run directory, or the run one of whose checkpoints ``init`` names."""
    found = run_of_checkpoint(init)
    return found[0] if found else Path(init)


def open_finetune_data(cfg: Config, tokenizer) -> FinetuneData:
    """The rows of ``cfg.finetune.data`` for its method, checked and tokenised for the model's context."""
    fc = cfg.finetune
    return FinetuneData(fc, ROW_KIND[fc.method], tokenizer, get_family(cfg.model.family), cfg.data.seq_len,
                        cfg.train.seed)


def init_weights(cfg: Config) -> dict[str, torch.Tensor]:
    """The EMA weights of the ``finetune.init`` run, or of the one checkpoint of a run it names (its own LoRA
    adapters merged)."""
    return _init_model(cfg).state_dict()


def _init_model(cfg: Config) -> torch.nn.Module:
    """The model of ``finetune.init``: a run's latest EMA weights, or those of the one checkpoint of a run it names."""
    from dimba.loading import run_model, split_checkpoint  # dimba.loading imports dimba.training: not at module level

    return run_model(*split_checkpoint(cfg.finetune.init))


def prepare_model(model, cfg: Config, weights: dict | None) -> None:
    """Load the starting ``weights`` (a new fine-tuning run: all of them; an adaptation, ``finetune.method=none``:
    those whose name and shape match, a causal Mamba-2 mixer's rewritten for the bidirectional block first
    (`dimba.backbones.adapt`), the rest keep their initialisation) and inject LoRA adapters when
    ``finetune.lora_rank`` is set (before a resumed run's checkpoint, which holds them, is loaded)."""
    if weights is not None and cfg.finetune.method != "none":
        model.load_state_dict(weights)
    elif weights is not None:
        own = model.state_dict()
        weights = bidirectional_from_causal(weights, own)  # an ar Mamba-2 model's mixers into the bidirectional block
        fits = {k: v for k, v in weights.items() if k in own and own[k].shape == v.shape}
        if not fits:
            raise UsageError(f"no weight of {cfg.finetune.init!r} fits this model (other sizes or backbone?): keep "
                             "the init run's model settings and change only model.family")
        model.load_state_dict(fits, strict=False)
        print(f"initialised {len(fits)} of {len(own)} tensors from {cfg.finetune.init}", file=sys.stderr)
    if cfg.finetune.lora_rank:
        add_lora(model, cfg.finetune.lora_rank, cfg.finetune.lora_alpha)


def _reference(cfg: Config, device) -> torch.nn.Module:
    """The frozen reference: the ``init`` run's model (or its checkpoint's), in eval mode."""
    reference = _init_model(cfg).to(device).eval()
    for param in reference.parameters():
        param.requires_grad = False
    return reference


def make_objective(cfg: Config, policy, tokenizer, device):
    """The `dimba.training.objectives.Objective` of ``cfg.finetune.method`` for the trained model ``policy``."""
    fc = cfg.finetune
    if fc.method == "sft":
        return SFT(device, cfg.diffusion)
    if fc.method == "grpo":
        return GRPO(device, policy, _reference(cfg, device), tokenizer, cfg.sample, cfg.data.seq_len, fc,
                    get_reward(fc.reward))
    if fc.preference_t0 is not None and "t0" not in policy.family.likelihood_options:
        raise UsageError(f"finetune.preference_t0 applies to the continuous and hybrid families' bound; the "
                         f"{policy.family.name} family's has no t_0: drop it")
    reference = None if fc.method == "simpo" else _reference(cfg, device)
    t0 = policy.family.preference_t0 if fc.preference_t0 is None else fc.preference_t0
    nll_weight = float(fc.method == "dpo") if fc.nll_weight is None else fc.nll_weight
    return Preference(device, fc.method, fc.beta, fc.simpo_gamma, fc.mc_samples, reference, nll_weight,
                      fc.preference_likelihood == "one_pass", t0)

