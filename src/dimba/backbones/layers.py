"""Building blocks shared by every backbone: RMSNorm, timestep embedding, conditioning, MLP."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """Root-mean-square layer norm (Zhang & Sennrich 2019), computed in float32."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)  # (..., D)
        return (out * self.weight.float()).to(x.dtype)


def sinusoidal_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """Sinusoidal features of a continuous time ``t`` in [0, 1] (scaled by 1000 as in DDPM)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = 1000.0 * t.float()[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, 2*half)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb  # (B, dim)


class TimestepEmbedding(nn.Module):
    """Sinusoidal features of t followed by a two-layer MLP."""

    def __init__(self, dim: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(sinusoidal_embedding(t, self.freq_dim).to(self.mlp[0].weight.dtype))  # (B, D)


class Modulation(nn.Module):
    """Applies a conditioning vector ``c`` (B, C) to hidden states (B, L, D) or, for one token, (B, D).

    ``film``: h * (1 + scale(c)) + shift(c); ``additive``: h + shift(c). The projection is
    zero-initialised so every block starts as the unconditioned identity modulation.
    """

    def __init__(self, d_model: int, cond_dim: int, kind: str = "film"):
        super().__init__()
        if kind not in ("film", "additive"):
            raise ValueError(f"unknown conditioning_type {kind!r}: use 'film' or 'additive'")
        self.kind = kind
        n_out = 2 * d_model if kind == "film" else d_model
        self.proj = nn.Linear(cond_dim, n_out)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        p = self.proj(F.silu(c))  # (B, D or 2D)
        if h.dim() == 3:
            p = p[:, None, :]  # (B, 1, D or 2D), broadcast over positions
        if self.kind == "additive":
            return h + p
        scale, shift = p.chunk(2, dim=-1)  # (B, [1,] D) each
        return h * (1 + scale) + shift


class SwiGLU(nn.Module):
    """Gated MLP of Shazeer (2020): W2(silu(W1 x) * W3 x)."""

    def __init__(self, d_model: int, hidden: int | None = None):
        super().__init__()
        hidden = hidden or int(8 * d_model / 3 / 64 + 0.999) * 64
        self.w13 = nn.Linear(d_model, 2 * hidden, bias=False)
        self.w2 = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.w13(x).chunk(2, dim=-1)  # (B, L, H) each
        return self.w2(F.silu(a) * b)  # (B, L, D)
