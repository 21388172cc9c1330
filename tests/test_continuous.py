"""The continuous family's recipe options: logits prediction (score interpolation) with the Bayes skip, the
cross-entropy objective, and adaptive time warping."""

from __future__ import annotations

import math

import pytest
import torch

from dimba import DIMBA, compute_dimba_losses, sample_from_model
from dimba.diffusion.schedules import NoiseSchedule
from dimba.diffusion.warp import BINS, UNIFORM, TimeWarp
from dimba.samplers.ddim import DDIMSampler
from dimba.samplers.state import SamplerState

V = 48


def small(**kw) -> DIMBA:
    torch.manual_seed(0)
    return DIMBA(V, **{**dict(d_model=32, num_denoiser_layers=1, d_state=8, headdim=16, chunk_size=8,
                              prediction_type="logits", logit_skip=True), **kw})


@pytest.mark.parametrize("kw", [dict(), dict(onehot_latent=True)])
def test_the_skip_alone_reads_tokens_at_high_snr_and_knows_nothing_at_zero_snr(kw):
    m = small(**kw)
    with torch.no_grad():  # the network contributes nothing: only the Bayes logits of z_t are left
        m.out_proj.weight.zero_()
        m.out_proj.bias.zero_()
    ids = torch.randint(3, V, (4, 16))
    m.calibrate_latent_scale(ids)
    z0, book = m.encode(ids), m.codebook()
    for t, clean in ((0.05, True), (1.0, False)):
        ab = m.schedule.alpha_bar(torch.full((4,), t))  # (B,)
        z_t = ab.sqrt()[:, None, None] * z0 + (1 - ab).sqrt()[:, None, None] * torch.randn_like(z0)
        x0, logits = m.interpret(m.denoise(z_t, torch.full((4,), t), m.condition(ids, torch.full((4,), t))), z_t, ab)
        if clean:
            assert torch.equal(logits.argmax(-1), ids) and torch.equal(m.round(x0), ids)
        else:  # no signal: the uniform prior, whose expected latent is the codebook mean
            assert torch.allclose(x0, book.mean(0).expand_as(x0), atol=1e-5)


def test_an_absorbed_position_has_no_skip_logits():
    m = small(family="hybrid")
    with torch.no_grad():  # only the Bayes logits of z_t are left
        m.out_proj.weight.zero_()
        m.out_proj.bias.zero_()
    ids = torch.randint(3, V, (2, 16))
    m.calibrate_latent_scale(ids)
    t = torch.full((2,), 0.05)
    ab = m.schedule.alpha_bar(t)  # (B,)
    masked = torch.zeros(2, 16, dtype=torch.bool)
    masked[:, ::2] = True  # (B, L): absorbed at even positions
    z_t = ab.sqrt()[:, None, None] * m.encode(ids)  # (B, L, d): every latent, even an absorbed one, holds its token
    x0, logits = m.interpret(m.denoise(z_t, t, m.condition(ids, t), masked=masked), z_t, ab, masked)
    assert torch.equal(logits.argmax(-1)[~masked], ids[~masked])
    assert torch.allclose(x0[masked], m.codebook().mean(0).expand_as(x0[masked]), atol=1e-5)


def test_the_training_pass_reads_the_logits_without_forming_the_x0_estimate():
    m = small(family="hybrid")
    ids = torch.randint(3, V, (2, 16))
    t, noise = torch.tensor([0.3, 0.8]), torch.randn(2, 16, m.d_x)
    masked = torch.rand(2, 16) < 0.3  # (B, L)
    _, _, full = m(ids, t, noise=noise, masked=masked)
    _, _, lean = m(ids, t, noise=noise, masked=masked, estimate_x0=False)
    assert lean["x0_hat"] is None and full["x0_hat"].shape == (2, 16, m.d_x)
    assert torch.equal(lean["logits"], full["logits"])


def test_self_conditioning_feeds_back_the_clean_latent_at_prompt_positions(monkeypatch):
    m = small(self_conditioning=True)
    ids = torch.randint(3, V, (2, 16))
    prompt = torch.rand(2, 16) < 0.5  # (B, L): a clean subset
    seen = []
    denoise = m.denoise
    monkeypatch.setattr(m, "denoise", lambda *a, **k: seen.append(a[4]) or denoise(*a, **k))
    compute_dimba_losses(m, ids, torch.tensor([0.5, 0.9]), prompt_mask=prompt, self_cond_prob=1.0, objective="ce")
    first, fed = seen  # the no-grad pass reads no estimate; the second reads the first's
    assert first is None
    z0 = m.encode(ids)  # (B, L, d)
    assert torch.equal(fed[prompt], z0[prompt].detach())
    assert not torch.allclose(fed[~prompt], z0[~prompt])  # elsewhere, the first pass's estimate


@pytest.mark.parametrize("kw", [dict(), dict(logit_skip=False), dict(self_conditioning=True, time_warping=True),
                                dict(family="hybrid", self_conditioning=True),
                                dict(onehot_latent=True, self_conditioning=True, time_warping=True, noise_shift=4.0)])
def test_the_cross_entropy_objective_learns(kw):
    m = small(**kw).train()
    ids = (torch.arange(16)[None] * 5 + torch.arange(8)[:, None]) % (V - 3) + 3  # (8, 16) a periodic pattern
    m.calibrate_latent_scale(ids)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    t = torch.linspace(0.2, 0.9, 8)
    first = None
    for _ in range(120):
        loss, parts = compute_dimba_losses(m, ids, t, objective="ce")
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first if first is not None else float(parts["ce"])
    assert float(parts["ce"]) < 0.5 * first


def _curve(t: torch.Tensor) -> torch.Tensor:
    """A cross-entropy that rises steeply around t = 0.6: tokens are decided there."""
    return 5 * torch.sigmoid((t - 0.6) * 30)


def test_time_warp_puts_its_times_where_the_cross_entropy_changes():
    warp = TimeWarp()
    u = torch.linspace(0.02, 0.98, 25)
    assert torch.allclose(warp(u), u)  # nothing seen yet: the identity
    gen = torch.Generator().manual_seed(0)
    for _ in range(300):
        t = torch.rand(64, generator=gen)
        warp.update(t, _curve(t))
    t = warp(torch.rand(20000, generator=gen))
    near = ((t - 0.6).abs() < 0.1).float().mean()
    assert near > 0.7  # the uniform density would put 20% there
    assert ((t < 0.3).float().mean() - UNIFORM * 0.3).abs() < 0.02  # far from it, only the uniform share
    assert torch.all(warp(torch.linspace(0, 1, 101)).diff() >= 0)  # monotone, from 0 to 1
    assert float(warp(torch.zeros(1))) == 0 and float(warp(torch.ones(1))) == 1


def test_the_warp_places_the_sampler_steps_and_travels_with_the_weights(tmp_path):
    m = small(time_warping=True)
    t = torch.rand(BINS * 20, generator=torch.Generator().manual_seed(1))
    m.time_warp.update(t, _curve(t))
    sampler = DDIMSampler(NoiseSchedule(), warp=m.time_warp)
    sampler.set_timesteps(10, SamplerState(torch.zeros(1, 4, 32)))
    steps = sampler.timesteps
    assert float(steps[0]) == 1.0 and ((steps - 0.6).abs() < 0.1).sum() >= 6  # most steps where tokens decide
    loaded = DIMBA.from_pretrained(m.save_pretrained(tmp_path / "exp"))
    assert torch.equal(loaded.time_warp(torch.linspace(0, 1, 50)), m.time_warp(torch.linspace(0, 1, 50)))


def test_training_feeds_the_warp_and_draws_from_it():
    m = small(time_warping=True).train()
    ids = torch.randint(3, V, (8, 16))
    m.calibrate_latent_scale(ids)
    assert float(m.time_warp.weight.sum()) == 0
    compute_dimba_losses(m, ids, objective="ce")
    assert math.isclose(float(m.time_warp.weight.sum()), 8 * 0.02, rel_tol=0.2)  # one EMA hit per example's bin
    m.eval()
    compute_dimba_losses(m, ids, objective="ce")  # evaluation does not move it
    assert math.isclose(float(m.time_warp.weight.sum()), 8 * 0.02, rel_tol=0.2)


def test_a_pretrained_token_vae_is_the_frozen_latent_space_of_a_run(corpus, tmp_path, tiny, capsys):
    import json

    from dimba.cli import main
    from dimba.loading import load_for_inference

    vae = tmp_path / "vae"
    assert main(["vae", "train", "--data", str(corpus), "--latent-dim", "8", "--d-model", "32", "--steps", "150",
                 "--vocab-size", "300", "--out", str(vae)]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["acc"] > 0.5 and metrics["kl"] > 0  # tokens decode from their posterior means (chance: 1/300)
    run = tmp_path / "run"
    latent = ["model.latent_diffusion=true", "model.use_vae_latent=true", "model.d_latent=8",
              f"model.vae_checkpoint_path={vae}"]
    assert main(["train", "--data", str(corpus), "--max-steps", "4", "--out", str(run), "--quiet", *tiny, *latent]) == 0
    model, tokenizer = load_for_inference(run)
    assert (run / "tokenizer.json").read_text() == (vae / "tokenizer.json").read_text()  # the VAE's tokenizer
    from safetensors.torch import load_file

    pretrained = load_file(vae / "model.safetensors")
    for name in ("embedding.weight", "vae.encoder.0.weight", "vae.decoder.2.weight", "head_norm.weight"):
        # loaded and not trained since (generation uses the EMA, whose average of an unchanged weight rounds)
        assert torch.allclose(model.state_dict()[name], pretrained[name], rtol=1e-6, atol=1e-7), name
    ids = torch.tensor([tokenizer.encode("ROMEO: O gentle night")])
    assert torch.equal(model.round(model.encode(ids)), ids)  # the posterior means keep every token apart
    assert main(["train", "--data", str(corpus), "--max-steps", "1", "--out", str(tmp_path / "bad"), "--quiet", *tiny,
                 *latent[:2], "model.d_latent=16", latent[3]]) == 2  # a latent width the VAE does not have
    assert "d_latent" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_a_low_score_temperature_sharpens_every_x0_estimate():
    m = small().eval()
    ids = torch.randint(3, V, (2, 8))
    m.calibrate_latent_scale(ids)
    seen = {}
    for tau in (1.0, 0.05):
        seen[tau] = []
        sample_from_model(m, None, seq_len=8, num_steps=4, num_samples=2, score_temperature=tau,
                          generator=torch.Generator().manual_seed(0), callback=lambda i, t, x0: seen[tau].append(x0))
    book = m.codebook()
    for tau, estimates in seen.items():  # distance of each x0 estimate to its nearest codebook latent
        gap = torch.stack([(x0[..., None, :] - book).pow(2).sum(-1).min(-1).values.mean() for x0 in estimates])
        seen[tau] = gap
    assert (seen[0.05] < 0.2 * seen[1.0]).all()  # near-one-hot estimates sit on the codebook


def test_a_guided_logits_model_interpolates_the_guided_logits_so_its_estimates_stay_on_the_codebook_hull():
    m = small().eval()
    ids = torch.randint(3, V, (2, 8))
    m.calibrate_latent_scale(ids)
    estimates = []
    sample_from_model(m, ids[:, :3], seq_len=8, num_steps=4, num_samples=2, guidance_scale=8.0, score_temperature=1.0,
                      generator=torch.Generator().manual_seed(0), callback=lambda i, t, x0: estimates.append(x0))
    book = m.codebook()  # (V, d)
    for x0 in estimates:  # a softmax-weighted mean of codebook latents is no longer than the longest of them
        assert (x0[:, 3:].norm(dim=-1) <= book.norm(dim=-1).max() + 1e-4).all()


@pytest.mark.parametrize("kw", [dict(), dict(latent_diffusion=True, d_latent=8), dict(tie_weights=False),
                                dict(onehot_latent=True)])
def test_the_one_product_is_the_head_logits_plus_the_bayes_skip_logits(kw):
    m = small(**kw)
    ids = torch.randint(3, V, (3, 16))
    m.calibrate_latent_scale(ids)
    x_pred = torch.randn(3, 16, m.d_model if m.onehot else m.d_x)  # (B, L, d_x), or the head's input (B, L, D)
    z_t = torch.randn(3, 16, m.d_x)  # (B, L, d_x)
    ab = torch.tensor([0.999, 0.5, 0.01])  # (B,): the skip's scale spans 1e3 to 0.1
    _, logits = m.interpret(x_pred, z_t, ab, estimate_x0=False)
    bayes = (ab.sqrt() / (1 - ab))[:, None, None] * (z_t @ m.codebook().T)  # (B, L, V)
    expected = m._head_logits(x_pred if m.onehot else m.decode_latent(x_pred)) + bayes
    assert logits.dtype == torch.float32
    assert torch.allclose(logits, expected, rtol=1e-5, atol=1e-6 * expected.abs().max().item())


def test_a_one_hot_latent_is_the_scaled_simplex_and_its_estimate_is_the_distribution():
    m = small(onehot_latent=True)
    ids = torch.randint(3, V, (2, 16))
    m.calibrate_latent_scale(ids)
    scale = float(m.latent_scale)
    assert m.d_x == V and abs(scale - math.sqrt(V)) < 0.05 * math.sqrt(V)  # unit variance: about sqrt(V)
    assert torch.equal(m.codebook(), scale * torch.eye(V))
    logits = torch.randn(2, 16, V)
    x0 = m.score_interpolate(logits, 0.7)  # (B, L, V)
    assert torch.allclose(x0, (logits / 0.7).softmax(-1) @ m.codebook(), atol=1e-5)
    assert torch.allclose(m.decode(x0), (logits / 0.7).log_softmax(-1), atol=1e-4)  # the estimate's own tokens
    assert torch.allclose(m.decode(m.encode(ids)).softmax(-1), torch.nn.functional.one_hot(ids, V).float())


def test_a_one_hot_run_trains_generates_bounds_and_exports(corpus, tmp_path, tiny, metrics, capsys):
    import json

    from dimba.cli import main

    run, exported = tmp_path / "run", tmp_path / "exp"
    assert main(["train", "--data", str(corpus), "--max-steps", "12", "--out", str(run), "--quiet", *tiny,
                 "model.onehot_latent=true"]) == 0
    val = metrics(run, "val_ce")
    assert val[-1] < 0.9 * val[0]  # it learned (2.14 -> 1.86 nats)
    capsys.readouterr()
    args = ["--prompt", "ROMEO:", "--length", "12", "--steps", "8", "--seed", "1"]
    assert main(["generate", str(run), *args]) == 0
    text = capsys.readouterr().out
    assert text.startswith("ROMEO:") and len(text.strip()) > len("ROMEO:")
    assert main(["eval", str(run), "--data", str(corpus), "--json", "--max-tokens", "64", "--mc-samples", "2"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["is_bound"] and r["tokens"] == 64 and 0 < r["bits_per_byte"] < 20
    assert main(["export", str(run), "--out", str(exported)]) == 0
    capsys.readouterr()
    assert main(["generate", str(exported), *args]) == 0
    assert capsys.readouterr().out == text  # the export samples as the run does
