"""Load a model for inference from a training run (its EMA weights) or an export folder, with its tokenizer."""

from __future__ import annotations

from pathlib import Path

import torch

from dimba.config import load_run_config
from dimba.data.tokenizer import Tokenizer
from dimba.errors import CheckpointError
from dimba.export import CONFIG_NAME, TOKENIZER_NAME
from dimba.model import DIMBA, build_model
from dimba.training import sharded
from dimba.training.checkpoint import check_state_fits, latest_checkpoint, load_training_state
from dimba.training.files import CKPT_SUBDIR, LAST_CKPT, LAST_POINTER, has_checkpoint


def _run_model(path: Path) -> DIMBA:
    """The model of training run ``path`` with the EMA weights of its latest checkpoint."""
    model = build_model(load_run_config(path / "config.yaml").model)
    ckpt = latest_checkpoint(path / CKPT_SUBDIR)
    if ckpt.is_dir():  # sharded (FSDP run): the EMA's shards assembled into whole tensors here
        check_state_fits(model, sharded.stored_shapes(ckpt, "ema.module."), path)
        sharded.load_ema_weights(ckpt, model)
        return model
    ema = load_training_state(ckpt)["ema"]
    weights = {k.removeprefix("module."): v for k, v in (ema if isinstance(ema, dict) else {}).items()
               if isinstance(k, str) and k.startswith("module.") and isinstance(v, torch.Tensor)}
    check_state_fits(model, {name: tuple(t.shape) for name, t in weights.items()}, path)
    model.load_state_dict(weights, strict=True)
    return model


def load_for_inference(path: str | Path, map_location: str = "cpu") -> tuple[DIMBA, Tokenizer]:
    """(model, tokenizer) from an export folder or a training run (its EMA weights), in eval mode."""
    path = Path(path)
    if path.is_file():
        raise CheckpointError(f"{str(path)!r} is a file: pass a run directory (runs/NAME) or an export folder")
    if not path.is_dir():
        raise CheckpointError(f"model directory {str(path)!r} not found: pass a run directory (runs/NAME) or an export folder")
    if (path / CONFIG_NAME).is_file():
        model = DIMBA.from_pretrained(path, map_location)
    elif has_checkpoint(path / CKPT_SUBDIR):
        model = _run_model(path).to(map_location)
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
