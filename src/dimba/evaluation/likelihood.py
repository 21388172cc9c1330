"""Likelihood evaluation of any family, in nats per token and bits per byte.

The model's family estimates -log p of the blocks (`Family.likelihood`): the exact NLL (ar: tokens 1..L-1 of
each block given the tokens before them; token 0 has no context and is neither scored nor counted), or an upper
bound on it (masked: the continuous-time NELBO; continuous and hybrid: the variational bound of the latent
Gaussian process, `dimba.families.gaussian_bound`), each on all L tokens.

Bits per byte = total nats / ln 2 / UTF-8 bytes of the evaluated text, where the text is the
scored token ids of each block decoded by the tokenizer (special tokens such as [EOS] decode to
nothing). It counts exactly the tokens that were scored, so numbers compare across tokenizers.
"""

from __future__ import annotations

import math
import time

import torch

from dimba.errors import UsageError
from dimba.families import Family


def _text_bytes(blocks: torch.Tensor, tokenizer) -> int:
    """UTF-8 bytes of the text of each row of ``blocks`` (R, L'), decoded row by row."""
    return sum(len(tokenizer.decode(row.tolist()).encode("utf-8")) for row in blocks)


@torch.no_grad()
def evaluate_likelihood(model, blocks: torch.Tensor, tokenizer, mc_samples: int = 8,
                        generator: torch.Generator | None = None, batch_size: int = 16,
                        progress: bool = False, calibration_blocks: torch.Tensor | None = None, **options) -> dict:
    """NLL (exact) or an upper bound on it (the diffusion families) of ``blocks`` (N, L) LongTensor.

    Returns a dict: family, nll_nats_per_token, bits_per_byte, is_bound, mc_samples (0 for an exact NLL),
    stderr_nats_per_token (of the Monte Carlo estimate; 0 for an exact NLL), stderr_bits_per_byte, tokens,
    bytes, blocks, seconds; a bound with parts adds ``parts_nats_per_token`` (continuous / hybrid: diffusion,
    absorbing, reconstruction, prior) and what else the family reports (continuous / hybrid: ``t0``, ``clamp``,
    ``snr_t0``). ``batch_size`` counts rows per forward pass (for the bounds, one row is one (block, sample)
    pair). ``generator`` (CPU) drives the estimators' randomness. ``options`` are the settings of the family's
    estimator (`Family.likelihood_options`; continuous / hybrid: ``t0``, where the reverse process stops and
    rounds, and ``clamp`` (none | soft), the x0 estimate it steps with; an option the family does not take is a
    `UsageError`); those not given are chosen on ``calibration_blocks`` (default: the first 8 evaluated blocks).
    """
    family = getattr(model, "family", None)
    if not isinstance(family, Family):
        raise UsageError(f"cannot evaluate the likelihood of {type(model).__name__}: it has no dimba family")
    if blocks.dim() != 2 or blocks.shape[0] < 1 or blocks.shape[1] < 2:
        raise UsageError(f"need blocks of shape (N >= 1, L >= 2), got {tuple(blocks.shape)}")
    if mc_samples < 1 or batch_size < 1:
        raise UsageError(f"--mc-samples and --batch-size must be at least 1, got {mc_samples} and {batch_size}")
    family.check_likelihood_options(options)
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    start = time.perf_counter()
    calibration = None if calibration_blocks is None else calibration_blocks.long().cpu()
    estimate = family.likelihood(model, blocks.long().cpu(), mc_samples, batch_size, generator, progress,
                                 calibration, **{k: v for k, v in options.items() if k in family.likelihood_options})
    if was_training:
        model.train()
    tokens, nbytes = estimate.scored.numel(), _text_bytes(estimate.scored, tokenizer)
    bits = 1 / math.log(2) / max(nbytes, 1)
    result = {
        "family": family.name,
        "nll_nats_per_token": estimate.total_nats / tokens,
        "bits_per_byte": estimate.total_nats * bits,
        "is_bound": not family.exact_likelihood,
        "mc_samples": estimate.mc_samples,
        "stderr_nats_per_token": estimate.stderr_nats / tokens,
        "stderr_bits_per_byte": estimate.stderr_nats * bits,
        "tokens": tokens,
        "bytes": nbytes,
        "blocks": len(blocks),
        "seconds": time.perf_counter() - start,
    }
    if estimate.parts_nats:
        result["parts_nats_per_token"] = {name: value / tokens for name, value in estimate.parts_nats.items()}
    return {**result, **estimate.extra}
