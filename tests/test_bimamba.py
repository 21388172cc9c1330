"""SharedBiMamba2 (the shared-projection bidirectional block), the model.bimamba setting, and models saved before it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from test_biscan import quasiseparable_reference

from dimba import DIMBA
from dimba.backbones import Backbone
from dimba.backbones.bimamba import SharedBiMamba2
from dimba.backbones.mamba import BiMamba2
from dimba.config import ModelConfig, validate
from dimba.errors import ConfigError

SMALL = {"d_state": 8, "headdim": 8, "chunk_size": 8}  # d_model 16 -> d_inner 32, 4 heads
PRE_BIMAMBA = Path(__file__).parent / "data" / "pre_bimamba"


def tokens(batch=2, length=21, d_model=16, seed=0, dtype=torch.float32):
    return torch.randn(batch, length, d_model, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def mixer_reference(m: SharedBiMamba2, u: torch.Tensor) -> torch.Tensor:
    """The mixer from plain ops: nn.functional's conv with zero padding on both sides, the explicit
    quasiseparable matrix of test_biscan, and the gated RMSNorm written out."""
    H, P, G, N, K = m.nheads, m.headdim, m.ngroups, m.d_state, m.d_conv
    z, xBC, dt = m.in_proj(u).split([m.d_inner, m.conv_dim, 2 * H], dim=-1)
    ahead = (K - 1) // 2
    conv = F.conv1d(F.pad(xBC.transpose(1, 2), (K - 1 - ahead, ahead)), m.conv1d.weight, m.conv1d.bias,
                    groups=m.conv_dim)  # (B, C, L)
    x, *bc = F.silu(conv).transpose(1, 2).split([m.d_inner] + [G * N] * m.n_bc, dim=-1)
    Bf, Cf, Br, Cr = bc if m.fc_D is None else bc * 2  # hydra: one B and C for both directions
    dt = F.softplus(dt + m.dt_bias)  # (B, L, 2H)
    A = -torch.exp(m.A_log)  # (2H,)
    y = quasiseparable_reference(x.unflatten(-1, (H, P)), dt[..., :H], dt[..., H:], A[:H], A[H:],
                                 *(t.unflatten(-1, (G, N)) for t in (Bf, Cf, Br, Cr)), m.D,
                                 forward_diagonal=m.fc_D is None).flatten(-2)
    if m.fc_D is not None:  # hydra: the learned diagonal fc_D(x_t) x_t
        y = y + (x.unflatten(-1, (H, P)) * (x @ m.fc_D.weight.T)[..., None]).flatten(-2)
    gated = (y * F.silu(z)).unflatten(-1, (G, -1))  # (B, L, G, d_inner / G)
    normed = gated * torch.rsqrt(gated.square().mean(-1, keepdim=True) + m.norm.eps)
    return m.out_proj(normed.flatten(-2) * m.norm.weight)  # (B, L, D)


@pytest.mark.parametrize("hydra", [False, True])
@pytest.mark.parametrize("ngroups,d_conv", [(1, 4), (2, 3), (1, 1)])
def test_mixer_equals_plain_composition_float64(ngroups, d_conv, hydra):
    torch.manual_seed(0)
    mixer = SharedBiMamba2(16, ngroups=ngroups, d_conv=d_conv, hydra=hydra, **SMALL).double()
    with torch.no_grad():
        for p in mixer.parameters():
            p.add_(0.1 * torch.randn_like(p))
    u = tokens(length=29, dtype=torch.float64)
    torch.testing.assert_close(mixer(u), mixer_reference(mixer, u), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("hydra", [False, True])
def test_mixer_sees_both_directions_and_its_gradients_reach_every_parameter(hydra):
    torch.manual_seed(0)
    mixer = SharedBiMamba2(16, hydra=hydra, **SMALL)
    u = tokens().requires_grad_()
    bumped = u.detach().clone()
    bumped[:, 10] += 1.0
    with torch.no_grad():
        change = (mixer(bumped) - mixer(u)).abs().amax(dim=(0, 2))  # (L,)
    assert change[:10].min() > 1e-6 and change[11:].min() > 1e-6
    mixer(u).square().mean().backward()
    assert torch.isfinite(u.grad).all() and u.grad.abs().max() > 0
    for name, p in mixer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().max() > 0, name


def test_shared_block_has_one_of_each_projection():
    shared, hydra, separate = SharedBiMamba2(256), SharedBiMamba2(256, hydra=True), BiMamba2(256)
    d_inner, H, N = 512, 8, 32  # the default state size N = 32 per direction
    assert shared.in_proj.weight.shape == (2 * d_inner + 4 * N + 2 * H, 256)
    assert hydra.in_proj.weight.shape == (2 * d_inner + 2 * N + 2 * H, 256)  # one B and C for both directions
    assert shared.out_proj.weight.shape == hydra.out_proj.weight.shape == (256, d_inner)
    assert shared.dt_bias.shape == shared.A_log.shape == (2 * H,) and shared.D.shape == (H,)
    n_shared, n_hydra, n_separate = (sum(p.numel() for p in m.parameters()) for m in (shared, hydra, separate))
    # in_proj, conv weight and bias, dt_bias, A_log, D, norm, out_proj (+ hydra's fc_D)
    assert n_shared == 256 * 1168 + 640 * 5 + 16 + 16 + 8 + 512 + 512 * 256 == 433_832
    assert n_hydra == 256 * 1104 + 576 * 5 + 16 + 16 + 8 + 512 + 512 * 256 + 512 * 8 == 421_224
    assert n_separate == 2 * (256 * 1096 + 576 * 5 + 8 + 8 + 8 + 512 + 512 * 256) == 830_128


@pytest.mark.parametrize("make", [lambda: SharedBiMamba2(16, **SMALL), lambda: BiMamba2(16, **SMALL)])
def test_bidirectional_mixers_refuse_to_decode(make):
    mixer = make()
    calls = {"allocate_state": lambda: mixer.allocate_state(1, 8), "prefill": lambda: mixer.prefill(tokens(), None),
             "step": lambda: mixer.step(tokens()[:, 0], None, 0)}
    for method, call in calls.items():
        with pytest.raises(ValueError, match=rf"\.{method}\(\) needs a causal mixer"):
            call()


def test_config_default_and_configs_saved_before_the_setting():
    assert ModelConfig().bimamba == "shared"
    assert ModelConfig(tie_reverse=False).bimamba == "separate"  # lists tie_reverse but not bimamba: saved before
    assert ModelConfig(tie_reverse=False, bimamba="shared").bimamba == "shared"
    assert validate({"model": {"d_model": 64}}).model.bimamba == "shared"
    with pytest.raises(ConfigError, match="tie_reverse=true ties the two mixers of bimamba=separate"):
        validate({"model": {"tie_reverse": True, "bimamba": "shared"}})


@pytest.mark.parametrize("bimamba,cls", [("shared", SharedBiMamba2), ("separate", BiMamba2), ("hydra", SharedBiMamba2)])
def test_model_builds_the_chosen_block(bimamba, cls):
    model = DIMBA(vocab_size=64, d_model=16, num_denoiser_layers=2, family="masked", bimamba=bimamba, **SMALL)
    assert all(type(block.mixer) is cls for block in model.backbone.blocks)
    assert all((block.mixer.fc_D is not None) == (bimamba == "hydra") for block in model.backbone.blocks
               if cls is SharedBiMamba2)
    assert DIMBA(vocab_size=64, **model.config.model_dump(exclude={"vocab_size"})).config.bimamba == bimamba


def test_backbone_keeps_its_old_keywords():
    old = Backbone("mamba2", 16, 1, 16, tie_reverse=True, bimamba="separate", d_conv=4, expand=2, **SMALL)
    assert old.blocks[0].mixer.reverse_mixer is None
    with pytest.raises(ValueError, match="unknown bimamba"):
        Backbone("mamba2", 16, 1, 16, bimamba="both", d_conv=4, expand=2, **SMALL)


def test_model_exported_before_the_setting_loads_with_identical_outputs():
    """tests/data/pre_bimamba was exported by the code before model.bimamba existed (by tests/data/make_pre_bimamba.py):
    its config.json has no bimamba; it loads as the separate block and reproduces its saved logits."""
    model = DIMBA.from_pretrained(PRE_BIMAMBA)
    assert model.config.bimamba == "separate"
    expected = load_file(PRE_BIMAMBA / "expected.safetensors")
    with torch.no_grad():
        logits = model.token_logits(expected["input_ids"])
    # equal up to the rounding of the CPU's fp32 kernels: the file was saved on an AMD machine, and an Intel Xeon's
    # (AMX) kernels differ from it by up to 3e-5; a block loaded wrongly differs by whole logits
    torch.testing.assert_close(logits, expected["logits"], rtol=1e-4, atol=1e-4)
