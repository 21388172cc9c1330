"""Incremental decoding of causal backbones: allocate_cache / prefill / step against the full forward."""

from __future__ import annotations

import pytest
import torch

from dimba.backbones import Backbone
from dimba.backbones.layers import Modulation

D_MODEL, COND_DIM, BATCH, LENGTH = 16, 16, 2, 19
MIXER_KWARGS = {
    "transformer": {"num_heads": 2},
    "mamba2": {"d_state": 8, "headdim": 8, "chunk_size": 8, "d_conv": 4, "expand": 2, "tie_reverse": False},
}
BACKBONES = list(MIXER_KWARGS)


def make_backbone(name, bidirectional=False, conditioning_type="film", dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    backbone = Backbone(name, D_MODEL, 2, COND_DIM, conditioning_type, bidirectional=bidirectional,
                        **MIXER_KWARGS[name])
    return backbone.to(dtype).eval()


def inputs(dtype=torch.float32, seed=1, length=LENGTH):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(BATCH, length, D_MODEL, generator=gen, dtype=dtype)
    c = torch.randn(BATCH, COND_DIM, generator=gen, dtype=dtype)
    return h, c


@torch.no_grad()
def perturb(backbone, seed=2, scale=0.3):
    """Training-like drift of every weight, including the zero-initialised modulations."""
    gen = torch.Generator().manual_seed(seed)
    for p in backbone.parameters():
        p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))


@torch.no_grad()
def stepped(backbone, h, c, start=0, cache=None):
    """Outputs (B, L - start, D) of stepping through h[:, start:], from a fresh cache unless given."""
    if cache is None:
        cache = backbone.allocate_cache(h.shape[0], h.shape[1])
    outs = []
    for pos in range(start, h.shape[1]):
        out, cache = backbone.step(h[:, pos], c, cache, pos)
        outs.append(out)
    return torch.stack(outs, dim=1)


@pytest.mark.parametrize("name", BACKBONES)
def test_step_matches_forward_float32(name):
    backbone = make_backbone(name)
    h, c = inputs()
    with torch.no_grad():
        full = backbone(h, c)
    out = stepped(backbone, h, c)
    assert out.shape == full.shape == (BATCH, LENGTH, D_MODEL)
    torch.testing.assert_close(out, full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", BACKBONES)
def test_step_matches_forward_float64(name):
    backbone = make_backbone(name, dtype=torch.float64)
    perturb(backbone)
    h, c = inputs(torch.float64)
    with torch.no_grad():
        full = backbone(h, c)
    out = stepped(backbone, h, c)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, full, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("conditioning_type", ["film", "additive"])
@pytest.mark.parametrize("name", BACKBONES)
def test_step_matches_forward_after_perturbation(name, conditioning_type):
    backbone = make_backbone(name, conditioning_type=conditioning_type)
    perturb(backbone)
    h, c = inputs()
    with torch.no_grad():
        full = backbone(h, c)
        other_c = backbone(h, torch.randn(BATCH, COND_DIM, generator=torch.Generator().manual_seed(5)))
    assert (full - other_c).abs().max() > 1e-2  # the conditioning matters now
    torch.testing.assert_close(stepped(backbone, h, c), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", BACKBONES)
def test_prefill_then_step_matches_forward(name):
    backbone = make_backbone(name)
    perturb(backbone)
    h, c = inputs()
    prompt = 7
    with torch.no_grad():
        full = backbone(h, c)
        cache = backbone.allocate_cache(BATCH, LENGTH)
        pre, cache = backbone.prefill(h[:, :prompt], c, cache)
    torch.testing.assert_close(pre, full[:, :prompt], atol=1e-5, rtol=1e-5)
    rest = stepped(backbone, h, c, start=prompt, cache=cache)
    torch.testing.assert_close(rest, full[:, prompt:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", BACKBONES)
def test_bidirectional_backbone_refuses_to_step(name):
    backbone = make_backbone(name, bidirectional=True)
    h, c = inputs()
    with pytest.raises(ValueError, match=r"step\(\) needs a causal backbone \(bidirectional=False\)"):
        backbone.step(h[:, 0], c, [], 0)
    with pytest.raises(ValueError, match="needs a causal backbone"):
        backbone.allocate_cache(BATCH, LENGTH)
    with pytest.raises(ValueError, match="needs a causal backbone"):
        backbone.prefill(h, c, [])


def test_transformer_cache_carries_the_past_only():
    backbone = make_backbone("transformer")
    perturb(backbone)
    h, c = inputs()
    base = stepped(backbone, h, c)

    h_first = h.clone()
    h_first[:, 0] += 1.0
    changed_first = stepped(backbone, h_first, c)
    assert (changed_first[:, 5] - base[:, 5]).abs().max() > 1e-3  # position 5 sees token 0 via the cache

    h_later = h.clone()
    h_later[:, 10:] += 1.0
    changed_later = stepped(backbone, h_later, c)
    torch.testing.assert_close(changed_later[:, :10], base[:, :10], atol=0, rtol=0)  # not the future
    assert (changed_later[:, 10:] - base[:, 10:]).abs().max() > 1e-3


def test_transformer_cache_is_preallocated_and_bounded():
    backbone = make_backbone("transformer")
    cache = backbone.allocate_cache(BATCH, 8)
    assert len(cache) == 2
    for k, v in cache:
        assert k.shape == v.shape == (BATCH, 2, 8, D_MODEL // 2)
    h, c = inputs(length=1)
    with pytest.raises(ValueError, match="outside the cache"):
        backbone.step(h[:, 0], c, cache, 8)


@pytest.mark.parametrize("kind", ["film", "additive"])
def test_modulation_accepts_one_token(kind):
    mod = Modulation(D_MODEL, COND_DIM, kind)
    torch.nn.init.normal_(mod.proj.weight)
    h, c = inputs(length=3)
    torch.testing.assert_close(mod(h[:, 1], c), mod(h, c)[:, 1], atol=0, rtol=0)
