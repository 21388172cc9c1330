"""Mamba2Mixer and BiMamba2: checkpoint layout, initialisation, causality, bidirectionality, gradients, prefill."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dimba.backbones.mamba import BiMamba2, GatedRMSNorm, Mamba2Mixer

SMALL = {"d_state": 8, "headdim": 8, "chunk_size": 8}  # d_model 16 -> d_inner 32, 4 heads


def tokens(batch=2, length=21, d_model=16, seed=0):
    return torch.randn(batch, length, d_model, generator=torch.Generator().manual_seed(seed))


def test_parameters_match_mamba_ssm_layout():
    d_model, d_state, ngroups, headdim = 32, 16, 2, 16
    mixer = Mamba2Mixer(d_model, d_state=d_state, headdim=headdim, ngroups=ngroups)
    d_inner, nheads = 64, 4
    conv_dim = d_inner + 2 * ngroups * d_state
    expected = {
        "in_proj.weight": (2 * d_inner + 2 * ngroups * d_state + nheads, d_model),
        "conv1d.weight": (conv_dim, 1, 4),
        "conv1d.bias": (conv_dim,),
        "dt_bias": (nheads,),
        "A_log": (nheads,),
        "D": (nheads,),
        "norm.weight": (d_inner,),
        "out_proj.weight": (d_model, d_inner),
    }
    assert {k: tuple(v.shape) for k, v in mixer.state_dict().items()} == expected


def test_initialisation_follows_mamba2():
    mixer = Mamba2Mixer(64, headdim=4)  # 32 heads
    A = -torch.exp(mixer.A_log)
    dt = F.softplus(mixer.dt_bias)
    assert ((A >= -16) & (A <= -1)).all() and A.std() > 1
    assert ((dt >= 1e-3 * 0.999) & (dt <= 1e-1 * 1.001)).all()
    assert dt.min() < 1e-2 < dt.max()
    assert torch.equal(mixer.D.detach(), torch.ones(32))


def test_rejects_bad_head_and_group_sizes():
    with pytest.raises(ValueError, match="headdim"):
        Mamba2Mixer(16, headdim=24)
    with pytest.raises(ValueError, match="ngroups"):
        Mamba2Mixer(16, headdim=8, ngroups=3)


@pytest.mark.parametrize("ngroups", [1, 2])
def test_mixer_is_causal(ngroups):
    torch.manual_seed(0)
    mixer = Mamba2Mixer(16, ngroups=ngroups, **SMALL)
    u = tokens()
    t = 11
    u2 = u.clone()
    u2[:, t] += 1.0
    with torch.no_grad():
        y, y2 = mixer(u), mixer(u2)
    assert y.shape == u.shape
    torch.testing.assert_close(y2[:, :t], y[:, :t], rtol=0, atol=1e-6)
    assert (y2[:, t:] - y[:, t:]).abs().amax(dim=(0, 2)).min() > 1e-6  # every later position is affected


def test_bimamba_sees_the_future():
    torch.manual_seed(0)
    bi = BiMamba2(16, **SMALL)
    u = tokens()
    u2 = u.clone()
    u2[:, -1] += 1.0
    with torch.no_grad():
        y, y2 = bi(u), bi(u2)
    assert y.shape == u.shape
    assert (y2[:, 0] - y[:, 0]).abs().max() > 1e-6


def test_tied_bimamba_is_one_mixer_run_both_ways():
    torch.manual_seed(0)
    bi = BiMamba2(16, tie_reverse=True, **SMALL)
    assert bi.reverse_mixer is None
    assert sum(p.numel() for p in bi.parameters()) == sum(p.numel() for p in bi.forward_mixer.parameters())
    u = tokens()
    with torch.no_grad():
        expected = bi.forward_mixer(u) + bi.forward_mixer(u.flip(1)).flip(1)
        torch.testing.assert_close(bi(u), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("tie_reverse,equivariant", [(True, True), (False, False)])
def test_reversal_equivariance_only_when_tied(tie_reverse, equivariant):
    """flip(input) -> flip(output) holds exactly when both directions share weights."""
    torch.manual_seed(0)
    bi = BiMamba2(16, tie_reverse=tie_reverse, **SMALL)
    u = tokens()
    with torch.no_grad():
        gap = (bi(u.flip(1)) - bi(u).flip(1)).abs().max().item()
    assert (gap < 1e-5) == equivariant, gap


@pytest.mark.parametrize(
    "make",
    [
        lambda: Mamba2Mixer(16, ngroups=2, **SMALL),
        lambda: BiMamba2(16, **SMALL),
        lambda: BiMamba2(16, tie_reverse=True, **SMALL),
    ],
    ids=["mixer", "bimamba", "bimamba-tied"],
)
def test_gradients_reach_every_parameter(make):
    torch.manual_seed(0)
    module = make()
    u = tokens().requires_grad_()
    module(u).square().mean().backward()
    assert torch.isfinite(u.grad).all() and u.grad.abs().max() > 0
    for name, p in module.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all() and p.grad.abs().max() > 0, name


def test_gated_norm_normalises_each_group():
    norm = GatedRMSNorm(8, group_size=4)
    y, z = torch.randn(3, 8), torch.randn(3, 8) + 3.0
    out = norm(y, z).view(3, 2, 4)
    torch.testing.assert_close(out.pow(2).mean(-1), torch.ones(3, 2), rtol=1e-4, atol=1e-4)
    gated = (y * F.silu(z)).view(3, 2, 4)
    torch.testing.assert_close(out, gated / gated.pow(2).mean(-1, keepdim=True).sqrt(), rtol=1e-4, atol=1e-5)


def test_bfloat16_forward():
    torch.manual_seed(0)
    mixer = Mamba2Mixer(16, **SMALL).to(torch.bfloat16)
    y = mixer(tokens().to(torch.bfloat16))
    assert y.dtype == torch.bfloat16 and torch.isfinite(y.float()).all()


@pytest.mark.parametrize("ngroups", [1, 2])
def test_step_by_step_equals_full_forward(ngroups):
    torch.manual_seed(0)
    mixer = Mamba2Mixer(16, ngroups=ngroups, **SMALL).double()  # float64 throughout, the gated norm too
    with torch.no_grad():
        mixer.dt_bias.add_(1.0)  # larger steps: the state carries more than a few tokens' worth
    u = tokens(length=19).double()  # (B, L, D)
    state = mixer.allocate_state(u.shape[0])
    assert state[0].shape == (2, mixer.conv_dim, 3) and state[1].shape == (2, 4, 8, 8)
    with torch.no_grad():
        ys = []
        for u_t in u.unbind(1):
            y_t, state = mixer.step(u_t, state)  # (B, D)
            ys.append(y_t)
        torch.testing.assert_close(torch.stack(ys, dim=1), mixer(u), rtol=1e-10, atol=1e-12)


def test_step_leaves_the_given_state_untouched():
    mixer = Mamba2Mixer(16, **SMALL)
    state = mixer.allocate_state(2)
    mixer.step(tokens()[:, 0], state)
    assert all(not s.any() for s in state)


@pytest.mark.parametrize("parts", [(10, 13), (2, 1, 20), (23,)])
def test_prefill_in_parts_equals_full_forward(parts):
    """Each prefill continues from the state the last one left, conv history included (parts shorter than it too)."""
    torch.manual_seed(0)
    mixer = Mamba2Mixer(16, **SMALL).double()
    with torch.no_grad():
        mixer.dt_bias.add_(1.0)
    u = tokens(length=sum(parts)).double()  # (B, L, D)
    state = mixer.allocate_state(u.shape[0], u.shape[1])
    outs = []
    with torch.no_grad():
        for piece in u.split(list(parts), dim=1):
            y, state = mixer.prefill(piece, state)  # (B, part, D)
            outs.append(y)
        torch.testing.assert_close(torch.cat(outs, dim=1), mixer(u), rtol=1e-10, atol=1e-12)
        u_next = tokens(length=1, seed=5).double()  # (B, 1, D): decoding goes on from the state
        y_next, _ = mixer.step(u_next[:, 0], state, pos=u.shape[1])  # (B, D)
        torch.testing.assert_close(y_next, mixer(torch.cat([u, u_next], dim=1))[:, -1], rtol=1e-10, atol=1e-12)
