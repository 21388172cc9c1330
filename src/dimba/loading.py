"""Load a model for inference from a training run (its EMA weights) or an export folder (local, or a Hub model
``owner/name`` through the Hugging Face cache), with its tokenizer and its sampler defaults."""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from pydantic import ValidationError

from dimba.config import SampleConfig, load_run_config
from dimba.data.tokenizer import Tokenizer
from dimba.errors import CheckpointError, UsageError
from dimba.export import CONFIG_NAME, SAMPLE_NAME, TOKENIZER_NAME, read_sample
from dimba.hub import resolve
from dimba.model import DIMBA, build_model
from dimba.training import sharded
from dimba.training.checkpoint import check_state_fits, latest_checkpoint, load_training_state
from dimba.training.lora import add_lora, merge_lora
from dimba.training.files import (BEST_CKPT, BEST_DCP, CKPT_SUBDIR, LAST_CKPT, LAST_POINTER, has_checkpoint,
                                 run_of_checkpoint)


def split_checkpoint(path: str | Path) -> tuple[Path, Path | None]:
    """(folder, checkpoint) of a model argument: a path to one checkpoint of a training run
    (``RUN/checkpoints/best.ckpt``, ``step-N.ckpt``, ``last.ckpt`` or an FSDP run's ``*.dcp`` directory) gives
    (RUN, that checkpoint); a run directory, an export folder or a Hub id gives (its local folder, None)."""
    return run_of_checkpoint(path) or (resolve(path), None)


def model_folder(path: str | Path) -> Path:
    """The folder that holds the config and tokenizer of model argument ``path`` (see `split_checkpoint`)."""
    return split_checkpoint(path)[0]


def run_model(path: str | Path, checkpoint: Path | None = None) -> DIMBA:
    """The model of training run ``path`` with the EMA weights of ``checkpoint`` (one of its checkpoints/; default:
    the latest), LoRA adapters of a fine-tuning run merged into its linear maps."""
    path = Path(path)
    if not has_checkpoint(path / CKPT_SUBDIR):
        raise CheckpointError(f"{str(path)!r} is not a training run with a checkpoint: pass a run directory "
                              f"(a folder with config.yaml and {CKPT_SUBDIR}/)")
    if checkpoint is not None and not checkpoint.exists():
        kept = sorted(p.name for p in (path / CKPT_SUBDIR).iterdir() if p.suffix in (".ckpt", ".dcp"))
        hint = f"; train with train.save_best=true to keep {BEST_CKPT}" if checkpoint.name in (BEST_CKPT, BEST_DCP) else ""
        raise CheckpointError(f"checkpoint {str(checkpoint)!r} not found: the run keeps {', '.join(kept) or 'none'}"
                              f"{hint}")
    cfg = load_run_config(path / "config.yaml")
    model = build_model(cfg.model)
    if cfg.finetune.lora_rank:
        add_lora(model, cfg.finetune.lora_rank, cfg.finetune.lora_alpha)
    _load_ema(model, path, checkpoint or latest_checkpoint(path / CKPT_SUBDIR))
    if cfg.finetune.lora_rank:
        merge_lora(model)
    return model


def _load_ema(model: DIMBA, path: Path, ckpt: Path) -> None:
    """Load the EMA weights of checkpoint ``ckpt`` of run ``path`` into ``model``."""
    if ckpt.is_dir():  # sharded (FSDP run): the EMA's shards assembled into whole tensors here
        check_state_fits(model, sharded.stored_shapes(ckpt, "ema.module."), path)
        sharded.load_ema_weights(ckpt, model)
        return
    ema = load_training_state(ckpt)["ema"]
    weights = {k.removeprefix("module."): v for k, v in (ema if isinstance(ema, dict) else {}).items()
               if isinstance(k, str) and k.startswith("module.") and isinstance(v, torch.Tensor)}
    check_state_fits(model, {name: tuple(t.shape) for name, t in weights.items()}, path)
    model.load_state_dict(weights, strict=True)


def load_for_inference(path: str | Path, map_location: str = "cpu") -> tuple[DIMBA, Tokenizer]:
    """(model, tokenizer) from an export folder (or Hub id ``owner/name``), a training run (the EMA weights of its
    latest checkpoint) or one checkpoint of a run (``RUN/checkpoints/best.ckpt``, ``step-N.ckpt``), in eval mode."""
    path, checkpoint = split_checkpoint(path)
    if checkpoint is not None:
        model = run_model(path, checkpoint).to(map_location)
    elif path.is_file():
        raise CheckpointError(f"{str(path)!r} is a file: pass a run directory (runs/NAME), one of its checkpoints "
                              f"(runs/NAME/{CKPT_SUBDIR}/{BEST_CKPT}) or an export folder")
    elif not path.is_dir():
        raise CheckpointError(f"model directory {str(path)!r} not found: pass a run directory (runs/NAME) or an export folder")
    elif (path / CONFIG_NAME).is_file():
        model = DIMBA.from_pretrained(path, map_location)
    elif has_checkpoint(path / CKPT_SUBDIR):
        model = run_model(path).to(map_location)
    else:
        raise CheckpointError(f"{str(path)!r} holds no model: expected {CONFIG_NAME} (export folder) or "
                              f"{CKPT_SUBDIR}/{LAST_CKPT} or {CKPT_SUBDIR}/{LAST_POINTER} (training run)")
    tok_path = path / TOKENIZER_NAME
    if not tok_path.is_file():
        raise CheckpointError(f"{str(tok_path)!r} not found: the model folder must hold its tokenizer.json")
    tokenizer = Tokenizer.from_file(tok_path)
    if tokenizer.vocab_size != model.config.vocab_size:
        raise CheckpointError(f"{str(tok_path)!r} has {tokenizer.vocab_size} tokens but the model's vocabulary has "
                              f"{model.config.vocab_size}: put the tokenizer.json the model was trained with beside it")
    return model.eval(), tokenizer


@functools.lru_cache(maxsize=2)
def _loaded_guide(path: str, device: str) -> DIMBA:
    return load_for_inference(path, device)[0]


def guide_model(path: str, model: DIMBA) -> DIMBA:
    """The weaker model of autoguidance (`SampleConfig.guide_model`) for ``model``, on its device (loaded once per
    path and device); one line if it cannot guide ``model`` or ``model``'s family takes no guide."""
    if "guide_model" not in model.family.sample_settings:
        raise UsageError(f"--guide-model (autoguidance) is available for the masked family, not {model.family}: "
                         "leave it out")
    device = next(model.parameters()).device
    try:
        guide = _loaded_guide(str(path), str(device))
    except CheckpointError as err:
        raise CheckpointError(f"--guide-model: {err}") from None
    mine, theirs = model.config, guide.config
    if str(guide.family) != str(model.family) or theirs.vocab_size != mine.vocab_size or theirs.block_size is not None:
        raise UsageError(f"--guide-model {path!r} holds a model of the {guide.family} family (vocabulary "
                         f"{theirs.vocab_size}, block_size {theirs.block_size}): autoguidance needs a full-sequence "
                         f"{model.family} model of the same tokenizer (vocabulary {mine.vocab_size}), e.g. an earlier "
                         "checkpoint of the run")
    return guide


def sample_defaults(path: str | Path) -> SampleConfig:
    """The sampler defaults of a model: a run's `sample` config, an export folder's sample_config.json (local or a Hub
    id), else `SampleConfig`'s defaults."""
    path = model_folder(path)
    if (path / "config.yaml").is_file():
        return load_run_config(path / "config.yaml").sample
    sample = read_sample(path) if path.is_dir() else None
    try:
        return SampleConfig(**(sample or {}))
    except ValidationError as err:
        first = err.errors()[0]
        raise CheckpointError(f"{str(path / SAMPLE_NAME)!r}: invalid {'.'.join(map(str, first['loc']))} "
                              f"({first['msg']}): fix or delete the file") from None
