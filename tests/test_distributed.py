"""Data-parallel training on CPU: two DDP processes (gloo) split every global batch between them, and end with
the weights, and log the losses, of one process trained on the same global batches."""

import csv
import itertools
import os
import subprocess
import sys

import pytest
import torch

from dimba.errors import UsageError
from dimba.train import micro_batches

TINY = ["model.d_model=32", "model.num_denoiser_layers=2", "model.d_state=8", "model.headdim=16", "model.chunk_size=16",
        "data.seq_len=32", "data.vocab_size=300", "train.warmup_steps=2", "train.eval_every=100", "train.save_every=100",
        "train.eval_batches=2", "train.log_every=1", "train.num_threads=1", "train.max_time=null",
        "train.precision=32-true", "train.accelerator=cpu"]
STEPS, PER_DEVICE = 6, 4
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def _train(corpus, out, *args: str) -> None:
    """`dimba train` (the ar family: its loss draws no random numbers) in a fresh interpreter."""
    cmd = [sys.executable, "-m", "dimba", "train", "--quiet", "--family", "ar", "--data", str(corpus),
           "--max-steps", str(STEPS), "--out", str(out), *args, *TINY]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _losses(run) -> dict[int, float]:
    with open(run / "metrics.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["loss"]]
    steps = [int(r["step"]) for r in rows]
    assert steps == list(range(1, STEPS + 1))  # one row per step: rank 1 wrote none
    return {int(r["step"]): float(r["loss"]) for r in rows}


def test_ranks_take_disjoint_slices_of_the_single_process_batch():
    data = torch.arange(60).view(30, 2)  # (N, L): 3 global batches of 8 per epoch
    single = itertools.islice(micro_batches(data, 2 * PER_DEVICE, seed=5), 7)
    ranks = [itertools.islice(micro_batches(data, PER_DEVICE, seed=5, rank=r, world_size=2), 7) for r in (0, 1)]
    for whole, r0, r1 in zip(single, *ranks):
        assert not set(r0[:, 0].tolist()) & set(r1[:, 0].tolist())
        assert torch.equal(torch.cat([r0, r1]), whole)
    uninterrupted = list(itertools.islice(micro_batches(data, PER_DEVICE, seed=5, rank=1, world_size=2), 5))
    assert torch.equal(next(micro_batches(data, PER_DEVICE, seed=5, start=4, rank=1, world_size=2)), uninterrupted[4])
    with pytest.raises(UsageError, match="x 2 processes"):
        next(micro_batches(data, 16, seed=5, rank=0, world_size=2))


def test_ddp_on_two_processes_matches_one_process_with_the_global_batch(corpus, tmp_path):
    ddp, single = tmp_path / "ddp", tmp_path / "single"
    _train(corpus, ddp, "--devices", "2", "--strategy", "ddp", f"train.batch_size={PER_DEVICE}")
    _train(corpus, single, f"train.batch_size={2 * PER_DEVICE}")

    assert [p.name for p in ddp.rglob("metrics.csv")] == ["metrics.csv"]
    ddp_loss, single_loss = _losses(ddp), _losses(single)
    for step in ddp_loss:  # the logged loss is the mean over ranks: the loss of the global batch
        assert ddp_loss[step] == pytest.approx(single_loss[step], abs=1e-4)

    a = torch.load(ddp / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(single / "checkpoints" / "last.ckpt", weights_only=True)
    assert a["step"] == b["step"] == STEPS
    assert a["model"].keys() == b["model"].keys()
    for name, value in a["model"].items():  # gradients were averaged over ranks at every step
        torch.testing.assert_close(value, b["model"][name], atol=1e-5, rtol=1e-4, msg=name)


def test_multi_device_runs_need_a_named_folder_and_fsdp_is_refused(tmp_path, capsys):
    from dimba.cli import main

    assert main(["train", "--num-nodes", "2", "--quiet"]) == 2
    assert "pass --out RUN" in capsys.readouterr().err
    assert main(["train", "--strategy", "fsdp", "--out", str(tmp_path / "run"), "--quiet"]) == 2
    assert "train.strategy=fsdp is not supported" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
