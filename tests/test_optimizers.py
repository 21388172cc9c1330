"""train.optimizer=muon: Muon on the linear layers' weights, AdamW on the rest, one optimizer to the trainer."""

import io
import shutil

import torch

from dimba.cli import main
from dimba.config import load_config
from dimba.model import build_model
from dimba.training.checkpoint import load_training_state
from dimba.training.optimizers import MuonAdamW, build_optimizer, muon_names, peak_lrs
from dimba.training.setup import _no_weight_decay


def _model_and_config(*overrides):
    cfg = load_config("tiny", None, ["model.d_model=32", "model.num_denoiser_layers=2", "model.d_state=8",
                                     "model.headdim=16", "train.optimizer=muon", *overrides])
    torch.manual_seed(0)
    return build_model(cfg.model, vocab_size=300), cfg


def test_muon_takes_exactly_the_linear_weights():
    model, _ = _model_and_config()
    names = muon_names(model, _no_weight_decay(model))
    params = dict(model.named_parameters())
    linear = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)} & params.keys()
    assert model.head.weight is model.embedding.weight  # the tied head: an embedding, AdamW's
    assert names == linear and any("mixer.in_proj" in n for n in names) and any("mixer.out_proj" in n for n in names)
    assert all(params[n].dim() == 2 for n in names)
    assert not any("embedding" in n or "conv1d" in n or "norm" in n or n.endswith("bias") for n in names)


def _set_grads(model, seed):
    torch.manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn_like(p)


def _one_step(model, optimizer, seed):
    _set_grads(model, seed)
    optimizer.step()


def test_the_combined_optimizer_steps_each_part_as_its_own_optimizer_would():
    model, cfg = _model_and_config("train.muon_lr=0.02")
    exempt = _no_weight_decay(model)
    muon = muon_names(model, exempt)
    twin = build_model(cfg.model, vocab_size=300)
    twin.load_state_dict(model.state_dict())
    combined = build_optimizer(cfg.train, model, exempt, muon)
    assert isinstance(combined, MuonAdamW) and peak_lrs(cfg.train, combined) == [0.02, cfg.train.lr, cfg.train.lr]
    named = dict(twin.named_parameters())
    adamw = torch.optim.AdamW([{"params": [named[n] for n in named if n not in muon and n not in exempt],
                                "weight_decay": cfg.train.weight_decay},
                               {"params": [named[n] for n in named if n in exempt], "weight_decay": 0.0}],
                              lr=cfg.train.lr, betas=(cfg.train.beta1, cfg.train.beta2))
    plain_muon = torch.optim.Muon([named[n] for n in sorted(muon, key=list(named).index)], lr=0.02,
                                  weight_decay=cfg.train.weight_decay, adjust_lr_fn="match_rms_adamw")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for seed in range(3):
        _one_step(model, combined, seed)
        _set_grads(twin, seed)
        adamw.step()
        plain_muon.step()
    for n, p in model.named_parameters():
        assert torch.equal(p, named[n]), n
        assert not torch.equal(p, before[n]), n  # every parameter trained


def test_state_dict_round_trip_continues_bitwise():
    model, cfg = _model_and_config("train.muon_lr=0.01")
    exempt = _no_weight_decay(model)
    opt = build_optimizer(cfg.train, model, exempt, muon_names(model, exempt))
    for seed in range(2):
        _one_step(model, opt, seed)
    copy, _ = _model_and_config("train.muon_lr=0.01")
    copy.load_state_dict(model.state_dict())
    reloaded = build_optimizer(cfg.train, copy, exempt, muon_names(copy, exempt))
    saved = io.BytesIO()
    torch.save(opt.state_dict(), saved)  # as a checkpoint holds it: no tensor shared with the running optimizer
    saved.seek(0)
    reloaded.load_state_dict(torch.load(saved))
    assert len(reloaded.state) == len(opt.state) > 0
    for seed in (2, 3):
        _one_step(model, opt, seed)
        _one_step(copy, reloaded, seed)
    for (n, a), b in zip(model.named_parameters(), copy.parameters()):
        assert torch.equal(a, b), n


def test_a_muon_run_learns_and_resumes_exactly(corpus, tmp_path, tiny, metrics):
    """Resumed from its step-6 checkpoint, a run ends bitwise where the uninterrupted run did: the Muon state and
    the Muon group's own peak learning rate (train.muon_lr, not train.lr) come back."""
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert main(["train", "--data", str(corpus), "--out", str(full), "--max-steps", "12", "--quiet", *tiny,
                 "train.optimizer=muon", "train.muon_lr=0.02", "train.eval_every=6", "train.save_every=6"]) == 0
    losses = metrics(full, "val_loss")
    assert losses[-1] < losses[0] - 0.3
    shutil.copytree(full, cut)
    shutil.copy(cut / "checkpoints" / "step-0000006.ckpt", cut / "checkpoints" / "last.ckpt")
    assert main(["train", "--resume", str(cut), "--quiet"]) == 0
    a, b = (load_training_state(run / "checkpoints" / "last.ckpt") for run in (full, cut))
    assert a["step"] == b["step"] == 12
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert [g["lr"] for g in a["optimizer"]["param_groups"]] == [g["lr"] for g in b["optimizer"]["param_groups"]]


def test_muon_refuses_fsdp_in_one_line(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--strategy", "fsdp", "--out", str(run), "--quiet", "train.optimizer=muon"]) == 2
    assert "train.optimizer=muon does not work with train.strategy=fsdp" in capsys.readouterr().err
    assert not run.exists()


def test_an_unknown_optimizer_is_refused(tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path / "run"), "--quiet", "train.optimizer=sgd"]) == 2
    assert "train.optimizer" in capsys.readouterr().err
