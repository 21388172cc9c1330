"""End-to-end CLI: train -> generate -> export -> resume on a tiny local corpus, and user errors."""

import os
import re
import subprocess
import sys

import pytest
import torch

from dimba import DIMBA, sample_from_model
from dimba.cli import main, parse_cli
from dimba.loading import load_for_inference
from dimba.special_tokens import MASK_ID

DUAL_FORWARD = DIMBA.dual_forward


@pytest.fixture(scope="module")
def run(tmp_path_factory, corpus, tiny):
    out = tmp_path_factory.mktemp("runs") / "r"
    assert main(["train", "--data", str(corpus), "--max-steps", "20", "--out", str(out), "--quiet", *tiny]) == 0
    return out


def test_train_writes_a_complete_run(run, metrics):
    names = {p.name for p in run.iterdir()}
    assert {"config.yaml", "tokenizer.json", "metrics.csv", "checkpoints"} <= names
    assert (run / "checkpoints" / "last.ckpt").is_file() and (run / "checkpoints" / "step-0000010.ckpt").is_file()
    val = metrics(run, "val_loss")
    assert len(val) >= 3  # step 0, 10, 20
    assert val[-1] < val[0]  # validation loss falls


def test_generate_from_run_and_export_agree(run, tmp_path, capsys):
    args = ["--prompt", "ROMEO:", "--length", "12", "--steps", "5", "--seed", "3"]
    assert main(["generate", str(run), *args]) == 0
    from_run = capsys.readouterr().out
    assert from_run.startswith("ROMEO:")
    assert main(["export", str(run), "--out", str(tmp_path / "exp")]) == 0
    capsys.readouterr()
    assert {p.name for p in (tmp_path / "exp").iterdir()} == {"config.json", "model.safetensors", "tokenizer.json",
                                                        "sample_config.json", "README.md"}
    assert main(["generate", str(tmp_path / "exp"), *args]) == 0
    assert capsys.readouterr().out == from_run
    assert main(["generate", str(tmp_path / "exp"), *args[:-1], "4"]) == 0
    assert capsys.readouterr().out != from_run


def test_resume_continues_from_last_checkpoint(run, tmp_path, metrics):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    assert main(["train", "--resume", str(copy), "--max-steps", "25", "--quiet"]) == 0
    state = torch.load(copy / "checkpoints" / "last.ckpt", weights_only=True)
    assert state["step"] == 25
    steps = metrics(copy, "step")
    assert steps == sorted(steps) and steps[-1] == 25


def _err(capsys, argv):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    return code, err


@pytest.mark.parametrize("argv, needle", [
    (["train", "--print-config", "train.lrr=3"], "unknown config key 'train.lrr'"),
    (["train", "--print-config", "train.lr=fast"], "train.lr"),
    (["train", "--data", "/no/such/dir", "--out", "{tmp}/x"], "/no/such/dir"),
    (["train", "--data", "{tmp}/empty.txt", "--out", "{tmp}/x"], "empty"),
    (["generate", "/no/such/model"], "not found"),
    (["generate", "{tmp}"], "holds no model"),
    (["train", "--resume", "{tmp}"], "not a dimba run"),
    (["generate", "{run}", "--prompt", "ROMEO: " * 40], "context"),
    (["generate", "{run}", "--length", "0"], "--length"),
    (["generate", "{run}", "--steps", "0"], "--steps"),
    (["generate", "{run}", "--top-p", "1.5"], "--top-p"),
    (["train", "--out", "{run}"], "already holds another run"),
    (["export", "{run}", "--out", "{run}"], "not empty"),
])
def test_user_errors_are_one_line_exit_2(argv, needle, tmp_path, run, capsys):
    (tmp_path / "empty.txt").write_text("  \n")
    argv = [a.format(tmp=tmp_path, run=run) for a in argv]
    before = sorted(p.name for p in run.rglob("*"))
    code, err = _err(capsys, argv)
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("dimba: error:") and needle in err, err
    assert sorted(p.name for p in run.rglob("*")) == before  # nothing written into the existing run


def test_console_script_exit_status_and_no_traceback(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "dimba", "generate", str(tmp_path / "missing")], capture_output=True,
                          text=True, env=env)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_generate_takes_unset_flags_from_the_run_sample_config(run, tmp_path, capsys):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    args = ["--prompt", "ROMEO:", "--length", "12", "--seed", "3"]
    assert main(["generate", str(copy), *args, "--steps", "3", "--temperature", "0"]) == 0
    explicit = capsys.readouterr().out
    cfg = (copy / "config.yaml").read_text()
    cfg = re.sub(r"(?m)^(\s*)temperature: 1.0$", r"\1temperature: 0.0", cfg.replace("num_steps: 50", "num_steps: 3"))
    (copy / "config.yaml").write_text(cfg)
    assert main(["generate", str(copy), *args]) == 0
    assert capsys.readouterr().out == explicit


def test_print_config_shows_resolved_values(capsys):
    assert main(["train", "--print-config", "--backbone", "transformer", "train.lr=5e-4"]) == 0
    out = capsys.readouterr().out
    assert "backbone: transformer" in out and "lr: 0.0005" in out


def test_tokenizer_train_verb_writes_and_refuses_overwrite(corpus, tmp_path, capsys):
    from dimba.data.tokenizer import Tokenizer

    out = tmp_path / "tok"
    assert main(["tokenizer", "train", "--data", str(corpus), "--vocab-size", "300", "--out", str(out)]) == 0
    tok = Tokenizer.from_file(out / "tokenizer.json")
    assert tok.vocab_size == 300 and tok.decode(tok.encode("ROMEO:\nO gentle night")) == "ROMEO:\nO gentle night"
    before = (out / "tokenizer.json").read_bytes()
    code, err = _err(capsys, ["tokenizer", "train", "--data", str(corpus), "--vocab-size", "400", "--out", str(out)])
    assert code == 2 and (out / "tokenizer.json").read_bytes() == before


@pytest.mark.parametrize("family, flags", [("masked", ["--block-length", "4", "--remasking", "random"]),
                                           ("ar", []), ("hybrid", [])])
def test_every_family_trains_and_generates(family, flags, corpus, tmp_path, capsys, tiny, metrics, monkeypatch):
    out = tmp_path / family
    assert main(["train", "--family", family, "--data", str(corpus), "--max-steps", "10", "--out", str(out), "--quiet",
                 *tiny]) == 0
    val = metrics(out, "val_loss")
    assert val[-1] < val[0]  # the family's own validation objective falls
    assert "family: " + family in (out / "config.yaml").read_text()
    capsys.readouterr()
    args = ["--prompt", "ROMEO:", "--length", "12", "--steps", "8", "--seed", "1", *flags]
    assert main(["generate", str(out), *args]) == 0
    text = capsys.readouterr().out
    assert text.startswith("ROMEO:")
    if family == "masked":  # the DualCache flag: 8 steps over the 8 blocks of the 32-token canvas, one per block,
        reads = []  # where the cache changes nothing; each block's step reads the canvas
        monkeypatch.setattr(DIMBA, "dual_forward", lambda self, *a: reads.append(1) or DUAL_FORWARD(self, *a))
        assert main(["generate", str(out), *args, "--dual-cache"]) == 0
        assert capsys.readouterr().out == text and len(reads) == 8
    model, tokenizer = load_for_inference(out)  # the same generation: every position is filled, none left masked
    prompt = tokenizer.encode("ROMEO:")
    ids = sample_from_model(model, prompt, seq_len=32 - len(prompt), num_steps=8, remasking="random",
                            block_length=4 if flags else None, generator=torch.Generator().manual_seed(1))
    assert ids.shape == (1, 32) and not (ids == MASK_ID).any()
    assert main(["export", str(out), "--out", str(tmp_path / "exp")]) == 0
    capsys.readouterr()
    card = (tmp_path / "exp" / "README.md").read_text()
    assert {"masked": "masked ([MASK]", "ar": "autoregressive", "hybrid": "hybrid"}[family] in card
    assert main(["generate", str(tmp_path / "exp"), *args]) == 0
    assert capsys.readouterr().out == text


def test_lm_eval_without_the_extra_is_one_line(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "dimba.evaluation.harness", None)  # as if lm_eval were not installed
    assert main(["lm-eval", "--model", "dimba", "--tasks", "dimba_continuation"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install 'dimba[lmeval]'" in err, err


def test_overrides_may_sit_among_the_options_in_several_groups():
    args = parse_cli(["train", "--family", "masked", "model.d_model=64", "--backbone", "transformer",
                      "model.num_heads=4", "--max-steps", "3", "train.lr=1e-3"])
    assert args.overrides == ["model.d_model=64", "model.num_heads=4", "train.lr=1e-3"]
    assert (args.backbone, args.max_steps) == ("transformer", 3)
    args = parse_cli(["finetune", "sft", "--init", "runs/x", "--data", "task:arithmetic", "--out", "runs/y",
                      "train.lr=2e-3", "--max-steps", "40", "finetune.val_rows=8"])
    assert args.overrides == ["train.lr=2e-3", "finetune.val_rows=8"]


@pytest.mark.parametrize("argv", [["train", "model.d_model=64", "--nope"], ["train", "model.d_model=64", "--quiet",
                                                                              "stray"]])
def test_an_unknown_word_among_the_overrides_stops_in_one_line(argv, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"unrecognized arguments: {argv[-1]}" in err and err.count("\n") == 1
