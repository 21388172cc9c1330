"""Likelihood evaluation of the token families, in nats per token and bits per byte.

- ``ar``: the exact negative log-likelihood. Each block (N, L) is scored on its tokens 1..L-1,
  every one conditioned on all the tokens before it in the block; token 0 has no context and is
  neither scored nor counted (no EOS is prepended, which would exceed the training context).
- ``masked``: the continuous-time NELBO of masked diffusion (MDLM eq. 10), an upper bound on the
  NLL of all L tokens of each block, estimated by Monte Carlo (see `_masked_block_terms`).
- ``continuous`` and ``hybrid``: the variational bound of the latent-Gaussian process on all L
  tokens (diffusion + reconstruction + prior terms, VDM style; see `dimba.likelihood_gaussian`),
  not the training loss.

Bits per byte = total nats / ln 2 / UTF-8 bytes of the evaluated text, where the text is the
evaluated token ids of each block decoded by the tokenizer (special tokens such as [EOS] decode to
nothing). It counts exactly the tokens that were scored, so numbers compare across tokenizers.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
from tqdm.auto import tqdm

from dimba import likelihood_gaussian as gaussian
from dimba.likelihood_gaussian import model_device
from dimba.diffusion.masked import subs_log_probs
from dimba.errors import UsageError

FAMILIES = ("ar", "masked", "continuous", "hybrid")


def _text_bytes(blocks: torch.Tensor, tokenizer) -> int:
    """UTF-8 bytes of the text of each row of ``blocks`` (R, L'), decoded row by row."""
    return sum(len(tokenizer.decode(row.tolist()).encode("utf-8")) for row in blocks)


def _ar_block_nll(model, blocks: torch.Tensor, batch_size: int, progress: bool) -> np.ndarray:
    """Exact -log p(x_1..x_{L-1} | x_0) of each block, float64 (N,).

    logits[:, l] predict token l + 1; log-softmax is taken in float64.
    """
    out = []
    for start in tqdm(range(0, len(blocks), batch_size), desc="eval ar", disable=not progress, leave=False):
        x = blocks[start:start + batch_size].to(model_device(model))  # (B, L)
        logp = model.token_logits(x)[:, :-1].double().log_softmax(-1)  # (B, L-1, V)
        nll = -logp.gather(-1, x[:, 1:, None])[..., 0]  # (B, L-1)
        out.append(nll.sum(-1).cpu().numpy())
    return np.concatenate(out)  # (N,)


def _masked_block_terms(model, blocks: torch.Tensor, mc_samples: int, batch_size: int,
                        generator: torch.Generator | None, progress: bool) -> np.ndarray:
    """Monte Carlo terms X[i, k] of the masked-diffusion NELBO of each block, float64 (N, K).

    The continuous-time NELBO is  E_t [ w(t) sum_{l masked in x_t} -log p_SUBS(x_0^l | x_t) ]  with
    w(t) = -alpha'(t) / (1 - alpha(t)). The dimba masked denoiser does not see t, so substituting
    s = 1 - alpha(t) makes the bound the same for every schedule (MDLM §3.2, MD4), and integrating s
    out given the number m of masked tokens (the integral of C(L, m) s^(m-1) (1-s)^(L-m) ds is 1/m)
    gives the exactly equal form

        NELBO(x) = E_{m ~ U{1..L}} E_{S: |S| = m, uniform} [ (L / m) sum_{l in S} -log p_SUBS(x^l | x_S masked) ].

    This form is estimated rather than the t-form: its weight L/m is at most L, whereas the
    t-form's w(t) ~ 1/t gives it infinite variance near t = 0. Per block, the K samples are
    stratified: s_k = (k + u) / K with one u ~ U(0, 1) per block, and m_k = max(1, ceil(L s_k)),
    so m is uniform on {1..L} in each stratum average. Sums accumulate in float64.
    """
    n, length = blocks.shape
    dev = model_device(model)
    u = torch.rand(n, 1, generator=generator, dtype=torch.float64)  # (N, 1)
    s = (torch.arange(mc_samples, dtype=torch.float64)[None] + u) / mc_samples  # (N, K)
    m = (s * length).ceil().clamp(1, length).long().flatten()  # (N*K,)
    rows = torch.arange(n).repeat_interleave(mc_samples)  # (N*K,) block of each row
    terms = []
    for start in tqdm(range(0, n * mc_samples, batch_size), desc="eval masked", disable=not progress, leave=False):
        idx = rows[start:start + batch_size]
        x0 = blocks[idx]  # (B, L)
        mb = m[start:start + batch_size]  # (B,)
        # a uniform subset of m positions: the m smallest of L uniform keys
        keys = torch.rand(x0.shape, generator=generator)  # (B, L)
        rank = keys.argsort(-1).argsort(-1)  # (B, L)
        masked = rank < mb[:, None]  # (B, L)
        x0, masked = x0.to(dev), masked.to(dev)
        x_t = torch.where(masked, torch.full_like(x0, model.mask_id), x0)  # (B, L)
        logp = subs_log_probs(model.token_logits(x_t).double(), x_t, model.mask_id)  # (B, L, V) float64
        nll = -logp.gather(-1, x0[..., None])[..., 0]  # (B, L)
        nll = torch.where(masked, nll, torch.zeros_like(nll)).sum(-1)  # (B,)
        terms.append((nll * length / mb.to(dev).double()).cpu().numpy())
    return np.concatenate(terms).reshape(n, mc_samples)  # (N, K)


def _mc_stderr(terms: np.ndarray) -> float:
    """Monte Carlo standard error of the total bound estimate (nats), given the data, from terms (N, K).

    Per block, the variance of its K-sample mean is estimated as the sample variance of its terms
    over K (treating the stratified samples as independent, which overstates it: stratification
    only lowers the variance); blocks are independent, so their variances add. With K = 1 there is
    no within-block spread, and the spread of the N terms across blocks is used instead (it also
    counts the variation between blocks, so again it overstates the Monte Carlo error).
    """
    n, k = terms.shape
    if k > 1:
        return float(math.sqrt(terms.var(axis=1, ddof=1).sum() / k))
    return float(terms[:, 0].std(ddof=1) * math.sqrt(n)) if n > 1 else float("nan")


def _gaussian_total(model, blocks, mc_samples, batch_size, generator, progress, t0,
                    clamp) -> tuple[float, float, dict]:
    """Total bound (nats), its standard error and the per-part totals of a continuous / hybrid model."""
    gauss, absorb = gaussian.diffusion_terms(model, blocks, mc_samples, batch_size, generator, progress, t0,
                                             clamp)  # (N, K) each
    recon = gaussian.reconstruction_nats(model, blocks, batch_size, generator, progress, t0)  # (N,)
    prior = gaussian.prior_nats(model, blocks)  # (N,)
    parts = {"diffusion": float(gauss.mean(1).sum()), "absorbing": float(absorb.mean(1).sum()),
             "reconstruction": float(recon.sum()), "prior": float(prior.sum())}
    # the reconstruction is one draw per block: its spread across blocks overstates its Monte Carlo error
    recon_var = recon.var(ddof=1) * len(recon) if len(recon) > 1 else 0.0
    stderr = math.sqrt(_mc_stderr(gauss + absorb) ** 2 + recon_var)
    return sum(parts.values()), stderr, parts


@torch.no_grad()
def evaluate_likelihood(model, blocks: torch.Tensor, tokenizer, mc_samples: int = 8,
                        generator: torch.Generator | None = None, batch_size: int = 16,
                        progress: bool = False, t0: float | None = None, clamp: str | None = None,
                        calibration_blocks: torch.Tensor | None = None) -> dict:
    """NLL (ar, exact) or an upper bound on it (the diffusion families) of ``blocks`` (N, L) LongTensor.

    Returns a dict: family, nll_nats_per_token, bits_per_byte, is_bound, mc_samples
    (0 for ar), stderr_nats_per_token (of the Monte Carlo estimate; 0 for ar), stderr_bits_per_byte, tokens,
    bytes, blocks, seconds; continuous / hybrid add ``parts_nats_per_token`` (diffusion, absorbing,
    reconstruction, prior), ``t0``, ``snr_t0`` and ``clamp``. ``batch_size`` counts rows per forward pass
    (for the bounds, one row is one (block, sample) pair). ``generator`` (CPU) drives the estimators'
    randomness. continuous / hybrid: ``t0`` is where the reverse process stops and rounds, ``clamp``
    (none | soft) the x0 estimate it steps with; None chooses with
    `dimba.likelihood_gaussian.choose_reverse` on ``calibration_blocks`` (default: the first 8 evaluated blocks).
    """
    family = getattr(model, "family", None)
    if family not in FAMILIES:
        raise UsageError(f"cannot evaluate the likelihood of a {family!r} model: families are {', '.join(FAMILIES)}")
    if blocks.dim() != 2 or blocks.shape[0] < 1 or blocks.shape[1] < 2:
        raise UsageError(f"need blocks of shape (N >= 1, L >= 2), got {tuple(blocks.shape)}")
    if mc_samples < 1 or batch_size < 1:
        raise UsageError(f"--mc-samples and --batch-size must be at least 1, got {mc_samples} and {batch_size}")
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    start = time.perf_counter()
    blocks = blocks.long().cpu()
    parts = None
    if family == "ar":
        total = float(_ar_block_nll(model, blocks, batch_size, progress).sum())
        tokens, nbytes = blocks[:, 1:].numel(), _text_bytes(blocks[:, 1:], tokenizer)
        stderr, k = 0.0, 0
    else:
        tokens, nbytes, k = blocks.numel(), _text_bytes(blocks, tokenizer), mc_samples
        if family == "masked":
            terms = _masked_block_terms(model, blocks, mc_samples, batch_size, generator, progress)  # (N, K)
            total, stderr = float(terms.mean(axis=1).sum()), _mc_stderr(terms)
        else:
            if t0 is not None and not 0 < t0 < 1:
                raise UsageError(f"--t0 must lie in (0, 1), got {t0}")
            if clamp is not None and clamp not in gaussian.CLAMPS:
                raise UsageError(f"--clamp must be one of {', '.join(gaussian.CLAMPS)}, got {clamp!r}")
            if t0 is None or clamp is None:
                calib = blocks[:8] if calibration_blocks is None else calibration_blocks.long().cpu()
                clamp, t0, _ = gaussian.choose_reverse(model, calib, clamp, t0, generator, batch_size)
            total, stderr, parts = _gaussian_total(model, blocks, mc_samples, batch_size, generator, progress, t0,
                                                   clamp)
    if was_training:
        model.train()
    bits = 1 / math.log(2) / max(nbytes, 1)
    result = {
        "family": family,
        "nll_nats_per_token": total / tokens,
        "bits_per_byte": total * bits,
        "is_bound": family != "ar",
        "mc_samples": k,
        "stderr_nats_per_token": stderr / tokens,
        "stderr_bits_per_byte": stderr * bits,
        "tokens": tokens,
        "bytes": nbytes,
        "blocks": len(blocks),
        "seconds": time.perf_counter() - start,
    }
    if parts is not None:
        result["parts_nats_per_token"] = {name: value / tokens for name, value in parts.items()}
        result["t0"], result["clamp"] = t0, clamp
        result["snr_t0"] = float(model.schedule.snr_and_slope(torch.tensor([t0], dtype=torch.float64))[0])
    return result
