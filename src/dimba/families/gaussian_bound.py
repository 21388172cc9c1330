"""The variational bound on the NLL of the latent-Gaussian families (continuous, hybrid), VDM style.

**continuous.** Tokens x (L,) have the deterministic clean latent z_0 = encode(x) (L, d). The
generative model is the reverse of the Gaussian process q(z_t | x) = N(a_t z_0, s_t^2 I)
(a_t^2 = alpha_bar(t), SNR = a^2 / s^2) from t = 1 down to t_0, in the continuous-time limit
with the reverse step q(z_s | z_t, z_0 = x0_hat(z_t, t)), then the decoder
p(x | z_t0) = prod_l softmax(decode(x0_hat(z_t0, t0)))_l ("rounding through the output head").
Its NLL is bounded by (Kingma et al. 2021, VDM eq. 17; Gulrajani & Hashimoto 2023, Plaid)

    -log p(x) <= E[-log p(x | z_t0)]                                   reconstruction
               + KL(q(z_1 | x) || N(0, I))                             prior (0 with zero terminal SNR)
               + 1/2 int_{t0}^{1} -SNR'(t) E_eps ||z_0 - x0_hat(z_t, t)||^2 dt.     diffusion

x0_hat is `DIMBA.estimate`: unconditional, and self-conditioned on its own first estimate at the
same z_t when the model uses self-conditioning, so it is a deterministic function of (z_t, t) and
the bound holds.

**t_0 and the clamp** are part of the generative model, and every choice gives a valid bound: t_0
is where the reverse process stops and rounds; the clamp is which deterministic x0 estimate the
reverse steps use, the network's own (``none``) or the mean of the codebook under the head's
distribution (``soft``: score interpolation, CDCD; `dimba generate --clamp soft`). The choice
matters: an x0-predicting network has an error floor (its x0 error stops shrinking as the SNR
grows), and -SNR'(t) ~ SNR / t makes that floor explode near t = 0, while the head already decodes
the tokens from moderately noisy latents and the soft clamp snaps to a codebook point when the
head is sure. `choose_reverse` therefore picks both from a grid by minimising a cheap quadrature of
the bound on calibration blocks (the CLI uses training blocks, never the evaluated ones), the way
VDM learns its minimum log-SNR; the reported bound is then estimated with those fixed choices.

**hybrid.** A position is absorbed ([MASK], no latent) with probability 1 - alpha(t) of the mask
schedule and otherwise carries z_t of the Gaussian process at the same t (masks only grow with t).
Going backwards, an absorbed position is revealed at rate w(t) = -alpha'(t) / (1 - alpha(t)) with
its latent drawn from q(z_t | x) = N(a_t e_x, s_t^2); the model reveals it from the mixture
sum_v p_theta(v | state) N(a_t e_v, s_t^2), p_theta = softmax(decode(x0_hat)), whose KL from the
true draw is at most -log p_theta(x | state) (the mixture is at least its x component). Adding the
Gaussian term of the positions that are not absorbed gives

    -log p(x) <= E[-log p(x | state_t0)] + int_{t0}^{1} E[ w(t) sum_{l absorbed} -log p_theta(x_l | state_t)
                 + 1/2 (-SNR'(t)) sum_{l not absorbed} ||z_0^l - x0_hat^l||^2 ] dt,

the prior term being 0 because every position is absorbed at t = 1.

**A context.** Given the first c tokens as a clean prompt (``context``; the lm-evaluation-harness model
asks for -log p(continuation | context)), the reverse process keeps the prompt's clean latents in place,
flags them and conditions on them, as generation does (`DIMBA.estimate` with a prompt mask); every term
above is then summed over the positions after the prompt only, which bounds -log p(x_c.. | x_..c).

**Estimator.** Per block, K draws of t, stratified (t_k from u_k = (k + u) / K, one u per block)
under the proposal q(t) = 1/2 U(t0, 1) + 1/2 LogU(t0, 1): its log-uniform half matches the
1/t growth of both integrands near t0, so the importance weights f(t) / q(t) stay bounded. Each
draw costs one model evaluation (two with self-conditioning); the reconstruction takes one draw
per block. Everything is accumulated in float64.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from tqdm.auto import tqdm

from dimba.errors import UsageError
from dimba.families.base import LikelihoodEstimate, mc_stderr, model_device

CLAMPS = ("none", "soft")  # the x0 estimate the reverse process steps with (see `_integrand`)
T_MIN = 1e-4  # the smallest training time (`dimba.diffusion.schedules.stratified_times`): the smallest t_0 considered


def _t0_grid() -> torch.Tensor:
    """Times for `choose_reverse` (J,): 24 log-spaced on [T_MIN, 0.5], then 0.55, 0.6, ..., 1."""
    low = torch.logspace(math.log10(T_MIN), math.log10(0.5), 24, dtype=torch.float64)
    return torch.cat([low, torch.linspace(0.5, 1.0, 11, dtype=torch.float64)[1:]])


def proposal(u: torch.Tensor, t0: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Map u in [0, 1) (R,) to t in [t0, 1] and the proposal density q(t) (both float64 (R,)).

    u < 1/2 draws the uniform half, u >= 1/2 the log-uniform half; q is the mixture's density, so
    f(t) / q(t) is unbiased for the integral of f over [t0, 1].
    """
    u = u.double()
    low = u < 0.5
    v = torch.where(low, 2 * u, 2 * u - 1)  # (R,) uniform within the half
    log_t0 = math.log(t0)
    t = torch.where(low, t0 + (1 - t0) * v, torch.exp(log_t0 * (1 - v)))  # (R,)
    q = 0.5 / (1 - t0) + 0.5 / (t * -log_t0)  # (R,)
    return t, q


def _dtype(model) -> torch.dtype:
    return next(model.parameters()).dtype


def context_mask(ids: torch.Tensor, context: int) -> torch.Tensor | None:
    """The first ``context`` positions of every row of ``ids`` (B, L) as a prompt mask (B, L); None for none."""
    if not context:
        return None
    return (torch.arange(ids.shape[1], device=ids.device) < context)[None].expand(len(ids), -1)  # (B, L)


def _noisy_state(model, ids: torch.Tensor, t: torch.Tensor, generator: torch.Generator | None,
                 prompt: torch.Tensor | None = None):
    """z_0, the x0 estimate and the decoder's logits p_theta (float64 each; the predicted logits of a logits
    model, the head on the x0 estimate otherwise) and the absorbed positions (hybrid; else None) at times t.

    ids (B, L) on the model's device; t (B,) float64. The noise and masks are drawn on the CPU
    with ``generator``. The positions of ``prompt`` (B, L) bool are a clean prompt (never noised nor absorbed).
    """
    dev = ids.device
    z0 = model.encode(ids).double()  # (B, L, d)
    ab = model.schedule.alpha_bar64(t).to(dev)  # (B,)
    eps = torch.randn(z0.shape, generator=generator, dtype=torch.float64).to(dev)  # (B, L, d)
    z_t = ab.sqrt()[:, None, None] * z0 + (1 - ab).sqrt()[:, None, None] * eps  # (B, L, d)
    masked = None
    if model.family.absorbing:
        alpha = model.mask_schedule.alpha(t)  # (B,)
        masked = (torch.rand(ids.shape, generator=generator, dtype=torch.float64) >= alpha[:, None]).to(dev)  # (B, L)
    given = {}
    if prompt is not None:
        z_t = torch.where(prompt[..., None], z0, z_t)  # the prompt stays clean
        masked = None if masked is None else masked & ~prompt
        given = {"ids": ids, "prompt_mask": prompt}
    dtype = _dtype(model)
    x0, logits = model.estimate(z_t.to(dtype), t.to(dev, dtype), ab.to(dtype), masked, **given)  # (B, L, d), (B, L, V)
    if logits is None:  # the head on the estimate
        logits = model.decode(x0)
    return z0, x0.double(), logits.double(), masked


def _integrand(model, ids: torch.Tensor, t: torch.Tensor, generator: torch.Generator | None,
               clamps: tuple[str, ...] = ("none",), prompt: torch.Tensor | None = None
               ) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """Per position at times t (B,) float64, in nats per unit time: the Gaussian integrand (B, L) of the
    reverse process of each clamp in ``clamps``, the absorbing integrand (B, L) (zeros but for hybrid),
    and -log p_theta(x | state_t) (B, L), p_theta the model's token distribution (`_noisy_state`); all three
    are zero on the positions of ``prompt`` (B, L) bool, a clean prompt.

    Clamps: ``none`` steps with the network's x0 estimate, ``soft`` with the mean of the codebook under
    p_theta (score interpolation, as `dimba generate --clamp soft`).
    """
    z0, x0, logits, masked = _noisy_state(model, ids, t, generator, prompt)
    _, slope = model.schedule.snr_and_slope(t)  # (B,) dSNR/dt < 0
    scored = torch.ones_like(ids, dtype=torch.float64) if prompt is None else (~prompt).double()  # (B, L)
    nll = -logits.log_softmax(-1).gather(-1, ids[..., None])[..., 0] * scored  # (B, L)
    kept = scored if masked is None else (~masked).double() * scored  # the Gaussian term skips absorbed positions
    gauss = {}
    for clamp in clamps:
        x = x0 if clamp == "none" else model.score_interpolate(logits)  # (B, L, d)
        gauss[clamp] = 0.5 * -slope.to(ids.device)[:, None] * (z0 - x).pow(2).sum(-1) * kept  # (B, L)
    if masked is None:
        return gauss, torch.zeros_like(nll), nll
    w = model.mask_schedule.weight(t).to(ids.device)[:, None]  # (B, 1)
    return gauss, w * nll * masked, nll


def prior_nats(model, blocks: torch.Tensor, context: int = 0) -> np.ndarray:
    """KL(q(z_1 | x) || N(0, I)) of each block (N,) after its first ``context`` positions, float64: 0 with zero
    terminal SNR (and for hybrid)."""
    return prior_terms(model, blocks[:, context:].to(model_device(model))).sum(1).cpu().numpy()


def prior_terms(model, ids: torch.Tensor) -> torch.Tensor:
    """KL(q(z_1 | x_l) || N(0, I)) of each position of ``ids`` (B, L), float64 (B, L): 0 with zero terminal SNR."""
    ab1 = float(model.schedule.alpha_bar64(torch.ones((), dtype=torch.float64)))
    if model.family.absorbing or ab1 == 0.0:
        return torch.zeros(ids.shape, dtype=torch.float64, device=ids.device)
    z0 = model.encode(ids).double()  # (B, L, d)
    return 0.5 * (ab1 * z0.pow(2) - ab1 - math.log(1 - ab1)).sum(-1)  # (B, L)


def reconstruction_nats(model, blocks: torch.Tensor, batch_size: int, generator: torch.Generator | None,
                        progress: bool, t0: float, context: int = 0) -> np.ndarray:
    """One draw per block of -log p(x | state_t0) of the positions after the first ``context``, float64 (N,)."""
    out = []
    for start in tqdm(range(0, len(blocks), batch_size), desc="eval reconstruction", disable=not progress,
                      leave=False):
        ids = blocks[start:start + batch_size].to(model_device(model))  # (B, L)
        t = torch.full((len(ids),), t0, dtype=torch.float64)  # (B,)
        nll = _integrand(model, ids, t, generator, (), context_mask(ids, context))[2]  # (B, L)
        out.append(nll.sum(-1).cpu().numpy())
    return np.concatenate(out)


def diffusion_terms(model, blocks: torch.Tensor, mc_samples: int, batch_size: int, generator: torch.Generator | None,
                    progress: bool, t0: float, clamp: str = "none", context: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Monte Carlo terms of the integral over [t0, 1], float64: (gaussian (N, K), absorbing (N, K)), of the
    positions after the first ``context``.

    The absorbing terms (hybrid) are zeros for the continuous family; each term is f(t) / q(t).
    """
    n = len(blocks)
    u = torch.rand(n, 1, generator=generator, dtype=torch.float64)  # (N, 1)
    u = (torch.arange(mc_samples, dtype=torch.float64)[None] + u) / mc_samples  # (N, K) stratified
    t_all, q_all = proposal(u.flatten(), t0)  # (N*K,) each
    rows = torch.arange(n).repeat_interleave(mc_samples)  # (N*K,) block of each row
    gauss, absorb = [], []
    for start in tqdm(range(0, n * mc_samples, batch_size), desc=f"eval {model.family}", disable=not progress,
                      leave=False):
        sl = slice(start, start + batch_size)
        ids = blocks[rows[sl]].to(model_device(model))  # (B, L)
        t, q = t_all[sl], q_all[sl]  # (B,)
        g, a, _ = _integrand(model, ids, t, generator, (clamp,), context_mask(ids, context))  # (B, L) each
        gauss.append((g[clamp].sum(-1).cpu() / q).numpy())
        absorb.append((a.sum(-1).cpu() / q).numpy())
    shape = (n, mc_samples)
    return np.concatenate(gauss).reshape(shape), np.concatenate(absorb).reshape(shape)


def response_terms(model, rows, u: torch.Tensor | None, seed: int, t0: float = T_MIN) -> torch.Tensor:
    """Per position (B, L), float64, the terms of one Monte Carlo sample of the bound on -log p(response |
    prompt) of ``rows`` (`dimba.data.finetune.TokenRows`: the prompt clean, the scored positions summed): the
    soft-clamp Gaussian (and, for hybrid, absorbing) integrand at t ~ q on [t0, 1] from ``u`` (B,) in [0, 1)
    over q(t), plus the reconstruction at t0 and the prior (a bound for every t0 in [T_MIN, 1): a larger one is
    far less noisy). The noise comes from ``seed``, so a policy and its reference scored with the same (u, seed)
    see the same draws (VRPO). ``u=None``: the one-pass surrogate of diffu-GRPO / d1, -log p_theta(x | z_1) with
    every response latent pure noise (with zero terminal SNR, the continuous bound at t0 = 1: a one-step sampler's).

    A fixed t0 and the soft clamp (for a logits model, its own x0 estimate) make a valid bound for every model, with
    no calibration that a policy and its reference could choose differently."""
    generator = torch.Generator().manual_seed(seed)
    ids, prompt, scored = rows.ids, rows.prompt, rows.scored.double()  # (B, L) each
    if u is None:
        return _integrand(model, ids, torch.ones(len(ids), dtype=torch.float64), generator, (), prompt)[2] * scored
    t, q = proposal(u, t0)  # (B,) each
    gauss, absorb, _ = _integrand(model, ids, t, generator, ("soft",), prompt)  # (B, L) each
    recon = _integrand(model, ids, torch.full_like(t, t0), generator, (), prompt)[2]  # (B, L)
    diffusion = (gauss["soft"] + absorb) / q.to(ids.device)[:, None]  # (B, L)
    return (diffusion + recon + prior_terms(model, ids)) * scored


def choose_reverse(model, blocks: torch.Tensor, clamp: str | None = None, t0: float | None = None,
                   generator: torch.Generator | None = None, batch_size: int = 16) -> tuple[str, float, dict]:
    """The clamp (of `CLAMPS`) and t_0 (of the grid `_t0_grid` on [T_MIN, 1)) that minimise the bound on
    ``blocks`` (N, L); a ``clamp`` or ``t0`` given is kept (a given t0 is compared at its nearest grid time).

    At each grid time t_j one draw per block gives the integrands f(t_j) and the reconstruction term
    r(t_j) (one model pass); the bound of t_0 = t_j is approximated by r(t_j) + the trapezoid
    integral of f from t_j to 1 (the grid's last time) in log t. Returns the clamp, t_0 and the
    curves {"t": [...], clamp: [bound in nats per token, ...]} (approximations, only used to choose).
    """
    clamps = CLAMPS if clamp is None else (clamp,)
    times = _t0_grid()  # (J,)
    f = {c: np.zeros(len(times)) for c in clamps}
    r = np.zeros(len(times))
    for j, t in enumerate(times):
        for start in range(0, len(blocks), batch_size):
            ids = blocks[start:start + batch_size].to(model_device(model))  # (B, L)
            g, a, nll = _integrand(model, ids, t.expand(len(ids)), generator, clamps)  # (B, L) each
            for c in clamps:
                f[c][j] += (g[c] + a).sum().item() / blocks.numel()
            r[j] += nll.sum().item() / blocks.numel()
    grid = times.numpy()
    curves = {"t": grid[:-1].tolist()}
    for c in clamps:
        ft = f[c] * grid  # (J,) the integrand in log t
        pieces = 0.5 * (ft[1:] + ft[:-1]) * np.diff(np.log(grid))  # (J-1,)
        curves[c] = (r[:-1] + np.cumsum(pieces[::-1])[::-1]).tolist()  # (J-1,) r(t_j) + integral from t_j to 1
    rows = range(len(grid) - 1) if t0 is None else [int(np.argmin(np.abs(grid[:-1] - t0)))]
    best_clamp, best_row = min(((c, j) for c in clamps for j in rows), key=lambda cj: curves[cj[0]][cj[1]])
    return best_clamp, float(grid[best_row]) if t0 is None else t0, curves


def _total(model, blocks, mc_samples, batch_size, generator, progress, t0, clamp, context) -> tuple[float, float, dict]:
    """Total bound (nats), its standard error and the per-part totals."""
    gauss, absorb = diffusion_terms(model, blocks, mc_samples, batch_size, generator, progress, t0, clamp,
                                    context)  # (N, K)
    recon = reconstruction_nats(model, blocks, batch_size, generator, progress, t0, context)  # (N,)
    prior = prior_nats(model, blocks, context)  # (N,)
    parts = {"diffusion": float(gauss.mean(1).sum()), "absorbing": float(absorb.mean(1).sum()),
             "reconstruction": float(recon.sum()), "prior": float(prior.sum())}
    # the reconstruction is one draw per block: its spread across blocks overstates its Monte Carlo error
    recon_var = recon.var(ddof=1) * len(recon) if len(recon) > 1 else 0.0
    stderr = math.sqrt(mc_stderr(gauss + absorb) ** 2 + recon_var)
    return sum(parts.values()), stderr, parts


def estimate(model, blocks: torch.Tensor, mc_samples: int, batch_size: int, generator: torch.Generator | None,
             progress: bool, t0: float | None = None, clamp: str | None = None,
             calibration_blocks: torch.Tensor | None = None, context: int = 0) -> LikelihoodEstimate:
    """The bound on -log p of ``blocks`` (N, L), all L tokens scored, or with ``context`` = c the bound on
    -log p(x_c.. | x_..c), the first c tokens a clean prompt. ``t0`` is where the reverse process stops and
    rounds, ``clamp`` (of `CLAMPS`) the x0 estimate it steps with; None chooses with `choose_reverse` on
    ``calibration_blocks`` (default: the first 8 evaluated blocks). Reports t0, its SNR and the clamp."""
    if t0 is not None and not 0 < t0 < 1:
        raise UsageError(f"--t0 must lie in (0, 1), got {t0}")
    if clamp is not None and clamp not in CLAMPS:
        raise UsageError(f"--clamp must be one of {', '.join(CLAMPS)}, got {clamp!r}")
    if t0 is None or clamp is None:
        calib = blocks[:8] if calibration_blocks is None else calibration_blocks
        clamp, t0, _ = choose_reverse(model, calib, clamp, t0, generator, batch_size)
    total, stderr, parts = _total(model, blocks, mc_samples, batch_size, generator, progress, t0, clamp, context)
    snr_t0 = float(model.schedule.snr_and_slope(torch.tensor([t0], dtype=torch.float64))[0])
    return LikelihoodEstimate(total, stderr, blocks[:, context:], mc_samples, parts,
                              {"t0": t0, "clamp": clamp, "snr_t0": snr_t0})
