"""Export folders: ``config.json`` + ``model.safetensors`` + ``tokenizer.json`` + ``sample_config.json`` (the sampler
defaults of the run) + ``README.md`` (the model card, with Hugging Face Hub metadata).

Weights are safetensors and configs JSON: nothing here unpickles anything. This module builds no model itself:
`DIMBA.from_pretrained` passes its class to `build_from_config`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_model, save_model

from dimba.errors import CheckpointError, first_line
from dimba.io import disk_errors

FORMAT_VERSION = 1
CONFIG_NAME, WEIGHTS_NAME, TOKENIZER_NAME = "config.json", "model.safetensors", "tokenizer.json"
SAMPLE_NAME = "sample_config.json"  # the run's `sample` settings: what `dimba generate` uses for flags left out


def _front_matter(model) -> str:
    """The Hugging Face Hub metadata of the card (YAML between --- lines)."""
    meta = {"library_name": "dimba", "pipeline_tag": "text-generation",
            "tags": ["dimba", "diffusion-language-model", f"{model.family}-family", model.config.backbone]}
    return f"---\n{yaml.safe_dump(meta, sort_keys=False)}---\n\n"


def _process_lines(cfg, family, sample: dict | None) -> str:
    """The card's lines on the process: training T and context, and the sampler defaults."""
    steps = (f"the diffusion process has T = {cfg.num_diffusion_steps} steps (`num_diffusion_steps`; an integer "
             "timestep k stands for t = (k + 1) / T, training and sampling run in continuous time)"
             if family.has_steps else "no diffusion steps (left to right, one token per step)")
    lines = f"\n- Trained on blocks of {cfg.context_length or 'unknown'} tokens; {steps}.\n"
    if sample:
        shown = ", ".join(f"{k}={v}" for k, v in sample.items())
        lines += f"- Sampler defaults (`{SAMPLE_NAME}`, used by `dimba generate` for flags left out): {shown}.\n"
    return lines


def _model_card(model, extra: str, sample: dict | None = None) -> str:
    cfg = model.config
    family = model.family
    direction = "causal" if family.causal else "bidirectional" if cfg.bidirectional else "unidirectional"
    return (
        _front_matter(model) + f"# dimba model\n\n{family.description} with a {direction} "
        f"`{cfg.backbone}` network ({model.num_parameters() / 1e6:.2f}M parameters, d_model={cfg.d_model}, "
        f"{cfg.num_denoiser_layers} layers, vocabulary {cfg.vocab_size}).\n\n"
        "```python\nfrom dimba import DIMBA, sample_from_model\nmodel = DIMBA.from_pretrained('PATH')\n```\n\n"
        "or `dimba generate PATH --prompt \"HAMLET:\"` (PATH: this folder, or its Hub id OWNER/NAME).\n"
        + _process_lines(cfg, family, sample) + family.model_card(cfg) + (f"\n{extra}\n" if extra else "")
    )


def save_pretrained(model, out_dir: str | Path, tokenizer=None, extra_card: str = "", sample: dict | None = None
                    ) -> Path:
    """Write an export folder (with ``sample``, the sampler defaults, as sample_config.json); refuses a non-empty
    existing folder. Written in a temporary sibling folder and renamed, so a failure (a full disk, a read-only
    folder: a one-line `DiskError`) leaves nothing half-written."""
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointError(f"{str(out)!r} already exists and is not empty: choose another --out or remove it")
    with disk_errors(out, "or choose another --out"):
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        try:
            config = {"format_version": FORMAT_VERSION, "model_type": "dimba", **model.config.model_dump(mode="json")}
            (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
            _save_weights(model, tmp / WEIGHTS_NAME)
            if tokenizer is not None:
                (tmp / TOKENIZER_NAME).write_text(tokenizer.to_str())
            if sample is not None:
                (tmp / SAMPLE_NAME).write_text(json.dumps(sample, indent=2) + "\n")
            (tmp / "README.md").write_text(_model_card(model, extra_card, sample))
            if out.exists():
                out.rmdir()
            os.replace(tmp, out)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return out


def _save_weights(model, path: Path) -> None:
    """`save_model` to ``path``; a failed write is raised as the OSError it was (safetensors names the OS error
    only in the message of its own exception)."""
    try:
        save_model(model, str(path), metadata={"format": "pt"})
    except SafetensorError as exc:
        code = re.search(r"os error (\d+)", str(exc))
        if code is None:
            raise
        raise OSError(int(code[1]), os.strerror(int(code[1])), str(path)) from None


def read_sample(path: Path) -> dict[str, Any] | None:
    """The sampler defaults (sample_config.json) of export folder ``path``; None if it has none."""
    sample_path = path / SAMPLE_NAME
    if not sample_path.is_file():
        return None
    try:
        sample = json.loads(sample_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        raise CheckpointError(f"{str(sample_path)!r} is not valid JSON: re-export the model or delete it") from None
    if not isinstance(sample, dict):
        raise CheckpointError(f"{str(sample_path)!r} is not a JSON object of sampler settings: re-export the model")
    return sample


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
