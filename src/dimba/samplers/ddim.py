"""x0-parameterised DDIM (Song et al. 2021, eq. 12) on the continuous time grid.

A sampler holds no model: `set_timesteps` fixes the grid, `step` moves z_t to z_s given the
model's x0 estimate. eta = 0 is deterministic DDIM, eta = 1 ancestral DDPM.
"""

from __future__ import annotations

import torch

from dimba.diffusion.gaussian import eps_from_x0
from dimba.diffusion.schedules import NoiseSchedule


class DDIMSampler:
    """DDIM over ``num_steps`` uniform steps of t from 1 (pure noise) to 0 (data)."""

    def __init__(self, schedule: NoiseSchedule, eta: float = 0.0):
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f"eta must lie in [0, 1], got {eta}")
        self.schedule = schedule
        self.eta = eta
        self.timesteps = torch.empty(0)

    def set_timesteps(self, num_steps: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """The grid t_0 = 1 > t_1 > ... > t_num_steps = 0; returns the num_steps model times."""
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        self.timesteps = torch.linspace(1.0, 0.0, num_steps + 1, device=device)
        return self.timesteps[:-1]

    def step(self, x0_hat: torch.Tensor, i: int, z_t: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Move z_t at t_i to z_s at t_{i+1}: z_s = a_s x0 + sqrt(1 - a_s^2 - sigma^2) eps_hat + sigma noise."""
        t, s = self.timesteps[i], self.timesteps[i + 1]
        ab_t, ab_s = self.schedule.alpha_bar(t), self.schedule.alpha_bar(s)
        eps_hat = eps_from_x0(z_t, x0_hat, ab_t.expand(z_t.shape[0]))  # (B, L, d)
        sigma = self.eta * torch.sqrt((1 - ab_s) / (1 - ab_t).clamp_min(1e-12) * (1 - ab_t / ab_s.clamp_min(1e-12)))
        dir_coef = (1 - ab_s - sigma**2).clamp_min(0).sqrt()
        z_s = ab_s.sqrt() * x0_hat + dir_coef * eps_hat  # (B, L, d)
        if sigma > 0:
            z_s = z_s + sigma * torch.randn(z_t.shape, device=z_t.device, dtype=z_t.dtype, generator=generator)
        return z_s
