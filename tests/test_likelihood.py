"""Likelihood evaluation: the exact AR NLL and the masked NELBO bound on a Markov chain whose NLL is known."""

import json
import math

import numpy as np
import pytest
import torch

from dimba.cli import main
from dimba.likelihood import evaluate_likelihood

V = 7  # ids 0..2 are special ([PAD], [EOS], [MASK]); the chain lives on STATES
MASK = 2
STATES = np.arange(3, V)


class CharTokenizer:
    """One UTF-8 byte per chain state; special ids decode to nothing (like dimba's tokenizer)."""

    def decode(self, ids):
        return "".join(chr(ord("a") + i) for i in ids if i >= 3)


class FakeModel(torch.nn.Module):
    """A token-family model whose logits (B, L, V) come from ``fn(ids)``, in float64."""

    def __init__(self, family, fn):
        super().__init__()
        self.family, self.mask_id, self.fn = family, MASK, fn

    def token_logits(self, ids, prompt_mask=None):
        return self.fn(ids)


@pytest.fixture(scope="module")
def chain():
    """A random 4-state transition matrix P, its stationary law pi, and 60 blocks of 16 tokens from pi then P."""
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(len(STATES)) * 0.5, size=len(STATES))  # (S, S)
    evals, evecs = np.linalg.eig(p.T)
    pi = np.real(evecs[:, np.argmin(np.abs(evals - 1))])
    pi = pi / pi.sum()  # (S,)
    seqs = np.zeros((60, 16), dtype=np.int64)
    for i in range(len(seqs)):
        s = rng.choice(len(STATES), p=pi)
        for l in range(16):
            seqs[i, l] = s
            s = rng.choice(len(STATES), p=p[s])
    return p, pi, seqs


def _full_log(rows):
    """Embed per-state log-probabilities (..., S) into (..., V) logits with -inf off the chain."""
    out = torch.full((*rows.shape[:-1], V), float("-inf"), dtype=torch.float64)
    out[..., STATES] = torch.as_tensor(np.log(rows), dtype=torch.float64)
    return out


def _blocks(seqs):
    return torch.as_tensor(seqs + STATES[0])  # (N, L) token ids


def _exact_nll(chain):
    """Exact -log p of whole blocks (pi for the first token, P after) and of tokens 1..L-1 given token 0."""
    p, pi, seqs = chain
    trans = -np.log(p[seqs[:, :-1], seqs[:, 1:]]).sum()
    return trans - np.log(pi[seqs[:, 0]]).sum(), trans


def test_ar_nll_is_exact_on_a_markov_chain(chain):
    p, _, seqs = chain
    table = _full_log(p)  # (S, V)
    table = torch.cat([torch.zeros(3, V, dtype=torch.float64), table])  # (V, V): rows of special ids unused
    model = FakeModel("ar", lambda ids: table[ids])  # (B, L, V): position l predicts token l + 1
    r = evaluate_likelihood(model, _blocks(seqs), CharTokenizer(), batch_size=7)
    _, conditional = _exact_nll(chain)
    n, length = seqs.shape
    assert r["tokens"] == n * (length - 1) and r["bytes"] == n * (length - 1)
    assert r["nll_nats_per_token"] == pytest.approx(conditional / (n * (length - 1)), abs=1e-6)
    assert r["bits_per_byte"] == pytest.approx(conditional / math.log(2) / r["bytes"], abs=1e-6)
    assert r["is_bound"] is False and r["stderr_nats_per_token"] == 0 and r["family"] == "ar"


def test_masked_uniform_model_bound_is_log_v_minus_1(chain):
    _, _, seqs = chain
    model = FakeModel("masked", lambda ids: torch.zeros(*ids.shape, V, dtype=torch.float64))
    r = evaluate_likelihood(model, _blocks(seqs), CharTokenizer(), mc_samples=4,
                            generator=torch.Generator().manual_seed(0))
    assert r["nll_nats_per_token"] == pytest.approx(math.log(V - 1), abs=1e-12)
    assert r["stderr_nats_per_token"] == pytest.approx(0, abs=1e-12)
    assert r["bits_per_byte"] == pytest.approx(r["tokens"] * math.log(V - 1) / math.log(2) / r["bytes"], abs=1e-12)
    assert r["is_bound"] is True and r["tokens"] == seqs.size and r["bytes"] == seqs.size


def _marginal_model(chain):
    """Predicts the stationary law at every position, whatever the context."""
    _, pi, _ = chain
    row = _full_log(pi)  # (V,)
    return FakeModel("masked", lambda ids: row.expand(*ids.shape, V))


def test_masked_bound_is_above_the_exact_nll(chain):
    exact, _ = _exact_nll(chain)
    exact /= chain[2].size
    for model in (_marginal_model(chain), FakeModel("masked", lambda ids: torch.zeros(*ids.shape, V))):
        r = evaluate_likelihood(model, _blocks(chain[2]), CharTokenizer(), mc_samples=8,
                                generator=torch.Generator().manual_seed(1))
        assert r["nll_nats_per_token"] >= exact - 3 * r["stderr_nats_per_token"]
    # the marginal model's bound is unbiased for its own (context-free) NLL
    _, pi, seqs = chain
    own = -np.log(pi[seqs]).mean()
    r = evaluate_likelihood(_marginal_model(chain), _blocks(seqs), CharTokenizer(), mc_samples=64,
                            generator=torch.Generator().manual_seed(2))
    assert abs(r["nll_nats_per_token"] - own) < 4 * r["stderr_nats_per_token"]


def test_stderr_shrinks_like_one_over_sqrt_k(chain):
    model, blocks = _marginal_model(chain), _blocks(chain[2])
    se = {k: evaluate_likelihood(model, blocks, CharTokenizer(), mc_samples=k, batch_size=256,
                                 generator=torch.Generator().manual_seed(3))["stderr_nats_per_token"]
          for k in (4, 64)}
    assert se[64] > 0 and 2.5 < se[4] / se[64] < 6


def test_continuous_family_is_refused():
    from dimba.errors import UsageError

    with pytest.raises(UsageError, match="not yet"):
        evaluate_likelihood(FakeModel("continuous", None), torch.zeros(2, 4, dtype=torch.long), CharTokenizer())


TINY = ["model.d_model=32", "model.num_denoiser_layers=2", "model.d_state=8", "model.headdim=16", "model.chunk_size=16",
        "data.seq_len=32", "data.vocab_size=300", "train.batch_size=4", "train.eval_every=10", "train.save_every=10",
        "train.warmup_steps=2", "train.eval_batches=2", "train.log_every=5", "train.num_threads=1"]


def _train(tmp_path_factory, corpus, family):
    out = tmp_path_factory.mktemp("runs") / family
    assert main(["train", "--family", family, "--data", str(corpus), "--max-steps", "3", "--out", str(out),
                 "--quiet", *TINY]) == 0
    return out


@pytest.mark.parametrize("family", ["ar", "masked"])
def test_cli_eval_json(family, tmp_path_factory, corpus, capsys):
    run = _train(tmp_path_factory, corpus, family)
    capsys.readouterr()
    assert main(["eval", str(run), "--data", str(corpus), "--json", "--mc-samples", "2", "--max-tokens", "200"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert {"family", "nll_nats_per_token", "bits_per_byte", "is_bound", "mc_samples", "stderr_nats_per_token",
            "tokens", "bytes", "seconds"} <= set(r)
    assert r["family"] == family and r["is_bound"] == (family == "masked")
    assert r["tokens"] == 7 * (31 if family == "ar" else 32)  # ceil(200 / 32) blocks of 32
    assert 0 < r["bits_per_byte"] < 30 and r["bytes"] > 0
    assert main(["eval", str(run), "--data", str(corpus), "--max-tokens", "64"]) == 0
    assert "bits/byte" in capsys.readouterr().out


def test_cli_eval_continuous_is_one_line_exit_2(tmp_path_factory, corpus, capsys):
    run = _train(tmp_path_factory, corpus, "continuous")
    capsys.readouterr()
    assert main(["eval", str(run), "--data", str(corpus), "--json"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1 and "not yet" in captured.err
