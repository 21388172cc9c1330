"""The contract every sampler keeps: ``set_timesteps(num_steps, state)``, then ``step(state, output, i, generator)``
for i = 0 .. ``num_steps`` - 1, each returning the next `SamplerState`; ``timesteps[i]`` is the time of step i.
A sampler holds no model: the generation loop (`dimba.generation`) calls the model and hands its `ModelOutput` to
``step``. No step changes the clean prompt (the positions before ``gen_start``)."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch


@dataclass
class SamplerState:
    """A canvas being generated.

    x: ids (N, L) of the token samplers, or latents (N, L, d) of the Gaussian ones.
    gen_start: the positions before it hold the clean prompt.
    x0: the last x0 estimate (N, L, d) of a Gaussian sampler (None before its first step).
    masked: (N, L) bool, the absorbed positions of the hybrid process (None elsewhere).
    finished: (N,) bool, the rows that ended at EOS (None where rows do not end early).
    clean: (N, L) bool, positions no step changes, the prompt and tokens already committed, for samplers that
        commit tokens as they go (None: the prompt alone, the positions before ``gen_start``).
    tokens: (N, L) long, the ids at the ``clean`` positions (None without ``clean``).
    done: nothing is left to generate: the loop stops.
    """

    x: torch.Tensor
    gen_start: int = 0
    x0: torch.Tensor | None = None
    masked: torch.Tensor | None = None
    finished: torch.Tensor | None = None
    clean: torch.Tensor | None = None
    tokens: torch.Tensor | None = None
    done: bool = False

    def replace(self, **changes) -> "SamplerState":
        """A copy with ``changes`` (tensors are shared, not copied)."""
        return replace(self, **changes)

    def prompt_positions(self) -> torch.Tensor:
        """(L,) bool: the positions of the clean prompt."""
        return torch.arange(self.x.shape[1], device=self.x.device) < self.gen_start

    def kept(self) -> torch.Tensor:
        """The positions no step changes: ``clean`` (N, L), or the prompt positions (L,)."""
        return self.prompt_positions() if self.clean is None else self.clean


@dataclass
class ModelOutput:
    """What the model says about a canvas: an x0 estimate (N, L, d) for the Gaussian samplers and/or token
    logits (N, L, V) for the token samplers (the hybrid sampler takes both). ``start``: the logits may cover only
    the positions start .. start + width - 1 of the canvas (a block-diffusion model's current block; the masked
    sampler reads them there)."""

    x0: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    start: int = 0
