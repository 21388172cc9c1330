"""Both directions of a bidirectional SSD scan in one pass: the quasiseparable mixing matrix, chunked.

A forward scan over x and a reverse scan over the same x, summed, multiply x by one matrix M
(Hwang et al. 2024, "Hydra"): its lower triangle (with the diagonal) is the forward scan's
semiseparable matrix, its strict upper triangle the reverse scan's. Per head, with decays
a_t = dt_t A <= 0 of each direction,

    y_t = sum_{s <= t} C^f_t . B^f_s exp(a^f_{s+1} + ... + a^f_t) dt^f_s x_s       (forward, causal)
        + sum_{s > t}  C^r_t . B^r_s exp(a^r_t + ... + a^r_{s-1}) dt^r_s x_s       (reverse, anti-causal)
        + D x_t

which is what a forward :func:`~dimba.backbones.ssm.selective_scan` plus a reverse one on the
flipped sequence give, less the reverse scan's diagonal term: the diagonal (a token's own
contribution) is counted once, by the forward direction and D.

Chunked like :class:`dimba.backbones.ssd._ChunkedScan`, but both directions share the inside of
each chunk: one Q x Q matrix per head holds the forward decays below the diagonal and the reverse
decays above it, so the within-chunk product ``M @ x`` and its two backward products are made
once instead of twice, and x, dy and dx are laid out once. Only the states passed between chunks
(forwards for one direction, backwards for the other) are per direction. No flipped copies of
the inputs or outputs are made.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from dimba.backbones.ssd import (
    _check_inputs, _flat_baddbmm_, _heads_last, _pass_states, _pass_states_backward, _to_compute_dtype,
)


def chunked_bidirectional_scan(
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
    """Forward plus reverse SSD scan of one input, pure PyTorch, any device (formula in the module docstring).

    Args:
        x: inputs (batch, L, H, P), shared by both directions.
        dt_fwd, dt_rev: positive step sizes (batch, L, H) of each direction, after softplus.
        A_fwd, A_rev: negative per-head decay rates (H,).
        B_fwd, C_fwd, B_rev, C_rev: (batch, L, G, N), G dividing H.
        D: optional per-head skip (H,).
        chunk_size: chunk length Q; L need not be a multiple of it.
        forward_diagonal: whether the forward direction reads position t itself (s <= t, as above); False
            makes it strictly causal (s < t), so that neither direction has a diagonal and the only
            diagonal term is ``D x`` plus whatever the caller adds (Hydra's quasiseparable form).

    Returns:
        y (batch, L, H, P) in the dtype of ``x``; computed in float32 (float64 for float64 inputs).
        The backward pass is hand-derived and does not support double backward.
    """
    _check_inputs(x, dt_fwd, A_fwd, B_fwd, C_fwd, D, None)
    _check_inputs(x, dt_rev, A_rev, B_rev, C_rev, D, None)
    batch, length, H, P = x.shape
    G, N = B_fwd.shape[2:]
    R, Q = H // G, chunk_size
    x_, dtf, dtr, Af, Ar, Bf, Cf, Br, Cr, D_ = _to_compute_dtype(
        x, dt_fwd, dt_rev, A_fwd, A_rev, B_fwd, C_fwd, B_rev, C_rev, D)
    if length <= Q and not _needs_grad(x, dt_fwd, dt_rev, A_fwd, A_rev, B_fwd, C_fwd, B_rev, C_rev, D):
        with torch.autocast(x.device.type, enabled=False):
            return _one_chunk(x_, dtf, dtr, Af, Ar, Bf, Cf, Br, Cr, D_, forward_diagonal).to(x.dtype)
    pad = -length % Q
    if pad:  # padded steps have x = 0 and dt = 0: they add nothing and decay nothing, in either direction
        x_, dtf, dtr, Bf, Cf, Br, Cr = (F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad))
                                        for t in (x_, dtf, dtr, Bf, Cf, Br, Cr))
    n_chunks = (length + pad) // Q
    with torch.autocast(x.device.type, enabled=False):
        y = _BidirectionalChunkedScan.apply(
            x_.reshape(batch, n_chunks, Q, G, R, P),
            dtf.reshape(batch, n_chunks, Q, G, R),
            dtr.reshape(batch, n_chunks, Q, G, R),
            Af.reshape(G, R),
            Ar.reshape(G, R),
            *(t.reshape(batch, n_chunks, Q, G, N) for t in (Bf, Cf, Br, Cr)),
            None if D_ is None else D_.reshape(G, R),
            0 if forward_diagonal else -1,
        )
    return y.view(batch, n_chunks * Q, H, P)[:, :length].to(x.dtype)  # (b, L, H, P)


def _needs_grad(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd will differentiate through any of ``tensors``."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _one_chunk(x, dtf, dtr, Af, Ar, Bf, Cf, Br, Cr, D, forward_diagonal: bool) -> torch.Tensor:
    """The scan of a sequence no longer than one chunk, without gradients (a cached block-diffusion step, a short
    prompt): y = M x + D x with the whole L x L matrix M of the module docstring formed at once and no states to
    pass, in a dozen tensor ops instead of the chunked Function's setup for many chunks. Shapes as in
    `chunked_bidirectional_scan`, in the compute dtype."""
    batch, length, H, P = x.shape
    R = H // Bf.shape[2]
    pos = torch.arange(length, device=x.device)
    lower = pos[:, None] >= pos[None, :] if forward_diagonal else pos[:, None] > pos[None, :]  # (L, L): s <= t
    upper = pos[:, None] < pos[None, :]  # (L, L): s > t
    af = (dtf * Af).cumsum(1).transpose(1, 2)  # (b, H, L): a^f_1 + ... + a^f_t
    ar = dtr * Ar  # (b, L, H)
    ar = (ar.cumsum(1) - ar).transpose(1, 2)  # (b, H, L): a^r_1 + ... + a^r_{t-1}
    log_f = (af[..., :, None] - af[..., None, :]).masked_fill(~lower, float("-inf"))  # (b, H, L, L) [t, s]
    log_r = (ar[..., None, :] - ar[..., :, None]).masked_fill(~upper, float("-inf"))  # (b, H, L, L) [t, s]
    cb_f = torch.einsum("btgn,bsgn->bgts", Cf, Bf).repeat_interleave(R, dim=1)  # (b, H, L, L)
    cb_r = torch.einsum("btgn,bsgn->bgts", Cr, Br).repeat_interleave(R, dim=1)  # (b, H, L, L)
    m = (cb_f * log_f.exp() * dtf.transpose(1, 2)[..., None, :]
         + cb_r * log_r.exp() * dtr.transpose(1, 2)[..., None, :])  # (b, H, L, L)
    y = (m @ x.transpose(1, 2)).transpose(1, 2)  # (b, L, H, P)
    return y if D is None else y + D[:, None] * x


class _BidirectionalChunkedScan(torch.autograd.Function):
    """Both directions of SSD on padded, chunked inputs, with a hand-derived backward pass.

    Layouts as in ``_ChunkedScan``: x (b, c, Q, G, R, P), dt (b, c, Q, G, R), A (G, R), B and C
    (b, c, Q, G, N), D (G, R) or None; ``diagonal`` 0, or -1 for a strictly causal forward direction
    (``tril(., -1)`` below); head-major work tensors (b, c, G, R, Q, ...). Per chunk and
    head, with prefix sums s_t = a^f_1 + ... + a^f_t and suffix sums r_t = a^r_t + ... + a^r_Q:

        Y = (LD o CB) x  +  diag(exp(s)) C^f hf_in^T  +  diag(exp(r)) C^r hr_in^T  +  D x
        LD[t, j] = exp(s_t - s_j) dt^f_j (j <= t),  exp(r_t - r_j) dt^r_j (j > t)
        CB = tril(C^f B^f^T) + triu(C^r B^r^T, 1)
        written states  S^f = x^T diag(exp(s_Q - s) dt^f) B^f,  S^r = x^T diag(exp(r_1 - r) dt^r) B^r
        hf_in(c + 1) = exp(s_Q) hf_in(c) + S^f(c),  hr_in(c - 1) = exp(r_1) hr_in(c) + S^r(c)

    ``LD`` is built as exp of its logarithm (dt folded in as log dt), in one Q x Q tensor per head,
    and saved for the backward pass together with CB and the entering states.
    """

    @staticmethod
    def forward(ctx, x, dtf, dtr, Af, Ar, Bf, Cf, Br, Cr, D, diagonal):
        x_h = x.permute(0, 1, 3, 4, 2, 5).contiguous()  # (b, c, G, R, Q, P)
        dtf_h, dtr_h = dtf.permute(0, 1, 3, 4, 2), dtr.permute(0, 1, 3, 4, 2)  # (b, c, G, R, Q) each
        s, r = _log_decays(dtf_h, dtr_h, Af, Ar)  # (b, c, G, R, Q) each
        Bfg, Cfg, Brg, Crg = (t.transpose(2, 3) for t in (Bf, Cf, Br, Cr))  # (b, c, G, Q, N) each
        CB = torch.tril(Cfg @ Bfg.transpose(-1, -2), diagonal)  # (b, c, G, Q, Q)
        CB += torch.triu(Crg @ Brg.transpose(-1, -2), 1)
        LD = _decay_dt_matrix(s, r, dtf_h, dtr_h)  # (b, c, G, R, Q, Q)
        Y = (LD * CB.unsqueeze(3)) @ x_h  # (b, c, G, R, Q, P)
        h = _states_forward(Y, x_h, _directions(Bfg, Cfg, Brg, Crg, s, r, dtf_h, dtr_h))  # (b, c, G, R, P, 2N)
        y = _heads_last(Y)  # (b, c, Q, G, R, P)
        if D is not None:
            y.addcmul_(x, D[..., None])
        ctx.save_for_backward(x, dtf, dtr, Af, Ar, Bf, Cf, Br, Cr, D, h, CB, LD)
        ctx.diagonal = diagonal
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        with torch.autocast(dy.device.type, enabled=False):
            return _BidirectionalChunkedScan._backward(ctx, dy)

    @staticmethod
    def _backward(ctx, dy):
        x, dtf, dtr, Af, Ar, Bf, Cf, Br, Cr, D, h, CB, LD = ctx.saved_tensors
        x_h = x.permute(0, 1, 3, 4, 2, 5).contiguous()  # (b, c, G, R, Q, P)
        dtf_h, dtr_h = dtf.permute(0, 1, 3, 4, 2), dtr.permute(0, 1, 3, 4, 2)  # (b, c, G, R, Q) each
        s, r = _log_decays(dtf_h, dtr_h, Af, Ar)  # (b, c, G, R, Q) each
        Bfg, Cfg, Brg, Crg = (t.transpose(2, 3) for t in (Bf, Cf, Br, Cr))  # (b, c, G, Q, N) each
        dY = dy.permute(0, 1, 3, 4, 2, 5).contiguous()  # (b, c, G, R, Q, P)

        # Inside the chunks: Y = M x with M = LD o CB, and log LD = segment sums + log dt.
        dx_h = (LD * CB.unsqueeze(3)).transpose(-1, -2) @ dY  # (b, c, G, R, Q, P)
        dLD = (dY @ x_h.transpose(-1, -2)).mul_(LD)  # (b, c, G, R, Q, Q)  dM o LD
        dCB = dLD.sum(3)  # (b, c, G, Q, Q)
        ds, dr, ddtf, ddtr = _log_matrix_grads(dLD.mul_(CB.unsqueeze(3)), dtf_h, dtr_h)  # dM o M
        del dLD
        dCBf, dCBr = torch.tril(dCB, ctx.diagonal), dCB.triu_(1)  # (b, c, G, Q, Q) each
        dCf, dBf = dCBf @ Bfg, dCBf.transpose(-1, -2) @ Cfg  # (b, c, G, Q, N) each
        dCr, dBr = dCBr @ Brg, dCBr.transpose(-1, -2) @ Crg  # (b, c, G, Q, N) each

        # Between the chunks.
        fwd, rev = _states_backward(dY, dx_h, x_h, h, _directions(Bfg, Cfg, Brg, Crg, s, r, dtf_h, dtr_h))
        for grads, d_log, ddt, end in ((fwd, ds, ddtf, -1), (rev, dr, ddtr, 0)):
            dB, dC, dlog_E, dlog_w, ddt_states, dlog_gamma = grads
            d_log += dlog_E - dlog_w  # log E = s (or r); log w = s_Q - s (or r_1 - r)
            d_log[..., end] += dlog_w.sum(-1) + dlog_gamma
            ddt += ddt_states
        dBf, dCf, dBr, dCr = dBf + fwd[0], dCf + fwd[1], dBr + rev[0], dCr + rev[1]

        # s = cumsum(dt^f A^f) and r = reverse cumsum(dt^r A^r).
        daf, dar = ds.flip(-1).cumsum(-1).flip(-1), dr.cumsum(-1)  # (b, c, G, R, Q) each
        ddtf += daf * Af[..., None]
        ddtr += dar * Ar[..., None]
        dAf, dAr = (daf * dtf_h).sum((0, 1, 4)), (dar * dtr_h).sum((0, 1, 4))  # (G, R) each
        dx = _heads_last(dx_h)  # (b, c, Q, G, R, P)
        dD = None
        if D is not None:
            dx.addcmul_(dy, D[..., None])
            dD = torch.mul(dy, x, out=dY.view(x.shape)).sum(-1).sum((0, 1, 2))  # (G, R)  (dY: scratch)
        return (dx, ddtf.permute(0, 1, 4, 2, 3), ddtr.permute(0, 1, 4, 2, 3), dAf, dAr,
                *(t.transpose(2, 3) for t in (dBf, dCf, dBr, dCr)), dD, None)


def _log_decays(dtf_h: torch.Tensor, dtr_h: torch.Tensor, Af: torch.Tensor, Ar: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Within-chunk prefix sums s of the forward log decays and suffix sums r of the reverse ones.

    dt (b, c, G, R, Q), A (G, R) -> s, r (b, c, G, R, Q): s_t = a_1 + ... + a_t, r_t = a_t + ... + a_Q.
    """
    s = (dtf_h * Af[..., None]).cumsum(-1)
    r = (dtr_h * Ar[..., None]).flip(-1).cumsum(-1).flip(-1)
    return s, r


def _decay_dt_matrix(s: torch.Tensor, r: torch.Tensor, dtf: torch.Tensor, dtr: torch.Tensor) -> torch.Tensor:
    """LD (..., Q, Q): exp(s_t - s_j) dt^f_j on and below the diagonal, exp(r_t - r_j) dt^r_j above it.

    Computed as exp(s_t - (s_j - log dt_j)), clamped below at log(tiny) + 1 like
    ``ssd._decay_matrix``: entries too small for a normal float stay at ~1e-37 instead of turning
    subnormal (negligible, and much faster on CPU). dt = 0 (padding) is read as dt = tiny.
    """
    tiny = torch.finfo(s.dtype).tiny
    lower = s[..., :, None] - (s - dtf.clamp_min(tiny).log())[..., None, :]  # (..., Q, Q)
    upper = r[..., :, None] - (r - dtr.clamp_min(tiny).log())[..., None, :]  # (..., Q, Q)
    Q = s.shape[-1]
    on_or_below = torch.ones(Q, Q, dtype=torch.bool, device=s.device).tril_()  # (Q, Q)
    return torch.where(on_or_below, lower, upper, out=lower).clamp_min_(math.log(tiny) + 1.0).exp_()


def _log_matrix_grads(dseg: torch.Tensor, dtf: torch.Tensor, dtr: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of s, r, dt^f and dt^r from dseg (..., Q, Q), the gradient of log LD; dseg is overwritten.

    log LD[t, j] = s_t - s_j + log dt^f_j below and on the diagonal, r_t - r_j + log dt^r_j above
    it: row sums go to s_t (r_t), column sums are taken from s_j (r_j) and, divided by dt_j, are
    the gradient of dt_j (a sum of terms that each carry the factor dt_j, so the division is exact).
    """
    row_all, col_all = dseg.sum(-1), dseg.sum(-2)  # (..., Q) each
    low = dseg.tril_()  # (..., Q, Q)
    row_low, col_low = low.sum(-1), low.sum(-2)  # (..., Q) each
    col_up = col_all - col_low
    tiny = torch.finfo(dseg.dtype).tiny
    return (row_low - col_low, row_all - row_low - col_up,
            col_low / dtf.clamp_min(tiny), col_up / dtr.clamp_min(tiny))


class _Direction(NamedTuple):
    """One direction's terms between chunks: B, C (b, c, G, Q, N); log_E, the log scaling of the read-out
    of the entering state, log_w, that of the writes into the leaving one, and dt (b, c, G, R, Q);
    log_gamma (b, c, G, R), the log decay across each chunk; ``reverse``: states pass last chunk first."""

    B: torch.Tensor
    C: torch.Tensor
    log_E: torch.Tensor
    log_w: torch.Tensor
    dt: torch.Tensor
    log_gamma: torch.Tensor
    reverse: bool


def _directions(Bf, Cf, Br, Cr, s, r, dtf, dtr) -> tuple[_Direction, _Direction]:
    """The forward and reverse directions' terms (layouts of `_Direction`) from the prefix sums s and suffix sums r."""
    return (_Direction(Bf, Cf, s, s[..., -1:] - s, dtf, s[..., -1], False),
            _Direction(Br, Cr, r, r[..., :1] - r, dtr, r[..., 0], True))


def _states_forward(Y: torch.Tensor, x_h: torch.Tensor, dirs: tuple[_Direction, _Direction]) -> torch.Tensor:
    """Both directions' states between chunks: adds diag(E) C h_in^T of each to Y in place; returns h_in.

    The two directions are side by side along the state dimension (N forward, then N reverse), so
    each product is made once for both, with a doubled width. x_h (b, c, G, R, Q, P); returns the
    state entering each chunk (b, c, G, R, P, 2N).
    """
    f, r = dirs
    work = _side_by_side((f.B, f.log_w.exp() * f.dt), (r.B, r.log_w.exp() * r.dt))  # (b, c, G, R, Q, 2N)
    h = x_h.transpose(-1, -2) @ work  # (b, c, G, R, P, 2N)  state written by each chunk
    for d, half in zip(dirs, _halves(f.B.shape[-1])):
        _pass_states(h[..., half], d.log_gamma, None, reverse=d.reverse)  # -> state entering each chunk
    _side_by_side((f.C, f.log_E.exp()), (r.C, r.log_E.exp()), out=work)  # (b, c, G, R, Q, 2N)  diag(E) C
    _flat_baddbmm_(Y, work, h.transpose(-1, -2))
    return h


def _states_backward(dY, dx_h, x_h, h, dirs):
    """Backward of :func:`_states_forward` given dY; adds to dx_h in place.

    Returns per direction dB, dC (b, c, G, Q, N), the gradients of log_E, log_w and dt
    (b, c, G, R, Q) and of log_gamma (b, c, G, R).
    """
    f, r = dirs
    E, v = (f.log_E.exp(), r.log_E.exp()), (f.log_w.exp() * f.dt, r.log_w.exp() * r.dt)  # (b, c, G, R, Q) each
    work = _side_by_side((f.C, E[0]), (r.C, E[1]))  # (b, c, G, R, Q, 2N)  diag(E) C
    dh = dY.transpose(-1, -2) @ work  # (b, c, G, R, P, 2N)  gradient of the entering states
    dEC = dY @ h  # (b, c, G, R, Q, 2N)
    halves = _halves(f.B.shape[-1])
    zeros = torch.zeros_like(h[:, 0, ..., halves[0]])  # (b, G, R, P, N): nothing reads the final states
    out = []
    for d, Ed, half in zip(dirs, E, halves):
        dlog_E = Ed * (dEC[..., half] * d.C.unsqueeze(3)).sum(-1)  # (b, c, G, R, Q)
        dC = (dEC[..., half] * Ed[..., None]).sum(3)  # (b, c, G, Q, N)
        _, dlog_gamma = _pass_states_backward(dh[..., half], h[..., half], d.log_gamma, zeros, reverse=d.reverse)
        out.append([dC, dlog_E, dlog_gamma])
    _side_by_side((f.B, v[0]), (r.B, v[1]), out=work)  # (b, c, G, R, Q, 2N)  diag(w dt) B
    _flat_baddbmm_(dx_h, work, dh.transpose(-1, -2))
    dBv = x_h @ dh  # (b, c, G, R, Q, 2N)
    grads = []
    for (dC, dlog_E, dlog_gamma), d, vd, half in zip(out, dirs, v, halves):
        dv = (dBv[..., half] * d.B.unsqueeze(3)).sum(-1)  # (b, c, G, R, Q)
        dB = (dBv[..., half] * vd[..., None]).sum(3)  # (b, c, G, Q, N)
        grads.append((dB, dC, dlog_E, dv * vd, dv * d.log_w.exp(), dlog_gamma))
    return grads


def _side_by_side(first, second, out=None) -> torch.Tensor:
    """[diag(a) M | diag(a') M'] per head from pairs (M (b, c, G, Q, N), a (b, c, G, R, Q)): (b, c, G, R, Q, 2N)."""
    (m1, a1), (m2, a2) = first, second
    N = m1.shape[-1]
    out = m1.new_empty(*a1.shape, 2 * N) if out is None else out
    torch.mul(m1.unsqueeze(3), a1[..., None], out=out[..., :N])
    torch.mul(m2.unsqueeze(3), a2[..., None], out=out[..., N:])
    return out


def _halves(N: int) -> tuple[slice, slice]:
    """The forward and the reverse direction's half of a doubled state dimension."""
    return slice(0, N), slice(N, 2 * N)
