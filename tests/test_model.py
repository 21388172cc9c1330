import pytest
import torch

from dimba import DIMBA, compute_dimba_losses, sample_from_model
from dimba.errors import CheckpointError

V = 64


def tiny(backbone="transformer", **kw):
    torch.manual_seed(0)
    base = dict(d_model=32, num_denoiser_layers=2, backbone=backbone, num_heads=2, d_state=8, headdim=16, chunk_size=8)
    base.update(kw)
    return DIMBA(V, **base)


@pytest.mark.parametrize("kw", [{}, {"latent_diffusion": True, "d_latent": 8},
                                {"onehot_latent": True, "prediction_type": "logits"}])
def test_latent_is_unit_variance_and_round_trips_exactly(kw):
    m = tiny(**kw)
    ids = torch.randint(0, V, (4, 50))
    m.calibrate_latent_scale(ids)
    z = m.encode(ids)
    assert abs(z.std().item() - 1) < 1e-4
    assert torch.equal(m.round(z), ids)
    assert torch.equal(m.round(m.encode(torch.arange(V)[None]))[0], torch.arange(V))


@pytest.mark.parametrize("backbone", ["transformer", "mamba2"])
def test_condition_sees_only_the_prompt(backbone):
    m = tiny(backbone)
    a = torch.randint(0, V, (2, 16))
    b = a.clone()
    b[:, 5:] = torch.randint(0, V, (2, 11))  # same prompt (first 5), different targets
    pm = torch.zeros(2, 16, dtype=torch.bool)
    pm[:, :5] = True
    t = torch.tensor([0.3, 0.7])
    assert torch.equal(m.condition(a, t, pm), m.condition(b, t, pm))
    assert torch.equal(m.condition(a, t, None), m.condition(b, t, None))  # no prompt: ids unused
    c = a.clone()
    c[:, 2] = (a[:, 2] + 1) % V  # a different prompt changes the condition
    with torch.no_grad():
        m.prompt_proj.weight.normal_()
    assert not torch.equal(m.condition(a, t, pm), m.condition(c, t, pm))
    # gradient check: no path from target embeddings into the conditioning vector
    emb = m.embedding.weight
    g = torch.autograd.grad(m.condition(a, t, pm).sum(), emb)[0]
    used = torch.zeros(V, dtype=torch.bool)
    used[a[:, :5].flatten()] = True
    assert g[~used].abs().sum() == 0


def test_prompt_positions_are_clean_and_unscored():
    m = tiny()
    ids = torch.randint(0, V, (2, 12))
    pm = torch.zeros(2, 12, dtype=torch.bool)
    pm[:, :4] = True
    _, _, info = m(ids, torch.tensor([1.0, 1.0]), prompt_mask=pm)
    assert torch.equal(info["z_t"][:, :4], info["z0"][:, :4])
    assert not torch.allclose(info["z_t"][:, 4:], info["z0"][:, 4:])
    _, _, info = m(ids, torch.tensor([1.0, 1.0]), prompt_mask=pm, drop_cond=True)
    assert not info["prompt_mask"].any()  # dropped prompt: the whole sequence is noised


@pytest.mark.parametrize("kw", [{"prediction_type": "x0"}, {"prediction_type": "v", "self_conditioning": True},
                                {"latent_diffusion": True, "d_latent": 16, "backbone": "mamba2"}])
def test_loss_falls_when_fitting_a_small_batch(kw):
    m = tiny(**kw)
    ids = torch.randint(0, V, (8, 16))
    m.calibrate_latent_scale(ids)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    t = torch.linspace(0.05, 0.95, 8)
    noise = torch.randn(8, 16, m.d_x, generator=torch.Generator().manual_seed(0))
    first = None
    for _ in range(60):
        loss, parts = compute_dimba_losses(m, ids, t, noise=noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first if first is not None else loss.item()
    assert set(parts) >= {"loss", "mse", "ce", "recon"}
    assert loss.item() < 0.5 * first


def test_save_load_gives_identical_logits_and_is_strict(tmp_path):
    m = tiny("mamba2", self_conditioning=True, latent_diffusion=True, d_latent=8)
    m.calibrate_latent_scale(torch.randint(0, V, (2, 8)))
    ids = torch.randint(0, V, (2, 10))
    noise = torch.randn(2, 10, 8)
    out = m.save_pretrained(tmp_path / "exp")
    assert {p.name for p in out.iterdir()} >= {"config.json", "model.safetensors", "README.md"}
    m2 = DIMBA.from_pretrained(out)
    assert float(m2.latent_scale) == float(m.latent_scale)
    with torch.no_grad():
        a = m.eval().predict_token_logits(ids, torch.tensor([0.5, 0.5]), noise=noise)
        b = m2.eval().predict_token_logits(ids, torch.tensor([0.5, 0.5]), noise=noise)
    assert torch.equal(a, b)
    with pytest.raises(CheckpointError, match="not empty"):
        m.save_pretrained(out)
    # strict: weights of another shape / a missing weight are errors
    other = tiny("mamba2", self_conditioning=False, latent_diffusion=True, d_latent=8).save_pretrained(tmp_path / "other")
    (out / "model.safetensors").write_bytes((other / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointError):
        DIMBA.from_pretrained(out)
    (out / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="corrupted"):
        DIMBA.from_pretrained(out)


def test_sampling_is_deterministic_and_keeps_the_prompt():
    m = tiny("mamba2", self_conditioning=True)
    kw = dict(seq_len=9, num_steps=4, guidance_scale=2.0, num_samples=2)
    a = sample_from_model(m, [3, 4, 5], generator=torch.Generator().manual_seed(0), **kw)
    b = sample_from_model(m, [3, 4, 5], generator=torch.Generator().manual_seed(0), **kw)
    c = sample_from_model(m, [3, 4, 5], generator=torch.Generator().manual_seed(1), **kw)
    assert a.shape == (2, 12) and torch.equal(a, b) and not torch.equal(a, c)
    assert (a[:, :3] == torch.tensor([3, 4, 5])).all()


@pytest.mark.parametrize("backbone", ["mamba2", "transformer"])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(backbone):
    from dimba.config import DiffusionConfig
    from dimba.families import compute_losses

    torch.manual_seed(0)
    m = DIMBA(40, family="ar", backbone=backbone, d_model=32, num_denoiser_layers=2, d_state=8, headdim=16,
              chunk_size=8, num_heads=2).train()
    ids = torch.randint(3, 40, (2, 24))
    grads, calls = [], []
    mixer = m.backbone.blocks[0].mixer
    inner = mixer.forward
    mixer.forward = lambda *a: calls.append(1) or inner(*a)
    for recompute in (False, True):
        m.backbone.gradient_checkpointing = recompute
        m.zero_grad()
        calls.clear()
        loss, _ = compute_losses(m, ids, DiffusionConfig())
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in m.parameters()]))
        assert len(calls) == (2 if recompute else 1)  # the block really is recomputed in the backward pass
    (l0, g0), (l1, g1) = grads
    assert torch.equal(l0, l1) and all(torch.allclose(a, b, atol=1e-6) for a, b in zip(g0, g1))
