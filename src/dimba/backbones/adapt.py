"""A causal Mamba-2 model's weights carried into the shared-projection bidirectional block (ar-to-diffusion
adaptation, `dimba train --init`).

The causal mixer's input projection holds (z, x, B, C, dt); the shared block's holds (z, x, B_fwd, C_fwd, B_rev,
C_rev, dt_fwd, dt_rev). The forward direction takes the causal mixer's B, C, dt, dt_bias and A as they are; the
reverse direction starts as a copy of it with C_rev = 0 (its projection rows and conv bias zero), so at the start
it adds nothing and the block computes the causal mixer's scan, and its first gradients teach it to read the
future. The causal conv reads positions t - k + 1 .. t, the shared block's centred conv t - k + 1 + a .. t + a
(a = its lookahead): each kernel moves a taps earlier, dropping its oldest a taps and reading nothing ahead at first.
"""

from __future__ import annotations

import torch

_SUFFIX = ".mixer.in_proj.weight"


def bidirectional_from_causal(weights: dict[str, torch.Tensor], own: dict[str, torch.Tensor]
                              ) -> dict[str, torch.Tensor]:
    """``weights`` with every causal Mamba-2 mixer whose counterpart in the model state ``own`` is a shared
    bidirectional block (not Hydra's) rewritten in that block's layout; every other tensor as it was."""
    out = dict(weights)
    for name, w in weights.items():
        if not name.endswith(_SUFFIX) or name not in own or own[name].shape == w.shape:
            continue
        prefix = name[: -len("in_proj.weight")]
        heads = weights[prefix + "dt_bias"].numel()
        d_inner = weights[prefix + "out_proj.weight"].shape[1]
        gn = (weights[prefix + "conv1d.weight"].shape[0] - d_inner) // 2  # G * N: the width of B and of C
        if own[name].shape[0] != 2 * d_inner + 4 * gn + 2 * heads:  # not the shared block's layout
            continue
        z, x, b, c, dt = w.split([d_inner, d_inner, gn, gn, heads])  # rows of (out, D)
        out[name] = torch.cat([z, x, b, c, b, torch.zeros_like(c), dt, dt])
        kernel = own[prefix + "conv1d.weight"].shape[-1]
        lookahead = (kernel - 1) // 2
        conv = weights[prefix + "conv1d.weight"]  # (x + B + C channels, 1, k)
        conv = torch.cat([conv[..., lookahead:], conv.new_zeros(conv.shape[:-1] + (lookahead,))], dim=-1)
        xs, bs, cs = conv.split([d_inner, gn, gn])
        out[prefix + "conv1d.weight"] = torch.cat([xs, bs, cs, bs, cs])  # channels x, B_fwd, C_fwd, B_rev, C_rev
        xs, bs, cs = weights[prefix + "conv1d.bias"].split([d_inner, gn, gn])
        out[prefix + "conv1d.bias"] = torch.cat([xs, bs, cs, bs, torch.zeros_like(cs)])  # C_rev = silu(0 + 0) = 0
        for key in ("dt_bias", "A_log"):
            out[prefix + key] = weights[prefix + key].repeat(2)  # (2H,): forward, reverse
    return out
