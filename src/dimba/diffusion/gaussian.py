"""The continuous (Gaussian) process on latents: forward noising and parameterisation changes.

With a = sqrt(alpha_bar), s = sqrt(1 - alpha_bar):  z_t = a z_0 + s eps,  v = a eps - s z_0
(Salimans & Ho 2022), hence z_0 = a z_t - s v and eps = (z_t - a z_0) / s.
"""

from __future__ import annotations

import torch


def _bcast(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape + (1,) * (like.dim() - x.dim())).to(like.dtype)


def q_sample(z0: torch.Tensor, alpha_bar: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Sample z_t ~ q(z_t | z_0): z0, noise (B, L, d); alpha_bar (B,)."""
    a = _bcast(alpha_bar.sqrt(), z0)
    s = _bcast((1 - alpha_bar).clamp_min(0).sqrt(), z0)
    return a * z0 + s * noise  # (B, L, d)


def v_target(z0: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """The velocity v = a eps - s z_0."""
    a = _bcast(alpha_bar.sqrt(), z0)
    s = _bcast((1 - alpha_bar).clamp_min(0).sqrt(), z0)
    return a * noise - s * z0  # (B, L, d)


def x0_from_v(z_t: torch.Tensor, v: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    a = _bcast(alpha_bar.sqrt(), z_t)
    s = _bcast((1 - alpha_bar).clamp_min(0).sqrt(), z_t)
    return a * z_t - s * v  # (B, L, d)


def eps_from_x0(z_t: torch.Tensor, x0: torch.Tensor, alpha_bar: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    a = _bcast(alpha_bar.sqrt(), z_t)
    s = _bcast((1 - alpha_bar).clamp_min(0).sqrt(), z_t)
    return (z_t - a * x0) / s.clamp_min(eps)  # (B, L, d)


def min_snr_weight(snr: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma loss weight (Hang et al. 2023) for an x0 or v regression target."""
    w = snr.clamp(max=gamma)
    if prediction_type == "v":
        return w / (snr + 1)
    return w
