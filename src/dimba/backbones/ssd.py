"""The chunked SSD scan in pure PyTorch (any device): :func:`chunked_selective_scan` and its internals.

Notation and shapes as in :mod:`dimba.backbones.ssm`, which dispatches to this scan (and to
``mamba_ssm``'s fused kernel on CUDA). The helpers here (layouts, the decay matrix, the recurrence
across chunks, input checks) are shared with the bidirectional scan of :mod:`dimba.backbones.biscan`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable


def chunked_selective_scan(
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
    """The pure-PyTorch chunked SSD scan on any device; same arguments and returns as :func:`selective_scan`.

    Time and memory are linear in L (quadratic in ``chunk_size`` only); fp16/bf16 inputs are
    computed in float32. The backward pass is hand-derived: it keeps only the inputs, the state
    entering each chunk and C_t . B_s within chunks, and does not support double backward.
    """
    _check_inputs(x, dt, A, B, C, D, initial_state)
    batch, length, H, P = x.shape
    G, N = B.shape[2:]
    R, Q = H // G, chunk_size
    x_, dt_, A_, B_, C_, D_, h0 = _to_compute_dtype(x, dt, A, B, C, D, initial_state)
    pad = -length % Q
    if pad:  # steps with dt = 0 neither decay nor write the state: an exact no-op, cropped below
        x_, dt_, B_, C_ = (F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)) for t in (x_, dt_, B_, C_))
    n_chunks = (length + pad) // Q
    with torch.autocast(x.device.type, enabled=False):  # under bf16/fp16 autocast too, the products stay float32
        y, h_last = _ChunkedScan.apply(
            x_.reshape(batch, n_chunks, Q, G, R, P),
            dt_.reshape(batch, n_chunks, Q, G, R),
            A_.reshape(G, R),
            B_.reshape(batch, n_chunks, Q, G, N),
            C_.reshape(batch, n_chunks, Q, G, N),
            None if D_ is None else D_.reshape(G, R),
            None if h0 is None else h0.reshape(batch, G, R, P, N),
        )
    y = y.view(batch, n_chunks * Q, H, P)[:, :length].to(x.dtype)  # (b, L, H, P)
    return (y, h_last.view(batch, H, P, N)) if return_final_state else y

class _ChunkedScan(torch.autograd.Function):
    """SSD on padded, chunked inputs, with a hand-derived backward pass.

    Layouts: x (b, c, Q, G, R, P), dt (b, c, Q, G, R), A (G, R), B and C (b, c, Q, G, N),
    D (G, R) or None, h0 (b, G, R, P, N) or None; the R = H / G heads of a group share B and C.
    Head-major work tensors are (b, c, G, R, Q, ...). Per chunk and head, with a_t = dt_t A,
    prefix sums s_t = a_1 + ... + a_t and u_t = dt_t x_t:

        Y = (CB o Lmat) u + diag(exp(s)) C h_in^T + D x      CB = tril(C B^T), Lmat[t, r] = exp(s_t - s_r)
        S = u^T diag(w) B,  w_r = exp(s_Q - s_r)            (the state the chunk writes by its end)
        h_in(next chunk) = exp(s_Q) h_in + S

    Autograd through these products would keep about ten (b, c, H, Q, Q|P|N) intermediates alive
    and make as many extra passes over them; here only the inputs, the per-chunk entering states and
    the per-group CB are saved, and the per-head decay matrix is recomputed in the backward pass.
    """

    @staticmethod
    def forward(ctx, x, dt, A, B, C, D, h0):
        Bg, Cg = B.transpose(2, 3), C.transpose(2, 3)  # (b, c, G, Q, N)
        dt_h = dt.permute(0, 1, 3, 4, 2)  # (b, c, G, R, Q)
        s = (dt_h * A[..., None]).cumsum(-1)  # (b, c, G, R, Q)
        u = _heads_first(x, dt_h)  # (b, c, G, R, Q, P)
        CB = torch.tril(Cg @ Bg.transpose(-1, -2))  # (b, c, G, Q, Q)

        # Inside each chunk: Y = (CB o Lmat) u.
        M = _decay_matrix(s).mul_(CB.unsqueeze(3))  # (b, c, G, R, Q, Q)
        Y = M @ u  # (b, c, G, R, Q, P)
        del M
        # State written by each chunk, then the recurrence across chunks (in place: -> entering states).
        # `work` holds, in turn, each per-head scaling of B or C.
        work = Bg.unsqueeze(3) * torch.exp(s[..., -1:] - s)[..., None]  # (b, c, G, R, Q, N)  diag(w) B
        h = u.transpose(-1, -2) @ work  # (b, c, G, R, P, N)
        h_last = _pass_states(h, s[..., -1], h0)  # (b, G, R, P, N)
        # Entering state read out inside the chunk: Y += diag(exp(s)) C h_in^T.
        torch.mul(Cg.unsqueeze(3), s.exp()[..., None], out=work)  # (b, c, G, R, Q, N)  diag(exp(s)) C
        _flat_baddbmm_(Y, work, h.transpose(-1, -2))
        y = _heads_last(Y)  # (b, c, Q, G, R, P)
        if D is not None:
            y.addcmul_(x, D[..., None])
        ctx.save_for_backward(x, dt, A, B, C, D, h0, h, CB)
        return y, h_last

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, dh_last):
        with torch.autocast(dy.device.type, enabled=False):  # float32 like the forward, whatever the autocast state
            return _ChunkedScan._backward(ctx, dy, dh_last)

    @staticmethod
    def _backward(ctx, dy, dh_last):
        x, dt, A, B, C, D, h0, h, CB = ctx.saved_tensors
        Bg, Cg = B.transpose(2, 3), C.transpose(2, 3)  # (b, c, G, Q, N)
        dt_h = dt.permute(0, 1, 3, 4, 2)  # (b, c, G, R, Q)
        s = (dt_h * A[..., None]).cumsum(-1)  # (b, c, G, R, Q)
        u = _heads_first(x, dt_h)  # (b, c, G, R, Q, P)
        dY = dy.permute(0, 1, 3, 4, 2, 5).contiguous()  # (b, c, G, R, Q, P)

        # Y = M u with M = CB o Lmat and Lmat = exp(s_t - s_r), so dM/d(s_t - s_r) = M (up to entries
        # clamped at the exp floor, whose true derivative 0 differs from M by < 1e-37 |CB|).
        Lmat = _decay_matrix(s)  # (b, c, G, R, Q, Q)
        M = Lmat * CB.unsqueeze(3)  # (b, c, G, R, Q, Q)
        du = M.transpose(-1, -2) @ dY  # (b, c, G, R, Q, P)
        dM = dY @ u.transpose(-1, -2)  # (b, c, G, R, Q, Q)
        dseg = M.mul_(dM)  # (b, c, G, R, Q, Q)  gradient of the segment sums s_t - s_r
        ds = dseg.sum(-1) - dseg.sum(-2)  # (b, c, G, R, Q)
        dCB = dM.mul_(Lmat).sum(3).tril_()  # (b, c, G, Q, Q)
        del Lmat, M, dM, dseg
        dCg = dCB @ Bg  # (b, c, G, Q, N)
        dBg = dCB.transpose(-1, -2) @ Cg  # (b, c, G, Q, N)

        # Y += EC h_in^T with EC = diag(E) C, E = exp(s). `work` holds per-head scalings of B or C.
        E = s.exp()  # (b, c, G, R, Q)
        work = Cg.unsqueeze(3) * E[..., None]  # (b, c, G, R, Q, N)  EC
        dh = dY.transpose(-1, -2) @ work  # (b, c, G, R, P, N)
        dEC = dY @ h  # (b, c, G, R, Q, N)
        ds += E * torch.mul(dEC, Cg.unsqueeze(3), out=work).sum(-1)  # E dE, with dE = rowsum(dEC o C)
        dCg += dEC.mul_(E[..., None]).sum(3)

        # Recurrence across chunks, backwards: dh becomes the gradient of each chunk's written state.
        dh0, dlog_gamma = _pass_states_backward(dh, h, s[..., -1], dh_last)
        ds[..., -1] += dlog_gamma

        # Written state S = u^T Bw with Bw = diag(w) B, w_r = exp(s_Q - s_r).
        w = torch.exp(s[..., -1:] - s)  # (b, c, G, R, Q)
        torch.mul(Bg.unsqueeze(3), w[..., None], out=work)  # (b, c, G, R, Q, N)  Bw
        _flat_baddbmm_(du, work, dh.transpose(-1, -2))
        dBw = u @ dh  # (b, c, G, R, Q, N)
        w_dw = w * torch.mul(dBw, Bg.unsqueeze(3), out=work).sum(-1)  # (b, c, G, R, Q)  w dw
        ds -= w_dw
        ds[..., -1] += w_dw.sum(-1)
        dBg += dBw.mul_(w[..., None]).sum(3)

        # u = dt x and s = cumsum(dt A).
        da = ds.flip(-1).cumsum(-1).flip(-1)  # (b, c, G, R, Q)
        x_h = x.permute(0, 1, 3, 4, 2, 5)  # (b, c, G, R, Q, P)
        ddt = torch.mul(du, x_h, out=dY).sum(-1) + da * A[..., None]  # (b, c, G, R, Q)  (dY is free: scratch)
        dA = (da * dt_h).sum((0, 1, 4))  # (G, R)
        dx = _heads_last(du.mul_(dt_h[..., None]))  # (b, c, Q, G, R, P)
        dD = None
        if D is not None:
            dx.addcmul_(dy, D[..., None])
            dD = torch.mul(dy, x, out=dY.view(x.shape)).sum(-1).sum((0, 1, 2))  # (G, R)  (dY: scratch)
        dh0 = None if h0 is None else dh0
        return dx, ddt.permute(0, 1, 4, 2, 3), dA, dBg.transpose(2, 3), dCg.transpose(2, 3), dD, dh0


def _heads_first(x: torch.Tensor, dt_h: torch.Tensor) -> torch.Tensor:
    """u = dt x in the head-major layout: x (b, c, Q, G, R, P), dt_h (b, c, G, R, Q) -> (b, c, G, R, Q, P)."""
    b, c, Q, G, R, P = x.shape
    u = x.new_empty(b, c, G, R, Q, P)
    return torch.mul(x.permute(0, 1, 3, 4, 2, 5), dt_h[..., None], out=u)


def _heads_last(t: torch.Tensor) -> torch.Tensor:
    """Contiguous copy of a head-major (b, c, G, R, Q, P) tensor in the (b, c, Q, G, R, P) layout."""
    return t.permute(0, 1, 4, 2, 3, 5).contiguous()


def _flat_baddbmm_(out: torch.Tensor, m1: torch.Tensor, m2: torch.Tensor) -> None:
    """out += m1 @ m2 in place, batching over all leading dimensions (out must be contiguous)."""
    out.view(-1, *out.shape[-2:]).baddbmm_(m1.reshape(-1, *m1.shape[-2:]), m2.reshape(-1, *m2.shape[-2:]))


def _decay_matrix(s: torch.Tensor) -> torch.Tensor:
    """Lmat[..., t, r] = exp(s_t - s_r) = exp(a_{r+1} + ... + a_t): the decay from step r to step t >= r.

    ``s`` (..., Q) holds within-chunk prefix sums of the log decays a <= 0. The segment sums are
    clamped to [log(tiny) + 1, 0] before exp: exp never sees a positive number (above the diagonal,
    r > t, the value is exp(0) = 1 and callers zero it through the lower-triangular CB, so no inf
    or NaN can arise in either pass), and decays too small for a normal float stay at ~1e-37
    instead of turning subnormal, which is both negligible and much faster on CPU.
    """
    floor = math.log(torch.finfo(s.dtype).tiny) + 1.0
    return (s[..., :, None] - s[..., None, :]).clamp_(floor, 0.0).exp_()  # (..., Q, Q)


def _pass_states(h: torch.Tensor, log_gamma: torch.Tensor, h0: torch.Tensor | None,
                 reverse: bool = False) -> torch.Tensor:
    """Recurrence across chunks h_in[c+1] = exp(log_gamma[c]) h_in[c] + S[c], computed in place.

    h: the states S written by each chunk (b, c, ..., P, N), replaced by the state entering each
    chunk; log_gamma: total log decay of each chunk (b, c, ...); h0: initial state or None.
    ``reverse``: the states run from the last chunk to the first (h_in[c-1] = exp(log_gamma[c]) h_in[c] + S[c]).
    Returns the state after the last chunk (the first, with ``reverse``).
    """
    gamma = log_gamma.exp()[..., None, None]  # (b, c, ..., 1, 1)
    state = torch.zeros_like(h[:, 0]) if h0 is None else h0
    for c in _chunk_order(h.shape[1], reverse):
        after = torch.addcmul(h[:, c], gamma[:, c], state)
        h[:, c] = state
        state = after
    return state


def _pass_states_backward(
    dh: torch.Tensor, h: torch.Tensor, log_gamma: torch.Tensor, dh_last: torch.Tensor, reverse: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Backward of :func:`_pass_states` (with the same ``reverse``), in place.

    dh: gradient w.r.t. the entering states (b, c, ..., P, N), replaced by the gradient w.r.t. the
    written states S (which is the gradient w.r.t. the state after each chunk); h: the entering
    states; dh_last: gradient w.r.t. the final state.
    Returns the gradients w.r.t. the initial state and w.r.t. log_gamma (b, c, ...).
    """
    gamma = log_gamma.exp()  # (b, c, ...)
    dlog_gamma = torch.empty_like(log_gamma)
    grad = dh_last  # gradient w.r.t. the state after chunk c
    for c in reversed(_chunk_order(dh.shape[1], reverse)):
        dlog_gamma[:, c] = gamma[:, c] * torch.linalg.vecdot(grad.flatten(-2), h[:, c].flatten(-2))
        before = torch.addcmul(dh[:, c], gamma[:, c, ..., None, None], grad)
        dh[:, c] = grad
        grad = before
    return grad, dlog_gamma


def _chunk_order(n_chunks: int, reverse: bool) -> range:
    """The chunks in the order the states pass through them."""
    return range(n_chunks - 1, -1, -1) if reverse else range(n_chunks)


def _to_compute_dtype(*tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    """Casts to float64 if x (the first tensor) is float64, else to float32."""
    dtype = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32
    return [None if t is None else t.to(dtype) for t in tensors]


def _check_inputs(x, dt, A, B, C, D, initial_state) -> None:
    if x.dim() != 4:
        raise ValueError(f"x must be (batch, L, H, P), got shape {tuple(x.shape)}")
    batch, length, H, P = x.shape
    if dt.shape != (batch, length, H):
        raise ValueError(f"dt must be (batch, L, H) = {(batch, length, H)}, got {tuple(dt.shape)}")
    if A.shape != (H,):
        raise ValueError(f"A must be (H,) = ({H},), got {tuple(A.shape)}")
    if B.dim() != 4 or B.shape[:2] != (batch, length) or B.shape != C.shape:
        raise ValueError(f"B and C must both be (batch, L, G, N), got {tuple(B.shape)} and {tuple(C.shape)}")
    if H % B.shape[2]:
        raise ValueError(f"the number of groups G={B.shape[2]} must divide the number of heads H={H}")
    if D is not None and D.shape != (H,):
        raise ValueError(f"D must be (H,) = ({H},), got {tuple(D.shape)}")
    state_shape = (batch, H, P, B.shape[3])
    if initial_state is not None and initial_state.shape != state_shape:
        raise ValueError(f"initial_state must be (batch, H, P, N) = {state_shape}, "
                         f"got {tuple(initial_state.shape)}")
