"""The committing continuous sampler: planned counts, confidence order, committed tokens that never change, and
end to end through a model."""

from __future__ import annotations

import torch

from dimba import DIMBA
from dimba.config import SampleConfig
from dimba.diffusion.schedules import NoiseSchedule
from dimba.generation import generate
from dimba.samplers.commit import CommitSampler
from dimba.samplers.ddim import DDIMSampler
from dimba.samplers.state import ModelOutput, SamplerState

V, D = 6, 3


def _state(n: int, length: int, prompt: int) -> SamplerState:
    clean = torch.zeros(n, length, dtype=torch.bool)
    clean[:, :prompt] = True
    tokens = torch.zeros(n, length, dtype=torch.long)
    tokens[:, :prompt] = 5
    return SamplerState(torch.randn(n, length, D, generator=torch.Generator().manual_seed(0)), prompt,
                        clean=clean, tokens=tokens)


def test_commits_the_planned_share_most_confident_first_and_never_changes_a_commitment():
    book = torch.arange(V, dtype=torch.float32)[:, None].expand(V, D)  # token v has the latent (v, v, v)
    sampler = CommitSampler(DDIMSampler(NoiseSchedule()), book, "confidence", temperature=0.0)
    state = _state(2, 12, 2)  # 10 free positions, 4 steps: 3, 3, 2, 2 commitments
    sampler.set_timesteps(4, state)
    logits = torch.zeros(2, 12, V)
    confidence = torch.linspace(1, 10, 10)  # position 11 is the surest, then 10, ...
    logits[:, 2:, 3] = confidence
    history = [state]
    for i in range(4):
        state = sampler.step(state, ModelOutput(x0=torch.zeros(2, 12, D), logits=logits), i)
        history.append(state)
    counts = [int((b.clean & ~a.clean)[0].sum()) for a, b in zip(history, history[1:])]
    assert counts == [3, 3, 2, 2] and history[-1].done and not history[-2].done
    first = (history[1].clean & ~history[0].clean)[0].nonzero().flatten().tolist()
    assert first == [9, 10, 11]  # the most confident first
    for a, b in zip(history[1:], history[2:]):  # a committed latent and token stay as they are
        assert torch.equal(b.x[a.clean], a.x[a.clean]) and torch.equal(b.tokens[a.clean], a.tokens[a.clean])
    final = history[-1]
    assert (final.tokens[:, 2:] == 3).all() and (final.tokens[:, :2] == 5).all()
    assert torch.equal(final.x[:, 2:], book[3].expand(2, 10, D)) and torch.equal(final.x[:, :2], history[0].x[:, :2])


def test_a_model_generates_with_every_position_committed_from_its_own_draws():
    torch.manual_seed(0)
    m = DIMBA(40, d_model=32, num_denoiser_layers=1, d_state=8, headdim=16, chunk_size=8, prediction_type="logits",
              logit_skip=True).eval()
    settings = SampleConfig(num_steps=5, commit="random")
    a = generate(m, [4, 5], 10, settings, 3, torch.Generator().manual_seed(1))
    b = generate(m, [4, 5], 10, settings, 3, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.shape == (3, 12) and (a[:, :2] == torch.tensor([4, 5])).all()
    plain = generate(m, [4, 5], 10, SampleConfig(num_steps=5), 3, torch.Generator().manual_seed(1))
    assert not torch.equal(a, plain)
