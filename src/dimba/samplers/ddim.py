"""x0-parameterised DDIM (Song et al. 2021, eq. 12) on the continuous time grid.

A sampler holds no model: `set_timesteps` fixes the grid, `step` moves z_t to z_s given the
model's x0 estimate. eta = 0 is deterministic DDIM, eta = 1 ancestral DDPM.
"""

from __future__ import annotations

import torch

from dimba.diffusion.gaussian import eps_from_x0
from dimba.diffusion.schedules import NoiseSchedule
from dimba.samplers.state import ModelOutput, SamplerState


class DDIMSampler:
    """DDIM over ``num_steps`` steps of t from 1 (pure noise) to 0 (data): uniform in t, or in the warped time
    u of ``warp`` (a map u -> t, `dimba.diffusion.warp.TimeWarp`)."""

    def __init__(self, schedule: NoiseSchedule, eta: float = 0.0, warp=None):
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f"eta must lie in [0, 1], got {eta}")
        self.schedule = schedule
        self.eta = eta
        self.warp = warp
        self.grid = torch.empty(0)
        self.timesteps = torch.empty(0)

    @property
    def num_steps(self) -> int:
        """Number of steps planned by the last `set_timesteps`."""
        return len(self.timesteps)

    def set_timesteps(self, num_steps: int, state: SamplerState) -> None:
        """The grid t_0 = 1 > t_1 > ... > t_num_steps = 0; ``timesteps`` holds the num_steps model times."""
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        u = torch.linspace(1.0, 0.0, num_steps + 1, device=state.x.device)
        self.grid = u if self.warp is None else self.warp(u)
        self.timesteps = self.grid[:-1]

    def step(self, state: SamplerState, output: ModelOutput, i: int,
             generator: torch.Generator | None = None) -> SamplerState:
        """Move z_t at t_i to z_s at t_{i+1} with the x0 estimate ``output.x0``; the prompt stays as it is."""
        return state.replace(x=self.move(state, output.x0, i, generator), x0=output.x0)

    def move(self, state: SamplerState, x0_hat: torch.Tensor, i: int,
             generator: torch.Generator | None = None) -> torch.Tensor:
        """z_s = a_s x0 + sqrt(1 - a_s^2 - sigma^2) eps_hat + sigma noise: (N, L, d), the kept positions kept."""
        z_t = state.x
        t, s = self.grid[i], self.grid[i + 1]
        ab_t, ab_s = self.schedule.alpha_bar(t), self.schedule.alpha_bar(s)
        eps_hat = eps_from_x0(z_t, x0_hat, ab_t.expand(z_t.shape[0]))  # (N, L, d)
        sigma = self.eta * torch.sqrt((1 - ab_s) / (1 - ab_t).clamp_min(1e-12) * (1 - ab_t / ab_s.clamp_min(1e-12)))
        dir_coef = (1 - ab_s - sigma**2).clamp_min(0).sqrt()
        z_s = ab_s.sqrt() * x0_hat + dir_coef * eps_hat  # (N, L, d)
        if sigma > 0:
            z_s = z_s + sigma * torch.randn(z_t.shape, device=z_t.device, dtype=z_t.dtype, generator=generator)
        return torch.where(state.kept()[..., None], z_t, z_s)  # (N, L, d)


class OnDDIM:
    """Base of the samplers that move latents by an inner x0-DDIM (``self.ddim``) and add their own token
    decisions: the step grid is the inner sampler's."""

    ddim: DDIMSampler

    @property
    def timesteps(self) -> torch.Tensor:
        return self.ddim.timesteps

    @property
    def num_steps(self) -> int:
        return self.ddim.num_steps
