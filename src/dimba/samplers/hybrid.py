"""The hybrid family's sampler: ancestral unmasking (MDLM) and x0-DDIM for the Gaussian part.

In the hybrid process a token at time t is absorbed ([MASK], no latent) with probability
1 - alpha(t) of the mask schedule, and otherwise carries the Gaussian latent
z_t = sqrt(alpha_bar(t)) z_0 + sqrt(1 - alpha_bar(t)) eps. Reversing one step t -> s:

- a position still absorbed is revealed with probability (alpha(s) - alpha(t)) / (1 - alpha(t)),
  the posterior of the absorbing process; a revealed position starts in the Gaussian process at
  s, from the latent of a token drawn from the model's x0 distribution: q(z_s | x_0 = token);
- a position already revealed moves by x0-DDIM from t to s.

Like every sampler here it holds no model: the loop passes the x0 estimate and the head's logits
on it; the sampler draws the tokens (float64, temperature / top-k / top-p) and looks up their
latents in the codebook it was given.
"""

from __future__ import annotations

import torch

from dimba.diffusion.gaussian import q_sample
from dimba.diffusion.masked import MaskSchedule
from dimba.diffusion.schedules import NoiseSchedule
from dimba.samplers.categorical import sample_tokens
from dimba.samplers.ddim import DDIMSampler, OnDDIM
from dimba.samplers.state import ModelOutput, SamplerState


class HybridSampler(OnDDIM):
    """Uniform steps of t from 1 (all absorbed, pure noise) to 0 (data); ``eta`` as in DDIM.

    ``codebook`` (V, d) holds the clean latent of every token; temperature / top-k / top-p draw the
    token a revealed position starts from; ``warp`` places the steps (see `DDIMSampler`).
    """

    def __init__(self, schedule: NoiseSchedule, mask_schedule: MaskSchedule, codebook: torch.Tensor,
                 eta: float = 0.0, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                 warp=None):
        self.ddim = DDIMSampler(schedule, eta, warp)
        self.schedule = schedule
        self.mask_schedule = mask_schedule
        self.codebook = codebook
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p

    def set_timesteps(self, num_steps: int, state: SamplerState) -> None:
        """The grid 1 = t_0 > ... > t_num_steps = 0 (see `DDIMSampler.set_timesteps`)."""
        self.ddim.set_timesteps(num_steps, state)

    def step(self, state: SamplerState, output: ModelOutput, i: int,
             generator: torch.Generator | None = None) -> SamplerState:
        """Move (z_t, masked) at t_i to (z_s, masked_s) at t_{i+1}, given ``output.x0`` (N, L, d) and the
        head's ``output.logits`` (N, L, V) on it, from which each revealed position draws its token."""
        token_latent = self.codebook[sample_tokens(output.logits, self.temperature, self.top_k, self.top_p,
                                                   generator)]  # (N, L, d)
        t, s = self.ddim.grid[i], self.ddim.grid[i + 1]
        a_t, a_s = self.mask_schedule.alpha(t), self.mask_schedule.alpha(s)
        reveal_p = ((a_s - a_t) / (1 - a_t).clamp_min(1e-12)).clamp(0, 1)
        masked, z_t = state.masked, state.x
        u = torch.rand(masked.shape, device=masked.device, generator=generator)  # (N, L)
        revealed = masked & (u < reveal_p)  # (N, L)
        ab_s = self.schedule.alpha_bar(s).expand(z_t.shape[0])  # (N,)
        noise = torch.randn(z_t.shape, device=z_t.device, dtype=z_t.dtype, generator=generator)
        z_new = q_sample(token_latent, ab_s, noise)  # (N, L, d): q(z_s | x_0 = drawn token)
        z_s = self.ddim.move(state, output.x0, i, generator)  # (N, L, d)
        z_s = torch.where(revealed[..., None], z_new, z_s)
        return state.replace(x=z_s, x0=output.x0, masked=masked & ~revealed)
