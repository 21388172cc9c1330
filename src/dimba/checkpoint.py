"""Training state (atomic, resumable) and export folders (config.json + model.safetensors + tokenizer.json).

Nothing here unpickles arbitrary objects: weights are safetensors, configs JSON/YAML, and the
training state is read with ``torch.load(weights_only=True)``. The sharded checkpoints of FSDP runs
(`dimba.sharded`) hold a pickled DCP ``.metadata``, read with an unpickler restricted to DCP's own classes.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_model, save_model

from dimba.errors import CheckpointError, first_line

FORMAT_VERSION = 1
CONFIG_NAME, WEIGHTS_NAME, TOKENIZER_NAME = "config.json", "model.safetensors", "tokenizer.json"
LAST_CKPT = "last.ckpt"
LAST_POINTER = "last.json"  # of FSDP runs: names the latest sharded checkpoint directory
CKPT_SUBDIR = "checkpoints"


def atomic_save(obj: Any, path: Path) -> None:
    """torch.save to a hidden temporary file in the same folder, flushed to disk, then renamed over
    ``path``: a crash at any moment leaves the old file or the new one, never a half-written one
    (at worst a stale ``.NAME.*`` temporary, which `remove_partial_saves` deletes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def remove_partial_saves(folder: Path) -> None:
    """Delete the temporaries of checkpoint saves that a crash interrupted in ``folder``: ``.NAME.ckpt.*`` files,
    ``.NAME.dcp.*`` directories of sharded checkpoints and ``.last.json.*`` pointers."""
    for tmp in [*folder.glob(".*.ckpt.*"), *folder.glob(f".{LAST_POINTER}.*")]:
        tmp.unlink(missing_ok=True)
    for tmp in folder.glob(".*.dcp.*"):
        shutil.rmtree(tmp, ignore_errors=True)


def has_checkpoint(folder: Path) -> bool:
    """Whether ``folder`` (a run's checkpoints/) holds a training checkpoint: last.ckpt, or last.json (FSDP runs)."""
    return (folder / LAST_CKPT).is_file() or (folder / LAST_POINTER).is_file()


def latest_checkpoint(folder: Path) -> Path:
    """The latest training checkpoint in ``folder`` (a run's checkpoints/): the sharded checkpoint directory that
    last.json points to (FSDP runs), otherwise last.ckpt (which may not exist)."""
    from dimba.sharded import latest

    return latest(folder) or folder / LAST_CKPT


_STATE_KEYS = ("model", "ema", "optimizer", "scheduler", "step", "rng")


def load_training_state(path: Path) -> dict[str, Any]:
    """Read a training checkpoint written by `atomic_save` (tensors and plain containers only: a file
    that would run code when unpickled is refused without running it). For a sharded checkpoint (a directory)
    it reads the per-run state only, with ``"sharded"``: its path; the shards are loaded by `dimba.sharded.load`."""
    if path.is_dir() and path.suffix == ".dcp":
        from dimba.sharded import read_run_state

        return read_run_state(path)
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


def _model_card(model, extra: str) -> str:
    cfg = model.config
    kind = {"continuous": "A continuous (Gaussian latent) diffusion language model",
            "masked": "A masked ([MASK] absorbing-state) diffusion language model",
            "hybrid": "A hybrid (per-token masked or Gaussian) diffusion language model",
            "ar": "An autoregressive language model"}[cfg.family]
    direction = "causal" if cfg.family == "ar" else "bidirectional" if cfg.bidirectional else "unidirectional"
    return (
        f"# dimba model\n\n{kind} with a {direction} "
        f"`{cfg.backbone}` network ({model.num_parameters() / 1e6:.2f}M parameters, d_model={cfg.d_model}, "
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


def _config_problem(exc: Exception) -> str:
    """The first problem of a model config that `DIMBA` refused, in a few words."""
    if isinstance(exc, ValidationError):
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        return f"{where}: {first['msg']}" if where else first["msg"]
    return first_line(exc, 200)


def _key_problem(missing: list[str], unexpected: list[str]) -> str:
    """Missing and unexpected weight names in a few words; '' when there are none."""
    parts = ([f"it lacks {len(missing)} weights the config needs, e.g. {missing[0]!r}"] if missing else []) + (
        [f"it holds {len(unexpected)} weights the config does not know, e.g. {unexpected[0]!r}"] if unexpected else [])
    return " and ".join(parts)


def _mismatch(model, shapes: dict[str, tuple[int, ...]], complete: bool) -> str:
    """How stored weights (name -> shape) fail to fit ``model``, in a few words; '' when they fit.

    With ``complete`` every weight of the model must be stored; safetensors files keep only one
    name of each tied pair, which `load_model` resolves itself.
    """
    own = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    for name, shape in shapes.items():
        if name in own and own[name] != shape:
            return f"its {name!r} has shape {shape} but the config needs {own[name]}"
    missing = sorted(own.keys() - shapes.keys()) if complete else []
    return _key_problem(missing, sorted(shapes.keys() - own.keys()))


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
                              f"({_config_problem(exc)}): re-export the model") from None
    load_weights(model, path / WEIGHTS_NAME)
    return model.to(map_location)


def load_weights(model, weights: Path) -> None:
    """Load a safetensors file into ``model`` strictly, with one-line errors."""
    if not weights.is_file():
        what = "is a folder, not a safetensors file" if weights.is_dir() else "not found"
        raise CheckpointError(f"weights file {str(weights)!r} {what}: re-export the model")
    corrupted = "weights {!r} are corrupted ({}): re-export the model"
    try:
        with safe_open(str(weights), framework="pt") as f:
            shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(corrupted.format(str(weights), first_line(exc, 200))) from None
    problem = _mismatch(model, shapes, complete=False)
    if not problem:
        try:
            missing, _ = load_model(model, str(weights), strict=False)
        except (SafetensorError, OSError, RuntimeError) as exc:
            raise CheckpointError(corrupted.format(str(weights), first_line(exc, 200))) from None
        problem = _key_problem(sorted(missing), [])
    if problem:
        raise CheckpointError(f"weights {str(weights)!r} do not fit their config.json ({problem}; another vocabulary, "
                              "family or size?): use the config.json exported with them")


def check_state_fits(model, shapes: dict[str, tuple[int, ...]], run: str | Path) -> None:
    """Raise a one-line `CheckpointError` unless a state dict with ``shapes`` (name -> shape) of run ``run`` loads
    strictly into ``model`` (built from the run's config.yaml)."""
    problem = _mismatch(model, shapes, complete=True)
    if problem:
        raise CheckpointError(f"the checkpoint of {str(run)!r} does not fit its config.yaml ({problem}; was "
                              "config.yaml edited, e.g. model.family?): restore the run's config.yaml or retrain")


def load_for_inference(path: str | Path, map_location: str = "cpu"):
    """(model, tokenizer) from an export folder or a training run (its EMA weights), in eval mode."""
    from dimba.config import load_run_config
    from dimba.model import build_model
    from dimba.tokenizer import Tokenizer

    path = Path(path)
    if path.is_file():
        raise CheckpointError(f"{str(path)!r} is a file: pass a run directory (runs/NAME) or an export folder")
    if not path.is_dir():
        raise CheckpointError(f"model directory {str(path)!r} not found: pass a run directory (runs/NAME) or an export folder")
    if (path / CONFIG_NAME).is_file():
        model = load_pretrained(path, map_location)
    elif has_checkpoint(path / CKPT_SUBDIR):
        cfg = load_run_config(path / "config.yaml")
        model = build_model(cfg.model)
        ckpt = latest_checkpoint(path / CKPT_SUBDIR)
        if ckpt.is_dir():  # sharded (FSDP run): the EMA's shards assembled into whole tensors here
            from dimba.sharded import load_ema_weights, stored_shapes

            check_state_fits(model, stored_shapes(ckpt, "ema.module."), path)
            load_ema_weights(ckpt, model)
        else:
            ema = load_training_state(ckpt)["ema"]
            weights = {k.removeprefix("module."): v for k, v in (ema if isinstance(ema, dict) else {}).items()
                       if isinstance(k, str) and k.startswith("module.") and isinstance(v, torch.Tensor)}
            check_state_fits(model, {name: tuple(t.shape) for name, t in weights.items()}, path)
            model.load_state_dict(weights, strict=True)
        model.to(map_location)
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
