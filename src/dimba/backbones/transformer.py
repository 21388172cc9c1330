"""Attention mixer: multi-head self-attention with rotary positions and SDPA, bidirectional or causal."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def rotary_tables(length: int, head_dim: int, device: torch.device, base: float = 10_000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables of RoPE (Su et al. 2021) for positions 0..length-1."""
    inv = 1.0 / base ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)  # (Dh/2,)
    angles = torch.arange(length, device=device, dtype=torch.float32)[:, None] * inv[None]  # (L, Dh/2)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[..., :Dh/2], x[..., Dh/2:]) of x: (B, H, L, Dh) by the position angles."""
    x1, x2 = x.float().chunk(2, dim=-1)  # (B, H, L, Dh/2) each
    out = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)  # (B, H, L, Dh)
    return out.to(x.dtype)


class Attention(nn.Module):
    """Self-attention mixer with the interface of every mixer: (B, L, D) -> (B, L, D)."""

    def __init__(self, d_model: int, num_heads: int, causal: bool = False):
        super().__init__()
        if d_model % num_heads:
            raise ValueError(f"d_model={d_model} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.head_dim = d_model // num_heads
        if self.head_dim % 2:
            raise ValueError(f"head dimension {self.head_dim} must be even for rotary embeddings")
        self.causal = causal
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.out_proj = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, length, d = x.shape
        qkv = self.qkv(x).view(b, length, 3, self.num_heads, self.head_dim)  # (B, L, 3, H, Dh)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, L, Dh) each
        cos, sin = rotary_tables(length, self.head_dim, x.device)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)  # (B, H, L, Dh)
        return self.out_proj(y.transpose(1, 2).reshape(b, length, d))  # (B, L, D)
