import itertools

import pytest
import torch

from dimba.config import load_config
from dimba.errors import UsageError
from dimba.data.packing import micro_batches
from dimba.training.schedule import lr_lambda


def test_micro_batches_cover_each_epoch_and_resume_exactly():
    data = torch.arange(40).view(20, 2)  # (N, L)
    full = list(itertools.islice(micro_batches(data, 4, seed=0), 12))  # 5 per epoch, 2.4 epochs
    epoch0 = torch.cat(full[:5])[:, 0].sort().values
    assert torch.equal(epoch0, torch.arange(0, 40, 2))  # every block exactly once per epoch
    assert not torch.equal(torch.cat(full[:5]), torch.cat(full[5:10]))  # reshuffled per epoch
    resumed = list(itertools.islice(micro_batches(data, 4, seed=0, start=7), 5))
    assert all(torch.equal(a, b) for a, b in zip(full[7:], resumed))
    with pytest.raises(UsageError, match="batch_size"):
        next(micro_batches(data, 21, seed=0))


def test_lr_warms_up_then_decays_to_the_floor():
    cfg = load_config("tiny", None, ["train.max_steps=100", "train.warmup_steps=10", "train.min_lr_ratio=0.1"])
    f = lr_lambda(cfg)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    values = [f(s) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(values, values[1:])) and values[-1] == pytest.approx(0.1)


def test_lr_decay_follows_the_wall_clock_budget_when_it_runs_out_first():
    cfg = load_config("tiny", None, ["train.max_steps=1000", "train.warmup_steps=10", "train.min_lr_ratio=0.1"])
    used = {"fraction": 0.0}
    f = lr_lambda(cfg, lambda: used["fraction"])
    assert f(100) == pytest.approx(lr_lambda(cfg)(100))  # no time used: the step schedule
    used["fraction"] = 0.5
    assert f(100) == pytest.approx(0.1 + 0.9 * 0.5)  # half the time gone: halfway down the cosine
    used["fraction"] = 1.2
    assert f(100) == pytest.approx(0.1)  # out of time: the floor


@pytest.mark.parametrize("family", ["continuous", "masked", "ar"])
def test_bf16_mixed_precision_trains_on_cpu(family, corpus, tmp_path):
    """`train.precision=bf16-mixed` (CPU autocast) runs the mamba2 families: the losses are finite and the
    validation loss (fixed t, noise and masks) falls."""
    import csv

    from dimba.cli import main

    out = tmp_path / family
    assert main(["train", "--family", family, "--data", str(corpus), "--max-steps", "12", "--out", str(out), "--quiet",
                 "model.d_model=32", "model.num_denoiser_layers=2", "model.d_state=8", "model.headdim=16",
                 "model.chunk_size=16", "data.seq_len=32", "data.vocab_size=300", "train.batch_size=4",
                 "train.log_every=1", "train.eval_every=12", "train.num_threads=1", "train.precision=bf16-mixed"]) == 0
    with open(out / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    losses = [float(r["loss"]) for r in rows if r["loss"]]
    val = [float(r["val_loss"]) for r in rows if r["val_loss"]]
    assert len(losses) == 12 and all(torch.isfinite(torch.tensor(losses)))
    assert len(val) == 2 and val[1] < val[0]


@pytest.mark.parametrize("flags, expected", [({"avx512_bf16": True}, "bf16-mixed"), ({"amx_bf16": True}, "bf16-mixed"),
                                             ({"avx512_bf16": False, "avx2": True}, "32-true")])
def test_auto_precision_is_bf16_on_a_cpu_that_multiplies_bf16(flags, expected, monkeypatch):
    from dimba.training.setup import precision_of

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch._C._cpu, "_get_cpu_capability", lambda: flags)
    cfg = load_config("tiny", None, [])
    assert precision_of(cfg) == expected
    assert precision_of(load_config("tiny", None, ["train.precision=32-true"])) == "32-true"


def test_fit_leaves_the_callers_config_alone_and_bench_times_its_step(corpus, tmp_path, tiny):
    from dimba.config import dump_yaml
    from dimba.training import fit, setup, train_step

    cfg = load_config("tiny", None, [*tiny, f"data.corpus={corpus}", "train.max_steps=2"])
    before = dump_yaml(cfg)
    fit(cfg, tmp_path / "run", progress=False)
    assert dump_yaml(cfg) == before and cfg.model.vocab_size is None  # the run's config.yaml has it filled in
    assert "vocab_size: 300" in (tmp_path / "run" / "config.yaml").read_text()
    ts = setup(cfg, run_dir=None)  # writes nothing
    weights = [p.detach().clone() for p in ts.model.parameters()]
    result = train_step(ts)
    assert ts.step == 1 and result.applied and set(result.parts) == set(ts.model.family.metrics)
    assert any(not torch.equal(a, b) for a, b in zip(weights, ts.model.parameters()))


@pytest.mark.parametrize("seed", [0, 5])
def test_a_sampler_seeded_like_the_run_does_not_draw_its_initial_weights(corpus, tiny, seed):
    """The initial weights come from a stream of their own (`dimba.training.rng.init_seed`): a sampler seeded with
    ``train.seed`` (``torch.Generator().manual_seed(seed)``) would otherwise draw the initial embedding table as its
    noise, rows of the codebook in id order that a continuous model decodes as word salad."""
    from dimba.training import setup

    cfg = load_config("tiny", None, [*tiny, f"data.corpus={corpus}", f"train.seed={seed}"])
    table = setup(cfg, run_dir=None).model.embedding.weight.detach().flatten()  # (V d,) normal, std d^-0.5
    assert torch.equal(table, setup(cfg, run_dir=None).model.embedding.weight.detach().flatten())  # reproducible
    stream = torch.randn(8 * table.numel(), generator=torch.Generator().manual_seed(seed))  # (M,)
    windows = stream.unfold(0, 4, 1) * cfg.model.d_model ** -0.5  # (M - 3, 4) every offset, scaled as the init
    assert not torch.isclose(windows, table[:4], rtol=1e-5, atol=0).all(1).any()
