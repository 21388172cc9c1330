"""The names of the original DIMBA code, as a user porting from it calls them, and files written by earlier dimba
versions: accepted with the meaning they had, or refused in one line naming the dimba equivalent."""

from __future__ import annotations

import json

import pytest
import torch

from dimba import DIMBA, sample_from_model
from dimba.cli import main
from dimba.config import load_run_config
from dimba.model import _rms_normalize

V = 64


def small(**kw) -> DIMBA:
    torch.manual_seed(0)
    return DIMBA(V, **{**dict(d_model=32, num_denoiser_layers=1, d_state=8, headdim=16, chunk_size=8), **kw})


def test_encode_latent_and_decode_latent_carry_the_scale_and_round_trip():
    m = small()
    ids = torch.randint(3, V, (2, 12))
    m.calibrate_latent_scale(ids)
    e = m.embedding(ids)  # (B, L, D)
    z = m.encode_latent(e)
    assert torch.equal(z, m.encode(ids)) and abs(z.std().item() - 1) < 1e-4  # unit variance: the scale is applied
    assert torch.allclose(m.decode_latent(z), _rms_normalize(e), atol=1e-6)  # RMS-normalised embeddings come back
    assert torch.equal(m.round(m.encode_latent(e)), ids)
    assert torch.equal(m.decode(z), m._head_logits(m.decode_latent(z)))
    projected = small(latent_diffusion=True, d_latent=8)
    assert projected.encode_latent(projected.embedding(ids)).shape == (2, 12, 8) and projected.d_latent == 8
    assert projected.decode_latent(torch.zeros(2, 12, 8)).shape == (2, 12, 32)


def test_the_config_is_a_mapping_that_rebuilds_the_model():
    m = small(family="masked", backbone="transformer", num_heads=2)
    twin = DIMBA(**m.config)
    assert dict(m.config)["d_model"] == m.config["d_model"] == 32 and set(m.config.keys()) == set(type(m.config).model_fields)
    twin.load_state_dict(m.state_dict())  # strict: the same weights, names and shapes
    ids = torch.randint(3, V, (2, 10))
    assert torch.equal(m.eval().token_logits(ids), twin.eval().token_logits(ids))
    assert (m.vocab_size, m.d_model, m.d_latent) == (V, 32, 32)


def test_original_constructor_keywords_keep_their_meaning_or_are_refused_in_one_line():
    small(d_prompt=32, dropout=0.0, use_simple_mamba=False, use_vae_latent=False)  # what dimba does anyway
    for kw, hint in [({"d_prompt": 512}, "omit d_prompt"), ({"dropout": 0.1}, "no dropout"),
                     ({"use_simple_mamba": True}, "mamba_ssm")]:
        with pytest.raises(ValueError, match=hint) as err:
            small(**kw)
        assert len(str(err.value).splitlines()) == 1
    m = small(embed_init_std=0.02)
    assert abs(m.embedding.weight.std().item() - 0.02) < 0.002
    assert float(small(latent_scale=3.0).latent_scale) == 3.0


def test_integer_timesteps_are_the_original_convention():
    m = small(num_diffusion_steps=100)
    ids = torch.randint(3, V, (2, 8))
    noise = torch.randn(2, 8, 32)
    by_step = m(ids, torch.tensor([9, 49]), noise=noise)[0]
    by_time = m(ids, torch.tensor([0.1, 0.5]), noise=noise)[0]  # step k of T is t = (k + 1) / T
    assert torch.allclose(by_step, by_time, atol=1e-6)


def test_sample_from_model_takes_a_device():
    m = small()
    a = sample_from_model(m, [5, 6], seq_len=4, num_steps=2, generator=torch.Generator().manual_seed(0), device="cpu")
    b = sample_from_model(m, [5, 6], seq_len=4, num_steps=2, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="move it first"):
        sample_from_model(m, [5, 6], seq_len=4, num_steps=2, device="meta")


def test_a_fixed_latent_scale_is_not_calibrated(corpus, tmp_path, tiny):
    assert main(["train", "--data", str(corpus), "--max-steps", "1", "--out", str(tmp_path / "r"), "--quiet", *tiny,
                 "model.latent_scale=2.5"]) == 0
    state = torch.load(tmp_path / "r" / "checkpoints" / "last.ckpt", weights_only=True)
    assert float(state["model"]["latent_scale"]) == 2.5


def test_runs_and_exports_of_earlier_versions_load(corpus, tmp_path, tiny, capsys):
    """Earlier versions wrote no latent_scale, embed_init_std, logit_skip, time_warping or vae_checkpoint_path."""
    run, exported = tmp_path / "run", tmp_path / "exported"
    earlier_recipe = ("model.prediction_type=x0", "model.logit_skip=false", "model.time_warping=false")
    assert main(["train", "--data", str(corpus), "--max-steps", "2", "--out", str(run), "--quiet", *tiny,
                 *earlier_recipe]) == 0
    assert main(["export", str(run), "--out", str(exported)]) == 0
    args = ["--prompt", "ROMEO:", "--length", "8", "--steps", "3", "--seed", "0"]
    capsys.readouterr()
    assert main(["generate", str(exported), *args]) == 0
    text = capsys.readouterr().out
    new_keys = ("latent_scale", "embed_init_std", "logit_skip", "time_warping", "vae_checkpoint_path")
    config = json.loads((exported / "config.json").read_text())
    (exported / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k not in new_keys}))
    lines = (run / "config.yaml").read_text().splitlines(keepends=True)
    (run / "config.yaml").write_text("".join(ln for ln in lines if ln.strip().split(":")[0] not in new_keys))
    assert load_run_config(run / "config.yaml").model.latent_scale is None
    for folder in (exported, run):
        assert main(["generate", str(folder), *args]) == 0
        assert capsys.readouterr().out == text
    (exported / "config.json").write_text(json.dumps({**config, "use_vae_latent": True}))  # no latent_diffusion
    assert main(["generate", str(exported)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "use_vae_latent" in err and "latent_diffusion" in err
