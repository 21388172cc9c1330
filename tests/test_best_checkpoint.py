"""train.save_best keeps checkpoints/best.ckpt, the state at the lowest validation loss (through a resume, too), and
every command that takes a model loads one checkpoint of a run when given its path."""

import json

import pytest
import torch

from dimba.cli import main
from dimba.loading import load_for_inference, sample_defaults
from dimba.training.checkpoint import best_score


def _val_losses(metrics, run) -> dict[int, float]:
    """step -> validation loss of every validation after step 0."""
    return {int(r["step"]): float(r["val_loss"]) for r in metrics(run) if r.get("val_loss") and int(r["step"]) > 0}


@pytest.fixture(scope="module")
def spoiled(tmp_path_factory, corpus, tiny):
    """A tiny masked run (EMA off, so validation reads the trained weights) that learns for 20 steps, then is
    resumed for 10 more at a learning rate that wrecks it."""
    run = tmp_path_factory.mktemp("best") / "run"
    base = ["--data", str(corpus), "--quiet", *tiny, "train.eval_every=5", "train.ema_decay=0"]
    assert main(["train", "--family", "masked", "--max-steps", "20", "--out", str(run), *base]) == 0
    before = torch.load(run / "checkpoints" / "best.ckpt", weights_only=True)
    assert main(["train", "--resume", str(run), "--max-steps", "30", "train.lr=0.5"]) == 0
    return run, before


def test_best_checkpoint_is_the_lowest_validation_loss_and_survives_a_worse_resume(spoiled, metrics):
    run, before = spoiled
    losses = _val_losses(metrics, run)
    first = {s: v for s, v in losses.items() if s <= 20}
    assert before["step"] == min(first, key=first.get)
    score = pytest.approx(min(first.values()), rel=1e-5)  # metrics.csv keeps 6 significant digits
    assert before["best"] == {"metric": "val_loss", "score": score, "step": before["step"]}
    assert max(v for s, v in losses.items() if s > 20) > min(first.values())  # the resume made validation worse
    best = torch.load(run / "checkpoints" / "best.ckpt", weights_only=True)
    assert best["step"] == min(losses, key=losses.get)
    last = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["step"] == 30 and last["best"]["step"] == best["step"]  # the resumed run kept comparing
    if best["step"] <= 20:  # the wrecking rate did not beat the first session: best.ckpt is the first session's
        assert all(torch.equal(best["ema"][k], before["ema"][k]) for k in before["ema"])


def test_a_checkpoint_path_loads_that_checkpoint(spoiled):
    run, _ = spoiled
    ckpts = run / "checkpoints"
    best = torch.load(ckpts / "best.ckpt", weights_only=True)["ema"]
    model, tokenizer = load_for_inference(ckpts / "best.ckpt")
    assert all(torch.equal(v, best["module." + k]) for k, v in model.state_dict().items())
    latest, _ = load_for_inference(run)
    assert any(not torch.equal(v, latest.state_dict()[k]) for k, v in model.state_dict().items())
    assert tokenizer.vocab_size == model.config.vocab_size
    assert sample_defaults(ckpts / "step-0000010.ckpt") == sample_defaults(run)


def test_eval_and_export_of_the_best_checkpoint(spoiled, capsys, tmp_path):
    run, _ = spoiled
    best = run / "checkpoints" / "best.ckpt"
    step = torch.load(best, weights_only=True)["step"]
    capsys.readouterr()
    assert main(["eval", str(best), "--json", "--max-tokens", "256", "--mc-samples", "1"]) == 0
    at_best = json.loads(capsys.readouterr().out)["bits_per_byte"]
    assert main(["eval", str(run), "--json", "--max-tokens", "256", "--mc-samples", "1"]) == 0
    at_last = json.loads(capsys.readouterr().out)["bits_per_byte"]
    assert at_best < at_last  # the wrecked last checkpoint is worse on held-out text too
    out = tmp_path / "export"
    assert main(["export", str(best), "--out", str(out)]) == 0
    assert f"trained for {step} optimizer steps" in (out / "README.md").read_text()
    exported, _ = load_for_inference(out)
    model, _ = load_for_inference(best)
    assert all(torch.equal(v, exported.state_dict()[k]) for k, v in model.state_dict().items())


def test_a_missing_checkpoint_is_one_line_naming_what_the_run_keeps(tmp_path, corpus, tiny, capsys):
    run = tmp_path / "run"
    assert main(["train", "--family", "ar", "--data", str(corpus), "--max-steps", "10", "--out", str(run), "--quiet",
                 *tiny, "train.save_best=false"]) == 0
    assert not (run / "checkpoints" / "best.ckpt").exists()
    capsys.readouterr()
    assert main(["generate", str(run / "checkpoints" / "best.ckpt"), "--length", "4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "last.ckpt" in err[0] and "step-0000010.ckpt" in err[0] and "save_best" in err[0]


def test_best_score_ranks_losses_up_and_rewards_down():
    assert best_score({"val_loss": 2.0, "val_ce": 1.0}) == ("val_loss", 2.0)
    assert best_score({"val_reward": 0.75}) == ("val_reward", -0.75)
    assert best_score({"val_ce": 1.0}) is None


def test_a_run_starts_from_one_checkpoint_of_another(spoiled, tmp_path, capsys):
    from dimba.training.finetune import adaptation_config, finetune_config, init_weights

    run, _ = spoiled
    best = run / "checkpoints" / "best.ckpt"
    ema = torch.load(best, weights_only=True)["ema"]
    for cfg in (adaptation_config(best), finetune_config(best, "sft", "task:arithmetic")):
        assert cfg.data.tokenizer == str(run / "tokenizer.json") and cfg.finetune.init == str(best)
        assert all(torch.equal(v, ema["module." + k]) for k, v in init_weights(cfg).items())
    capsys.readouterr()
    out = tmp_path / "adapted"
    assert main(["train", "--init", str(best), "--family", "ar", "--max-steps", "2", "--out", str(out), "--quiet"]) == 0
    assert f"tensors from {best}" in capsys.readouterr().err
