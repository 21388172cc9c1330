"""Block diffusion (BD3-LM, Arriola et al. 2025) for the Mamba-2 mixers: the clean prefix's state carried into
each block, in one vectorised pass over each stream.

A block-diffusion backbone reads two streams of the same length L, split into blocks of ``block`` positions:
the noisy x_t and the clean x_0. Outputs of block k of the noisy stream depend on the clean blocks before k and
on the noisy block k only; outputs of clean block k on the clean blocks up to k. For a Mamba-2 mixer:

- the convolution of block k reads the ``lookback`` clean conv inputs just before the block, and zeros after its
  end (the block is right padding's "row run alone");
- the forward scan of block k starts from the state the clean stream's forward scan has at the block's start;
- any reverse scan runs inside the block only.

Since a scan is linear in its initial state, the forward scan of block k from a state h equals the scan of the
block alone from zero plus ``C_t exp(s_t) h`` (s_t: the block's cumulative log decay up to t). So every block of
both streams is scanned alone (a batch of n * nb rows of ``block`` positions, by the mixer's own scan), and the
states entering the blocks come from the clean stream: each block's written state S_k, chained across blocks
with an (nb x nb) decay matrix (no loop over blocks). `clean_blocks` runs the clean stream and returns what the
noisy stream reads of it (the entering states and the conv look-back before each block); `noisy_blocks` runs the
noisy stream with them, so the clean stream can also run without gradients (`Backbone.forward_blocks`). In
decoding (`block_step`) the state is carried instead: (the last ``lookback`` clean conv inputs, the forward SSM
state), O(block) work per call.

A mixer using these functions provides ``_project(u) -> (z, xBC, dt)``, ``_lookback`` and ``_lookahead``
(its conv's reach), ``_block_features(xBC, dt, context) -> BlockFeatures`` and
``_block_output(z, features, h_in) -> y``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from dimba.backbones.ssm import conv_silu


class BlockFeatures(NamedTuple):
    """A mixer's post-conv tensors on blocks (n, nb, Bk, ...): its forward direction's x (n, nb, Bk, H, P),
    dt (n, nb, Bk, H), A (H,), B (n, nb, Bk, G, N) and C, plus whatever else the mixer's output needs."""

    x: torch.Tensor
    dt: torch.Tensor
    A: torch.Tensor
    B: torch.Tensor
    C: torch.Tensor
    rest: tuple = ()


def to_blocks(t: torch.Tensor, block: int) -> torch.Tensor:
    """(n, L, ...) -> (n, L / block, block, ...); L must be a multiple of ``block``."""
    if t.shape[1] % block:
        raise ValueError(f"sequence length {t.shape[1]} is not a multiple of block_size {block}: "
                         "give whole blocks (set the context length to a multiple of model.block_size)")
    return t.unflatten(1, (t.shape[1] // block, block))


def clean_context(xBC: torch.Tensor, lookback: int, block: int) -> torch.Tensor:
    """The ``lookback`` clean conv inputs before each block start: (n, L, C) -> (n, nb, lookback, C), zeros before 0."""
    nb = xBC.shape[1] // block
    padded = F.pad(xBC, (0, 0, lookback, 0))  # (n, lookback + L, C): position p at p + lookback
    idx = (torch.arange(nb, device=xBC.device) * block)[:, None] + torch.arange(lookback, device=xBC.device)  # (nb, lb)
    return padded[:, idx]  # (n, nb, lookback, C)


def conv_blocks(xBC: torch.Tensor, context: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                lookahead: int, after: torch.Tensor | None = None) -> torch.Tensor:
    """SiLU of the depthwise conv of each block alone, after its clean ``context``: xBC (n, nb, Bk, C) and
    context (n, nb, lookback, C) -> (n, nb, Bk, C); positions after the block's end read ``after``
    (n, nb, lookahead, C), or zeros without it."""
    n, nb, bk, c = xBC.shape
    lb = context.shape[2]
    parts = [context.to(xBC.dtype), xBC] + ([] if after is None else [after.to(xBC.dtype)])
    seq = torch.cat(parts, dim=2).flatten(0, 1)  # (n nb, lb + Bk [+ la], C)
    return conv_silu(seq, weight, bias, lookahead)[:, lb:lb + bk].reshape(n, nb, bk, c)


def _heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """B or C (..., G, N) in float32 (float64 stays) with each group repeated for its heads: (..., H, N)."""
    t = t.to(torch.promote_types(t.dtype, torch.float32))
    return t.repeat_interleave(heads // t.shape[-2], dim=-2)


def _log_decay(f: BlockFeatures) -> torch.Tensor:
    """Cumulative log decay s (n, nb, Bk, H) of each block's forward scan, from its start through each position."""
    dt = f.dt.to(torch.promote_types(f.dt.dtype, torch.float32))
    return (dt * f.A.to(dt.dtype)).cumsum(2)


def block_writes(f: BlockFeatures) -> tuple[torch.Tensor, torch.Tensor]:
    """The state each block's forward scan writes from zero, S (n, nb, H, P, N), and its log decay across the
    block, (n, nb, H): h_end = exp(total) h_start + S."""
    s = _log_decay(f)  # (n, nb, Bk, H)
    total = s[:, :, -1]  # (n, nb, H)
    w = (total[:, :, None] - s).exp() * f.dt.to(s.dtype)  # (n, nb, Bk, H)
    S = torch.einsum("nkth,nkthp,nkthq->nkhpq", w, f.x.to(s.dtype), _heads(f.B, f.x.shape[-2]))
    return S, total


def entering_states(S: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """The forward state entering each block, of one scan over all blocks from zero: (n, nb, H, P, N).

    h_in(k) = sum_{i < k} exp(total_{i+1} + ... + total_{k-1}) S_i, as one product with an (nb x nb) decay matrix.
    """
    cum = total.cumsum(1)  # (n, nb, H): log decay from the start to the end of each block
    diff = (cum - total)[:, :, None] - cum[:, None]  # (n, k, i, H): from the end of block i to the start of k
    nb = total.shape[1]
    before = torch.ones(nb, nb, dtype=torch.bool, device=total.device).tril_(-1)[None, :, :, None]  # i < k
    decay = torch.where(before, diff, torch.full_like(diff, float("-inf"))).exp()  # (n, k, i, H)
    return torch.einsum("nkih,nihpq->nkhpq", decay, S)


def prefix_state(f: BlockFeatures, end: int) -> torch.Tensor:
    """The state a forward scan over the first ``end`` positions of the features ``f`` of one block (n, 1, L, ...)
    writes from zero: (n, H, P, N); zeros for ``end = 0``."""
    n, _, _, heads, p = f.x.shape
    if end <= 0:
        dtype = torch.promote_types(f.dt.dtype, torch.float32)
        return torch.zeros(n, heads, p, f.B.shape[-1], dtype=dtype, device=f.x.device)
    part = BlockFeatures(f.x[:, :, :end], f.dt[:, :, :end], f.A, f.B[:, :, :end], f.C[:, :, :end])
    return block_writes(part)[0][:, 0]


def flip_blocks(f: BlockFeatures) -> BlockFeatures:
    """The features of each block read backwards (a forward scan of them is the reverse scan of ``f``)."""
    return BlockFeatures(f.x.flip(2), f.dt.flip(2), f.A, f.B.flip(2), f.C.flip(2))


def state_readout(h_in: torch.Tensor, f: BlockFeatures) -> torch.Tensor:
    """What the entering state adds to each block's forward scan: C_t exp(s_t) h_in -> (n, nb, Bk, H, P)."""
    s = _log_decay(f)  # (n, nb, Bk, H)
    y = torch.einsum("nkhpq,nkthq->nkthp", h_in.to(s.dtype), _heads(f.C, f.x.shape[-2]))
    return y * s.exp()[..., None]


def _blocks(mixer, u: torch.Tensor, block: int, context: torch.Tensor | None = None):
    """The projections of u (n, L, D) as blocks: z (n, nb, Bk, ...), the post-conv `BlockFeatures` after the clean
    conv ``context`` (n, nb, lb, C) (None: u's own, u being the clean stream) and that context."""
    z, xBC, dt = mixer._project(u)  # (n, L, ...) each
    if context is None:
        context = clean_context(xBC, mixer._lookback, block)  # (n, nb, lb, C)
    return to_blocks(z, block), mixer._block_features(to_blocks(xBC, block), to_blocks(dt, block), context), context


def clean_blocks(mixer, u_clean: torch.Tensor, block: int
                 ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """The clean stream of a Mamba-2 ``mixer`` (see the module docstring): (n, L, D) -> (y_clean (n, L, D), what
    the noisy stream reads of it: the conv look-back before each block (n, nb, lb, C) and the forward state
    entering each block (n, nb, H, P, N))."""
    z, f, context = _blocks(mixer, u_clean, block)
    h_in = entering_states(*block_writes(f))  # (n, nb, H, P, N)
    return mixer._block_output(z, f, h_in).flatten(1, 2), (context, h_in)


def noisy_blocks(mixer, u_noisy: torch.Tensor, clean: tuple[torch.Tensor, torch.Tensor], block: int
                 ) -> torch.Tensor:
    """The noisy stream (n, L, D) of a Mamba-2 ``mixer`` read with what `clean_blocks` gave -> (n, L, D)."""
    context, h_in = clean
    z, f, _ = _blocks(mixer, u_noisy, block, context)
    return mixer._block_output(z, f, h_in).flatten(1, 2)


def block_step(mixer, u: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]
               ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """One block u (n, Bk, D) after the clean prefix summarised by ``state`` = (the last ``lookback`` clean conv
    inputs (n, lb, C), the forward SSM state (n, H, P, N)) -> (y (n, Bk, D), the state after u read as clean).
    ``state`` is not modified."""
    context, h = state
    z, xBC, dt = mixer._project(u)  # (n, Bk, ...) each
    f = mixer._block_features(xBC[:, None], dt[:, None], context[:, None])
    y = mixer._block_output(z[:, None], f, h[:, None])[:, 0]  # (n, Bk, D)
    S, total = block_writes(f)  # (n, 1, H, P, N), (n, 1, H)
    h = total[:, 0].exp()[..., None, None] * h + S[:, 0]  # (n, H, P, N)
    context = torch.cat([context, xBC.to(context.dtype)], dim=1)[:, xBC.shape[1]:]  # (n, lb, C): the last lb
    return y, (context, h)


def allocate_block_state(mixer, batch: int, device: torch.device | None = None, dtype: torch.dtype | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """The state of an empty prefix for `block_step`: zero conv context (batch, lookback, C) in the weights' dtype
    and zero SSM state (batch, H, P, N) in the scan's compute dtype."""
    weight = mixer.in_proj.weight
    device = weight.device if device is None else device
    dtype = weight.dtype if dtype is None else dtype
    ssm_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    context = torch.zeros(batch, mixer._lookback, mixer.conv_dim, device=device, dtype=dtype)
    h = torch.zeros(batch, mixer.nheads, mixer.headdim, mixer.d_state, device=device, dtype=ssm_dtype)
    return context, h


class BlockDiffusionMixin:
    """The block-diffusion entry points of a Mamba-2 mixer (`Mamba2Mixer`, `SharedBiMamba2`), which provides
    ``_project`` and ``_block_features``; the work is this module's functions."""

    def clean_blocks(self, u_clean: torch.Tensor, block: int) -> tuple[torch.Tensor, tuple]:
        """Block diffusion's clean stream (n, L, D) -> (its output (n, L, D), what the noisy stream reads of it: the
        forward scan's state entering each block and the conv's look-back before it)."""
        return clean_blocks(self, u_clean, block)

    def noisy_blocks(self, u_noisy: torch.Tensor, clean: tuple, block: int) -> torch.Tensor:
        """Block diffusion's noisy stream (n, L, D) -> (n, L, D): block k reads the clean blocks before it through
        ``clean`` (`clean_blocks`) and itself; what looks ahead (a reverse scan, a centred conv) stays inside it."""
        return noisy_blocks(self, u_noisy, clean, block)

    def allocate_block_state(self, batch: int, max_len: int | None = None, device: torch.device | None = None,
                             dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The empty-prefix state of `block_step` (its size does not depend on ``max_len``)."""
        return allocate_block_state(self, batch, device, dtype)

    def block_step(self, u: torch.Tensor, state, pos: int | None = None):
        """One block u (n, Bk, D) after the clean prefix in ``state`` -> (y (n, Bk, D), the state after u)."""
        return block_step(self, u, state)
