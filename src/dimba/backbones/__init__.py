"""Denoiser backbones: (B, L, D) hidden states + a conditioning vector (B, C) -> (B, L, D).

A backbone knows nothing of noise, masks, schedules or losses. A new mixer is one file plus
one entry in `MIXERS`.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

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
        h = h + self.mixer(self.mod1(self.norm1(h), c))  # (B, L, D)
        if self.mlp is not None:
            h = h + self.mlp(self.mod2(self.norm2(h), c))  # (B, L, D)
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

    def forward(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            h = block(h, c)  # (B, L, D)
        return self.norm(h)
