"""Fixtures shared by the end-to-end tests."""

import csv

import pytest


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """A tiny three-speaker play: a few hundred 32-token blocks, enough to train for a few steps."""
    path = tmp_path_factory.mktemp("corpus") / "plays.txt"
    lines = [f"{['ROMEO', 'JULIET', 'NURSE'][i % 3]}:\nO gentle night, thou art the {['moon', 'sun', 'star'][i % 3]} "
             f"of my heart number {i % 7}.\n" for i in range(400)]
    path.write_text("\n".join(lines))
    return path


@pytest.fixture(scope="session")
def tiny() -> tuple[str, ...]:
    """KEY=VALUE overrides of a tiny model and run that train in seconds on one thread (later overrides win)."""
    return ("model.d_model=32", "model.num_denoiser_layers=2", "model.d_state=8", "model.headdim=16",
            "model.chunk_size=16", "data.seq_len=32", "data.vocab_size=300", "train.batch_size=4",
            "train.eval_every=10", "train.save_every=10", "train.warmup_steps=2", "train.eval_batches=2",
            "train.log_every=5", "train.num_threads=1", "train.lr=4e-3")  # a rate that learns in a dozen steps


@pytest.fixture(scope="session")
def metrics():
    """``metrics(run)``: the rows of a run's metrics.csv as dicts, and ``metrics(run, "val_loss")`` the non-empty
    values of one column as floats."""
    def read(run, column=None):
        with open(run / "metrics.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        return rows if column is None else [float(r[column]) for r in rows if r.get(column)]
    return read


@pytest.fixture(scope="session")
def masked_run(tmp_path_factory, corpus, tiny):
    """A tiny masked-family run (32-token context), trained for a few steps: what the serve tests serve."""
    from dimba.cli import main

    out = tmp_path_factory.mktemp("runs") / "masked"
    assert main(["train", "--family", "masked", "--data", str(corpus), "--max-steps", "10", "--out", str(out),
                 "--quiet", *tiny]) == 0
    return out


@pytest.fixture(scope="session")
def serving():
    """``serving(model_path, start=True, **options)``: a context manager running `dimba serve` on a free loopback
    port in a thread (the same `prepare` as the CLI), yielding (base URL, engine); ``options`` are
    `dimba.serve.server.Options` fields, ``start=False`` leaves the engine's worker stopped."""
    import threading
    import time
    from contextlib import contextmanager

    from dimba.config import SampleConfig
    from dimba.serve.server import Options, prepare, url_of

    @contextmanager
    def run(model_path, start=True, **options):
        server, sock, engine = prepare(str(model_path), SampleConfig(), Options(port=0, **options), start=start)
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        deadline = time.monotonic() + 30
        while not server.started and thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert server.started, "the server did not start"
        try:
            yield url_of(sock).rstrip("/"), engine
        finally:
            server.should_exit = True
            thread.join(10)
            engine.close(5)
    return run
