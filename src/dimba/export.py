"""Export folders: ``config.json`` + ``model.safetensors`` + ``tokenizer.json`` + ``README.md`` (the model card).

Weights are safetensors and configs JSON: nothing here unpickles anything. This module builds no model itself:
`DIMBA.from_pretrained` passes its class to `build_from_config`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_model, save_model

from dimba.errors import CheckpointError, first_line

FORMAT_VERSION = 1
CONFIG_NAME, WEIGHTS_NAME, TOKENIZER_NAME = "config.json", "model.safetensors", "tokenizer.json"


def _model_card(model, extra: str) -> str:
    cfg = model.config
    family = model.family
    direction = "causal" if family.causal else "bidirectional" if cfg.bidirectional else "unidirectional"
    return (
        f"# dimba model\n\n{family.description} with a {direction} "
        f"`{cfg.backbone}` network ({model.num_parameters() / 1e6:.2f}M parameters, d_model={cfg.d_model}, "
        f"{cfg.num_denoiser_layers} layers, vocabulary {cfg.vocab_size}).\n\n"
        "```python\nfrom dimba import DIMBA, sample_from_model\nmodel = DIMBA.from_pretrained('PATH')\n```\n\n"
        "or `dimba generate PATH --prompt \"HAMLET:\"`.\n" + family.model_card(cfg) + (f"\n{extra}\n" if extra else "")
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


def read_config(path: Path) -> dict[str, Any]:
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


def build_from_config(cls, path: str | Path):
    """``cls(**config)`` of the config.json of export folder ``path`` (no weights loaded), with one-line errors."""
    path = Path(path)
    config = read_config(path)
    config.pop("format_version", None)
    config.pop("model_type", None)
    try:
        return cls(**config)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{str(path / CONFIG_NAME)!r} has an invalid model config "
                              f"({_config_problem(exc)}): re-export the model") from None


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


def mismatch(model, shapes: dict[str, tuple[int, ...]], complete: bool) -> str:
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
    problem = mismatch(model, shapes, complete=False)
    if not problem:
        try:
            missing, _ = load_model(model, str(weights), strict=False)
        except (SafetensorError, OSError, RuntimeError) as exc:
            raise CheckpointError(corrupted.format(str(weights), first_line(exc, 200))) from None
        problem = _key_problem(sorted(missing), [])
    if problem:
        raise CheckpointError(f"weights {str(weights)!r} do not fit their config.json ({problem}; another vocabulary, "
                              "family or size?): use the config.json exported with them")
