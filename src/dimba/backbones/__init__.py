"""Denoiser backbones: (B, L, D) hidden states + a conditioning vector (B, C) -> (B, L, D).

A backbone knows nothing of noise, masks, schedules or losses. A new mixer is one file plus
one entry in `MIXERS`. A causal backbone (``bidirectional=False``) also decodes one token at a
time in O(1) work per token and layer for Mamba-2 (O(position) for attention) with
:meth:`Backbone.allocate_cache`, :meth:`Backbone.prefill` and :meth:`Backbone.step`.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from dimba.backbones.layers import Modulation, RMSNorm, SwiGLU
from dimba.backbones.mamba import BiMamba2, Mamba2Mixer
from dimba.backbones.transformer import Attention


def _mamba2(d_model: int, bidirectional: bool, **kw) -> nn.Module:
    mixer_kw = {k: kw[k] for k in ("d_state", "d_conv", "expand", "headdim", "chunk_size")}
    if bidirectional:
        return BiMamba2(d_model, tie_reverse=kw["tie_reverse"], **mixer_kw)
    return Mamba2Mixer(d_model, **mixer_kw)


def _transformer(d_model: int, bidirectional: bool, **kw) -> nn.Module:
    return Attention(d_model, kw["num_heads"], causal=not bidirectional)


# name -> (mixer factory, whether each block also has an MLP)
MIXERS: dict[str, tuple[Callable[..., nn.Module], bool]] = {
    "mamba2": (_mamba2, False),
    "transformer": (_transformer, True),
}


class Block(nn.Module):
    """Pre-norm residual block: h + mixer(mod(norm(h), c)) [+ mlp(mod(norm(h), c))]."""

    def __init__(self, mixer: nn.Module, d_model: int, cond_dim: int, conditioning_type: str, mlp: bool):
        super().__init__()
        self.norm1 = RMSNorm(d_model)
        self.mod1 = Modulation(d_model, cond_dim, conditioning_type)
        self.mixer = mixer
        self.mlp = None
        if mlp:
            self.norm2 = RMSNorm(d_model)
            self.mod2 = Modulation(d_model, cond_dim, conditioning_type)
            self.mlp = SwiGLU(d_model)

    def forward(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """h (B, L, D), c (B, C) -> (B, L, D)."""
        h = h + self.mixer(self.mod1(self.norm1(h), c))  # (B, L, D)
        return self._mlp(h, c)

    def allocate_state(self, batch: int, max_len: int, device: torch.device | None = None,
                       dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Empty decoding state of the causal mixer: a KV cache of ``max_len`` positions for
        attention, the (conv, SSM) recurrent state for Mamba-2 (which ignores ``max_len``)."""
        if isinstance(self.mixer, Attention):
            return self.mixer.allocate_cache(batch, max_len, device, dtype)
        return self.mixer.allocate_state(batch, device, dtype)

    def prefill(self, h: torch.Tensor, c: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """:meth:`forward` on a prompt h (B, P, D) at positions 0..P-1 that also fills ``state``.

        Attention fills its KV cache in one parallel pass; Mamba-2 steps its mixer token by token.
        """
        x = self.mod1(self.norm1(h), c)  # (B, P, D)
        if isinstance(self.mixer, Attention):
            y, state = self.mixer.prefill(x, state)  # (B, P, D)
        else:
            ys = []
            for t in range(x.shape[1]):
                y_t, state = self.mixer.step(x[:, t], state)  # (B, D)
                ys.append(y_t)
            y = torch.stack(ys, dim=1)  # (B, P, D)
        return self._mlp(h + y, c), state

    def step(self, h_t: torch.Tensor, c: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor], pos: int
             ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """:meth:`forward` for the one token h_t (B, D) at position ``pos`` -> (B, D), new state."""
        x_t = self.mod1(self.norm1(h_t), c)  # (B, D)
        if isinstance(self.mixer, Attention):
            y_t, state = self.mixer.step(x_t, state, pos)  # (B, D)
        else:
            y_t, state = self.mixer.step(x_t, state)  # (B, D)
        return self._mlp(h_t + y_t, c), state

    def _mlp(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """The residual MLP sub-block, when present: (B, [L,] D) -> (B, [L,] D)."""
        if self.mlp is not None:
            h = h + self.mlp(self.mod2(self.norm2(h), c))  # (B, [L,] D)
        return h


class Backbone(nn.Module):
    """A stack of `Block`s and a final RMSNorm."""

    def __init__(self, name: str, d_model: int, num_layers: int, cond_dim: int, conditioning_type: str = "film",
                 bidirectional: bool = True, **mixer_kwargs):
        super().__init__()
        if name not in MIXERS:
            raise ValueError(f"unknown backbone {name!r}: choose one of {', '.join(MIXERS)}")
        factory, mlp = MIXERS[name]
        self.blocks = nn.ModuleList(
            Block(factory(d_model, bidirectional, **mixer_kwargs), d_model, cond_dim, conditioning_type, mlp)
            for _ in range(num_layers)
        )
        self.norm = RMSNorm(d_model)
        self.bidirectional = bidirectional
        self.gradient_checkpointing = False

    def forward(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """h (B, L, D), c (B, C) -> (B, L, D) after the final norm.

        With ``gradient_checkpointing`` (training with gradients), each block's activations are
        recomputed in the backward pass instead of stored.
        """
        recompute = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.blocks:
            if recompute:
                h = checkpoint(block, h, c, use_reentrant=False)  # (B, L, D)
            else:
                h = block(h, c)  # (B, L, D)
        return self.norm(h)

    def allocate_cache(self, batch: int, max_len: int, device: torch.device | None = None,
                       dtype: torch.dtype | None = None) -> list:
        """Empty decoding cache, one state per block, for sequences of up to ``max_len`` positions.

        Defaults to the device and dtype of the weights. Attention KV caches are written in
        place by :meth:`prefill` and :meth:`step`; Mamba-2 states are replaced, never modified.
        """
        self._require_causal("allocate_cache")
        return [block.allocate_state(batch, max_len, device, dtype) for block in self.blocks]

    def prefill(self, h: torch.Tensor, c: torch.Tensor, cache: list) -> tuple[torch.Tensor, list]:
        """Causal :meth:`forward` on a prompt h (B, P, D) at positions 0..P-1 that also fills ``cache``.

        Returns (out (B, P, D), new cache); decoding goes on with :meth:`step` at ``pos = P``.
        """
        self._require_causal("prefill")
        new_cache = []
        for block, state in zip(self.blocks, cache, strict=True):
            h, state = block.prefill(h, c, state)  # (B, P, D)
            new_cache.append(state)
        return self.norm(h), new_cache

    def step(self, h_t: torch.Tensor, c: torch.Tensor, cache: list, pos: int) -> tuple[torch.Tensor, list]:
        """One decoding step for the token at position ``pos``.

        h_t (B, D) hidden state of that token, c (B, C) conditioning -> (out (B, D) after the
        final norm, new cache).

        ``cache`` comes from :meth:`allocate_cache`, :meth:`prefill` or the previous step (at
        ``pos - 1``). Stepping through a sequence gives the outputs of :meth:`forward`.
        """
        self._require_causal("step")
        new_cache = []
        for block, state in zip(self.blocks, cache, strict=True):
            h_t, state = block.step(h_t, c, state, pos)  # (B, D)
            new_cache.append(state)
        return self.norm(h_t), new_cache

    def _require_causal(self, method: str) -> None:
        if self.bidirectional:
            raise ValueError(f"{method}() needs a causal backbone (bidirectional=False)")
