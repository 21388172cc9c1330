"""The shared-projection bidirectional Mamba-2 mixer: one mixer, two scan directions, one scan call.

Ideas from Hydra (Hwang et al. 2024) and Caduceus' BiMamba (Schiff et al. 2024). Where
:class:`~dimba.backbones.mamba.BiMamba2` runs two whole Mamba-2 mixers (two input and output
projections, convolutions and gated norms), :class:`SharedBiMamba2` has one of each and splits only
what must differ per direction: B, C, dt, dt_bias and A. The forward and reverse scans read the
same x and run as one call (:func:`dimba.backbones.ssm.bidirectional_scan`); their sum, a
quasiseparable mixing matrix applied to x, goes through the one gated norm and output projection.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dimba.backbones import blockdiff, dualcache
from dimba.backbones.blockdiff import BlockDiffusionMixin, BlockFeatures
from dimba.backbones.mamba import GatedRMSNorm, _inverse_softplus_log_uniform, head_layout
from dimba.backbones.mixer import BidirectionalMixer, real_positions
from dimba.backbones.ssm import bidirectional_scan, conv_silu


class SharedBiMamba2(BlockDiffusionMixin, BidirectionalMixer):
    """Bidirectional Mamba-2 mixer with shared projections: (B, L, D) -> (B, L, D).

    in_proj -> (z, xBC, dt) with xBC = (x, B_fwd, C_fwd, B_rev, C_rev) and dt = (dt_fwd, dt_rev);
    xBC -> depthwise conv centred on each position (``(d_conv - 1) // 2`` steps ahead) -> SiLU;
    y = bidirectional_scan(x, softplus(dt + dt_bias), A = -exp(A_log), B, C, D): position t reads
    positions <= t through the forward scan and > t through the reverse one;
    out = out_proj(norm(y * silu(z))).

    ``hydra=True`` builds Hydra's quasiseparable form instead (Hwang et al. 2024): both scans read
    one B and one C (still with their own dt and A), the forward scan is strictly causal (s < t) like
    the reverse one is anti-causal, and the diagonal is learned from the token itself, a per-head
    weight ``fc_D(x_t) + D`` of x_t, instead of the forward scan's C_t . B_t dt_t + D.

    With ``lengths`` (B,), the positions after each row's last real token are zeroed at the
    conv's input, at x and at dt, so they add nothing and decay nothing in either direction: real
    positions get the outputs of the row run alone (and the padding's dt, which can be anything,
    never enters the scan's sums of log decays).

    Args:
        d_model: model width D.
        d_state: state size N per head and direction.
        d_conv: convolution width.
        expand: d_inner = expand * d_model.
        headdim: head size P; H = d_inner / P heads.
        ngroups: number G of B/C groups shared by the heads (must divide H).
        chunk_size: chunk length of the scan.
        hydra: Hydra's form: shared B and C, no diagonal in either scan, a learned diagonal.
    """

    def __init__(self, d_model: int, d_state: int = 32, d_conv: int = 4, expand: int = 2, headdim: int = 64,
                 ngroups: int = 1, chunk_size: int = 64, hydra: bool = False):
        super().__init__()
        d_inner, nheads = head_layout(d_model, expand, headdim, ngroups)
        self.d_inner, self.d_state, self.headdim = d_inner, d_state, headdim
        self.nheads, self.ngroups, self.chunk_size, self.d_conv = nheads, ngroups, chunk_size, d_conv
        self.n_bc = 2 if hydra else 4  # B and C, shared by both directions (hydra) or per direction
        self.conv_dim = d_inner + self.n_bc * ngroups * d_state  # channels of xBC: x and the B, C

        self.in_proj = nn.Linear(d_model, d_inner + self.conv_dim + 2 * nheads, bias=False)  # -> z, xBC, dt
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, d_conv, groups=self.conv_dim)
        self.dt_bias = nn.Parameter(torch.cat([_inverse_softplus_log_uniform(nheads, 1e-3, 1e-1) for _ in range(2)]))
        self.A_log = nn.Parameter(torch.empty(2 * nheads).uniform_(1.0, 16.0).log())  # (2H,): forward, reverse
        self.D = nn.Parameter(torch.ones(nheads))
        for p in (self.dt_bias, self.A_log, self.D):
            p._no_weight_decay = True
        self.norm = GatedRMSNorm(d_inner, group_size=d_inner // ngroups)
        self.out_proj = nn.Linear(d_inner, d_model, bias=False)
        self.fc_D = nn.Linear(d_inner, nheads, bias=False) if hydra else None  # the learned diagonal's part in x_t
        if hydra:
            nn.init.zeros_(self.fc_D.weight)  # starts as the plain skip D
        self._lookahead = (d_conv - 1) // 2  # the conv is centred: it reads this many positions ahead
        self._lookback = d_conv - 1 - self._lookahead

    def forward(self, u: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """u: (B, L, D) -> (B, L, D); ``lengths`` (B,): real tokens per row (see :mod:`dimba.backbones.mixer`)."""
        H, P, G, N = self.nheads, self.headdim, self.ngroups, self.d_state
        z, xBC, dt = self.in_proj(u).split([self.d_inner, self.conv_dim, 2 * H], dim=-1)
        keep = None if lengths is None else real_positions(lengths, u.shape[1])[..., None].to(xBC.dtype)  # (B, L, 1)
        if keep is not None:
            xBC = xBC * keep  # (B, L, conv_dim)
        xBC = conv_silu(xBC, self.conv1d.weight.squeeze(1), self.conv1d.bias, lookahead=self._lookahead)
        x, *bc = xBC.split([self.d_inner] + [G * N] * self.n_bc, dim=-1)
        dt = F.softplus(dt + self.dt_bias)  # (B, L, 2H)
        if keep is not None:
            x, dt = x * keep, dt * keep  # (B, L, d_inner), (B, L, 2H)
        A = -torch.exp(self.A_log.to(torch.promote_types(self.A_log.dtype, torch.float32)))  # (2H,)
        x = x.unflatten(-1, (H, P))  # (B, L, H, P)
        y = bidirectional_scan(
            x, dt[..., :H], dt[..., H:],  # (B, L, H) each
            A[:H], A[H:],  # (H,) each
            *(t.unflatten(-1, (G, N)) for t in self._directions_bc(bc)),  # (B, L, G, N) each
            self.D,
            chunk_size=self.chunk_size,
            forward_diagonal=self.fc_D is None,
        )  # (B, L, H, P)
        return self.out_proj(self.norm(self._learned_diagonal(y, x).flatten(-2), z))  # (B, L, D)

    def _directions_bc(self, bc: list[torch.Tensor]) -> list[torch.Tensor]:
        """(B_fwd, C_fwd, B_rev, C_rev) from the conv's B, C channels: both directions read the same ones (hydra)."""
        return bc * 2 if self.n_bc == 2 else bc

    def _learned_diagonal(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """y (..., H, P) plus Hydra's learned diagonal fc_D(x_t) x_t (hydra); else y itself."""
        if self.fc_D is None:
            return y
        return y + x * self.fc_D(x.flatten(-2)).unsqueeze(-1).to(x.dtype)  # (..., H, P)

    def _project(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.in_proj(u).split([self.d_inner, self.conv_dim, 2 * self.nheads], dim=-1)

    def _block_features(self, xBC: torch.Tensor, dt: torch.Tensor, context: torch.Tensor,
                        after: torch.Tensor | None = None) -> BlockFeatures:
        """Post-conv tensors of blocks xBC (n, nb, Bk, C), raw dt (n, nb, Bk, 2H) after their clean context
        (before each block's end the conv reads ``after``, (n, nb, lookahead, C), or zeros)."""
        H, P, G, N = self.nheads, self.headdim, self.ngroups, self.d_state
        xBC = blockdiff.conv_blocks(xBC, context, self.conv1d.weight.squeeze(1), self.conv1d.bias, self._lookahead,
                                    after)
        x, *bc = xBC.split([self.d_inner] + [G * N] * self.n_bc, dim=-1)
        bc = self._directions_bc(bc)
        B_fwd, C_fwd, B_rev, C_rev = (t.unflatten(-1, (G, N)) for t in bc)  # (n, nb, Bk, G, N) each
        dt = F.softplus(dt + self.dt_bias)  # (n, nb, Bk, 2H)
        A = -torch.exp(self.A_log.to(torch.promote_types(self.A_log.dtype, torch.float32)))  # (2H,)
        x = x.unflatten(-1, (H, P))  # (n, nb, Bk, H, P)
        return BlockFeatures(x, dt[..., :H], A[:H], B_fwd, C_fwd, (dt[..., H:], A[H:], B_rev, C_rev))

    def _block_output(self, z: torch.Tensor, f: BlockFeatures, h_in: torch.Tensor | None,
                      h_rev: torch.Tensor | None = None) -> torch.Tensor:
        """Both scans of every block alone plus the readouts of the forward state entering it, ``h_in``, and of the
        reverse state entering it from its end, ``h_rev`` (n, nb, H, P, N) each (None: zero) -> (n, nb, Bk, D)."""
        dt_rev, A_rev, B_rev, C_rev = f.rest
        bk = f.x.shape[2]
        y = bidirectional_scan(
            *(t.flatten(0, 1) for t in (f.x, f.dt, dt_rev)), f.A, A_rev,
            *(t.flatten(0, 1) for t in (f.B, f.C, B_rev, C_rev)), self.D,
            chunk_size=min(self.chunk_size, bk), forward_diagonal=self.fc_D is None,
        ).view(f.x.shape)  # (n, nb, Bk, H, P)
        y = self._learned_diagonal(y, f.x)
        if h_in is not None:
            y = y + blockdiff.state_readout(h_in, f).to(y.dtype)
        if h_rev is not None:
            backwards = blockdiff.flip_blocks(self._reverse_features(f))
            y = y + blockdiff.state_readout(h_rev, backwards).flip(2).to(y.dtype)  # (n, nb, Bk, H, P)
        return self.out_proj(self.norm(y.flatten(-2), z))  # (n, nb, Bk, D)

    @staticmethod
    def _reverse_features(f: BlockFeatures) -> BlockFeatures:
        """The reverse direction's features (its dt, A, B, C; the shared x) in the forward order."""
        return BlockFeatures(f.x, *f.rest)

    def dual_forward(self, u: torch.Tensor, start: int, end: int) -> tuple[torch.Tensor, tuple]:
        """:meth:`forward` on u (n, L, D) and the DualCache state of the block [start, end)
        (`dimba.backbones.dualcache`)."""
        return dualcache.shared_forward(self, u, start, end)

    def dual_step(self, u: torch.Tensor, state: tuple, start: int) -> torch.Tensor:
        """The block u (n, Bk, D) read with the DualCache ``state`` of its surroundings -> (n, Bk, D)."""
        return dualcache.shared_step(self, u, state)
