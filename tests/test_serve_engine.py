"""The batching engine of `dimba serve`, without HTTP: grouping, seeds, cancellation, deadlines and failures."""

import threading
import time

import pytest
import torch

from dimba.config import SampleConfig
from dimba.generation import generate_ids
from dimba.loading import load_for_inference
from dimba.serve import engine as engine_module
from dimba.serve.engine import Engine, Expired, Job, QueueFull


@pytest.fixture(scope="module")
def loaded(masked_run):
    return load_for_inference(masked_run)


def _job(tokenizer, length=8, n=1, seed=None, steps=4, deadline=60.0, watch=False):
    """A job and the list its outcomes are appended to."""
    outcomes, done = [], threading.Event()

    def notify(kind, payload):
        outcomes.append((kind, payload))
        if kind != "step":
            done.set()
    job = Job(tokenizer.encode("ROMEO:"), length, n, SampleConfig(num_steps=steps), time.monotonic() + deadline,
              seed=seed, watch=watch, notify=notify)
    job.done = done
    return job, outcomes


def _finish(engine, jobs):
    engine.start()
    for job in jobs:
        assert job.done.wait(60), "a job never ended"
    engine.close(10)


def test_jobs_queued_together_run_as_one_batch(loaded):
    model, tokenizer = loaded
    engine = Engine(model, tokenizer.eos_id, max_batch=8, batch_wait=0)
    jobs = [_job(tokenizer, n=n) for n in (1, 2, 3)]
    for job, _ in jobs:
        engine.submit(job)
    _finish(engine, [j for j, _ in jobs])
    assert engine.counts["groups"] == 1 and engine.counts["rows"] == 6 and engine.counts["completed"] == 3
    for (job, outcomes), n in zip(jobs, (1, 2, 3)):
        (kind, ids), = outcomes
        assert kind == "done" and ids.shape[0] == n and job.batch_rows == 6


def test_max_batch_splits_the_queue_and_a_seed_runs_alone(loaded):
    model, tokenizer = loaded
    engine = Engine(model, tokenizer.eos_id, max_batch=2, batch_wait=0)
    jobs = [_job(tokenizer) for _ in range(3)] + [_job(tokenizer, seed=7), _job(tokenizer, length=12)]
    for job, _ in jobs:
        engine.submit(job)
    _finish(engine, [j for j, _ in jobs])
    # groups of at most 2 rows: the first two; the third with the 12-token job (a masked model denoises the same
    # canvas for any length, each job keeps its own); the seeded job alone
    assert engine.counts["completed"] == 5 and engine.counts["groups"] == 3
    assert [j.batch_rows for j, _ in jobs] == [2, 2, 2, 1, 2]
    assert jobs[4][1][0][1].shape == jobs[2][1][0][1].shape
    seeded = jobs[3][1][0][1]
    expected = generate_ids(model, tokenizer.encode("ROMEO:"), 8, SampleConfig(num_steps=4), 1,
                            torch.Generator().manual_seed(7), tokenizer.eos_id)
    assert torch.equal(seeded, expected)  # a seeded job gets what `dimba generate --seed` gets


def test_queue_limit_and_oversized_jobs(loaded):
    model, tokenizer = loaded
    engine = Engine(model, tokenizer.eos_id, max_batch=2, max_queue=2)
    engine.submit(_job(tokenizer)[0])
    engine.submit(_job(tokenizer)[0])
    with pytest.raises(QueueFull, match="2 waiting"):
        engine.submit(_job(tokenizer)[0])
    with pytest.raises(ValueError, match="batches of 2"):
        engine.submit(_job(tokenizer, n=3)[0])
    engine.close()
    with pytest.raises(QueueFull, match="shutting down"):
        engine.submit(_job(tokenizer)[0])


def test_cancelled_and_expired_jobs_leave_the_queue(loaded):
    model, tokenizer = loaded
    engine = Engine(model, tokenizer.eos_id, batch_wait=0)
    gone, gone_out = _job(tokenizer)
    late, late_out = _job(tokenizer, deadline=-1.0)
    kept, kept_out = _job(tokenizer, length=12)
    for job in (gone, late, kept):
        engine.submit(job)
    gone.cancel()
    _finish(engine, [late, kept])
    assert gone_out == [] and late_out[0][0] == "error" and isinstance(late_out[0][1], Expired)
    assert kept_out[0][0] == "done" and engine.counts["dropped"] == 2 and engine.counts["groups"] == 1
    assert engine.stats()["queued"] == 0 and engine.stats()["running"] == 0


def test_a_group_nobody_wants_stops_at_its_next_step(loaded):
    model, tokenizer = loaded
    engine = Engine(model, tokenizer.eos_id, batch_wait=0)
    job, outcomes = _job(tokenizer, length=30, steps=30, watch=True)

    def notify(kind, payload):  # the client goes away after the first step
        outcomes.append((kind, payload))
        job.cancel()
        job.done.set()
    job.notify = notify
    engine.submit(job)
    _finish(engine, [job])
    for _ in range(200):
        if engine.stats()["running"] == 0:
            break
        time.sleep(0.05)
    assert [k for k, _ in outcomes] == ["step"] and engine.counts["abandoned_groups"] == 1
    assert engine.stats()["running"] == 0 and engine.counts["completed"] == 0


def test_a_failing_generation_fails_its_group_and_the_worker_goes_on(loaded, monkeypatch):
    model, tokenizer = loaded
    calls = []
    real = engine_module.generate_ids

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("boom")
        return real(*args, **kwargs)
    monkeypatch.setattr(engine_module, "generate_ids", flaky)
    engine = Engine(model, tokenizer.eos_id, batch_wait=0)
    first, first_out = _job(tokenizer, seed=1)
    second, second_out = _job(tokenizer, seed=2)
    engine.submit(first)
    engine.submit(second)
    _finish(engine, [first, second])
    assert first_out[0][0] == "error" and "boom" in str(first_out[0][1])
    assert second_out[0][0] == "done" and engine.counts["failed_groups"] == 1
