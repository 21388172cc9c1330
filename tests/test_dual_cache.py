"""DualCache (Fast-dLLM) for full-sequence models: exact while the block is unchanged, for every mixer, and used by
the masked sampler with fewer full-canvas calls."""

import pytest
import torch

from dimba import DIMBA
from dimba.config import SampleConfig
from dimba.errors import UsageError
from dimba.generation import generate, run

MIXERS = [("mamba2", "shared", False), ("mamba2", "hydra", False), ("mamba2", "separate", False),
          ("mamba2", "separate", True), ("transformer", "shared", False)]


def full_model(backbone="mamba2", bimamba="shared", tie_reverse=False, d_conv=4):
    torch.manual_seed(0)
    model = DIMBA(vocab_size=40, family="masked", d_model=16, num_denoiser_layers=2, backbone=backbone, d_state=8,
                  headdim=8, chunk_size=4, num_heads=2, context_length=24, bimamba=bimamba, tie_reverse=tie_reverse,
                  d_conv=d_conv)
    for p in model.parameters():  # a sharper, non-trivial model
        p.data.add_(0.3 * torch.randn_like(p))
    return model.double().eval()


def canvas(n=2, length=24, masked_from=9):
    ids = torch.randint(3, 40, (n, length), generator=torch.Generator().manual_seed(1))
    ids[:, masked_from:] = 2  # [MASK]
    return ids


@pytest.mark.parametrize("backbone,bimamba,tie", MIXERS)
@pytest.mark.parametrize("start,end", [(0, 5), (6, 11), (8, 16), (19, 24), (0, 24)])
def test_dual_step_on_the_unchanged_block_gives_the_full_logits(backbone, bimamba, tie, start, end):
    model = full_model(backbone, bimamba, tie)
    ids = canvas()
    cond = model.condition(ids, torch.zeros(()), None)
    with torch.no_grad():
        logits, cache = model.dual_forward(ids, cond, start, end)
        full = model.token_logits(ids)
        block = model.dual_step(ids[:, start:end], cond, cache, start)
    torch.testing.assert_close(logits, full, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(block, full[:, start:end], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("backbone,bimamba,tie", MIXERS)
def test_dual_step_reads_the_changed_block_and_the_cached_surroundings(backbone, bimamba, tie):
    """A changed block: its logits move (it is read), but are those of the model whose outside hidden states are
    the cached ones: with the outside changed too, dual_step does not see it."""
    model = full_model(backbone, bimamba, tie)
    ids = canvas()
    cond = model.condition(ids, torch.zeros(()), None)
    start, end = 8, 16
    changed = ids.clone()
    changed[:, start:end] = torch.randint(3, 40, (2, end - start), generator=torch.Generator().manual_seed(2))
    outside = ids.clone()
    outside[:, 17:] = 7  # the suffix changed after the cache was made
    with torch.no_grad():
        _, cache = model.dual_forward(ids, cond, start, end)
        moved = model.dual_step(changed[:, start:end], cond, cache, start)
        same = model.dual_step(ids[:, start:end], cond, cache, start)
        exact = model.token_logits(changed)[:, start:end]
        _, cache_outside = model.dual_forward(outside, cond, start, end)
        sees_suffix = model.dual_step(ids[:, start:end], cond, cache_outside, start)
    assert (moved - same).abs().max() > 1e-3
    assert (moved - exact).abs().max() < (same - exact).abs().max()  # nearer the exact logits than before
    assert (sees_suffix - same).abs().max() > 1e-6  # the suffix reaches the block through the cache


def test_the_conv_reads_the_cached_inputs_on_both_sides():
    """A wide centred conv (width 6: 3 steps back, 2 ahead) with a block shorter than its reach."""
    model = full_model("mamba2", "shared", d_conv=6)
    ids = canvas()
    cond = model.condition(ids, torch.zeros(()), None)
    with torch.no_grad():
        _, cache = model.dual_forward(ids, cond, 10, 12)
        block = model.dual_step(ids[:, 10:12], cond, cache, 10)
    torch.testing.assert_close(block, model.token_logits(ids)[:, 10:12], rtol=1e-9, atol=1e-9)


class Counting:
    def __init__(self, model):
        self.model, self.calls = model, {"dual_forward": 0, "dual_step": 0, "token_logits": 0}

    def __getattr__(self, name):
        attr = getattr(self.model, name)
        if name in self.calls:
            def counted(*a, **kw):
                self.calls[name] += 1
                return attr(*a, **kw)
            return counted
        return attr


@pytest.mark.parametrize("backbone,bimamba", [("mamba2", "shared"), ("transformer", "shared")])
def test_generation_reads_the_canvas_once_per_block(backbone, bimamba):
    model = Counting(full_model(backbone, bimamba))
    settings = SampleConfig(num_steps=16, block_length=4, dual_cache=True)
    gen = model.family.generation(model, torch.tensor([[5, 6, 7]]), 16, settings, None, None, True)
    ids = run(gen, torch.Generator().manual_seed(0))
    assert ids.shape == (1, 19) and (ids != 2).all() and torch.equal(ids[0, :3], torch.tensor([5, 6, 7]))
    assert model.calls == {"dual_forward": 4, "dual_step": 12, "token_logits": 0}


def test_one_step_per_block_gives_the_uncached_tokens():
    """With one step per block every call is a block's first: the DualCache then changes nothing."""
    model = full_model()
    prompt = torch.tensor([5, 6, 7])
    runs = [generate(model, prompt, 16, SampleConfig(num_steps=4, block_length=4, dual_cache=dual), num_samples=3,
                     generator=torch.Generator().manual_seed(3)) for dual in (True, False)]
    assert torch.equal(runs[0], runs[1])


def test_guidance_with_the_dual_cache_is_refused():
    model = full_model()
    settings = SampleConfig(num_steps=8, block_length=4, dual_cache=True, guidance_scale=2.0)
    with pytest.raises(UsageError, match="--dual-cache"):
        model.family.generation(model, torch.tensor([[5, 6]]), 8, settings, None, None, True)


def test_the_dual_cache_on_a_block_diffusion_model_is_refused():
    model = DIMBA(vocab_size=40, family="masked", d_model=16, num_denoiser_layers=1, d_state=8, headdim=8,
                  context_length=16, block_size=4)
    with pytest.raises(UsageError, match="drop --dual-cache"):
        model.family.generation(model, torch.tensor([[5, 6]]), 8, SampleConfig(num_steps=8, dual_cache=True), None,
                                None, True)
