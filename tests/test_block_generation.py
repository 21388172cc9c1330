"""Block-diffusion generation on a cached state, and the parallel unmasking rules of the masked sampler."""

import pytest
import torch

from dimba import DIMBA
from dimba.config import SampleConfig
from dimba.generation import generate, run
from dimba.samplers.masked import MaskedSampler
from dimba.samplers.state import ModelOutput

MASK, V = 2, 12


def block_model(backbone="mamba2", bimamba="shared", block=4):
    torch.manual_seed(0)
    model = DIMBA(vocab_size=40, family="masked", d_model=16, num_denoiser_layers=2, backbone=backbone, d_state=8,
                  headdim=8, chunk_size=4, num_heads=2, context_length=16, block_size=block, bimamba=bimamba)
    for p in model.parameters():  # a sharper, non-trivial model
        p.data.add_(0.3 * torch.randn_like(p))
    return model.double().eval()


class CountingModel:
    """Counts the model calls of a generation (its block_step and block_logits)."""

    def __init__(self, model):
        self.model, self.calls = model, 0

    def __getattr__(self, name):
        attr = getattr(self.model, name)
        if name in ("block_step", "block_logits"):
            def counted(*a, **kw):
                self.calls += 1
                return attr(*a, **kw)
            return counted
        return attr


@pytest.mark.parametrize("backbone,bimamba", [("mamba2", "shared"), ("mamba2", "separate"), ("transformer", "shared")])
@pytest.mark.parametrize("settings", [dict(num_steps=12), dict(num_steps=24, unmask_threshold=0.3)])
def test_cached_generation_gives_the_uncached_tokens(backbone, bimamba, settings):
    model = block_model(backbone, bimamba)
    prompt = torch.tensor([5, 6, 7, 8, 9, 10])  # ends inside a block: the first generated block holds its tail
    cfg = SampleConfig(**settings)
    runs = [generate(model, prompt, 18, cfg, num_samples=3, generator=torch.Generator().manual_seed(4),
                     use_cache=cache) for cache in (True, False)]
    assert runs[0].shape == (3, 24) and torch.equal(runs[0][:, :6], prompt.expand(3, -1))
    assert (runs[0] != MASK).all()
    assert torch.equal(runs[0], runs[1])


def test_generation_runs_past_the_training_context_reading_each_block_once():
    model = block_model()
    counted = CountingModel(model)
    gen = model.family.generation(counted, torch.tensor([[5, 6]]), 38, SampleConfig(num_steps=20), None, None, True)
    ids = run(gen, torch.Generator().manual_seed(0))
    assert ids.shape == (1, 40) and (ids != MASK).all()  # 40 positions, the model was trained on 16
    assert counted.calls == 20 + 9  # one call per step, and each of the 9 finished blocks before the last read once


def test_generation_stops_at_eos():
    model = block_model()
    eos = 1
    with torch.no_grad():  # make EOS the certain prediction everywhere
        model.head.weight.zero_() if not model.config.tie_weights else model.embedding.weight.zero_()
        model.head_norm.weight.zero_()
    bias = torch.zeros(40, dtype=torch.float64)
    bias[eos] = 50.0
    model.head.register_forward_hook(lambda m, i, out: out + bias)
    counted = CountingModel(model)
    gen = model.family.generation(counted, torch.tensor([[5, 6]]), 30, SampleConfig(num_steps=32), None, eos, True)
    ids = run(gen, torch.Generator().manual_seed(0))
    assert (ids[0, 2:] == eos).all()
    assert counted.calls < 4  # the first step commits EOS and fills the rest: no further blocks are denoised


def _logits(conf_rows):
    """Logits (1, L, V) whose sampled token has probability conf at each position (token 3, the rest flat)."""
    rows = []
    for c in conf_rows:
        p = torch.full((V,), (1 - c) / (V - 2), dtype=torch.float64)
        p[MASK], p[3] = 0.0, c
        rows.append(p.clamp_min(1e-30).log())
    return torch.stack(rows)[None]


def _step_counts(sampler, conf, num_steps):
    """The committed count of each step of a sampler on one 6-token canvas with fixed logits."""
    state = sampler.initial_state(torch.zeros(1, 0, dtype=torch.long), len(conf))
    sampler.set_timesteps(num_steps, state)
    counts, i = [], 0
    while not state.done:
        before = int((state.x == MASK).sum())
        state = sampler.step(state, ModelOutput(logits=_logits(conf)), i, torch.Generator().manual_seed(i))
        counts.append(before - int((state.x == MASK).sum()))
        i += 1
    return counts


def test_threshold_commits_every_confident_token_at_once_and_at_least_one():
    conf = [0.99, 0.2, 0.95, 0.3, 0.97, 0.25]
    assert _step_counts(MaskedSampler(MASK, temperature=0.0, threshold=0.9), conf, 6) == [3, 1, 1, 1]
    assert _step_counts(MaskedSampler(MASK, temperature=0.0, threshold=0.1), conf, 6) == [6]
    # a step budget smaller than the rule needs: the last planned step commits what is left
    assert _step_counts(MaskedSampler(MASK, temperature=0.0, threshold=0.9), conf, 2) == [3, 3]


def test_entropy_bound_commits_the_lowest_entropy_tokens_within_the_bound():
    conf = [0.99, 0.2, 0.95, 0.3, 0.97, 0.25]
    assert _step_counts(MaskedSampler(MASK, temperature=0.0, entropy_bound=0.0), conf, 6) == [1] * 6
    assert _step_counts(MaskedSampler(MASK, temperature=0.0, entropy_bound=100.0), conf, 6) == [6]
    # entropies 0.08, 0.20, 0.31 nats (the confident tokens), then 2.2-2.3: a token is committed while the
    # entropies ranked before it sum to at most the bound (0.60 before the first flat one)
    assert _step_counts(MaskedSampler(MASK, temperature=0.0, entropy_bound=0.5), conf, 6)[0] == 3
    assert _step_counts(MaskedSampler(MASK, temperature=0.0, entropy_bound=0.65), conf, 6)[0] == 4


def test_a_block_model_exports_and_reloads_with_its_block_size(tmp_path):
    model = block_model(block=8).float()
    model.save_pretrained(tmp_path / "m")
    again = DIMBA.from_pretrained(tmp_path / "m")
    assert again.config.block_size == 8 and "block_size` = 8" in (tmp_path / "m" / "README.md").read_text()
    ids = torch.randint(3, 40, (2, 16))
    torch.testing.assert_close(again.block_logits(ids, ids), model.block_logits(ids, ids))


def test_the_live_canvas_view_follows_a_block_generation():
    from dimba.canvas_view import CanvasView

    model = block_model()
    frames = []
    view = CanvasView(model, 10, eos_id=1)
    generate(model, torch.tensor([5, 6]), 10, SampleConfig(num_steps=10), 1, torch.Generator().manual_seed(0),
             on_step=lambda step: frames.append(view.update(step)))
    assert len(frames) == 10 and frames[-1].ids.shape == (1, 10)
    first = frames[0].confidence[0]  # the first block (positions 2..3) has a guess, later blocks none yet
    assert not first[:2].isnan().any() and first[2:].isnan().all()
