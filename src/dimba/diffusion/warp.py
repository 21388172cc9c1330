"""Adaptive time warping (CDCD, Dieleman et al. 2022, §3.3): spend training and sampling steps where tokens are
decided.

During training the cross-entropy of the denoiser's token prediction is tracked as a function of the noise level
t (an EMA per bin of t). Its monotone envelope c(t), normalised to run from 0 at t = 0 to 1 at t = 1, is the
cumulative distribution F(t) of the warped time: training draws u uniformly and uses t = F^-1(u), so the density
of t is proportional to c'(t), high where the loss changes fastest; the sampler places its steps uniformly in u.
A uniform share `UNIFORM` of the density keeps every t visited, so the curve stays estimated everywhere. The warp
lives in the model's buffers: checkpoints, the EMA weights and exports carry it, and a model samples with the
warp it was trained with.
"""

from __future__ import annotations

import torch
from torch import nn

BINS = 100  # bins of t on [0, 1]
DECAY = 0.98  # EMA decay of a bin's cross-entropy each time a batch has examples in it
UNIFORM = 0.1  # share of the uniform density in the warped one
MIN_SEEN = 0.5  # a bin counts once this much EMA weight has accumulated in it (an EMA copy averages the weights)


class TimeWarp(nn.Module):
    """F(t) and its inverse from the cross-entropy seen during training; the identity until every bin was seen."""

    def __init__(self):
        super().__init__()
        self.register_buffer("ce", torch.zeros(BINS, dtype=torch.float64))  # EMA of the cross-entropy per bin
        self.register_buffer("weight", torch.zeros(BINS, dtype=torch.float64))  # EMA weight accumulated per bin

    @torch.no_grad()
    def update(self, t: torch.Tensor, ce: torch.Tensor) -> None:
        """Record the cross-entropy ``ce`` (B,) of examples at times ``t`` (B,)."""
        bins = (t.detach().double().clamp(0, 1) * BINS).long().clamp_max(BINS - 1).to(self.ce.device)  # (B,)
        total = torch.zeros_like(self.ce).index_add_(0, bins, ce.detach().double().to(self.ce.device))  # (BINS,)
        count = torch.zeros_like(self.ce).index_add_(0, bins, torch.ones_like(total[bins]))  # (BINS,)
        hit = count > 0
        mean = total / count.clamp_min(1)
        self.ce[hit] = DECAY * self.ce[hit] + (1 - DECAY) * mean[hit]
        self.weight[hit] = DECAY * self.weight[hit] + (1 - DECAY)

    def _knots(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The knots (t, F(t)) of the piecewise-linear CDF, t from 0 to 1 (BINS + 1 each, float64)."""
        t = torch.linspace(0, 1, BINS + 1, dtype=torch.float64, device=self.ce.device)  # (BINS + 1,)
        if bool((self.weight < MIN_SEEN * (1 - DECAY)).any()):
            return t, t.clone()
        ce = self.ce / self.weight  # (BINS,) bias-corrected EMA
        envelope = torch.cummax(ce, 0).values  # monotone in t
        c = torch.cat([envelope[:1], envelope])  # (BINS + 1,) c at the bin edges, c(0) = the first bin's
        span = (c[-1] - c[0]).clamp_min(1e-12)
        return t, (1 - UNIFORM) * (c - c[0]) / span + UNIFORM * t

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        """t = F^-1(u) for u (...) in [0, 1]: warped times, in the dtype of u."""
        t, f = self._knots()
        uu = u.detach().double().clamp(0, 1).to(t.device)
        j = torch.searchsorted(f, uu.reshape(-1), right=True).clamp(1, BINS).reshape(uu.shape)  # knot after u
        f0, f1, t0, t1 = f[j - 1], f[j], t[j - 1], t[j]
        out = t0 + (uu - f0) / (f1 - f0).clamp_min(1e-12) * (t1 - t0)
        return out.to(u.dtype).to(u.device)
