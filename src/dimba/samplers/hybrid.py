"""The hybrid family's sampler: ancestral unmasking (MDLM) and x0-DDIM for the Gaussian part.

In the hybrid process a token at time t is absorbed ([MASK], no latent) with probability
1 - alpha(t) of the mask schedule, and otherwise carries the Gaussian latent
z_t = sqrt(alpha_bar(t)) z_0 + sqrt(1 - alpha_bar(t)) eps. Reversing one step t -> s:

- a position still absorbed is revealed with probability (alpha(s) - alpha(t)) / (1 - alpha(t)),
  the posterior of the absorbing process; a revealed position starts in the Gaussian process at
  s, from the latent of a token drawn from the model's x0 distribution: q(z_s | x_0 = token);
- a position already revealed moves by x0-DDIM from t to s.

Like every sampler here it holds no model: the loop passes the x0 estimate and the latents of
the tokens it drew.
"""

from __future__ import annotations

import torch

from dimba.diffusion.gaussian import q_sample
from dimba.diffusion.masked import MaskSchedule
from dimba.diffusion.schedules import NoiseSchedule
from dimba.samplers.ddim import DDIMSampler


class HybridSampler:
    """Uniform steps of t from 1 (all absorbed, pure noise) to 0 (data); ``eta`` as in DDIM."""

    def __init__(self, schedule: NoiseSchedule, mask_schedule: MaskSchedule, eta: float = 0.0):
        self.ddim = DDIMSampler(schedule, eta)
        self.schedule = schedule
        self.mask_schedule = mask_schedule

    @property
    def timesteps(self) -> torch.Tensor:
        return self.ddim.timesteps

    def set_timesteps(self, num_steps: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """The grid 1 = t_0 > ... > t_num_steps = 0; returns the num_steps model times."""
        return self.ddim.set_timesteps(num_steps, device)

    def step(self, x0_hat: torch.Tensor, token_latent: torch.Tensor, i: int, z_t: torch.Tensor, masked: torch.Tensor,
             generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Move (z_t, masked) at t_i to (z_s, masked_s) at t_{i+1}.

        x0_hat, token_latent, z_t: (N, L, d); masked: (N, L) bool. ``token_latent`` is the clean
        latent of a token drawn from the model at each position (used where a position is revealed).
        """
        t, s = self.timesteps[i], self.timesteps[i + 1]
        a_t, a_s = self.mask_schedule.alpha(t), self.mask_schedule.alpha(s)
        reveal_p = ((a_s - a_t) / (1 - a_t).clamp_min(1e-12)).clamp(0, 1)
        u = torch.rand(masked.shape, device=masked.device, generator=generator)  # (N, L)
        revealed = masked & (u < reveal_p)  # (N, L)
        ab_s = self.schedule.alpha_bar(s).expand(z_t.shape[0])  # (N,)
        noise = torch.randn(z_t.shape, device=z_t.device, dtype=z_t.dtype, generator=generator)
        z_new = q_sample(token_latent, ab_s, noise)  # (N, L, d): q(z_s | x_0 = drawn token)
        z_s = self.ddim.step(x0_hat, i, z_t, generator)  # (N, L, d)
        z_s = torch.where(revealed[..., None], z_new, z_s)
        return z_s, masked & ~revealed
