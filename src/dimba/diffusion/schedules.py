"""Noise schedules of continuous time t in [0, 1]: t -> alpha_bar(t), SNR(t).

alpha_bar is the signal variance of q(z_t | z_0) = N(sqrt(alpha_bar) z_0, (1 - alpha_bar) I).
t = 0 is clean data, t = 1 pure noise. With ``zero_terminal_snr`` the schedule is rescaled so
that alpha_bar(1) = 0 exactly (Lin et al. 2023, "Common diffusion noise schedules and sample
steps are flawed", Alg. 1), so the sampler's start matches what training saw.
"""

from __future__ import annotations

import math

import torch

_COSINE_S = 0.008
_VP_BETA_MIN, _VP_BETA_MAX = 0.1, 20.0


class NoiseSchedule:
    """``cosine`` (Nichol & Dhariwal 2021) or ``linear`` (continuous VP-SDE betas of DDPM)."""

    def __init__(self, kind: str = "cosine", zero_terminal_snr: bool = True, num_steps: int = 1000, shift: float = 1.0):
        if kind not in ("cosine", "linear"):
            raise ValueError(f"unknown schedule {kind!r}: use 'cosine' or 'linear'")
        if shift <= 0:
            raise ValueError(f"schedule shift must be positive, got {shift}")
        self.kind = kind
        self.shift = shift
        self.zero_terminal_snr = zero_terminal_snr
        self.num_steps = num_steps
        t_ends = torch.tensor([0.0, 1.0], dtype=torch.float64)
        self._a0, self._a1 = self._sqrt_alpha_bar_raw(t_ends).tolist()

    def _sqrt_alpha_bar_raw(self, t: torch.Tensor) -> torch.Tensor:
        if self.kind == "cosine":
            f = torch.cos(0.5 * math.pi * (t + _COSINE_S) / (1 + _COSINE_S))
            return f / math.cos(0.5 * math.pi * _COSINE_S / (1 + _COSINE_S))
        log_ab = -(_VP_BETA_MIN * t + 0.5 * (_VP_BETA_MAX - _VP_BETA_MIN) * t**2)
        return torch.exp(0.5 * log_ab)

    def to_continuous(self, t: torch.Tensor) -> torch.Tensor:
        """Integer timesteps k in [0, num_steps) map to (k + 1) / num_steps; floats pass through."""
        if t.is_floating_point():
            return t
        return (t.double() + 1) / self.num_steps

    def alpha_bar64(self, t: torch.Tensor) -> torch.Tensor:
        """alpha_bar(t) in float64 (differentiable in t, for the likelihood bound's SNR slope)."""
        a = self._sqrt_alpha_bar_raw(self.to_continuous(t).double().clamp(0, 1))
        if self.zero_terminal_snr:
            a = (a - self._a1) * self._a0 / (self._a0 - self._a1)
        ab = a.clamp(0, 1) ** 2
        if self.shift != 1.0:
            ab = ab / (ab + self.shift**2 * (1 - ab))  # SNR / shift^2
        return ab

    def sqrt_alpha_bar(self, t: torch.Tensor) -> torch.Tensor:
        """sqrt(alpha_bar(t)), computed in float64, returned in float32."""
        return self.alpha_bar64(t).sqrt().float()

    def alpha_bar(self, t: torch.Tensor) -> torch.Tensor:
        return self.sqrt_alpha_bar(t) ** 2

    def snr(self, t: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
        """Signal-to-noise ratio alpha_bar / (1 - alpha_bar), finite at t = 0 through ``eps``."""
        ab = self.alpha_bar(t).double()
        return (ab / (1 - ab).clamp_min(eps)).float()

    def snr_and_slope(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """SNR(t) and dSNR/dt in float64 for continuous t in (0, 1] (autograd through `alpha_bar64`)."""
        t = t.detach().double().requires_grad_(True)
        with torch.enable_grad():
            ab = self.alpha_bar64(t)
            snr = ab / (1 - ab)
            (slope,) = torch.autograd.grad(snr.sum(), t)
        return snr.detach(), slope


def stratified_times(batch: int, device: torch.device, generator: torch.Generator | None = None,
                     t_min: float = 1e-4) -> torch.Tensor:
    """Low-discrepancy t in [t_min, 1] for a batch: one uniform offset, then evenly spaced across the batch."""
    u = torch.rand((), device=device, generator=generator)
    t = (u + torch.arange(batch, device=device) / batch) % 1.0  # (B,)
    return t_min + (1 - t_min) * t
