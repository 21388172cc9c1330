"""DualCache (Wu et al. 2025, "Fast-dLLM") for full-sequence bidirectional models: a training-free, approximate
cache for sampling a canvas block by block.

At the first step of a block [start, end) the whole canvas is read once (``dual_forward``, which also gives that
step's output), and every layer keeps what its mixer needs of the positions outside the block:

- a Mamba-2 mixer with shared projections: the forward scan's state entering the block from the prefix, the
  reverse scan's state entering it from the suffix, and the conv inputs the block's centred conv reads on either
  side (the ``lookback`` before ``start``, the ``lookahead`` from ``end``);
- the two-mixer bidirectional block: each direction's causal state (its conv inputs and scan state), the
  reverse mixer's from the suffix read backwards;
- attention: the keys and values of every position.

The block's other steps run every layer on the block alone (``dual_step``): O(block) work instead of
O(length). The approximation is the cache itself: in a bidirectional model the prefix's and suffix's hidden
states depend on the block's tokens, which change as it is unmasked, and the cache keeps them as they were at
the block's first step. On the block as it was then, ``dual_step`` gives ``dual_forward``'s output (a test
checks this for every mixer).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dimba.backbones import blockdiff


def window(t: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """t[:, lo:hi] of t (n, L, C), with zeros where the window leaves [0, L): (n, hi - lo, C)."""
    length = t.shape[1]
    inside = t[:, max(lo, 0):min(hi, length)]  # (n, <= hi - lo, C)
    return F.pad(inside, (0, 0, max(0, -lo), max(0, hi - max(lo, length))))


def shared_forward(mixer, u: torch.Tensor, start: int, end: int) -> tuple[torch.Tensor, tuple]:
    """The shared-projection mixer (`SharedBiMamba2`) on the whole u (n, L, D) -> (y (n, L, D), the state of
    the block [start, end): (conv inputs before it (n, lookback, C), conv inputs after it (n, lookahead, C),
    forward state entering it (n, H, P, N), reverse state entering it from its end (n, H, P, N)))."""
    n, length = u.shape[:2]
    z, xBC, dt = mixer._project(u)  # (n, L, ...) each
    before = xBC.new_zeros(n, 1, mixer._lookback, xBC.shape[-1])  # zeros before position 0
    f = mixer._block_features(xBC[:, None], dt[:, None], before)  # the sequence as one block: (n, 1, L, ...)
    y = mixer._block_output(z[:, None], f, None)[:, 0]  # (n, L, D)
    h_fwd = blockdiff.prefix_state(f, start)  # (n, H, P, N): positions < start, read forwards
    backwards = blockdiff.flip_blocks(mixer._reverse_features(f))  # position L - 1 first
    h_rev = blockdiff.prefix_state(backwards, length - end)  # (n, H, P, N): positions >= end, read backwards
    sides = window(xBC, start - mixer._lookback, start), window(xBC, end, end + mixer._lookahead)
    return y, (*sides, h_fwd, h_rev)


def shared_step(mixer, u: torch.Tensor, state: tuple) -> torch.Tensor:
    """The shared-projection mixer on the block u (n, Bk, D) between the surroundings in ``state`` (from
    `shared_forward`) -> (n, Bk, D)."""
    before, after, h_fwd, h_rev = state
    z, xBC, dt = mixer._project(u)  # (n, Bk, ...) each
    f = mixer._block_features(xBC[:, None], dt[:, None], before[:, None], after[:, None])
    return mixer._block_output(z[:, None], f, h_fwd[:, None], h_rev[:, None])[:, 0]  # (n, Bk, D)


def causal_forward(mixer, u: torch.Tensor, start: int) -> tuple[torch.Tensor, tuple]:
    """A causal `Mamba2Mixer` on u (n, L, D) -> (y (n, L, D), its `block_step` state at ``start``: the conv inputs
    before it (n, lookback, C) and the scan state (n, H, P, N))."""
    n = u.shape[0]
    if start == 0:
        return mixer(u), mixer.allocate_block_state(n, device=u.device, dtype=u.dtype)
    y_before, (conv, h) = mixer.prefill(u[:, :start], mixer.allocate_state(n, device=u.device, dtype=u.dtype))
    y_after, _ = mixer.prefill(u[:, start:], (conv, h))  # (n, L - start, D)
    return torch.cat([y_before, y_after], dim=1), (conv.transpose(1, 2), h)  # conv (n, lookback, C)
