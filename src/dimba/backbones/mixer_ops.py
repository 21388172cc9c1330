"""The Mamba-2 mixer's two elementwise stages as autograd Functions with hand-written backward passes.

Written with autograd from small ops, the depthwise convolution over time (+ SiLU) and the gated
RMSNorm cost as much as the mixer's matmuls on CPU: ``nn.Conv1d`` wants (B, C, L), so the
(B, L, C) activations were copied to that layout and back in both passes, and each small op of
the norm saved its own intermediate and made its own pass in the backward. These Functions work
in the (B, L, C) layout the projections produce, save only what their backward needs, and make a
few fused passes each. Both equal the plain compositions they replace (tests compare values and
gradients at float64).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable


def conv1d_silu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      lookahead: int = 0) -> torch.Tensor:
    """SiLU of a depthwise convolution over time, in the (B, L, C) layout; causal unless ``lookahead``.

    out[:, t] = silu(bias + sum_k weight[:, k] * x[:, t - (K - 1 - lookahead) + k]), with zeros
    outside the sequence: tap k reads ``lookahead - (K - 1 - k)`` steps ahead. With ``lookahead = 0``
    this equals ``silu(conv1d(x.transpose(1, 2), weight[:, None], bias, padding=K-1, groups=C)[..., :L])``
    transposed back; with ``lookahead = (K - 1) // 2`` the window is centred (one step more to the
    past for even K).

    Args:
        x: (B, L, C); any strides (a slice of a wider projection is fine).
        weight: (C, K), the ``nn.Conv1d`` weight with its singleton dimension squeezed.
        bias: (C,) or None.
        lookahead: future steps each output reads, 0 <= lookahead < K.

    Returns:
        (B, L, C), contiguous.
    """
    if not 0 <= lookahead < weight.shape[1]:
        raise ValueError(f"lookahead must be in [0, {weight.shape[1] - 1}] for a width-{weight.shape[1]} conv, got {lookahead}")
    return _ConvSiLU.apply(x, weight, bias, lookahead)


def gated_rms_norm(y: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, group_size: int,
                   eps: float) -> torch.Tensor:
    """RMSNorm of ``y * silu(z)`` over groups of ``group_size`` channels, times ``weight``.

    Computed in float32 (float64 for float64 inputs).

    Args:
        y, z: (..., D) with D a multiple of ``group_size``.
        weight: (D,).

    Returns:
        (..., D) in the dtype of ``y``.
    """
    return _GatedRMSNorm.apply(y, z, weight, group_size, eps)


class _ConvSiLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lookahead):
        K, L = weight.shape[1], x.shape[1]
        k0 = K - 1 - lookahead  # the tap that reads step t itself
        w = weight.to(x.dtype)  # (C, K)
        pre = x * w[:, k0] if bias is None else torch.addcmul(bias.to(x.dtype), x, w[:, k0])  # (B, L, C)
        for k, lo, hi, j in _taps(K, k0, L):  # outputs lo..hi-1 read the input j steps ahead
            pre[:, lo:hi].addcmul_(x[:, lo + j: hi + j], w[:, k])  # (B, hi - lo, C)
        ctx.save_for_backward(x, weight, pre)
        ctx.has_bias, ctx.k0 = bias is not None, k0
        return F.silu(pre)

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        x, weight, pre = ctx.saved_tensors
        K, L, k0 = weight.shape[1], x.shape[1], ctx.k0
        w = weight.to(x.dtype)  # (C, K)
        g = torch.ops.aten.silu_backward(dout.contiguous(), pre)  # (B, L, C)  gradient of the pre-activation
        dx = g * w[:, k0]  # (B, L, C)
        dw = torch.empty_like(weight)  # (C, K)
        # Weight gradient: products in a contiguous (B, L, C) buffer, zero where the tap reads padding,
        # then summed over B and L together (summing a strided slice instead is an order of magnitude slower).
        tmp = torch.mul(g, x)  # (B, L, C)
        dw[:, k0] = tmp.view(-1, tmp.shape[-1]).sum(0)
        for k, lo, hi, j in _taps(K, k0, L, keep_empty=True):
            if lo < hi:
                dx[:, lo + j: hi + j].addcmul_(g[:, lo:hi], w[:, k])  # (B, hi - lo, C)
                torch.mul(g[:, lo:hi], x[:, lo + j: hi + j], out=tmp[:, lo:hi])
            tmp[:, :lo] = 0
            tmp[:, max(hi, lo):] = 0
            dw[:, k] = tmp.view(-1, tmp.shape[-1]).sum(0)
        dbias = g.sum((0, 1)).to(weight.dtype) if ctx.has_bias else None
        return dx, dw, dbias, None


def _taps(K: int, k0: int, L: int, keep_empty: bool = False):
    """(k, lo, hi, j) for every tap k != k0, nearest first (the past first on ties): outputs lo..hi-1 read
    the input j = k - k0 steps ahead. Taps that read only outside the sequence (lo >= hi) are left out
    unless ``keep_empty``."""
    for k in sorted(range(K), key=lambda k: (abs(k - k0), k > k0)):
        j = k - k0
        lo, hi = max(0, -j), min(L, L - j)
        if k != k0 and (lo < hi or keep_empty):
            yield k, lo, hi, j


class _GatedRMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, z, weight, group_size, eps):
        ct = torch.promote_types(y.dtype, torch.float32)  # compute dtype
        g = (y.to(ct) * F.silu(z.to(ct))).unflatten(-1, (-1, group_size))  # (..., G, D/G)
        rstd = torch.rsqrt(g.square().mean(-1, keepdim=True).add_(eps))  # (..., G, 1)
        out = g.mul_(rstd).flatten(-2).mul_(weight.to(ct))  # (..., D)
        ctx.save_for_backward(y, z, weight, rstd)
        ctx.group_size = group_size
        return out.to(y.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        y, z, weight, rstd = ctx.saved_tensors
        yf, zf, doutf = y.to(rstd.dtype), z.to(rstd.dtype), dout.to(rstd.dtype)
        gate = F.silu(zf)  # (..., D)
        n = (yf * gate).unflatten(-1, (-1, ctx.group_size)).mul_(rstd)  # (..., G, D/G)  normalised
        dn = (doutf * weight.to(rstd.dtype)).unflatten(-1, (-1, ctx.group_size))  # (..., G, D/G)
        dweight = (doutf.flatten(0, -2) * n.flatten(-2).flatten(0, -2)).sum(0)  # (D,)
        proj = (dn * n).mean(-1, keepdim=True)  # (..., G, 1)
        dg = dn.sub_(n.mul_(proj)).mul_(rstd).flatten(-2)  # (..., D)  RMSNorm backward
        dy = dg * gate  # (..., D)
        dz = torch.ops.aten.silu_backward(dg.mul_(yf), zf)  # (..., D)
        return dy.to(y.dtype), dz.to(z.dtype), dweight.to(weight.dtype), None, None
