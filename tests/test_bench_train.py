"""`dimba bench train`: the training step's FLOPs, throughput and MFU, from the CLI."""

import json

from dimba.cli import main

TINY = ["model.d_model=32", "model.num_denoiser_layers=2", "model.d_state=8", "model.headdim=16", "model.chunk_size=16",
        "data.seq_len=32", "data.vocab_size=300", "train.num_threads=1"]


def _bench(corpus, capsys, batch, *extra):
    capsys.readouterr()
    assert main(["bench", "train", "--data", str(corpus), "--steps", "2", "--warmup", "1", *extra, *TINY,
                 f"train.batch_size={batch}"]) == 0
    return json.loads(capsys.readouterr().out)


def test_bench_train_counts_flops_and_writes_json_and_png(corpus, capsys, tmp_path):
    r = _bench(corpus, capsys, 4, "--family", "ar", "--backbone", "transformer", "--out", str(tmp_path / "bt"))
    assert r["family"] == "ar" and r["backbone"] == "transformer" and r["tokens_per_step"] == 4 * 32
    assert len(r["step_seconds"]) == 2 and r["tokens_per_s"] == r["tokens_per_step"] / r["median_step_s"]
    assert r["achieved_gflops"] == r["flops_per_step"] / r["median_step_s"] / 1e9
    assert 0 < r["mfu"] < 1 and r["mfu"] == r["achieved_gflops"] / max(r["matmul_peak_gflops"])
    assert r["peak_rss_mib"] > 0 and r["threads"] == 1
    assert json.loads((tmp_path / "bt.json").read_text())["flops_per_step"] == r["flops_per_step"]
    assert (tmp_path / "bt.png").stat().st_size > 1000
    # the counted FLOPs are those of the step: twice the batch, twice the FLOPs (the matmuls are linear in it)
    r2 = _bench(corpus, capsys, 8, "--family", "ar", "--backbone", "transformer")
    assert abs(r2["flops_per_step"] / r["flops_per_step"] - 2) < 0.01


def test_bench_train_bad_input_is_one_line(corpus, capsys):
    capsys.readouterr()
    assert main(["bench", "train", "--data", str(corpus), "--steps", "0", *TINY]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--steps" in err
    assert main(["bench", "train", "--data", str(corpus), "model.d_model=-1"]) == 2
    assert capsys.readouterr().err.count("\n") == 1
