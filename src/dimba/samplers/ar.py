"""Left-to-right sampling (the ar family): step i draws the token at position ``gen_start + i`` from the model's
next-token logits, in float64 with temperature / top-k / top-p. A row that drew EOS is finished: its later
positions keep the fill (EOS), and the state is done when every row is. Holds no model (`dimba.samplers.state`)."""

from __future__ import annotations

import torch

from dimba.samplers.categorical import sample_tokens
from dimba.samplers.state import ModelOutput, SamplerState


class ARSampler:
    """One token per step; ``eos_id`` ends a row (None: rows never end early); ``fill_id`` fills the canvas."""

    def __init__(self, fill_id: int, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                 eos_id: int | None = None):
        self.fill_id, self.eos_id = fill_id, eos_id
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.timesteps: list[float] = []

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    def set_timesteps(self, num_steps: int, state: SamplerState) -> None:
        """One step per generated position: ``num_steps`` must equal the canvas length after ``gen_start``."""
        if num_steps != state.x.shape[1] - state.gen_start:
            raise ValueError(f"an ar canvas of {state.x.shape[1] - state.gen_start} new positions takes as many "
                             f"steps, not {num_steps}")
        self.timesteps = [float(j) for j in range(num_steps)]

    def initial_state(self, context: torch.Tensor, length: int) -> SamplerState:
        """The canvas (N, C + length): the context (N, C), then ``fill_id``; no row finished."""
        n, c = context.shape
        fill = torch.full((n, length), self.fill_id, dtype=torch.long, device=context.device)
        return SamplerState(x=torch.cat([context, fill], dim=1), gen_start=c,
                            finished=torch.zeros(n, dtype=torch.bool, device=context.device))

    def step(self, state: SamplerState, output: ModelOutput, i: int,
             generator: torch.Generator | None = None) -> SamplerState:
        """Draw the token at ``gen_start + i`` from ``output.logits`` (N, V)."""
        tok = sample_tokens(output.logits, self.temperature, self.top_k, self.top_p, generator)  # (N,)
        tok = torch.where(state.finished, torch.full_like(tok, self.fill_id), tok)
        x = state.x.clone()  # (N, L)
        x[:, state.gen_start + i] = tok
        finished = state.finished
        if self.eos_id is not None:
            finished = finished | (tok == self.eos_id)
        return state.replace(x=x, finished=finished, done=bool(finished.all()))
