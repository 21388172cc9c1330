"""`dimba export` and `dimba push`: a run (or an export folder) written as an export folder whose model card records
the run, optionally with its likelihood measured, and uploaded to the Hugging Face Hub."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from dimba.config import load_run_config
from dimba.errors import UsageError
from dimba.export import CONFIG_NAME
from dimba.hub import push, resolve
from dimba.loading import load_for_inference, sample_defaults, split_checkpoint
from dimba.run_card import run_card
from dimba.training.checkpoint import latest_checkpoint, load_training_state
from dimba.training.files import CKPT_SUBDIR


def measure(model, tokenizer, cfg, mc_samples: int = 8, seed: int = 0, max_tokens: int | None = None) -> dict:
    """The likelihood of the validation split of the run's own corpus (config ``cfg``), as `dimba eval` computes it
    (the bounds' reverse process chosen on 8 training blocks), with the corpus, split and seed it was measured on."""
    from dimba.data import open_data
    from dimba.evaluation.likelihood import evaluate_likelihood

    data = open_data(cfg.data, tokenizer)
    blocks = data.val  # (M, L)
    if max_tokens is not None:
        blocks = blocks[: max(1, -(-max_tokens // blocks.shape[1]))]
    result = evaluate_likelihood(model, blocks, tokenizer, mc_samples=mc_samples,
                                 generator=torch.Generator().manual_seed(seed), calibration_blocks=data.train_head(8))
    return {**result, "corpus": cfg.data.corpus, "split": "val", "seed": seed}


def export_model(source: str | Path, out: str | Path, evaluate: bool = False, mc_samples: int = 8, seed: int = 0,
                 max_tokens: int | None = None) -> Path:
    """Write the export folder ``out`` of a run (the EMA weights of its latest checkpoint, or of the checkpoint
    ``source`` names: ``RUN/checkpoints/best.ckpt``) or an export folder ``source``: weights, config,
    tokenizer, the sampler defaults (sample_config.json) and a model card recording the run; with ``evaluate``, the
    card also gives the bits per byte of the run's validation split (`measure`)."""
    model, tokenizer = load_for_inference(source)
    folder, checkpoint = split_checkpoint(source)
    cfg = load_run_config(folder / "config.yaml") if (folder / "config.yaml").is_file() else None
    steps = (int(load_training_state(checkpoint or latest_checkpoint(folder / CKPT_SUBDIR))["step"])
             if cfg is not None else None)
    if evaluate and cfg is None:
        raise UsageError(f"--eval measures the validation split of the training run's corpus, but {str(source)!r} is "
                         "an export folder: export the run itself, or measure with `dimba eval`")
    evaluation = measure(model, tokenizer, cfg, mc_samples, seed, max_tokens) if evaluate else None
    card = run_card(cfg, steps, tokenizer.vocab_size, evaluation)
    return model.save_pretrained(out, tokenizer, extra_card=card, sample=sample_defaults(folder).model_dump())


def push_model(source: str | Path, repo_id: str, private: bool = False, **export_options) -> str:
    """Upload a run (exported first, to a temporary folder, with ``export_options`` of `export_model`) or an export
    folder, as it is, to the Hub model repository ``repo_id``; returns its URL."""
    folder = resolve(source)
    if (folder / CONFIG_NAME).is_file():
        model, _ = load_for_inference(folder)  # refuse a damaged folder before uploading it
        return push(folder, repo_id, private, f"Upload a dimba {model.family} model")
    with tempfile.TemporaryDirectory(prefix="dimba-push-") as tmp:
        exported = export_model(source, Path(tmp) / "export", **export_options)
        return push(exported, repo_id, private, "Upload a dimba model exported from a training run")
