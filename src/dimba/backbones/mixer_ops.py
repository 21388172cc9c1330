"""The Mamba-2 mixer's two elementwise stages as autograd Functions with hand-written backward passes.

Written with autograd from small ops, the causal depthwise convolution (+ SiLU) and the gated
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


def causal_conv1d_silu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """SiLU of a causal depthwise convolution over time, in the (B, L, C) layout.

    Equals ``silu(conv1d(x.transpose(1, 2), weight[:, None], bias, padding=K-1, groups=C)[..., :L])``
    transposed back: out[:, t] = silu(bias + sum_k weight[:, k] * x[:, t - (K - 1) + k]), with zeros
    before the sequence start.

    Args:
        x: (B, L, C); any strides (a slice of a wider projection is fine).
        weight: (C, K), the ``nn.Conv1d`` weight with its singleton dimension squeezed.
        bias: (C,) or None.

    Returns:
        (B, L, C), contiguous.
    """
    return _CausalConvSiLU.apply(x, weight, bias)


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


class _CausalConvSiLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        K, L = weight.shape[1], x.shape[1]
        w = weight.to(x.dtype)  # (C, K)
        pre = x * w[:, K - 1] if bias is None else torch.addcmul(bias.to(x.dtype), x, w[:, K - 1])  # (B, L, C)
        for j in range(1, min(K, L + 1)):  # tap K-1-j reads the input j steps back
            pre[:, j:].addcmul_(x[:, : L - j], w[:, K - 1 - j])  # (B, L - j, C)
        ctx.save_for_backward(x, weight, pre)
        ctx.has_bias = bias is not None
        return F.silu(pre)

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        x, weight, pre = ctx.saved_tensors
        K, L = weight.shape[1], x.shape[1]
        w = weight.to(x.dtype)  # (C, K)
        g = torch.ops.aten.silu_backward(dout.contiguous(), pre)  # (B, L, C)  gradient of the pre-activation
        dx = g * w[:, K - 1]  # (B, L, C)
        dw = torch.empty_like(weight)  # (C, K)
        # Weight gradient: products in a contiguous (B, L, C) buffer, zero where the tap reads padding,
        # then summed over B and L together (summing a strided slice instead is an order of magnitude slower).
        tmp = torch.mul(g, x)  # (B, L, C)
        dw[:, K - 1] = tmp.view(-1, tmp.shape[-1]).sum(0)
        for j in range(1, K):
            if j < L:
                dx[:, : L - j].addcmul_(g[:, j:], w[:, K - 1 - j])  # (B, L - j, C)
                torch.mul(g[:, j:], x[:, : L - j], out=tmp[:, j:])
            tmp[:, : min(j, L)] = 0
            dw[:, K - 1 - j] = tmp.view(-1, tmp.shape[-1]).sum(0)
        dbias = g.sum((0, 1)).to(weight.dtype) if ctx.has_bias else None
        return dx, dw, dbias


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
