"""Data-parallel training on CPU: two DDP or FSDP processes (gloo) split every global batch between them, and end
with the weights, and log the losses, of one process trained on the same global batches."""

import csv
import itertools
import math
import os
import pickle
import subprocess
import sys

import pytest
import torch

from dimba.errors import UsageError
from dimba.data.packing import micro_batches

DISTRIBUTED = ("train.eval_every=100", "train.save_every=100", "train.log_every=1", "train.max_time=null",
               "train.precision=32-true", "train.accelerator=cpu")
STEPS, PER_DEVICE = 6, 4
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def _train(corpus, out, tiny, *args: str, steps: int = STEPS, family: str = "ar") -> None:
    """`dimba train` (by default the ar family: its loss draws no random numbers) in a fresh interpreter; the
    KEY=VALUE overrides in ``args`` come after the tiny ones, so they win."""
    flags = [a for a in args if a.startswith("-") or "=" not in a]
    cmd = [sys.executable, "-m", "dimba", "train", "--quiet", "--family", family, "--data", str(corpus),
           "--max-steps", str(steps), "--out", str(out), *flags, *tiny, *DISTRIBUTED,
           *(a for a in args if a not in flags)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _losses(run, steps: int = STEPS) -> dict[int, float]:
    with open(run / "metrics.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["loss"]]
    assert [int(r["step"]) for r in rows] == list(range(1, steps + 1))  # one row per step: rank 1 wrote none
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


def test_ddp_on_two_processes_matches_one_process_with_the_global_batch(corpus, tmp_path, tiny):
    ddp, single = tmp_path / "ddp", tmp_path / "single"
    _train(corpus, ddp, tiny, "--devices", "2", "--strategy", "ddp", f"train.batch_size={PER_DEVICE}")
    _train(corpus, single, tiny, f"train.batch_size={2 * PER_DEVICE}")

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


def _assert_close(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    for name, value in a.items():
        torch.testing.assert_close(value, b[name], atol=1e-5, rtol=1e-4, msg=f"{what} {name}")


def _sharded(run, tmp_path) -> tuple[dict, dict]:
    """The latest sharded checkpoint of ``run``: its per-run state, and its shards assembled into one state dict
    (the optimizer's keyed by parameter name) by torch's own converter (a test trusts its files)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from dimba.training.checkpoint import latest_checkpoint, load_training_state

    folder = run / "checkpoints"
    ckpt = latest_checkpoint(folder)
    assert ckpt.is_dir() and ckpt.suffix == ".dcp" and not (folder / "last.ckpt").exists()  # nothing gathered
    assert {".metadata", "__0_0.distcp", "__1_0.distcp", "run.pt"} <= {p.name for p in ckpt.iterdir()}  # per rank
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no temporaries left
    whole = tmp_path / f"{run.name}-{ckpt.name}.pt"
    dcp_to_torch_save(ckpt, whole)
    return load_training_state(ckpt), torch.load(whole, weights_only=False)


def test_fsdp_on_two_processes_matches_one_process_resumes_and_generates(corpus, tmp_path, tiny, capsys):
    """Sharded weights, gradients, AdamW moments and EMA: the same training as one process, a sharded checkpoint
    (each rank writes its shards), a resume that reads them back into the shards and continues, and
    `dimba generate` assembling the EMA weights in one process."""
    from dimba.loading import load_for_inference
    from dimba.cli import main

    fsdp, single = tmp_path / "fsdp", tmp_path / "single"
    flat_lr = "train.min_lr_ratio=1.0"  # after warmup the LR is constant: the schedule does not depend on --max-steps
    _train(corpus, fsdp, tiny, "--devices", "2", "--strategy", "fsdp", f"train.batch_size={PER_DEVICE}", flat_lr,
           steps=STEPS // 2)
    meta, half = _sharded(fsdp, tmp_path)
    assert meta["step"] == STEPS // 2 and int(half["ema"]["n_averaged"]) == STEPS // 2 and len(meta["rng_ranks"]) == 2
    _train(corpus, fsdp, tiny, "--resume", str(fsdp), steps=STEPS)  # the run's config.yaml: 2 devices, fsdp
    _train(corpus, single, tiny, f"train.batch_size={2 * PER_DEVICE}", flat_lr)

    assert [p.name for p in fsdp.rglob("metrics.csv")] == ["metrics.csv"]
    fsdp_loss, single_loss = _losses(fsdp), _losses(single)
    for step in fsdp_loss:  # before and after the resume
        assert fsdp_loss[step] == pytest.approx(single_loss[step], abs=1e-4)

    meta, a = _sharded(fsdp, tmp_path)
    assert [p.name for p in (fsdp / "checkpoints").glob("last-*.dcp")] == [meta["sharded"].name]  # older removed
    b = torch.load(single / "checkpoints" / "last.ckpt", weights_only=True)
    assert meta["step"] == b["step"] == STEPS
    _assert_close(a["model"], b["model"], "model")
    _assert_close(a["ema"], b["ema"], "ema")  # the EMA of the shards is the shards of the EMA
    opt_a, opt_b = a["optimizer"], b["optimizer"]
    names = [name for group in opt_a["param_groups"] for name in group["params"]]  # in the order of b's ids
    ids = [index for group in opt_b["param_groups"] for index in group["params"]]
    assert len(names) == len(ids) == len(opt_a["state"]) == len(opt_b["state"])
    for name, index in zip(names, ids):
        _assert_close(opt_a["state"][name], opt_b["state"][index], f"optimizer state {name}")

    model, _ = load_for_inference(fsdp)
    reference, _ = load_for_inference(single)
    _assert_close(model.state_dict(), reference.state_dict(), "inference weights")
    best, reference = load_for_inference(fsdp / "checkpoints" / "best.dcp")[0], load_for_inference(
        single / "checkpoints" / "best.ckpt")[0]  # the same validation losses pick the same step
    assert meta["best"]["step"] == torch.load(single / "checkpoints" / "best.ckpt", weights_only=True)["step"]
    _assert_close(best.state_dict(), reference.state_dict(), "best weights")
    capsys.readouterr()
    assert main(["generate", str(fsdp), "--prompt", "ROMEO:", "--length", "8"]) == 0
    assert capsys.readouterr().out.startswith("ROMEO:")


def test_a_damaged_sharded_checkpoint_is_refused_and_kept(corpus, tmp_path, tiny, capsys):
    """A truncated shard file: `dimba train --resume` and `dimba generate` stop with one line (exit 2), and
    nothing on disk changes."""
    from dimba.training.checkpoint import latest_checkpoint
    from dimba.cli import main

    run = tmp_path / "run"
    _train(corpus, run, tiny, "--devices", "2", "--strategy", "fsdp", f"train.batch_size={PER_DEVICE}", steps=2)
    shard = latest_checkpoint(run / "checkpoints") / "__1_0.distcp"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}

    cmd = [sys.executable, "-m", "dimba", "train", "--quiet", "--resume", str(run), "--max-steps", "4"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "__1_0.distcp is missing or truncated" in proc.stderr, proc.stderr
    capsys.readouterr()
    assert main(["generate", str(run), "--prompt", "ROMEO:", "--length", "8"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "is damaged" in err
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before

    # DCP's .metadata is a pickle: one that would run code when unpickled is refused without running it
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (latest_checkpoint(run / "checkpoints") / ".metadata").write_bytes(pickle.dumps(Payload()))
    capsys.readouterr()
    assert main(["generate", str(run), "--prompt", "ROMEO:", "--length", "8"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and not marker.exists()


def test_fsdp_ranks_take_the_random_self_conditioning_pass_together(corpus, tmp_path, tiny):
    """Every FSDP forward gathers weights from all ranks: a rank taking the optional no-grad self-conditioning
    pass alone would wait forever. With self-conditioning, accumulation and recomputed activations (more forward
    passes), the run completes."""
    run = tmp_path / "run"
    _train(corpus, run, tiny, "--devices", "2", "--strategy", "fsdp", f"train.batch_size={PER_DEVICE}", "train.grad_accum=3",
           "model.self_conditioning=true", "train.gradient_checkpointing=true", steps=3, family="continuous")
    assert all(math.isfinite(loss) for loss in _losses(run, steps=3).values())


def test_multi_device_runs_need_a_named_folder_and_fsdp_needs_a_scaler_free_precision(tmp_path, capsys):
    from dimba.cli import main

    assert main(["train", "--num-nodes", "2", "--quiet"]) == 2
    assert "pass --out RUN" in capsys.readouterr().err
    run = tmp_path / "run"
    assert main(["train", "--strategy", "fsdp", "--out", str(run), "--quiet", "train.precision=16-mixed"]) == 2
    assert "train.precision=16-mixed does not work with train.strategy=fsdp" in capsys.readouterr().err
    assert not run.exists()


def test_ddp_resume_on_two_processes_is_bitwise_exact(corpus, tmp_path, tiny):
    """Every rank's generators are in the checkpoint: rank 1's t and masks (masked family) continue as if the run
    had never stopped, so 3 steps + a resume to 6 end with the weights of 6 uninterrupted steps, bit for bit."""
    args = ["--devices", "2", "--strategy", "ddp", f"train.batch_size={PER_DEVICE}", "train.min_lr_ratio=1.0"]
    whole, split = tmp_path / "whole", tmp_path / "split"
    _train(corpus, whole, tiny, *args, family="masked")
    _train(corpus, split, tiny, *args, steps=3, family="masked")
    state = torch.load(split / "checkpoints" / "last.ckpt", weights_only=True)
    assert len(state["rng_ranks"]) == 2 and not torch.equal(state["rng_ranks"][0]["torch"], state["rng_ranks"][1]["torch"])
    _train(corpus, split, tiny, "--resume", str(split), *args, family="masked")
    a = torch.load(whole / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(split / "checkpoints" / "last.ckpt", weights_only=True)
    assert a["step"] == b["step"] == STEPS
    for key in ("model", "ema"):
        for name, value in a[key].items():
            assert torch.equal(value, b[key][name]), f"{key} {name}"
