"""Mamba-2 mixers: the causal :class:`Mamba2Mixer` and the two-mixer bidirectional :class:`BiMamba2`.

:class:`Mamba2Mixer` follows ``mamba_ssm.modules.mamba2.Mamba2`` (Dao & Gu 2024) with identical
parameter names and shapes, so a checkpoint trained on GPU with ``mamba_ssm`` loads on CPU:
``in_proj.weight, conv1d.weight, conv1d.bias, dt_bias, A_log, D, norm.weight, out_proj.weight``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from dimba.backbones import blockdiff, dualcache
from dimba.backbones.blockdiff import BlockDiffusionMixin, BlockFeatures
from dimba.backbones.mixer import BidirectionalMixer, reverse_rows
from dimba.backbones.mixer_ops import gated_rms_norm
from dimba.backbones.ssm import conv_silu, selective_scan


def head_layout(d_model: int, expand: int, headdim: int, ngroups: int) -> tuple[int, int]:
    """(d_inner, nheads) of a Mamba-2 mixer, refusing a width that headdim does not divide or a group count
    that does not divide the heads."""
    d_inner = expand * d_model
    if d_inner % headdim:
        raise ValueError(f"d_inner = expand * d_model = {d_inner} is not divisible by headdim = {headdim}")
    nheads = d_inner // headdim
    if nheads % ngroups:
        raise ValueError(f"ngroups = {ngroups} must divide the number of heads {nheads} (d_inner / headdim)")
    return d_inner, nheads


class GatedRMSNorm(nn.Module):
    """RMSNorm of the gated input ``y * silu(z)``, normalised over groups of ``group_size`` channels.

    Matches ``mamba_ssm``'s ``RMSNormGated(norm_before_gate=False)``; computed in float32 (float64 for
    float64 inputs) by :func:`dimba.backbones.mixer_ops.gated_rms_norm`.
    """

    def __init__(self, dim: int, group_size: int, eps: float = 1e-5):
        super().__init__()
        self.group_size = group_size
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """y, z: (..., dim) -> (..., dim) in the dtype of y."""
        return gated_rms_norm(y, z, self.weight, self.group_size, self.eps)


class Mamba2Mixer(BlockDiffusionMixin, nn.Module):
    """Causal Mamba-2 mixer: (B, L, D) -> (B, L, D); output t depends on inputs <= t only.

    in_proj -> (z, xBC, dt); xBC -> causal depthwise conv -> SiLU -> (x, B, C);
    y = SSD scan(x, softplus(dt + dt_bias), A = -exp(A_log), B, C, D); out_proj(norm(y * silu(z))).

    Args:
        d_model: model width D.
        d_state: state size N per head.
        d_conv: causal convolution width.
        expand: d_inner = expand * d_model.
        headdim: head size P; the number of heads is H = d_inner / P.
        ngroups: number G of B/C groups shared by the heads (must divide H).
        chunk_size: chunk length of the SSD scan.
    """

    def __init__(self, d_model: int, d_state: int = 32, d_conv: int = 4, expand: int = 2, headdim: int = 64,
                 ngroups: int = 1, chunk_size: int = 64):
        super().__init__()
        d_inner, nheads = head_layout(d_model, expand, headdim, ngroups)
        self.d_inner, self.d_state, self.headdim = d_inner, d_state, headdim
        self.nheads, self.ngroups, self.chunk_size, self.d_conv = nheads, ngroups, chunk_size, d_conv
        self.conv_dim = d_inner + 2 * ngroups * d_state  # channels of xBC

        self.in_proj = nn.Linear(d_model, d_inner + self.conv_dim + nheads, bias=False)  # -> z, xBC, dt
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, d_conv, groups=self.conv_dim, padding=d_conv - 1)
        self.dt_bias = nn.Parameter(_inverse_softplus_log_uniform(nheads, 1e-3, 1e-1))
        self.A_log = nn.Parameter(torch.empty(nheads).uniform_(1.0, 16.0).log())
        self.D = nn.Parameter(torch.ones(nheads))
        for p in (self.dt_bias, self.A_log, self.D):
            p._no_weight_decay = True  # same flag as mamba_ssm, for optimiser parameter grouping
        self.norm = GatedRMSNorm(d_inner, group_size=d_inner // ngroups)
        self.out_proj = nn.Linear(d_inner, d_model, bias=False)
        self._lookahead, self._lookback = 0, d_conv - 1  # a causal conv

    def forward(self, u: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """u: (B, L, D) -> (B, L, D). ``lengths`` is accepted for the mixer contract and not needed:
        right padding comes after every real position, so a causal mixer never reads it."""
        return self._mix(u)[0]

    def prefill(self, u: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """:meth:`forward` on u (B, P, D) continuing from ``state`` (in one parallel pass) -> (y, new state).

        From :meth:`allocate_state`'s empty state this is the prompt at positions 0..P-1; decoding
        goes on with :meth:`step`. ``state`` is not modified.
        """
        return self._mix(u, state)

    def _mix(self, u: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor] | None = None
             ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        """The mixer on u (B, L, D) from ``state`` (None: the sequence start) -> (y, state after u or None)."""
        H, P, G, N = self.nheads, self.headdim, self.ngroups, self.d_state
        z, xBC, dt = self.in_proj(u).split([self.d_inner, self.conv_dim, H], dim=-1)
        history = 0 if state is None else self.d_conv - 1
        if history:  # the conv reads the last d_conv - 1 inputs before u
            xBC = torch.cat([state[0].transpose(1, 2).to(xBC.dtype), xBC], dim=1)  # (B, history + L, C)
        x, B, C = self._causal_conv(xBC)[:, history:].split([self.d_inner, G * N, G * N], dim=-1)
        y = selective_scan(
            x.unflatten(-1, (H, P)),  # (B, L, H, P)
            F.softplus(dt + self.dt_bias),  # (B, L, H)
            -torch.exp(self.A_log.float()),  # (H,)
            B.unflatten(-1, (G, N)),  # (B, L, G, N)
            C.unflatten(-1, (G, N)),  # (B, L, G, N)
            self.D,
            chunk_size=self.chunk_size,
            initial_state=None if state is None else state[1],
            return_final_state=state is not None,
        )  # (B, L, H, P), with the final state (B, H, P, N) when state is given
        if state is None:
            return self.out_proj(self.norm(y.flatten(-2), z)), None  # (B, L, D)
        y, h = y
        conv_state = xBC[:, xBC.shape[1] - history:].transpose(1, 2).to(state[0].dtype)  # (B, C, d_conv - 1)
        return self.out_proj(self.norm(y.flatten(-2), z)), (conv_state, h)  # (B, L, D)

    def allocate_state(self, batch: int, max_len: int | None = None, device: torch.device | None = None,
                       dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Zero recurrent state for :meth:`step`, as before the first token; its size does not depend
        on ``max_len`` (accepted for the mixer contract).

        Returns ``(conv_state, ssm_state)``: the last ``d_conv - 1`` conv inputs
        (batch, conv_dim, d_conv - 1) in the dtype of the weights (or ``dtype``), and the SSM state
        (batch, H, P, N) in the scan's compute dtype (float64 for float64 weights, else float32).
        """
        weight = self.in_proj.weight
        device = weight.device if device is None else device
        dtype = weight.dtype if dtype is None else dtype
        ssm_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        conv_state = torch.zeros(batch, self.conv_dim, self.d_conv - 1, device=device, dtype=dtype)
        ssm_state = torch.zeros(batch, self.nheads, self.headdim, self.d_state, device=device, dtype=ssm_dtype)
        return conv_state, ssm_state

    def step(self, u_t: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor], pos: int | None = None
             ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """One causal recurrent step in O(1) time and memory: u_t (B, D) -> (y_t (B, D), new state).

        ``pos`` is accepted for the mixer contract; the state alone carries the position.

        ``state`` comes from :meth:`allocate_state` or a previous call and is not modified. Stepping
        through a sequence token by token gives the outputs of :meth:`forward` on the whole sequence.
        """
        conv_state, h = state
        H, P, G, N = self.nheads, self.headdim, self.ngroups, self.d_state
        z, xBC, dt = self.in_proj(u_t).split([self.d_inner, self.conv_dim, H], dim=-1)
        window = torch.cat([conv_state, xBC.unsqueeze(-1)], dim=-1)  # (B, conv_dim, d_conv), oldest first
        xBC = F.silu((window * self.conv1d.weight.squeeze(1)).sum(-1) + self.conv1d.bias)  # (B, conv_dim)
        x, B, C = xBC.to(h.dtype).split([self.d_inner, G * N, G * N], dim=-1)
        x = x.unflatten(-1, (H, P))  # (B, H, P)
        B = B.unflatten(-1, (G, N)).repeat_interleave(H // G, dim=1)  # (B, H, N)
        C = C.unflatten(-1, (G, N)).repeat_interleave(H // G, dim=1)  # (B, H, N)
        dt = F.softplus(dt.to(h.dtype) + self.dt_bias)  # (B, H)
        A = -torch.exp(self.A_log.float()).to(h.dtype)  # (H,), rounded through float32 as in forward
        decay = torch.exp(dt * A)  # (B, H)
        h = decay[..., None, None] * h + (dt[..., None] * x)[..., None] * B[:, :, None, :]  # (B, H, P, N)
        y = torch.einsum("bhpn,bhn->bhp", h, C) + self.D.to(h.dtype)[:, None] * x  # (B, H, P)
        y_t = self.out_proj(self.norm(y.flatten(-2).to(u_t.dtype), z))  # (B, D)
        return y_t, (window[..., 1:], h)

    def _project(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.in_proj(u).split([self.d_inner, self.conv_dim, self.nheads], dim=-1)

    def _block_features(self, xBC: torch.Tensor, dt: torch.Tensor, context: torch.Tensor) -> BlockFeatures:
        """Post-conv tensors of blocks xBC (n, nb, Bk, C), raw dt (n, nb, Bk, H) after their clean context."""
        H, P, G, N = self.nheads, self.headdim, self.ngroups, self.d_state
        xBC = blockdiff.conv_blocks(xBC, context, self.conv1d.weight.squeeze(1), self.conv1d.bias, 0)
        x, B, C = xBC.split([self.d_inner, G * N, G * N], dim=-1)
        return BlockFeatures(x.unflatten(-1, (H, P)), F.softplus(dt + self.dt_bias), -torch.exp(self.A_log.float()),
                             B.unflatten(-1, (G, N)), C.unflatten(-1, (G, N)))

    def _block_output(self, z: torch.Tensor, f: BlockFeatures, h_in: torch.Tensor) -> torch.Tensor:
        """The scan of every block alone plus the entering state's readout -> (n, nb, Bk, D)."""
        y = selective_scan(*(t.flatten(0, 1) for t in (f.x, f.dt)), f.A, *(t.flatten(0, 1) for t in (f.B, f.C)),
                           self.D, chunk_size=min(self.chunk_size, f.x.shape[2])).view(f.x.shape)  # (n, nb, Bk, H, P)
        y = y + blockdiff.state_readout(h_in, f).to(y.dtype)
        return self.out_proj(self.norm(y.flatten(-2), z))  # (n, nb, Bk, D)

    def dual_forward(self, u: torch.Tensor, start: int, end: int | None = None) -> tuple[torch.Tensor, tuple]:
        """:meth:`forward` on u (n, L, D) and the `block_step` state of the prefix before ``start`` (a causal
        mixer reads nothing after a block; see `dimba.backbones.dualcache`)."""
        return dualcache.causal_forward(self, u, start)

    def dual_step(self, u: torch.Tensor, state: tuple, start: int | None = None) -> torch.Tensor:
        """The block u (n, Bk, D) after the prefix in ``state`` -> (n, Bk, D)."""
        return self.block_step(u, state)[0]

    def _causal_conv(self, xBC: torch.Tensor) -> torch.Tensor:
        """Depthwise causal convolution over time followed by SiLU: (B, L, C) -> (B, L, C)."""
        return conv_silu(xBC, self.conv1d.weight.squeeze(1), self.conv1d.bias)  # (B, L, C)


class BiMamba2(BidirectionalMixer):
    """Bidirectional Mamba-2 from two whole mixers: a forward one plus one run on the time-reversed sequence.

    The block of ``model.bimamba = "separate"`` (every model before :class:`~dimba.backbones.bimamba.SharedBiMamba2`).
    The reverse output is flipped back and added to the forward one. With ``tie_reverse=True`` both directions share ``forward_mixer`` and run as
    one batched call. Every output position depends on the whole sequence; with ``lengths`` each
    row is reversed within its real tokens, so the reverse mixer starts at the last real one.

    Args:
        d_model: model width D.
        tie_reverse: share the mixer weights between the two directions.
        **mixer_kwargs: passed to :class:`Mamba2Mixer`.
    """

    def __init__(self, d_model: int, tie_reverse: bool = False, **mixer_kwargs):
        super().__init__()
        self.forward_mixer = Mamba2Mixer(d_model, **mixer_kwargs)
        self.reverse_mixer = None if tie_reverse else Mamba2Mixer(d_model, **mixer_kwargs)

    def forward(self, u: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """u: (B, L, D) -> (B, L, D); ``lengths`` (B,): real tokens per row (see :mod:`dimba.backbones.mixer`)."""
        u_rev = reverse_rows(u, lengths)  # (B, L, D)
        if self.reverse_mixer is None:
            y_fwd, y_rev = self.forward_mixer(torch.cat([u, u_rev], dim=0)).chunk(2, dim=0)  # (B, L, D) each
        else:
            y_fwd, y_rev = self.forward_mixer(u), self.reverse_mixer(u_rev)  # (B, L, D) each
        return y_fwd + reverse_rows(y_rev, lengths)  # (B, L, D): the reverse output back in the original order

    def clean_blocks(self, u_clean: torch.Tensor, block: int) -> tuple[torch.Tensor, tuple]:
        """Block diffusion's clean stream (n, L, D) -> (its output, what the noisy stream reads of it): the forward
        mixer carries the clean prefix's state into each block (:meth:`Mamba2Mixer.clean_blocks`), the reverse
        mixer reads each block alone."""
        y, clean = self.forward_mixer.clean_blocks(u_clean, block)  # (n, L, D)
        return y + self._reverse_blocks(u_clean, block), clean

    def noisy_blocks(self, u_noisy: torch.Tensor, clean: tuple, block: int) -> torch.Tensor:
        """Block diffusion's noisy stream (n, L, D) read with ``clean`` (:meth:`clean_blocks`) -> (n, L, D)."""
        return self.forward_mixer.noisy_blocks(u_noisy, clean, block) + self._reverse_blocks(u_noisy, block)

    def _reverse_blocks(self, u: torch.Tensor, block: int) -> torch.Tensor:
        """The reverse mixer on each block of u (n, L, D) alone -> (n, L, D)."""
        blocks = blockdiff.to_blocks(u, block)  # (n, nb, Bk, D)
        return self._reverse_within(blocks.flatten(0, 1)).view(blocks.shape).flatten(1, 2)

    def allocate_block_state(self, batch: int, max_len: int | None = None, device: torch.device | None = None,
                             dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The empty-prefix state of `block_step`: the forward mixer's."""
        return self.forward_mixer.allocate_block_state(batch, max_len, device, dtype)

    def block_step(self, u: torch.Tensor, state, pos: int | None = None):
        """One block u (n, Bk, D) after the clean prefix in ``state`` -> (y (n, Bk, D), the state after u)."""
        y, state = self.forward_mixer.block_step(u, state)  # (n, Bk, D)
        return y + self._reverse_within(u), state

    def dual_forward(self, u: torch.Tensor, start: int, end: int) -> tuple[torch.Tensor, tuple]:
        """:meth:`forward` on u (n, L, D) and the DualCache state of the block [start, end): the forward mixer's
        state at ``start``, the reverse mixer's at ``end`` with the sequence read backwards."""
        y_fwd, fwd = self.forward_mixer.dual_forward(u, start)  # (n, L, D)
        y_rev, rev = self._reverse_mixer().dual_forward(u.flip(1), u.shape[1] - end)  # (n, L, D), read backwards
        return y_fwd + y_rev.flip(1), (fwd, rev)

    def dual_step(self, u: torch.Tensor, state: tuple, start: int | None = None) -> torch.Tensor:
        """The block u (n, Bk, D) between the surroundings in ``state`` (from :meth:`dual_forward`) -> (n, Bk, D)."""
        fwd, rev = state
        return self.forward_mixer.dual_step(u, fwd) + self._reverse_mixer().dual_step(u.flip(1), rev).flip(1)

    def _reverse_mixer(self) -> Mamba2Mixer:
        return self.forward_mixer if self.reverse_mixer is None else self.reverse_mixer

    def _reverse_within(self, u: torch.Tensor) -> torch.Tensor:
        """The reverse mixer on rows u (m, Bk, D) read backwards, flipped back: (m, Bk, D)."""
        return self._reverse_mixer()(u.flip(1)).flip(1)


def _inverse_softplus_log_uniform(n: int, low: float, high: float) -> torch.Tensor:
    """Values whose softplus is log-uniform in [low, high] (the Mamba dt_bias initialisation)."""
    dt = torch.exp(torch.empty(n).uniform_(math.log(low), math.log(high)))  # (n,)
    return dt + torch.log(-torch.expm1(-dt))  # softplus^{-1}(dt) = log(exp(dt) - 1)
