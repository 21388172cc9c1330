"""Mamba-2 selective state-space scans (SSD): dispatch to the fastest kernel, and the sequential reference.

Notation follows Dao & Gu (2024), "Transformers are SSMs". Every head has a scalar decay rate
``A < 0``; its state ``h_t`` is a (P, N) matrix and, with the input-dependent step ``dt_t > 0``,

    h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T
    y_t = h_t C_t + D x_t

Shapes: x (batch, L, H, P); dt (batch, L, H); A (H,); B, C (batch, L, G, N) where the G groups
divide the H heads and head ``h`` reads group ``h // (H // G)`` (the ``mamba_ssm`` convention);
D (H,) or None; states (batch, H, P, N).

On CUDA with ``mamba_ssm`` installed, :func:`selective_scan` and :func:`bidirectional_scan` dispatch
to its fused Triton kernel, and :func:`conv_silu` (the mixers' convolution) to ``causal_conv1d``'s;
elsewhere the pure-PyTorch chunked scans of :mod:`dimba.backbones.ssd` and :mod:`dimba.backbones.biscan`
run. This module alone imports those optional packages; without them a warning is given once per
package on CUDA.
"""

from __future__ import annotations

import functools
import warnings

import torch
import torch.nn.functional as F

from dimba.backbones.biscan import chunked_bidirectional_scan
from dimba.backbones.mixer_ops import conv1d_silu
from dimba.backbones.ssd import _check_inputs, _to_compute_dtype, chunked_selective_scan

try:
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
except ImportError:
    mamba_chunk_scan_combined = None
try:
    from causal_conv1d import causal_conv1d_fn
except ImportError:
    causal_conv1d_fn = None


def selective_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    *,
    chunk_size: int = 64,
    initial_state: torch.Tensor | None = None,
    return_final_state: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Chunked SSD scan: quadratic (attention-like) form inside chunks, linear recurrence across them.

    Args:
        x: inputs (batch, L, H, P).
        dt: positive step sizes (batch, L, H), already passed through softplus.
        A: negative per-head decay rates (H,).
        B, C: input and output projections (batch, L, G, N), G dividing H.
        D: optional per-head skip connection (H,).
        chunk_size: chunk length Q; L need not be a multiple of it.
        initial_state: optional state before the first step (batch, H, P, N).
        return_final_state: also return the state after the last step.

    Returns:
        y (batch, L, H, P) in the dtype of ``x``, and with ``return_final_state`` the final state
        (batch, H, P, N) in the compute dtype (float32, or float64 for float64 inputs).

    On CUDA, float32/fp16/bf16 inputs go to ``mamba_ssm``'s fused Triton kernel
    (``mamba_chunk_scan_combined``) when it is installed; without it a warning is given once and
    :func:`chunked_selective_scan` runs instead. float64 and CPU inputs always take
    :func:`chunked_selective_scan`, whose notes on time, memory and precision apply.
    """
    if x.is_cuda and x.dtype != torch.float64:
        if mamba_chunk_scan_combined is not None:
            _check_inputs(x, dt, A, B, C, D, initial_state)
            return mamba_chunk_scan_combined(
                x, dt, A, B, C, chunk_size, D=D,
                initial_states=initial_state, return_final_states=return_final_state,
            )
        _warn_pure_pytorch_on_cuda("mamba_ssm", "selective_scan runs the pure-PyTorch chunked scan")
    return chunked_selective_scan(x, dt, A, B, C, D, chunk_size=chunk_size, initial_state=initial_state,
                                  return_final_state=return_final_state)

def conv_silu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lookahead: int = 0) -> torch.Tensor:
    """SiLU of the depthwise convolution over time, causal unless ``lookahead``: (B, L, C) -> (B, L, C).

    ``weight`` (C, K), ``bias`` (C,) or None; see :func:`dimba.backbones.mixer_ops.conv1d_silu` for
    ``lookahead``. On CUDA with ``causal_conv1d`` installed, its fused causal kernel (run on the input
    followed by ``lookahead`` zero steps, and read ``lookahead`` steps later); otherwise
    :func:`~dimba.backbones.mixer_ops.conv1d_silu` (same result).
    """
    if x.is_cuda:
        if causal_conv1d_fn is not None:
            if lookahead:
                x = F.pad(x, (0, 0, 0, lookahead))  # (B, L + lookahead, C)
            xt = x.transpose(1, 2)  # (B, C, L), channel-last in memory
            if xt.stride(0) % 8 or xt.stride(2) % 8 or xt.shape[1] % 8:
                # the kernel's channel-last layout needs these strides (and those of the gradient,
                # made contiguous as (B, L, C)) to be multiples of 8; else give it channel-first
                xt = xt.contiguous()  # (B, C, L)
            return causal_conv1d_fn(xt, weight, bias, activation="silu").transpose(1, 2)[:, lookahead:]  # (B, L, C)
        _warn_pure_pytorch_on_cuda("causal_conv1d", "the convolution runs in plain PyTorch")
    return conv1d_silu(x, weight, bias, lookahead)  # (B, L, C)


def bidirectional_scan(
    x: torch.Tensor,
    dt_fwd: torch.Tensor,
    dt_rev: torch.Tensor,
    A_fwd: torch.Tensor,
    A_rev: torch.Tensor,
    B_fwd: torch.Tensor,
    C_fwd: torch.Tensor,
    B_rev: torch.Tensor,
    C_rev: torch.Tensor,
    D: torch.Tensor | None = None,
    *,
    chunk_size: int = 64,
    forward_diagonal: bool = True,
) -> torch.Tensor:
    """A forward and a reverse SSD scan of one input x (batch, L, H, P), summed, in one call.

    The forward direction reads positions <= t (with dt_fwd, A_fwd, B_fwd, C_fwd; < t if not
    ``forward_diagonal``), the reverse one positions > t (with the ``_rev`` tensors), plus ``D x``;
    shapes as in :func:`selective_scan`. The formula is in :mod:`dimba.backbones.biscan`. Returns y
    (batch, L, H, P) in the dtype of x.

    On CUDA with ``mamba_ssm``, float32/fp16/bf16 inputs go through ``mamba_chunk_scan_combined`` in
    one call, the reverse direction as H more heads reading the flipped sequence
    (:func:`stacked_bidirectional_scan`); elsewhere :func:`~dimba.backbones.biscan.chunked_bidirectional_scan`.
    """
    if x.is_cuda and x.dtype != torch.float64:
        if mamba_chunk_scan_combined is not None:
            return stacked_bidirectional_scan(_mamba_ssm_scan, x, dt_fwd, dt_rev, A_fwd, A_rev, B_fwd, C_fwd,
                                              B_rev, C_rev, D, chunk_size=chunk_size,
                                              forward_diagonal=forward_diagonal)
        _warn_pure_pytorch_on_cuda("mamba_ssm", "bidirectional_scan runs the pure-PyTorch chunked scan")
    return chunked_bidirectional_scan(x, dt_fwd, dt_rev, A_fwd, A_rev, B_fwd, C_fwd, B_rev, C_rev, D,
                                      chunk_size=chunk_size, forward_diagonal=forward_diagonal)


def stacked_bidirectional_scan(scan, x, dt_fwd, dt_rev, A_fwd, A_rev, B_fwd, C_fwd, B_rev, C_rev, D=None, *,
                               chunk_size: int = 64, forward_diagonal: bool = True) -> torch.Tensor:
    """:func:`bidirectional_scan` through one call of a causal ``scan`` with the signature of
    :func:`selective_scan` (without D): the reverse direction runs as H more heads, and G more groups
    of B and C, over the flipped sequence. Its diagonal term, which the reverse direction does not
    have, is subtracted (and the forward one's too without ``forward_diagonal``).
    """
    H, G = x.shape[2], B_fwd.shape[2]
    x2 = torch.cat([x, x.flip(1)], dim=2)  # (b, L, 2H, P)
    y2 = scan(
        x2,
        torch.cat([dt_fwd, dt_rev.flip(1)], dim=2),  # (b, L, 2H)
        torch.cat([A_fwd, A_rev]),  # (2H,)
        torch.cat([B_fwd, B_rev.flip(1)], dim=2),  # (b, L, 2G, N)
        torch.cat([C_fwd, C_rev.flip(1)], dim=2),  # (b, L, 2G, N)
        chunk_size=chunk_size,
    )  # (b, L, 2H, P)
    diag = _diagonal(B_rev, C_rev, dt_rev, H // G)  # (b, L, H)
    if not forward_diagonal:
        diag = diag + _diagonal(B_fwd, C_fwd, dt_fwd, H // G)
    y = y2[:, :, :H] + y2[:, :, H:].flip(1) - diag[..., None] * x  # (b, L, H, P)
    return y if D is None else y + D[:, None] * x


def _diagonal(B: torch.Tensor, C: torch.Tensor, dt: torch.Tensor, heads_per_group: int) -> torch.Tensor:
    """A causal scan's diagonal, the weight of x_t in y_t: C_t . B_t dt_t per head (b, L, H) from B, C (b, L, G, N)."""
    return (C * B).sum(-1).repeat_interleave(heads_per_group, dim=2) * dt


def _mamba_ssm_scan(x, dt, A, B, C, *, chunk_size):
    """``mamba_chunk_scan_combined`` with :func:`selective_scan`'s input checks."""
    _check_inputs(x, dt, A, B, C, None, None)
    return mamba_chunk_scan_combined(x, dt, A, B, C, chunk_size)


def selective_scan_sequential(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    *,
    chunk_size: int = 64,
    initial_state: torch.Tensor | None = None,
    return_final_state: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Reference scan: the recurrence stepped one position at a time (O(L) sequential steps).

    Same arguments and returns as :func:`selective_scan`; ``chunk_size`` is accepted for
    interchangeability and ignored.
    """
    _check_inputs(x, dt, A, B, C, D, initial_state)
    x_, dt_, A_, B_, C_, D_, h = _to_compute_dtype(x, dt, A, B, C, D, initial_state)
    batch, _, H, P = x.shape
    R = H // B.shape[2]
    B_ = B_.repeat_interleave(R, dim=2)  # (b, L, H, N)
    C_ = C_.repeat_interleave(R, dim=2)  # (b, L, H, N)
    decay = torch.exp(dt_ * A_)  # (b, L, H)
    u = x_ * dt_[..., None]  # (b, L, H, P)  dt_t x_t
    if h is None:
        h = x_.new_zeros(batch, H, P, B.shape[-1])  # (b, H, P, N)
    ys = []
    for decay_t, u_t, B_t, C_t in zip(decay.unbind(1), u.unbind(1), B_.unbind(1), C_.unbind(1)):
        h = decay_t[..., None, None] * h + u_t[..., None] * B_t[:, :, None, :]  # (b, H, P, N)
        ys.append(torch.einsum("bhpn,bhn->bhp", h, C_t))  # (b, H, P)
    y = torch.stack(ys, dim=1)  # (b, L, H, P)
    if D_ is not None:
        y = y + x_ * D_[:, None]
    y = y.to(x.dtype)
    return (y, h) if return_final_state else y

@functools.cache
def _warn_pure_pytorch_on_cuda(package: str, consequence: str) -> None:
    warnings.warn(
        f"{package} is not installed: {consequence} on CUDA, which is slower than its fused kernel "
        "(pip install 'dimba[gpu]').",
        stacklevel=3,
    )
