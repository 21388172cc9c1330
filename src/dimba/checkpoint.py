"""Training state (atomic, resumable) and export folders (config.json + model.safetensors + tokenizer.json).

Nothing here unpickles arbitrary objects: weights are safetensors, configs JSON/YAML, and the
training state is read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model

from dimba.errors import CheckpointError

FORMAT_VERSION = 1
CONFIG_NAME, WEIGHTS_NAME, TOKENIZER_NAME = "config.json", "model.safetensors", "tokenizer.json"
LAST_CKPT = "last.ckpt"
CKPT_SUBDIR = "checkpoints"


def atomic_save(obj: Any, path: Path) -> None:
    """torch.save to a temporary file in the same folder, then rename over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_training_state(path: Path) -> dict[str, Any]:
    """Read a training checkpoint written by `atomic_save`."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} not found: pass a run directory that holds checkpoints/{LAST_CKPT}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user-facing problem
        raise CheckpointError(f"checkpoint {str(path)!r} is unreadable or not a dimba checkpoint ({type(exc).__name__}): "
                              "resume from another checkpoint") from None


def _model_card(model, extra: str) -> str:
    cfg = model.config
    return (
        f"# dimba model\n\nA continuous diffusion language model with a {'bidirectional ' if cfg.bidirectional else ''}"
        f"`{cfg.backbone}` denoiser ({model.num_parameters() / 1e6:.2f}M parameters, d_model={cfg.d_model}, "
        f"{cfg.num_denoiser_layers} layers, vocabulary {cfg.vocab_size}).\n\n"
        "```python\nfrom dimba import DIMBA, sample_from_model\nmodel = DIMBA.from_pretrained('PATH')\n```\n\n"
        "or `dimba generate PATH --prompt \"ROMEO:\"`.\n" + (f"\n{extra}\n" if extra else "")
    )


def save_pretrained(model, out_dir: str | Path, tokenizer=None, extra_card: str = "") -> Path:
    """Write an export folder; refuses a non-empty existing folder. Written in a temporary
    sibling folder and renamed, so a failure leaves nothing half-written."""
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointError(f"{str(out)!r} already exists and is not empty: choose another --out or remove it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        config = {"format_version": FORMAT_VERSION, "model_type": "dimba", **model.config.model_dump(mode="json")}
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        save_model(model, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        if tokenizer is not None:
            (tmp / TOKENIZER_NAME).write_text(tokenizer.to_str())
        (tmp / "README.md").write_text(_model_card(model, extra_card))
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out


def _read_config(path: Path) -> dict[str, Any]:
    cfg_path = path / CONFIG_NAME
    if not cfg_path.is_file():
        raise CheckpointError(f"{str(cfg_path)!r} not found: {str(path)!r} is not a dimba export folder")
    try:
        config = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{str(cfg_path)!r} is not valid JSON: re-export the model") from None
    if not isinstance(config, dict) or config.get("model_type") != "dimba":
        raise CheckpointError(f"{str(cfg_path)!r} does not describe a dimba model: re-export the model")
    return config


def load_pretrained(path: str | Path, map_location: str = "cpu"):
    """Build the model of an export folder and load its weights strictly."""
    from dimba.model import DIMBA

    path = Path(path)
    config = _read_config(path)
    config.pop("format_version", None)
    config.pop("model_type", None)
    try:
        model = DIMBA(**config)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{str(path / CONFIG_NAME)!r} has an invalid model config "
                              f"({str(exc).splitlines()[0]}): re-export the model") from None
    load_weights(model, path / WEIGHTS_NAME)
    return model.to(map_location)


def load_weights(model, weights: Path) -> None:
    """Load a safetensors file into ``model`` strictly, with one-line errors."""
    if not weights.is_file():
        raise CheckpointError(f"weights {str(weights)!r} not found: re-export the model")
    try:
        missing, unexpected = load_model(model, str(weights), strict=False)
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise CheckpointError(f"weights {str(weights)!r} are corrupted or do not fit this model "
                              f"({str(exc).splitlines()[0][:200]}): re-export the model") from None
    if missing or unexpected:
        raise CheckpointError(f"weights {str(weights)!r} do not match the model config: missing {sorted(missing)[:3]}, "
                              f"unexpected {sorted(unexpected)[:3]}: use the config.json exported with them")


def load_for_inference(path: str | Path, map_location: str = "cpu"):
    """(model, tokenizer) from an export folder or a training run (its EMA weights), in eval mode."""
    from dimba.config import load_run_config
    from dimba.model import build_model
    from dimba.tokenizer import Tokenizer

    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"model directory {str(path)!r} not found: pass a run directory (runs/NAME) or an export folder")
    if (path / CONFIG_NAME).is_file():
        model = load_pretrained(path, map_location)
    elif (path / CKPT_SUBDIR / LAST_CKPT).is_file():
        cfg = load_run_config(path / "config.yaml")
        model = build_model(cfg.model)
        ema = load_training_state(path / CKPT_SUBDIR / LAST_CKPT)["ema"]
        weights = {k.removeprefix("module."): v for k, v in ema.items() if k.startswith("module.")}
        try:
            model.load_state_dict(weights, strict=True)
        except RuntimeError as exc:
            raise CheckpointError(f"checkpoint of {str(path)!r} does not match its config.yaml "
                                  f"({str(exc).splitlines()[0][:200]}): resume or retrain the run") from None
        model.to(map_location)
    else:
        raise CheckpointError(f"{str(path)!r} holds no model: expected {CONFIG_NAME} (export folder) or "
                              f"{CKPT_SUBDIR}/{LAST_CKPT} (training run)")
    tok_path = path / TOKENIZER_NAME
    if not tok_path.is_file():
        raise CheckpointError(f"{str(tok_path)!r} not found: the model folder must hold its tokenizer.json")
    return model.eval(), Tokenizer.from_file(tok_path)
