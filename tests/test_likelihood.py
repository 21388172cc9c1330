"""Likelihood evaluation: the exact AR NLL and the masked NELBO bound on a Markov chain whose NLL is known."""

import json
import math

import numpy as np
import pytest
import torch

from dimba.cli import main
from dimba.families import get_family
from dimba.evaluation.likelihood import evaluate_likelihood

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
        self.family, self.mask_id, self.fn = get_family(family), MASK, fn

    def token_logits(self, ids, prompt_mask=None, drop_cond=False):
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


class FakeBlockModel(FakeModel):
    """A block-diffusion masked model (``config.block_size``) whose logits of block k come from
    ``fn(x_t, x_0)``, which must read x_0 only before block k."""

    def __init__(self, block, fn):
        super().__init__("masked", None)
        self.config, self.block_fn = type("Cfg", (), {"block_size": block})(), fn

    def token_logits(self, ids, prompt_mask=None, drop_cond=False):
        raise AssertionError("a block model is scored through block_logits")

    def block_logits(self, x_t, x_0, prompt_mask=None, drop_cond=False, clean_grad=True):
        return self.block_fn(x_t, x_0)


def test_block_bound_with_one_token_blocks_is_the_exact_nll(chain):
    """block_size = 1 is autoregression: each block's NELBO is -log p(x_k | x_<k), so the exact chain
    conditionals give the exact NLL (no Monte Carlo spread)."""
    p, pi, seqs = chain
    table = torch.cat([torch.zeros(3, V, dtype=torch.float64), _full_log(p)])  # (V, V)
    first = _full_log(pi)  # (V,)

    def exact(x_t, x_0):
        prev = table[x_0[:, :-1]]  # (B, L-1, V): the clean previous token's transition row
        return torch.cat([first.expand(len(x_0), 1, V), prev], dim=1)  # (B, L, V)

    r = evaluate_likelihood(FakeBlockModel(1, exact), _blocks(seqs), CharTokenizer(), mc_samples=3,
                            generator=torch.Generator().manual_seed(0))
    assert r["nll_nats_per_token"] == pytest.approx(_exact_nll(chain)[0] / seqs.size, abs=1e-9)
    assert r["stderr_nats_per_token"] == pytest.approx(0, abs=1e-12) and r["is_bound"] is True


@pytest.mark.parametrize("block", [4, 8])
def test_block_bound_is_above_the_exact_nll_and_unbiased_for_a_context_free_model(chain, block):
    _, pi, seqs = chain
    row = _full_log(pi)  # (V,)
    model = FakeBlockModel(block, lambda x_t, x_0: row.expand(*x_t.shape, V))
    r = evaluate_likelihood(model, _blocks(seqs), CharTokenizer(), mc_samples=32,
                            generator=torch.Generator().manual_seed(3))
    assert r["nll_nats_per_token"] >= _exact_nll(chain)[0] / seqs.size - 3 * r["stderr_nats_per_token"]
    assert abs(r["nll_nats_per_token"] + np.log(pi[seqs]).mean()) < 4 * r["stderr_nats_per_token"]
    # a uniform model over the V - 1 non-mask ids is charged log(V - 1) per token, whatever the blocks
    uniform = FakeBlockModel(block, lambda x_t, x_0: torch.zeros(*x_t.shape, V, dtype=torch.float64))
    est = uniform.family.likelihood(uniform, _blocks(seqs), 2, 16, torch.Generator().manual_seed(0), False, context=6)
    assert est.scored.shape == (len(seqs), 10)  # a block partly in the context scores its other tokens only
    assert est.total_nats / est.scored.numel() == pytest.approx(math.log(V - 1), abs=1e-12)


def test_stderr_shrinks_like_one_over_sqrt_k(chain):
    model, blocks = _marginal_model(chain), _blocks(chain[2])
    se = {k: evaluate_likelihood(model, blocks, CharTokenizer(), mc_samples=k, batch_size=256,
                                 generator=torch.Generator().manual_seed(3))["stderr_nats_per_token"]
          for k in (4, 64)}
    assert se[64] > 0 and 2.5 < se[4] / se[64] < 6


class AnalyticGaussian(torch.nn.Module):
    """Tokens uniform and independent over the 4 chain states, embedded as orthogonal points of norm 3.

    ``estimate`` is the exact posterior mean E[z_0 | z_t] (the prior mean for an absorbed
    position), so the continuous-time bound is tight: it equals -log p(x) = log 4 per token. With ``logits``
    it also returns the exact posterior log-probabilities, as a logits-predicting model does.
    """

    def __init__(self, family="continuous", schedule="cosine", zero_terminal_snr=True, shift=1.0, logits=False):
        super().__init__()
        from dimba.diffusion.masked import MaskSchedule
        from dimba.diffusion.schedules import NoiseSchedule

        self.family, self.mask_id = get_family(family), MASK
        book = torch.zeros(V, len(STATES), dtype=torch.float64)
        book[STATES] = 3 * torch.eye(len(STATES), dtype=torch.float64)
        self.book = torch.nn.Parameter(book, requires_grad=False)  # (V, d)
        self.schedule = NoiseSchedule(schedule, zero_terminal_snr, shift=shift)
        self.mask_schedule = MaskSchedule("loglinear")
        self.logits = logits

    def encode(self, ids):
        return self.book[ids]  # (B, L, d)

    def codebook(self):
        return self.book  # (V, d)

    def estimate(self, z_t, t, alpha_bar, masked=None):
        states = self.book[STATES]  # (S, d)
        a, var = alpha_bar.sqrt()[:, None, None, None], (1 - alpha_bar)[:, None, None, None]
        logp = -(z_t[..., None, :] - a * states).pow(2).sum(-1) / (2 * var[..., 0])  # (B, L, S)
        if masked is not None:
            logp = logp.masked_fill(masked[..., None], 0.0)  # an absorbed position: the uniform prior
        x0 = logp.softmax(-1) @ states  # (B, L, d)
        if not self.logits:
            return x0, None
        logits = torch.full((*x0.shape[:-1], V), float("-inf"), dtype=torch.float64)
        logits[..., STATES] = logp.log_softmax(-1)
        return x0, logits

    def decode(self, x0):
        logits = torch.full((*x0.shape[:-1], V), float("-inf"), dtype=torch.float64)
        logits[..., STATES] = -1e3 * (x0[..., None, :] - self.book[STATES]).pow(2).sum(-1)  # nearest state
        return logits


@pytest.mark.parametrize("schedule,ztsnr,shift", [("cosine", True, 1.0), ("cosine", True, 4.0), ("linear", False, 1.0)])
def test_gaussian_bound_is_tight_for_the_exact_denoiser(schedule, ztsnr, shift):
    from dimba.families.gaussian_bound import T_MIN

    blocks = torch.as_tensor(np.random.default_rng(0).integers(0, len(STATES), (512, 16)) + STATES[0])
    r = evaluate_likelihood(AnalyticGaussian("continuous", schedule, ztsnr, shift), blocks, CharTokenizer(),
                            mc_samples=16, batch_size=2048, generator=torch.Generator().manual_seed(0), t0=T_MIN, clamp="none")
    # the estimate's spread over seeds is about 0.017 here; the reported standard error is conservative
    assert abs(r["nll_nats_per_token"] - math.log(4)) < min(0.06, 3 * r["stderr_nats_per_token"])
    parts = r["parts_nats_per_token"]
    assert parts["reconstruction"] < 1e-6 and parts["absorbing"] == 0
    assert (parts["prior"] > 0) == (not ztsnr) and r["t0"] == T_MIN and r["is_bound"]


@pytest.mark.parametrize("t0", [1e-4, 0.7])
def test_with_the_exact_logits_the_bound_is_tight_at_every_t0(t0):
    """A logits model reconstructs from its own token distribution: with the exact posterior, the reconstruction
    at t0 plus the diffusion term above it is -log p(x) = log 4 whatever t0 (the nearest-state head on the
    posterior mean, the estimate of an x0 model, pays far more at t0 = 0.7)."""
    blocks = torch.as_tensor(np.random.default_rng(0).integers(0, len(STATES), (512, 16)) + STATES[0])
    exact = AnalyticGaussian(logits=True)
    r = evaluate_likelihood(exact, blocks, CharTokenizer(), mc_samples=16, batch_size=2048,
                            generator=torch.Generator().manual_seed(0), t0=t0, clamp="none")
    assert abs(r["nll_nats_per_token"] - math.log(4)) < min(0.06, 3 * r["stderr_nats_per_token"])
    if t0 > 0.1:
        rounded = evaluate_likelihood(AnalyticGaussian(), blocks, CharTokenizer(), mc_samples=16, batch_size=2048,
                                      generator=torch.Generator().manual_seed(0), t0=t0, clamp="none")
        assert rounded["nll_nats_per_token"] > 10 * math.log(4)


@pytest.mark.parametrize("t0", [1e-4, 0.5])
def test_a_one_hot_model_whose_network_adds_nothing_has_the_exact_bound(t0):
    """On tokens uniform and independent over the vocabulary, the Bayes skip logits of a one-hot latent are the exact
    posterior: a real one-hot DIMBA whose head reads nothing (self-conditioned, logits prediction) has the bound
    -log p(x) = log V per token, the reconstruction at t0 plus the diffusion term above it."""
    from dimba.model import DIMBA

    torch.manual_seed(0)
    model = DIMBA(V, d_model=16, num_denoiser_layers=1, backbone="transformer", num_heads=2, context_length=16,
                  prediction_type="logits", logit_skip=True, self_conditioning=True, onehot_latent=True,
                  tie_weights=False).double().eval()
    with torch.no_grad():
        model.head.weight.zero_()
    blocks = torch.as_tensor(np.random.default_rng(0).integers(0, V, (256, 16)))
    model.calibrate_latent_scale(blocks)
    r = evaluate_likelihood(model, blocks, CharTokenizer(), mc_samples=16, batch_size=1024,
                            generator=torch.Generator().manual_seed(0), t0=t0, clamp="none")
    assert abs(r["nll_nats_per_token"] - math.log(V)) < min(0.06, 3 * r["stderr_nats_per_token"])
    assert r["parts_nats_per_token"]["diffusion"] > 0.3  # the terms above t0 carry a real share of it


def test_gaussian_stderr_shrinks_like_one_over_sqrt_k():
    blocks = torch.as_tensor(np.random.default_rng(2).integers(0, len(STATES), (64, 16)) + STATES[0])
    se = {k: evaluate_likelihood(AnalyticGaussian(), blocks, CharTokenizer(), mc_samples=k, batch_size=1024, t0=1e-3, clamp="none",
                                 generator=torch.Generator().manual_seed(3))["stderr_nats_per_token"] for k in (4, 64)}
    assert se[64] > 0 and 2.5 < se[4] / se[64] < 6


def test_hybrid_bound_charges_log_v_per_reveal():
    from dimba.families.gaussian_bound import T_MIN

    blocks = torch.as_tensor(np.random.default_rng(1).integers(0, len(STATES), (128, 16)) + STATES[0])
    r = evaluate_likelihood(AnalyticGaussian("hybrid"), blocks, CharTokenizer(), mc_samples=16, batch_size=512,
                            generator=torch.Generator().manual_seed(0), t0=T_MIN, clamp="none")
    parts, se = r["parts_nats_per_token"], r["stderr_nats_per_token"]
    # the reveal draws from a uniform head: log 4 nats per token, whatever t at which it happens
    assert abs(parts["absorbing"] - math.log(4)) < 3 * se
    # the Gaussian part after a reveal is positive: the bound is looser than the continuous one
    assert parts["diffusion"] > 6 * se and r["nll_nats_per_token"] > math.log(4)


def _train_on_chain(family, steps=400):
    """A 2-layer transformer DIMBA of ``family`` trained on 2000 fresh blocks of the module's chain."""
    from dimba.config import DiffusionConfig
    from dimba.families import compute_losses
    from dimba.model import DIMBA

    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(len(STATES)) * 0.5, size=len(STATES))  # the chain fixture's P (same seed)
    evals, evecs = np.linalg.eig(p.T)
    pi = np.real(evecs[:, np.argmin(np.abs(evals - 1))])
    pi = pi / pi.sum()
    seqs = np.zeros((2000, 16), dtype=np.int64)
    state = rng.choice(len(STATES), size=len(seqs), p=pi)  # (N,)
    for l in range(16):
        seqs[:, l] = state
        state = np.array([rng.choice(len(STATES), p=p[s]) for s in state])
    torch.manual_seed(0)
    model = DIMBA(V, family=family, d_model=32, num_denoiser_layers=2, backbone="transformer", num_heads=2,
                  context_length=16)
    data = _blocks(seqs)  # (N, L)
    if family == "continuous":
        model.calibrate_latent_scale(data)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        loss, _ = compute_losses(model, data[torch.randint(0, len(data), (16,), generator=g)], DiffusionConfig(),
                                 generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), data[:16]


@pytest.mark.parametrize("family", ["masked", "continuous"])
def test_trained_models_bound_the_exact_nll(family, chain):
    model, calibration = _train_on_chain(family)
    exact = _exact_nll(chain)[0] / chain[2].size
    r = evaluate_likelihood(model, _blocks(chain[2]), CharTokenizer(), mc_samples=16, batch_size=256,
                            generator=torch.Generator().manual_seed(0), calibration_blocks=calibration)
    assert r["nll_nats_per_token"] >= exact - 3 * r["stderr_nats_per_token"]
    assert r["nll_nats_per_token"] < math.log(len(STATES))  # trained: better than a uniform guess over the states
    if family == "continuous":
        from dimba.families.gaussian_bound import T_MIN

        # the x0 error floor makes the unclamped bound explode near t = 0: the chosen t0 / clamp avoid it
        floor = evaluate_likelihood(model, _blocks(chain[2]), CharTokenizer(), mc_samples=4, batch_size=256,
                                    generator=torch.Generator().manual_seed(0), t0=T_MIN, clamp="none")
        assert floor["nll_nats_per_token"] > 2 * r["nll_nats_per_token"]
        for clamp in ("none", "soft"):  # each reverse process, its t0 chosen, bounds the NLL
            other = evaluate_likelihood(model, _blocks(chain[2]), CharTokenizer(), mc_samples=16, batch_size=256,
                                        generator=torch.Generator().manual_seed(1), clamp=clamp,
                                        calibration_blocks=calibration)
            assert other["clamp"] == clamp and other["nll_nats_per_token"] >= exact - 3 * other["stderr_nats_per_token"]


def _train(tmp_path_factory, corpus, family, tiny):
    out = tmp_path_factory.mktemp("runs") / family
    assert main(["train", "--family", family, "--data", str(corpus), "--max-steps", "3", "--out", str(out),
                 "--quiet", *tiny]) == 0
    return out


@pytest.mark.parametrize("family", ["ar", "masked", "continuous", "hybrid"])
def test_cli_eval_json(family, tmp_path_factory, corpus, capsys, tiny):
    run = _train(tmp_path_factory, corpus, family, tiny)
    capsys.readouterr()
    assert main(["eval", str(run), "--data", str(corpus), "--json", "--mc-samples", "2", "--max-tokens", "200"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert {"family", "nll_nats_per_token", "bits_per_byte", "is_bound", "mc_samples", "stderr_nats_per_token",
            "tokens", "bytes", "seconds"} <= set(r)
    assert r["family"] == family and r["is_bound"] == (family != "ar")
    assert r["tokens"] == 7 * (31 if family == "ar" else 32)  # ceil(200 / 32) blocks of 32
    assert 0 < r["bits_per_byte"] < 60 and r["bytes"] > 0
    if family in ("continuous", "hybrid"):
        assert 0 < r["t0"] < 1 and r["clamp"] in ("none", "soft") and set(r["parts_nats_per_token"]) == {"diffusion", "absorbing", "reconstruction",
                                                                         "prior"}
    assert main(["eval", str(run), "--data", str(corpus), "--max-tokens", "64"]) == 0
    assert "bits/byte" in capsys.readouterr().out


def test_cli_eval_defaults_to_the_runs_own_corpus(tmp_path_factory, corpus, capsys, tiny):
    run = _train(tmp_path_factory, corpus, "ar", tiny)
    results = []
    for data in ([], ["--data", str(corpus)], ["--data", "shakespeare"]):
        capsys.readouterr()
        assert main(["eval", str(run), *data, "--json", "--max-tokens", "200"]) == 0
        r = json.loads(capsys.readouterr().out)
        results.append((r["bytes"], r["nll_nats_per_token"]))
    assert results[0] == results[1] != results[2]


def test_cli_eval_reverse_process_flags(tmp_path_factory, corpus, capsys, tiny):
    ar, cont = _train(tmp_path_factory, corpus, "ar", tiny), _train(tmp_path_factory, corpus, "continuous", tiny)
    for run, flags, words in ((ar, ["--t0", "0.5"], "--t0 does not apply to the ar family"), (cont, ["--t0", "1.5"], "(0, 1)"),
                              (cont, ["--clamp", "hard"], "invalid choice")):
        capsys.readouterr()
        assert main(["eval", str(run), "--data", str(corpus), "--max-tokens", "64", *flags]) == 2
        captured = capsys.readouterr()
        assert captured.out == "" and captured.err.count("\n") == 1 and words in captured.err
    capsys.readouterr()
    assert main(["eval", str(cont), "--data", str(corpus), "--max-tokens", "64", "--json", "--t0", "0.3",
                 "--clamp", "soft", "--mc-samples", "2"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["t0"] == 0.3 and r["clamp"] == "soft"
