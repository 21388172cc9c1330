import math

import pytest
import torch

from dimba.samplers.masked import MaskedSampler
from dimba.samplers.state import ModelOutput, SamplerState

MASK = 5  # vocabulary: tokens 0..4 plus [MASK] = 5
V = 6
PROBS = torch.tensor([0.5, 0.25, 0.15, 0.1, 0.0])


def _fixed_logits(x):
    """The fixed distribution PROBS at every position, with a huge [MASK] logit that must be ignored."""
    logits = torch.cat([PROBS.log(), torch.tensor([50.0])])  # (V,)
    return logits.expand(*x.shape, V).clone()  # (N, L, V)


def _random_logits(seed):
    gen = torch.Generator().manual_seed(seed)
    return lambda x: torch.randn(*x.shape, V, generator=gen)


def _step(sampler, logits, x, i, gen, gen_start=0):
    """One step on canvas x (N, L): the next canvas."""
    return sampler.step(SamplerState(x, gen_start), ModelOutput(logits=logits), i, gen).x


def _plan(sampler, steps, length, gen_start=0):
    sampler.set_timesteps(steps, SamplerState(torch.empty(1, length, dtype=torch.long), gen_start))


def _run(sampler, x, logits_fn, steps, gen_start=0, seed=0):
    """Run the loop; returns the canvases before the first and after every step."""
    sampler.set_timesteps(steps, SamplerState(x, gen_start))
    gen = torch.Generator().manual_seed(seed)
    hist = [x]
    for i in range(sampler.num_steps):
        hist.append(_step(sampler, logits_fn(hist[-1]), hist[-1], i, gen, gen_start))
    return hist


def _masked(rows, length):
    return torch.full((rows, length), MASK)


@pytest.mark.parametrize("remasking", ["ancestral", "random"])
def test_marginals_reproduce_the_categorical_distribution(remasking):
    x = _run(MaskedSampler(MASK, remasking), _masked(2000, 10), _fixed_logits, 4)[-1]
    n = x.numel()
    freq = torch.bincount(x.flatten(), minlength=V).double() / n
    assert freq[4] == 0 and freq[MASK] == 0
    se = (PROBS.double() * (1 - PROBS.double()) / n).sqrt()
    assert ((freq[:5] - PROBS.double()).abs() <= 4 * se + 1e-12).all(), freq


@pytest.mark.parametrize("remasking", ["low_confidence", "random"])
def test_llada_unmasks_exactly_the_planned_counts(remasking):
    x = _masked(6, 12)
    x[:, :2] = 0  # prompt
    for r in range(6):
        x[r, 2 : 2 + r % 3] = 1  # rows with 10, 9 and 8 positions left to generate
    hist = _run(MaskedSampler(MASK, remasking), x, _random_logits(1), 4, gen_start=2)
    counts = torch.stack([(a == MASK).sum(-1) - (b == MASK).sum(-1) for a, b in zip(hist, hist[1:])], 1)  # (N, 4)
    expected = {10: [3, 3, 2, 2], 9: [3, 2, 2, 2], 8: [2, 2, 2, 2]}
    for r in range(6):
        assert counts[r].tolist() == expected[10 - r % 3]
    assert not (hist[-1] == MASK).any()


@pytest.mark.parametrize("temperature", [1.0, 0.0])
def test_low_confidence_commits_the_most_confident_positions_first(temperature):
    logits = torch.zeros(4, 6, V)
    logits[:, [1, 4], 2] = 30.0  # near one-hot: confidence ~ 1
    logits[:, [0, 5], 3] = 12.0  # confidence ~ 1 - 2e-5
    logits[..., MASK] = 100.0  # ignored
    hist = _run(MaskedSampler(MASK, "low_confidence", temperature=temperature), _masked(4, 6), lambda x: logits, 3)
    assert ((hist[1] != MASK).nonzero()[:, 1].view(4, 2) == torch.tensor([1, 4])).all()
    assert (hist[1][:, [1, 4]] == 2).all()
    assert ((hist[2] != MASK).sum(-1) == 4).all() and (hist[2][:, [0, 5]] == 3).all()


@pytest.mark.parametrize("remasking", ["ancestral", "low_confidence", "random"])
def test_blocks_are_filled_left_to_right(remasking):
    x = _masked(5, 12)
    x[:, :2] = 0
    sampler = MaskedSampler(MASK, remasking, block_length=3)  # blocks [2,5) [5,8) [8,11) [11,12)
    hist = _run(sampler, x, _random_logits(2), 6, gen_start=2)  # steps per block 2, 2, 1, 1
    assert sampler.num_steps == 6
    blocks = [(2, 5), (5, 8), (8, 11), (11, 12)]
    block_of_step = [0, 0, 1, 1, 2, 3]
    for i, (prev, cur) in enumerate(zip(hist, hist[1:])):
        b = block_of_step[i]
        changed = (prev != cur).any(0).nonzero().flatten()
        assert all(blocks[b][0] <= p < blocks[b][1] for p in changed.tolist())
        assert not (cur[:, 2 : blocks[b][0]] == MASK).any()  # earlier blocks complete
        assert (cur[:, blocks[b][1] :] == MASK).all()  # later blocks untouched
        if i + 1 == len(block_of_step) or block_of_step[i + 1] != b:
            assert not (cur[:, blocks[b][0] : blocks[b][1]] == MASK).any()  # block done at its last step
    with pytest.raises(ValueError, match="blocks"):
        _plan(sampler, 3, 12, 2)


@pytest.mark.parametrize("remasking", ["ancestral", "low_confidence", "random"])
def test_prompt_and_committed_tokens_never_change_and_mask_never_sampled(remasking):
    x = _masked(8, 10)
    x[:, :3] = torch.tensor([1, MASK, 2])  # prompt, even a [MASK] in it, is left alone
    x[:, 5] = 4
    x[:, 8] = 0

    def logits_fn(c):
        lg = torch.randn(*c.shape, V, generator=torch.Generator().manual_seed(3))
        lg[..., MASK] = 40.0
        lg[..., 3] = 20.0  # the model would rather write 3 everywhere
        return lg

    before_logits = logits_fn(x)
    x_copy = x.clone()
    sampler = MaskedSampler(MASK, remasking, eos_id=3)
    _plan(sampler, 3, 10, gen_start=3)
    out = _step(sampler, before_logits, x, 0, torch.Generator().manual_seed(0), gen_start=3)
    assert torch.equal(x, x_copy) and torch.equal(before_logits, logits_fn(x))  # inputs not modified
    hist = _run(sampler, x, logits_fn, 3, gen_start=3)
    for c in [out, *hist]:
        assert (c[:, :3] == torch.tensor([1, MASK, 2])).all()
        assert (c[:, 5] == 4).all() and (c[:, 8] == 0).all()
    assert not (hist[-1][:, 3:] == MASK).any()  # [MASK] is never committed as a token


def test_eos_fills_the_rest_of_the_row():
    eos = 3
    x = _masked(3, 10)
    x[:, 0] = 0
    x[1, 8] = 1  # a committed token after the eos stays
    logits = torch.zeros(3, 10, V)
    logits[..., eos] = -10.0
    logits[0, 4, eos] = logits[1, 2, eos] = 30.0  # rows 0 and 1 commit eos first; row 2 never
    sampler = MaskedSampler(MASK, "low_confidence", eos_id=eos)
    hist = _run(sampler, x, lambda c: logits, 5, gen_start=1)
    first = hist[1]
    assert first[0, 4] == eos and (first[0, 5:] == eos).all()
    assert first[1, 2] == eos and first[1, 3:].tolist() == [eos] * 5 + [1, eos]
    assert not (first[0, 4:] == MASK).any() and not (first[1, 2:] == MASK).any()  # only positions before eos remain
    assert (first[2] == MASK).sum() == 9 - 2 and not (first[2] == eos).any()
    for c in hist[1:]:
        assert (c[0, 4:] == eos).all() and (c[1, 2:8] == eos).all()
    assert not (hist[-1] == MASK).any()
    assert not (hist[-1][2] == eos).any()


def test_ancestral_unmasks_the_expected_fraction_per_step():
    k = 4
    hist = _run(MaskedSampler(MASK, "ancestral"), _masked(4000, 8), _random_logits(4), k)
    for j, (prev, cur) in enumerate(zip(hist, hist[1:])):
        left = (prev == MASK).sum().item()
        frac = 1 - (cur == MASK).sum().item() / left
        t, s = 1 - j / k, 1 - (j + 1) / k
        p = (t - s) / t
        assert abs(frac - p) <= 4 * math.sqrt(p * (1 - p) / left) + 1e-12, (j, frac, p)
    assert not (hist[-1] == MASK).any()


@pytest.mark.parametrize("remasking", ["ancestral", "low_confidence", "random"])
def test_reproducible_and_greedy_at_temperature_zero(remasking):
    logits = torch.randn(16, 12, V, generator=torch.Generator().manual_seed(5))
    logits[:, ::2, MASK] = 100.0
    runs = [_run(MaskedSampler(MASK, remasking, block_length=5, top_k=3), _masked(16, 12), lambda c: logits, 6, seed=s)[-1]
            for s in (7, 7, 8)]
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])
    greedy = _run(MaskedSampler(MASK, remasking, temperature=0.0), _masked(16, 12), lambda c: logits, 3)[-1]
    assert torch.equal(greedy, logits[..., :MASK].argmax(-1))


def test_invalid_arguments():
    with pytest.raises(ValueError, match="remasking"):
        MaskedSampler(MASK, "greedy")
    with pytest.raises(ValueError, match="block_length"):
        MaskedSampler(MASK, block_length=0)
    with pytest.raises(ValueError, match="num_steps"):
        _plan(MaskedSampler(MASK), 0, 10)


def test_state_is_done_when_no_mask_is_left():
    sampler = MaskedSampler(MASK, "low_confidence")
    state = sampler.initial_state(torch.tensor([[0, 1]]), 4)
    assert state.x.tolist() == [[0, 1, MASK, MASK, MASK, MASK]] and state.gen_start == 2 and not state.done
    sampler.set_timesteps(2, state)
    logits = _fixed_logits(state.x)
    gen = torch.Generator().manual_seed(0)
    state = sampler.step(state, ModelOutput(logits=logits), 0, gen)
    assert not state.done and (state.x == MASK).sum() == 2
    state = sampler.step(state, ModelOutput(logits=logits), 1, gen)
    assert state.done and not (state.x == MASK).any()
