"""The masked, hybrid and ar families: processes, objectives, samplers in the loop, cached decoding."""

from __future__ import annotations

import math

import pytest
import torch

from dimba import DIMBA
from dimba.config import DiffusionConfig
from dimba.diffusion.masked import MaskSchedule, mask_tokens, subs_log_probs
from dimba.diffusion.schedules import NoiseSchedule
from dimba.generation import sample_from_model
from dimba.families import compute_losses, get_family
from dimba.families.masked import compute_masked_losses
from dimba.samplers.hybrid import HybridSampler
from dimba.samplers.state import ModelOutput, SamplerState

SMALL = dict(d_model=32, num_denoiser_layers=2, d_state=8, headdim=16, chunk_size=8, num_heads=2, context_length=24)
V = 40


def model(family: str, backbone: str = "mamba2", seed: int = 0, **kw) -> DIMBA:
    torch.manual_seed(seed)
    m = DIMBA(V, family=family, backbone=backbone, **{**SMALL, **kw})
    with torch.no_grad():  # zero-initialised modulations would hide the conditioning: give them weights
        for name, p in m.named_parameters():
            if "mod" in name:
                p.normal_(0, 0.05)
    return m.eval()


@pytest.mark.parametrize("kind", ["loglinear", "cosine"])
def test_mask_schedule_weight_is_the_elbo_weight(kind):
    sched = MaskSchedule(kind)
    t = torch.linspace(0.05, 0.95, 19, dtype=torch.float64, requires_grad=True)
    alpha = sched.alpha(t)
    (d_alpha,) = torch.autograd.grad(alpha.sum(), t)
    assert torch.allclose(sched.weight(t.detach()), -d_alpha / (1 - alpha.detach()))
    assert float(sched.alpha(torch.tensor(0.0))) == 1.0 and abs(float(sched.alpha(torch.tensor(1.0)))) < 1e-7


def test_mask_tokens_rate_and_prompt():
    ids = torch.randint(3, V, (400, 64))
    alpha = torch.linspace(0.0, 1.0, 400)
    keep = torch.zeros_like(ids, dtype=torch.bool)
    keep[:, :5] = True
    x_t, masked = mask_tokens(ids, alpha, 2, keep=keep, generator=torch.Generator().manual_seed(0))
    assert not masked[:, :5].any() and torch.equal(x_t[~masked], ids[~masked]) and (x_t[masked] == 2).all()
    rate = masked[:, 5:].float().mean(1)  # (400,)
    assert torch.allclose(rate.view(8, 50).mean(1), 1 - alpha.view(8, 50).mean(1), atol=0.03)


def test_subs_never_predicts_mask_and_carries_clean_tokens():
    logits = torch.randn(2, 6, V)
    logits[..., 2] = 50.0  # the model loves [MASK]: SUBS must ignore it
    x_t = torch.tensor([[5, 2, 7, 2, 2, 9], [2, 2, 2, 2, 2, 2]])
    logp = subs_log_probs(logits, x_t, 2)
    assert torch.isneginf(logp[..., 2]).all()
    assert torch.allclose(logp.exp().sum(-1), torch.ones(2, 6))
    clean = x_t != 2
    assert (logp[clean].argmax(-1) == x_t[clean]).all() and torch.all(logp[clean].max(-1).values == 0)


class _Uniform(torch.nn.Module):
    """A masked 'model' with constant logits: its NELBO per token is exactly log(V - 1)."""

    family, mask_id = get_family("masked"), 2

    def __init__(self, kind):
        super().__init__()
        self.mask_schedule = MaskSchedule(kind)

    def token_logits(self, x, prompt_mask=None, drop_cond=False):
        return torch.zeros(x.shape + (V,))


@pytest.mark.parametrize("kind", ["loglinear", "cosine"])
def test_masked_loss_is_the_nelbo(kind):
    """sum_masked w(t) * log(V-1) has expectation log(V-1) * int_0^1 -alpha'(t) dt = log(V-1)."""
    ids = torch.randint(3, V, (512, 32))
    gen = torch.Generator().manual_seed(0)
    losses = [float(compute_masked_losses(_Uniform(kind), ids, generator=gen)[0]) for _ in range(20)]
    assert sum(losses) / len(losses) == pytest.approx(math.log(V - 1), rel=0.02)


@pytest.mark.parametrize("family", ["masked", "ar", "hybrid"])
def test_each_family_learns_a_pattern(family):
    """A loss that falls: 40 AdamW steps on a periodic sequence cut each objective well below its start."""
    torch.manual_seed(0)
    m = DIMBA(V, family=family, **SMALL).train()
    ids = (torch.arange(24)[None] * 3 + torch.arange(8)[:, None]) % (V - 3) + 3  # (8, 24)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    dc, gen = DiffusionConfig(), torch.Generator().manual_seed(0)
    first = None
    for _ in range(40):
        loss, _ = compute_losses(m, ids, dc, generator=gen)
        first = float(loss.detach()) if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        val = [float(compute_losses(m, ids, dc, generator=torch.Generator().manual_seed(k))[0]) for k in range(4)]
    assert sum(val) / 4 < 0.6 * first


def test_masked_prompt_stays_clean_and_unscored():
    m = model("masked")
    ids = torch.randint(3, V, (4, 24))
    pm = torch.arange(24)[None].expand(4, -1) < 24  # everything is prompt: nothing to score
    loss, _ = compute_masked_losses(m, ids, prompt_mask=pm)
    assert float(loss.detach()) == 0.0


@pytest.mark.parametrize("backbone", ["mamba2", "transformer"])
def test_masked_model_is_bidirectional_and_ar_is_causal(backbone):
    ids = torch.randint(3, V, (1, 24))
    changed = ids.clone()
    changed[0, 20] = (ids[0, 20] + 1 - 3) % (V - 3) + 3
    masked, ar = model("masked", backbone), model("ar", backbone)
    with torch.no_grad():
        assert not torch.allclose(masked.token_logits(ids)[0, 5], masked.token_logits(changed)[0, 5])
        a, b = ar.token_logits(ids)[0], ar.token_logits(changed)[0]
    assert torch.equal(a[:20], b[:20]) and not torch.allclose(a[20], b[20])


@pytest.mark.parametrize("backbone", ["mamba2", "transformer"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_ar_cached_generation_equals_uncached(backbone, temperature):
    m = model("ar", backbone).double()
    kw = dict(seq_len=15, num_samples=3, temperature=temperature, top_k=20)
    for prompt in ([], [4, 5, 6, 7]):
        fast = sample_from_model(m, prompt, generator=torch.Generator().manual_seed(1), **kw)
        slow = sample_from_model(m, prompt, generator=torch.Generator().manual_seed(1), use_cache=False, **kw)
        assert fast.shape == (3, len(prompt) + 15) and torch.equal(fast, slow)


def test_ar_stops_rows_at_eos():
    m = model("ar")
    with torch.no_grad():
        m.head.weight[1] += 0.3 * m.head.weight.std() * torch.randn(m.head.weight.shape[1])  # make EOS likely
    ids = sample_from_model(m, [5], seq_len=20, num_samples=6, eos_id=1, temperature=3.0,
                            generator=torch.Generator().manual_seed(0))[:, 1:]
    for row in ids.tolist():
        if 1 in row:
            k = row.index(1)
            assert all(tok == 1 for tok in row[k:])
    assert any(1 in row for row in ids.tolist())


@pytest.mark.parametrize("remasking,block", [("low_confidence", None), ("random", 8), ("ancestral", 8)])
def test_masked_generation_keeps_prompt_and_fills_everything(remasking, block):
    m = model("masked")
    out = sample_from_model(m, [4, 5, 6], seq_len=16, num_steps=8, num_samples=2, remasking=remasking,
                            block_length=block, guidance_scale=1.5, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 19) and (out[:, :3] == torch.tensor([4, 5, 6])).all() and not (out == 2).any()


def test_masked_cache_skips_model_calls_but_not_results():
    m = model("masked")
    calls = {"n": 0}
    inner = m.token_logits

    def counted(*a, **k):
        calls["n"] += 1
        return inner(*a, **k)

    m.token_logits = counted
    kw = dict(seq_len=8, num_steps=64, remasking="ancestral", num_samples=1)
    a = sample_from_model(m, [4], generator=torch.Generator().manual_seed(0), **kw)
    cached_calls, calls["n"] = calls["n"], 0
    b = sample_from_model(m, [4], generator=torch.Generator().manual_seed(0), use_cache=False, **kw)
    assert torch.equal(a, b) and cached_calls <= 8 < calls["n"]


def test_hybrid_ignores_absorbed_latents_and_never_absorbs_the_prompt():
    m = model("hybrid")
    ids = torch.randint(3, V, (2, 24))
    pm = torch.arange(24)[None].expand(2, -1) < 4
    masked = torch.rand(2, 24, generator=torch.Generator().manual_seed(0)) < 0.5
    _, _, info = m(ids, torch.tensor([0.5, 0.5]), prompt_mask=pm, masked=masked)
    assert not info["masked"][:, :4].any() and torch.equal(info["masked"][:, 4:], masked[:, 4:])
    cond = m.condition(ids, torch.tensor([0.5, 0.5]), pm)
    z = info["z_t"]
    other = z + 5 * info["masked"][..., None]  # change only the absorbed positions' latents
    with torch.no_grad():
        a = m.denoise(z, torch.tensor([0.5, 0.5]), cond, pm, masked=info["masked"])
        b = m.denoise(other, torch.tensor([0.5, 0.5]), cond, pm, masked=info["masked"])
    assert torch.equal(a, b)


def test_hybrid_sampler_reveals_by_the_absorbing_posterior():
    n, book = 4000, torch.arange(V, dtype=torch.float32)[:, None].expand(V, 3)  # token v has the latent (v, v, v)
    sampler = HybridSampler(NoiseSchedule(), MaskSchedule("loglinear"), book)
    state = SamplerState(torch.randn(n, 8, 3), masked=torch.ones(n, 8, dtype=torch.bool))
    sampler.set_timesteps(4, state)
    logits = torch.full((n, 8, V), -1e4)
    logits[..., 7] = 0.0  # the model is sure of token 7
    gen = torch.Generator().manual_seed(0)
    fractions = []
    for i in range(4):
        before = state.masked
        state = sampler.step(state, ModelOutput(x0=torch.zeros(n, 8, 3), logits=logits), i, gen)
        fractions.append(float(1 - state.masked.float().mean() / before.float().mean()))
    # log-linear: from t to s a masked token is revealed with probability (t - s) / t = 1/4, 1/3, 1/2, 1
    assert fractions == pytest.approx([1 / 4, 1 / 3, 1 / 2, 1.0], abs=0.02) and not state.masked.any()
    # the last step reveals at s = 0, where q(z_0 | x_0 = 7) is exactly the drawn token's latent
    assert torch.equal(state.x[before], torch.full((int(before.sum()), 3), 7.0))


def test_hybrid_generation_runs_end_to_end():
    m = model("hybrid")
    out = sample_from_model(m, [4, 5], seq_len=10, num_steps=6, num_samples=2, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 12) and (out[:, :2] == torch.tensor([4, 5])).all() and not (out == 2).any()


@pytest.mark.parametrize("family", ["continuous", "hybrid"])
def test_latent_sampling_never_draws_mask(family):
    """[MASK] is never a clean token: a head that loves it still never puts it in a sample (the final
    draw, the hybrid sampler's revealed tokens), nor at temperature 0 (the argmax)."""
    m = model(family)
    decode = m.decode
    m.decode = lambda z: decode(z).index_fill(-1, torch.tensor([2]), 50.0)  # (B, L, V)
    for temperature in (1.0, 0.0):
        out = sample_from_model(m, [4, 5], seq_len=10, num_steps=4, num_samples=2, temperature=temperature,
                                generator=torch.Generator().manual_seed(0))
        assert out.shape == (2, 12) and not (out == 2).any()


def test_forward_refuses_token_families():
    with pytest.raises(ValueError, match="token_logits"):
        model("masked")(torch.randint(3, V, (1, 24)), torch.tensor([0.5]))


def test_token_nll_is_the_cross_entropy_and_ignores_what_it_is_told():
    from dimba.families.base import token_nll

    logits, ids = torch.randn(3, 7, 11), torch.randint(0, 11, (3, 7))
    ids[1, 2] = -100
    nll = token_nll(logits, ids)  # (B, L)
    logp = logits.log_softmax(-1)
    for b, l in ((0, 0), (2, 6), (1, 3)):
        assert math.isclose(float(nll[b, l]), -float(logp[b, l, ids[b, l]]), rel_tol=1e-6)
    assert float(nll[1, 2]) == 0.0


def test_ar_loss_is_the_mean_next_token_cross_entropy():
    from dimba.families.ar import compute_ar_losses

    torch.manual_seed(0)
    m = DIMBA(32, family="ar", d_model=32, num_denoiser_layers=1, d_state=8, headdim=16, chunk_size=8)
    ids = torch.randint(3, 32, (2, 12))
    loss, _ = compute_ar_losses(m, ids)
    logp = m.token_logits(ids).log_softmax(-1)[:, :-1]  # (B, L-1, V)
    expected = -logp.gather(-1, ids[:, 1:, None]).mean()
    assert torch.allclose(loss, expected, atol=1e-6)
