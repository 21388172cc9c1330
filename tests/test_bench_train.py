"""`dimba bench train`: the training step's FLOPs, throughput and MFU, from the CLI."""

import json

from dimba.cli import main

def _bench(corpus, capsys, tiny, batch, *extra):
    capsys.readouterr()
    assert main(["bench", "train", "--data", str(corpus), "--steps", "2", "--warmup", "1", *extra, *tiny,
                 f"train.batch_size={batch}"]) == 0
    return json.loads(capsys.readouterr().out)


def test_bench_train_counts_flops_and_writes_json_and_png(corpus, capsys, tmp_path, tiny):
    r = _bench(corpus, capsys, tiny, 4, "--family", "ar", "--backbone", "transformer", "--out", str(tmp_path / "bt"))
    assert r["family"] == "ar" and r["backbone"] == "transformer" and r["tokens_per_step"] == 4 * 32
    assert len(r["step_seconds"]) == 2 and all(s > 0 for s in r["step_seconds"])
    assert 0 < r["mfu"] < 1 and r["peak_rss_mib"] > 0 and r["threads"] == 1
    assert json.loads((tmp_path / "bt.json").read_text())["flops_per_step"] == r["flops_per_step"]
    assert (tmp_path / "bt.png").stat().st_size > 1000
    # the counted FLOPs are those of the step: twice the batch, twice the FLOPs (the matmuls are linear in it)
    r2 = _bench(corpus, capsys, tiny, 8, "--family", "ar", "--backbone", "transformer")
    assert abs(r2["flops_per_step"] / r["flops_per_step"] - 2) < 0.01


def test_bench_train_bad_input_is_one_line(corpus, capsys, tiny):
    capsys.readouterr()
    assert main(["bench", "train", "--data", str(corpus), "--steps", "0", *tiny]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--steps" in err
    assert main(["bench", "train", "--data", str(corpus), "model.d_model=-1"]) == 2
    assert capsys.readouterr().err.count("\n") == 1
