"""The one contract every sequence mixer keeps, and the padding helpers the mixers share.

A mixer maps hidden states (B, L, D) to (B, L, D) and has four methods:

- ``forward(x, lengths=None)``: the whole sequence. ``lengths`` (B,) int holds each row's number
  of real tokens, the rest being right padding: outputs at real positions then equal those of each
  row run alone, whatever the padding holds (outputs at padded positions are unspecified).
- ``allocate_state(batch, max_len, device=None, dtype=None)``: the empty decoding state of a causal
  mixer, for sequences of up to ``max_len`` positions.
- ``prefill(x, state) -> (y, state)``: the causal forward of a prompt (B, P, D) at positions
  0..P-1 that also fills the state.
- ``step(x_t, state, pos) -> (y_t, state)``: one token (B, D) at position ``pos``.

Stepping through a sequence gives the outputs of the causal ``forward``. Bidirectional mixers
derive from :class:`BidirectionalMixer`, whose decoding methods raise a one-line error.
"""

from __future__ import annotations

import torch
from torch import nn


class BidirectionalMixer(nn.Module):
    """Base of the mixers whose outputs depend on the whole sequence: they cannot decode token by token."""

    def allocate_state(self, batch: int, max_len: int, device: torch.device | None = None,
                       dtype: torch.dtype | None = None):
        """Not available: raises ValueError."""
        self._refuse("allocate_state")

    def prefill(self, x: torch.Tensor, state):
        """Not available: raises ValueError."""
        self._refuse("prefill")

    def step(self, x_t: torch.Tensor, state, pos: int):
        """Not available: raises ValueError."""
        self._refuse("step")

    def _refuse(self, method: str) -> None:
        raise ValueError(f"{type(self).__name__}.{method}() needs a causal mixer: a bidirectional mixer "
                         "reads the whole sequence (build the backbone with bidirectional=False)")


def real_positions(lengths: torch.Tensor, length: int) -> torch.Tensor:
    """(B, L) bool: True at the first ``lengths[b]`` positions of row b."""
    return torch.arange(length, device=lengths.device)[None, :] < lengths[:, None]  # (B, L)


def reverse_rows(x: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
    """x (B, L, ...) with each row's first ``lengths[b]`` positions in reverse order and its padding left
    where it is (``x.flip(1)`` when ``lengths`` is None). Applied twice, gives x back."""
    if lengths is None:
        return x.flip(1)
    length = x.shape[1]
    pos = torch.arange(length, device=x.device)[None, :]  # (1, L)
    index = torch.where(pos < lengths[:, None], lengths[:, None] - 1 - pos, pos)  # (B, L)
    return x.gather(1, index.view(*index.shape, *(1,) * (x.dim() - 2)).expand_as(x))
