"""Continuous denoising that commits tokens as it goes: the continuous family's counterpart of LLaDA's remasking.

At each step, after the model's estimate, a planned number of the positions not yet committed draw their token
(float64, temperature / top-k / top-p) from the model's distribution, take its clean latent and stay fixed from
then on: as clean context that later steps condition on (a model trained with ``diffusion.clean_subset_prob``
knows clean tokens anywhere). The others move by x0-DDIM. The plan spreads the positions evenly over the steps
(the last step commits every one left). ``order``: ``confidence`` commits those whose drawn token is the most
probable first, ``random`` random ones. Holds no model (`dimba.samplers.state`).
"""

from __future__ import annotations

import torch

from dimba.samplers.categorical import sample_from_probs, token_probs
from dimba.samplers.ddim import DDIMSampler, OnDDIM
from dimba.samplers.state import ModelOutput, SamplerState

ORDERS = ("confidence", "random")


class CommitSampler(OnDDIM):
    """x0-DDIM (``ddim``) plus commitment of drawn tokens; ``codebook`` (V, d) holds each token's clean latent."""

    def __init__(self, ddim: DDIMSampler, codebook: torch.Tensor, order: str = "confidence", temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None):
        if order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
        self.ddim, self.codebook, self.order = ddim, codebook, order
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p

    def set_timesteps(self, num_steps: int, state: SamplerState) -> None:
        """The grid of `DDIMSampler.set_timesteps`; ``state`` must carry ``clean`` and ``tokens``."""
        if state.clean is None or state.tokens is None:
            raise ValueError("a committing sampler needs a state with clean positions and their tokens")
        self.ddim.set_timesteps(num_steps, state)

    def step(self, state: SamplerState, output: ModelOutput, i: int,
             generator: torch.Generator | None = None) -> SamplerState:
        """Commit this step's share of the free positions (from ``output.logits`` (N, L, V)) and move the others
        from t_i to t_{i+1} with ``output.x0`` (N, L, d)."""
        probs = token_probs(output.logits, self.temperature, self.top_k, self.top_p)  # (N, L, V) float64
        drawn = probs.argmax(-1) if self.temperature == 0 else sample_from_probs(probs, generator)  # (N, L)
        free = ~state.clean  # (N, L)
        count = (free.sum(-1) + self.num_steps - i - 1) // (self.num_steps - i)  # (N,) ceil(left / steps left)
        if self.order == "confidence":
            score = probs.gather(-1, drawn[..., None])[..., 0]  # (N, L)
        else:
            score = torch.rand(free.shape, generator=generator, device=free.device, dtype=torch.float64)
        order = score.masked_fill(~free, -1.0).argsort(dim=-1, descending=True, stable=True)  # (N, L)
        chosen = torch.arange(free.shape[1], device=free.device) < count[:, None]  # (N, L) in sorted order
        new = torch.zeros_like(free).scatter(-1, order, chosen) & free  # (N, L)
        z_s = self.ddim.move(state, output.x0, i, generator)  # (N, L, d)
        z_s = torch.where(new[..., None], self.codebook[drawn].to(z_s.dtype), z_s)
        clean = state.clean | new
        return state.replace(x=z_s, x0=output.x0, clean=clean, tokens=torch.where(new, drawn, state.tokens),
                             done=bool(clean.all()))
