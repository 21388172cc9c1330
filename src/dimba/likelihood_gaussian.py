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

x0_hat is `DIMBA.estimate_x0`: unconditional, and self-conditioned on its own first estimate at the
same z_t when the model uses self-conditioning, so it is a deterministic function of (z_t, t) and
the bound holds.

**t_0** is part of the generative model (where the reverse process stops and rounds), and any t_0
in (0, 1) gives a valid bound. It matters: an x0-predicting network has an error floor (its x0
error stops shrinking as the SNR grows), and -SNR'(t) ~ SNR / t makes the diffusion term of that
floor explode near t = 0, while the head already decodes the tokens from moderately noisy latents.
`choose_t0` therefore picks t_0 from a grid by minimising a cheap quadrature of the bound on
calibration blocks (the CLI uses training blocks, never the evaluated ones), the way VDM learns its
minimum log-SNR; the reported bound is then estimated with that fixed t_0.

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

T_MIN = 1e-4  # the smallest training time (`dimba.losses.stratified_times`): the smallest t_0 considered


def _t0_grid() -> torch.Tensor:
    """Times for `choose_t0` (J,): 24 log-spaced on [T_MIN, 0.5], then 0.55, 0.6, ..., 1."""
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


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _dtype(model) -> torch.dtype:
    return next(model.parameters()).dtype


def _noisy_state(model, ids: torch.Tensor, t: torch.Tensor, generator: torch.Generator | None):
    """z_0 (float64), the x0 estimate (float64) and the absorbed positions (hybrid; else None) at times t.

    ids (B, L) on the model's device; t (B,) float64. The noise and masks are drawn on the CPU
    with ``generator``.
    """
    dev = ids.device
    z0 = model.encode(ids).double()  # (B, L, d)
    ab = model.schedule.alpha_bar64(t).to(dev)  # (B,)
    eps = torch.randn(z0.shape, generator=generator, dtype=torch.float64).to(dev)  # (B, L, d)
    z_t = ab.sqrt()[:, None, None] * z0 + (1 - ab).sqrt()[:, None, None] * eps  # (B, L, d)
    masked = None
    if model.family == "hybrid":
        alpha = model.mask_schedule.alpha(t)  # (B,)
        masked = (torch.rand(ids.shape, generator=generator, dtype=torch.float64) >= alpha[:, None]).to(dev)  # (B, L)
    dtype = _dtype(model)
    x0 = model.estimate_x0(z_t.to(dtype), t.to(dev, dtype), ab.to(dtype), masked).double()  # (B, L, d)
    return z0, x0, masked


def _token_nll(model, x0: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """-log softmax(decode(x0))[ids] per position, float64 (B, L)."""
    logp = model.decode(x0.to(_dtype(model))).double().log_softmax(-1)  # (B, L, V)
    return -logp.gather(-1, ids[..., None])[..., 0]


def _integrand(model, ids: torch.Tensor, t: torch.Tensor, generator: torch.Generator | None, with_nll: bool = False):
    """Per position at times t (B,) float64: the Gaussian and absorbing integrands (B, L) each, in nats per
    unit time, and -log p_theta(x | state_t) (B, L) when ``with_nll`` or hybrid (else None)."""
    z0, x0, masked = _noisy_state(model, ids, t, generator)
    _, slope = model.schedule.snr_and_slope(t)  # (B,) dSNR/dt < 0
    gauss = 0.5 * -slope.to(ids.device)[:, None] * (z0 - x0).pow(2).sum(-1)  # (B, L)
    nll = _token_nll(model, x0, ids) if with_nll or masked is not None else None  # (B, L)
    if masked is None:
        return gauss, torch.zeros_like(gauss), nll
    w = model.mask_schedule.weight(t).to(ids.device)[:, None]  # (B, 1)
    return gauss * ~masked, w * nll * masked, nll


def prior_nats(model, blocks: torch.Tensor) -> np.ndarray:
    """KL(q(z_1 | x) || N(0, I)) of each block (N,), float64: 0 with zero terminal SNR (and for hybrid)."""
    ab1 = float(model.schedule.alpha_bar64(torch.ones((), dtype=torch.float64)))
    if model.family == "hybrid" or ab1 == 0.0:
        return np.zeros(len(blocks))
    z0 = model.encode(blocks.to(_device(model))).double()  # (N, L, d)
    kl = 0.5 * (ab1 * z0.pow(2) - ab1 - math.log(1 - ab1))  # (N, L, d)
    return kl.sum((1, 2)).cpu().numpy()


def reconstruction_nats(model, blocks: torch.Tensor, batch_size: int, generator: torch.Generator | None,
                        progress: bool, t0: float) -> np.ndarray:
    """One draw per block of -log p(x | state_t0), float64 (N,)."""
    out = []
    for start in tqdm(range(0, len(blocks), batch_size), desc="eval reconstruction", disable=not progress,
                      leave=False):
        ids = blocks[start:start + batch_size].to(_device(model))  # (B, L)
        t = torch.full((len(ids),), t0, dtype=torch.float64)  # (B,)
        nll = _integrand(model, ids, t, generator, with_nll=True)[2]  # (B, L)
        out.append(nll.sum(-1).cpu().numpy())
    return np.concatenate(out)


def diffusion_terms(model, blocks: torch.Tensor, mc_samples: int, batch_size: int,
                    generator: torch.Generator | None, progress: bool, t0: float) -> tuple[np.ndarray, np.ndarray]:
    """Monte Carlo terms of the integral over [t0, 1], float64: (gaussian (N, K), absorbing (N, K)).

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
        ids = blocks[rows[sl]].to(_device(model))  # (B, L)
        t, q = t_all[sl], q_all[sl]  # (B,)
        g, a, _ = _integrand(model, ids, t, generator)  # (B, L) each
        gauss.append((g.sum(-1).cpu() / q).numpy())
        absorb.append((a.sum(-1).cpu() / q).numpy())
    shape = (n, mc_samples)
    return np.concatenate(gauss).reshape(shape), np.concatenate(absorb).reshape(shape)


def choose_t0(model, blocks: torch.Tensor, generator: torch.Generator | None = None,
              batch_size: int = 16) -> tuple[float, dict]:
    """The t_0 of a grid on [T_MIN, 1) (`_t0_grid`) that minimises the bound on ``blocks`` (N, L).

    At each grid time t_j one draw per block gives the integrand f(t_j) and the reconstruction
    term r(t_j) (the same model pass); the bound of t_0 = t_j is approximated by
    r(t_j) + the trapezoid integral of f from t_j to 1 (the grid's last time) in log t.
    Returns t_0 and the curve {"t": [...], "bound_nats_per_token": [...]} (an approximation, only
    used to choose t_0).
    """
    times = _t0_grid()  # (J,)
    f, r = [], []
    for t in times:
        fs, rs = [], []
        for start in range(0, len(blocks), batch_size):
            ids = blocks[start:start + batch_size].to(_device(model))  # (B, L)
            g, a, nll = _integrand(model, ids, t.expand(len(ids)), generator, with_nll=True)  # (B, L) each
            fs.append((g + a).sum().item())
            rs.append(nll.sum().item())
        f.append(sum(fs) / blocks.numel())
        r.append(sum(rs) / blocks.numel())
    f, r, t = np.array(f), np.array(r), times.numpy()
    ft = f * t  # (J,) the integrand in log t
    pieces = 0.5 * (ft[1:] + ft[:-1]) * np.diff(np.log(t))  # (J-1,)
    bound = r[:-1] + np.cumsum(pieces[::-1])[::-1]  # (J-1,) for t_0 = t_j: r(t_j) + integral from t_j to 1
    best = int(np.argmin(bound))
    return float(t[best]), {"t": t[:-1].tolist(), "bound_nats_per_token": bound.tolist()}
