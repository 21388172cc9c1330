"""Never lose work: a run killed with SIGKILL and resumed ends bitwise identical to an uninterrupted one,
no checkpoint on disk is ever half-written, and non-finite steps are skipped, counted and, after
train.max_bad_steps in a row, stop the run cleanly with the last good checkpoint."""

import csv
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import dimba.training
import dimba.training.step
from dimba.training.checkpoint import load_training_state
from dimba.cli import main
from dimba.config import load_config

MAX_STEPS, KILL_AFTER = 24, 7  # kill once metrics.csv shows step >= KILL_AFTER: last.ckpt is then at step 6 or later
TIMEOUT = 120
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


@pytest.fixture(scope="module")
def overrides(tiny) -> tuple[str, ...]:
    """A self-conditioned tiny run with accumulation, frequent checkpoints and a step-based LR schedule."""
    return (*tiny, "model.self_conditioning=true", "train.grad_accum=2", "train.eval_every=4", "train.save_every=3",
            "train.log_every=1", "train.max_time=null")


def _start(args: list[str], log) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "dimba", "train", "--quiet", *args], stdout=log, stderr=log, env=ENV)


def _rows(run) -> list[dict[str, str]]:
    path = run / "metrics.csv"
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _wait_for_step(proc: subprocess.Popen, run, step: int) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not any(r["loss"] and int(r["step"]) >= step for r in _rows(run)):
        assert proc.poll() is None, f"training exited early ({proc.returncode})"
        assert time.monotonic() < deadline, "training did not reach the kill point in time"
        time.sleep(0.01)


def _checkpoints_all_load(run) -> dict[str, dict]:
    """Every *.ckpt loads; anything else in checkpoints/ can only be a hidden temporary of an interrupted save."""
    files = sorted((run / "checkpoints").iterdir())
    assert all(p.suffix == ".ckpt" or (p.name.startswith(".") and not p.name.endswith(".ckpt")) for p in files), files
    return {p.name: load_training_state(p) for p in files if p.suffix == ".ckpt"}


def _assert_bitwise_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_sigkill_then_resume_is_bitwise_identical_to_an_uninterrupted_run(corpus, tmp_path, overrides):
    full, killed = tmp_path / "full", tmp_path / "killed"
    args = ["--data", str(corpus), "--max-steps", str(MAX_STEPS), *overrides]
    with open(tmp_path / "full.log", "w") as full_log, open(tmp_path / "killed.log", "w") as killed_log:
        reference = _start([*args, "--out", str(full)], full_log)  # runs alongside the one that gets killed
        victim = _start([*args, "--out", str(killed)], killed_log)
        try:
            _wait_for_step(victim, killed, KILL_AFTER)
            os.kill(victim.pid, signal.SIGKILL)
            assert victim.wait(TIMEOUT) == -signal.SIGKILL
            assert reference.wait(TIMEOUT) == 0, (tmp_path / "full.log").read_text()
        finally:
            for proc in (reference, victim):
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()

    on_disk = _checkpoints_all_load(killed)  # nothing half-written, whenever the kill struck
    interrupted_at = on_disk["last.ckpt"]["step"]
    assert 6 <= interrupted_at < MAX_STEPS
    (killed / "checkpoints" / ".last.ckpt.x1y2z3").write_bytes(b"PK\x03")  # as a kill during a save would leave it

    resumed = subprocess.run([sys.executable, "-m", "dimba", "train", "--resume", str(killed), "--quiet"],
                             capture_output=True, text=True, env=ENV, timeout=TIMEOUT)
    assert resumed.returncode == 0, resumed.stderr

    assert all(p.suffix == ".ckpt" for p in (killed / "checkpoints").iterdir())  # resume removed stale temporaries
    a, b = _checkpoints_all_load(full), _checkpoints_all_load(killed)
    assert a.keys() == b.keys() == {"last.ckpt", "best.ckpt",
                                    *(f"step-{s:07d}.ckpt" for s in range(3, MAX_STEPS + 1, 3))}
    last_a, last_b = a["last.ckpt"], b["last.ckpt"]
    assert last_a["step"] == last_b["step"] == MAX_STEPS
    assert last_a["best"] == last_b["best"] and a["best.ckpt"]["step"] == b["best.ckpt"]["step"]  # kept comparing
    _assert_bitwise_equal(a["best.ckpt"]["ema"], b["best.ckpt"]["ema"])
    _assert_bitwise_equal(last_a["model"], last_b["model"])
    _assert_bitwise_equal(last_a["ema"], last_b["ema"])
    opt_a, opt_b = last_a["optimizer"]["state"], last_b["optimizer"]["state"]
    assert opt_a.keys() == opt_b.keys()
    for key in opt_a:
        _assert_bitwise_equal(opt_a[key], opt_b[key])

    # metrics.csv: the rows the killed process wrote after its checkpoint were replaced, not duplicated
    train_a = [(r["step"], r["loss"], r["grad_norm"]) for r in _rows(full) if r["loss"]]
    train_b = [(r["step"], r["loss"], r["grad_norm"]) for r in _rows(killed) if r["loss"]]
    assert [int(s) for s, _, _ in train_b] == list(range(1, MAX_STEPS + 1))
    assert train_a == train_b


def _poison(monkeypatch, bad_steps: set[int], snapshots: list | None = None) -> None:
    """Make the training loss NaN (and with it every gradient) at the given steps (grad_accum=1);
    validation, which runs without gradients, is left alone. ``snapshots`` receives the weights
    at the start of every step."""
    real, calls = dimba.training.step.compute_losses, [0]

    def compute_losses(model, ids, dc, *args, **kwargs):
        loss, parts = real(model, ids, dc, *args, **kwargs)
        if not torch.is_grad_enabled():
            return loss, parts
        calls[0] += 1
        if snapshots is not None:
            snapshots.append([p.detach().clone() for p in model.parameters()])
        if calls[0] in bad_steps:
            loss = loss * float("nan")
            parts = {**parts, "loss": loss.detach()}
        return loss, parts

    monkeypatch.setattr(dimba.training.step, "compute_losses", compute_losses)


def _finite(weights: dict) -> bool:
    return all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())


def test_a_non_finite_step_is_skipped_and_counted(corpus, tmp_path, monkeypatch, overrides):
    snapshots = []
    _poison(monkeypatch, {3}, snapshots)
    kept = [o for o in overrides if not o.startswith("train.grad_accum")]
    cfg = load_config("tiny", None, [*kept, f"data.corpus={corpus}", "train.max_steps=6"])
    run = dimba.training.fit(cfg, tmp_path / "run", progress=False)

    same = [all(torch.equal(p, q) for p, q in zip(before, after)) for before, after in zip(snapshots, snapshots[1:])]
    assert same == [False, False, True, False, False]  # only the NaN step 3 left the weights as they were
    rows = {int(r["step"]): r for r in _rows(run) if r["loss"]}
    assert [rows[s]["bad_steps"] for s in range(1, 7)] == ["0", "0", "1", "1", "1", "1"]
    assert math.isnan(float(rows[3]["loss"])) and math.isnan(float(rows[3]["grad_norm"]))
    state = load_training_state(run / "checkpoints" / "last.ckpt")
    assert state["step"] == 6 and state["bad_steps"] == 1
    assert int(state["ema"]["n_averaged"]) == 5  # the EMA skipped the bad step too
    assert {int(s["step"]) for s in state["optimizer"]["state"].values()} == {5}  # and so did AdamW
    assert _finite(state["model"]) and _finite(state["ema"])


def test_consecutive_bad_steps_stop_the_run_with_the_last_good_checkpoint(corpus, tmp_path, monkeypatch, capsys,
                                                                         overrides):
    _poison(monkeypatch, set(range(5, 100)))
    kept = [o for o in overrides if not o.startswith(("train.grad_accum", "train.save_every"))]
    run = tmp_path / "run"
    code = main(["train", "--data", str(corpus), "--max-steps", "20", "--out", str(run), "--quiet", *kept,
                 "train.save_every=2", "train.max_bad_steps=3"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("dimba: error: training diverged: 3 consecutive steps (up to step 7)") and "train.lr" in err[-1]
    assert not any("Traceback" in line for line in err)
    state = _checkpoints_all_load(run)
    assert set(state) == {"last.ckpt", "best.ckpt", "step-0000002.ckpt", "step-0000004.ckpt"}  # none after the
    assert state["last.ckpt"]["step"] == state["best.ckpt"]["step"] == 4                   # first bad step
    assert _finite(state["best.ckpt"]["ema"])
    assert _finite(state["last.ckpt"]["model"]) and _finite(state["last.ckpt"]["ema"])
    assert [(int(r["step"]), r["bad_steps"]) for r in _rows(run) if r["loss"]][-3:] == [(5, "1"), (6, "2"), (7, "3")]

    monkeypatch.undo()  # the fix the message names: resume with a lower train.lr
    assert main(["train", "--resume", str(run), "--quiet", "train.lr=1e-4"]) == 0
    rows = [r for r in _rows(run) if r["loss"]]
    assert [int(r["step"]) for r in rows] == list(range(1, 21)) and rows[-1]["bad_steps"] == "0"
    assert float(rows[-1]["lr"]) == pytest.approx(1e-5)  # the new train.lr, decayed to min_lr_ratio=0.1
