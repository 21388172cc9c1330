import math

import torch

from dimba.diffusion.gaussian import q_sample
from dimba.diffusion.schedules import NoiseSchedule
from dimba.samplers.categorical import filter_logits, sample_tokens
from dimba.samplers.ddim import DDIMSampler
from dimba.samplers.state import ModelOutput, SamplerState


def _run(sampler, x0_fn, z, steps, gen=None, gen_start=0):
    state = SamplerState(z, gen_start)
    sampler.set_timesteps(steps, state)
    for i, t in enumerate(sampler.timesteps):
        state = sampler.step(state, ModelOutput(x0=x0_fn(state.x, t)), i, gen)
    return state.x


def test_ddim_with_oracle_x0_recovers_data_exactly():
    torch.manual_seed(0)
    x0 = torch.randn(2, 7, 4)
    for eta in (0.0, 1.0):
        for steps in (1, 3, 50):
            s = DDIMSampler(NoiseSchedule("cosine"), eta=eta)
            out = _run(s, lambda z, t: x0, torch.randn_like(x0), steps, torch.Generator().manual_seed(1))
            assert torch.allclose(out, x0, atol=1e-5)


def test_ddim_with_bayes_denoiser_reproduces_a_two_point_distribution():
    """Data: each coordinate is +1 w.p. 0.3 and -1 w.p. 0.7. The exact posterior mean
    E[x0 | z_t] is the oracle; the sampler must reproduce the 0.3 / 0.7 marginals."""
    sched = NoiseSchedule("cosine")
    p_plus = 0.3

    def posterior_mean(z, t):
        ab = sched.alpha_bar(t).double()
        a, var = ab.sqrt(), (1 - ab).clamp_min(1e-12)
        logit = math.log(p_plus / (1 - p_plus)) + 2 * a * z.double() / var  # log N(z; a,var) - log N(z; -a,var)
        return torch.tanh(logit / 2).float()  # E[x0] = P(+) - P(-)

    gen = torch.Generator().manual_seed(0)
    z = torch.randn(20000, 1, 1, generator=gen)
    for eta in (0.0, 1.0):
        out = _run(DDIMSampler(sched, eta=eta), posterior_mean, z.clone(), 200, gen)
        frac = (out > 0).float().mean().item()
        assert abs(frac - p_plus) < 0.02, (eta, frac)
        assert (out.abs() - 1).abs().max() < 0.05


def test_ddim_never_moves_the_prompt():
    x0, z = torch.randn(2, 7, 4), torch.randn(2, 7, 4, generator=torch.Generator().manual_seed(2))
    out = _run(DDIMSampler(NoiseSchedule("cosine"), eta=1.0), lambda z, t: x0, z.clone(), 5,
               torch.Generator().manual_seed(1), gen_start=3)
    assert torch.equal(out[:, :3], z[:, :3]) and torch.allclose(out[:, 3:], x0[:, 3:], atol=1e-5)


def test_q_sample_matches_schedule_variance():
    sched = NoiseSchedule("cosine")
    z0 = torch.ones(1, 200000, 1)
    ab = sched.alpha_bar(torch.tensor([0.5]))
    zt = q_sample(z0, ab, torch.randn_like(z0))
    assert abs(zt.mean().item() - ab.sqrt().item()) < 0.01 and abs(zt.var().item() - (1 - ab).item()) < 0.01


def test_categorical_sampling_reproduces_distribution_in_float64():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().expand(200000, 4)
    ids = sample_tokens(logits, generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(ids, minlength=4).double() / ids.numel()
    assert torch.allclose(freq, probs.double(), atol=0.005)


def test_top_k_top_p_and_greedy():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    kept = torch.isfinite(filter_logits(logits, top_k=2))
    assert kept.tolist() == [[True, True, False, False, False]]
    p = logits.softmax(-1)[0]
    kept = torch.isfinite(filter_logits(logits, top_p=float(p[0] + 0.01)))
    assert kept.tolist() == [[True, True, False, False, False]]
    kept = torch.isfinite(filter_logits(logits, top_p=float(p[0] - 0.01)))
    assert kept.tolist() == [[True, False, False, False, False]]
    assert sample_tokens(logits, temperature=0).item() == 0
    many = sample_tokens(logits.expand(5000, 5), top_k=2, generator=torch.Generator().manual_seed(0))
    assert set(many.tolist()) == {0, 1}
