"""A causal Mamba-2 mixer's weights in the shared bidirectional block (`dimba.backbones.adapt`)."""

from __future__ import annotations

import torch

from dimba.backbones.adapt import bidirectional_from_causal
from dimba.backbones.bimamba import SharedBiMamba2
from dimba.backbones.mamba import Mamba2Mixer

KW = {"d_state": 8, "headdim": 8, "chunk_size": 8, "ngroups": 2}  # d_model 16 -> d_inner 32, 4 heads


def _adapted(causal: Mamba2Mixer, hydra: bool = False) -> tuple[SharedBiMamba2, dict]:
    shared = SharedBiMamba2(16, hydra=hydra, **KW)
    weights = {f"blocks.0.mixer.{k}": v for k, v in causal.state_dict().items()}
    own = {f"blocks.0.mixer.{k}": v for k, v in shared.state_dict().items()}
    return shared, bidirectional_from_causal(weights, own)


def test_the_adapted_block_computes_the_causal_mixer_and_its_reverse_direction_can_learn():
    torch.manual_seed(0)
    causal = Mamba2Mixer(16, **KW)
    with torch.no_grad():
        causal.conv1d.weight[..., 0] = 0  # the one tap the centred conv cannot read (t - 3)
    shared, new = _adapted(causal)
    shared.load_state_dict({k.removeprefix("blocks.0.mixer."): v for k, v in new.items()})
    u = torch.randn(2, 21, 16)
    assert torch.allclose(shared(u), causal(u), atol=1e-5)
    shared(u).pow(2).sum().backward()
    c_rev = slice(32 + 32 + 3 * 16, 32 + 32 + 4 * 16)  # z, x, B_fwd, C_fwd, B_rev, then C_rev's rows
    assert shared.in_proj.weight.grad[c_rev].abs().sum() > 0  # silent at first, not frozen
    with torch.no_grad():  # a full tap at t - 3 is what the adapted block loses
        causal.conv1d.weight[..., 0] = 1
    assert not torch.allclose(causal(u), shared(u), atol=1e-3)


def test_hydra_and_matching_layouts_are_left_as_they_are():
    causal = Mamba2Mixer(16, **KW)
    _, new = _adapted(causal, hydra=True)  # another layout: the rows do not add up
    assert all(torch.equal(new[f"blocks.0.mixer.{k}"], v) for k, v in causal.state_dict().items())
    same = {f"m.mixer.{k}": v for k, v in causal.state_dict().items()}
    assert bidirectional_from_causal(same, same) == same
