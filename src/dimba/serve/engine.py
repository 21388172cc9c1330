"""The batching engine of `dimba serve`: a bounded queue of generation jobs and one worker thread that runs them in
groups, one model call per denoising step for the whole group.

Jobs that can share one canvas (the same prompt length, canvas length and sampler settings, and no seed of their
own) are grouped oldest first, up to ``max_batch`` rows (a job of n completions is n rows), and generated as one
batch: `dimba.generation.generate_ids` with one prompt per row. A job with a seed runs alone, so that it gets what
`dimba generate --seed` gives. When the oldest job arrived, or the previous group ended, less than ``batch_wait``
seconds ago and the batch is not full, the worker waits for others to join (the clients of the group that just
ended send their next requests then).

A job leaves the queue when it is cancelled (its client went away) or its deadline passes; a running group stops
at its next step once none of its jobs is wanted any more. Nothing a job does stops the worker: an unexpected
error fails the jobs of its group and the worker goes on.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field, replace
from itertools import accumulate
from typing import Any, Callable

import torch

from dimba.canvas_view import CanvasView
from dimba.config import SampleConfig
from dimba.generation import Step, canvas_length, generate_ids

log = logging.getLogger("dimba.serve")


class QueueFull(Exception):
    """The queue holds ``max_queue`` jobs already."""


class Expired(Exception):
    """A job's deadline passed before it finished."""


class _Abandoned(Exception):
    """Raised inside a running group that no job wants any more: stops its generation."""


def _ignore(kind: str, payload: Any) -> None:
    pass


@dataclass(eq=False)
class Job:
    """One request: ``n`` completions of at most ``length`` tokens after ``prompt`` (ids) with ``settings``.

    ``notify(kind, payload)`` is called from the worker thread with ("step", `Frame`) after each step when
    ``watch`` is set, then once with ("done", ids (n, P + canvas)) or ("error", exception). ``deadline`` is a
    `time.monotonic` time.
    """

    prompt: list[int]
    length: int
    n: int
    settings: SampleConfig
    deadline: float
    seed: int | None = None
    watch: bool = False
    notify: Callable[[str, Any], None] = _ignore
    arrived: float = field(default_factory=time.monotonic)
    started: float | None = None  # when its group started
    batch_rows: int = 0  # the rows of its group
    view: CanvasView | None = None
    key: tuple = ()
    _cancelled: threading.Event = field(default_factory=threading.Event)
    _ended: bool = False

    def cancel(self) -> None:
        """Nobody waits for this job any more: drop it from the queue, or stop computing it."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        """Whether `cancel` was called."""
        return self._cancelled.is_set()

    def wanted(self, now: float) -> bool:
        """Not cancelled, before its deadline and not ended."""
        return not self.cancelled and now < self.deadline and not self._ended

    def end(self, kind: str, payload: Any) -> None:
        """Deliver the job's outcome (once)."""
        if not self._ended:
            self._ended = True
            self.notify(kind, payload)


def _rows_of(step: Step, rows: slice) -> Step:
    """The step restricted to the canvas rows ``rows``."""
    def cut(state):
        return replace(state, x=state.x[rows], x0=None if state.x0 is None else state.x0[rows],
                       masked=None if state.masked is None else state.masked[rows],
                       finished=None if state.finished is None else state.finished[rows])
    out = step.output
    output = replace(out, x0=None if out.x0 is None else out.x0[rows],
                     logits=None if out.logits is None else out.logits[rows])
    return replace(step, before=cut(step.before), state=cut(step.state), output=output)


class Engine:
    """Runs `Job`s on ``model`` (see the module docstring); ``eos_id`` ends a row.

    `start` starts the worker thread, `submit` queues a job (`QueueFull` past ``max_queue`` waiting jobs), `stats`
    counts what is queued, running and done, `close` stops the worker after its current group.
    """

    def __init__(self, model, eos_id: int, max_batch: int = 32, max_queue: int = 64, batch_wait: float = 0.01):
        if max_batch < 1 or max_queue < 1 or batch_wait < 0:
            raise ValueError(f"need max_batch >= 1, max_queue >= 1 and batch_wait >= 0, got {max_batch}, "
                             f"{max_queue}, {batch_wait}")
        self.model, self.eos_id = model, eos_id
        self.max_batch, self.max_queue, self.batch_wait = max_batch, max_queue, batch_wait
        self.counts: Counter = Counter()
        self._cond = threading.Condition()
        self._waiting: deque[Job] = deque()
        self._running: list[Job] = []
        self._closed = False
        self._thread: threading.Thread | None = None
        self._free_since = 0.0  # when the previous group ended (time.monotonic)

    def start(self) -> None:
        """Start the worker thread (once)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="dimba-engine", daemon=True)
            self._thread.start()

    def close(self, timeout: float | None = None) -> None:
        """Stop taking jobs; the worker ends after its current group (waited for up to ``timeout`` s)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, job: Job) -> None:
        """Queue ``job``; `QueueFull` if ``max_queue`` jobs are waiting already."""
        if job.n > self.max_batch:
            raise ValueError(f"a job of {job.n} rows cannot fit batches of {self.max_batch}")
        job.key = self._key(job)
        with self._cond:
            if self._closed:
                raise QueueFull("the server is shutting down")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} waiting requests)")
            self._waiting.append(job)
            self.counts["submitted"] += 1
            self._cond.notify_all()

    def stats(self) -> dict[str, int]:
        """Jobs queued and running, rows running, and counts of what happened so far."""
        with self._cond:
            return {"queued": len(self._waiting), "running": len(self._running),
                    "running_rows": sum(j.n for j in self._running), **self.counts}

    def _key(self, job: Job) -> tuple:
        """What jobs must share to be generated as one batch."""
        canvas = canvas_length(self.model, len(job.prompt), job.length)
        return len(job.prompt), canvas, job.settings.model_dump_json(), None if job.seed is None else id(job)

    # ----- the worker ---------------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            group = self._next_group()
            if group is None:
                return
            try:
                self._run(group)
            finally:
                with self._cond:
                    self._running = []
                    self._free_since = time.monotonic()
                    self._cond.notify_all()

    def _drop_unwanted(self, now: float) -> None:
        """Remove cancelled and expired jobs from the queue, telling the expired ones (a cancelled job's client is
        gone)."""
        for job in [j for j in self._waiting if not j.wanted(now)]:
            self._waiting.remove(job)
            self.counts["dropped"] += 1
            if not job.cancelled:
                job.end("error", Expired("the request waited in the queue past its time limit"))

    def _next_group(self) -> list[Job] | None:
        """The next group to run (None once closed), taken out of the queue."""
        with self._cond:
            while True:
                now = time.monotonic()
                self._drop_unwanted(now)
                if self._closed:
                    return None
                if not self._waiting:
                    self._cond.wait()
                    continue
                head = self._waiting[0]
                group, rows = [], 0
                for job in self._waiting:
                    if job.key == head.key and rows + job.n <= self.max_batch:
                        group.append(job)
                        rows += job.n
                wait = max(head.arrived, self._free_since) + self.batch_wait - now
                if wait > 0 and rows < self.max_batch and head.seed is None:
                    self._cond.wait(wait)
                    continue
                for job in group:
                    self._waiting.remove(job)
                self._running = group
                return group

    def _run(self, group: list[Job]) -> None:
        """Generate ``group`` as one batch and deliver each job's rows; never raises."""
        rows = [slice(a - j.n, a) for j, a in zip(group, accumulate(j.n for j in group))]
        total, start = rows[-1].stop, time.monotonic()
        for job in group:
            job.started, job.batch_rows = start, total
            job.view = CanvasView(self.model, job.length, self.eos_id) if job.watch else None
        head = group[0]
        prompt = torch.tensor([job.prompt for job in group for _ in range(job.n)], dtype=torch.long)  # (R, P)
        generator = torch.Generator().manual_seed(head.seed if head.seed is not None else secrets.randbits(63))
        self.counts["groups"] += 1
        self.counts["rows"] += total
        try:
            ids = generate_ids(self.model, prompt, head.length, head.settings, total, generator, self.eos_id,
                               on_step=lambda step: self._observe(group, rows, step))
        except _Abandoned:
            self.counts["abandoned_groups"] += 1
            return
        except Exception as exc:  # a bug, or settings only the generation could refuse: fail the group, go on
            log.exception("generation failed")
            self.counts["failed_groups"] += 1
            for job in group:
                job.end("error", exc)
            return
        for job, sl in zip(group, rows):
            job.end("done", ids[sl])
        self.counts["completed"] += len(group)

    def _observe(self, group: list[Job], rows: list[slice], step: Step) -> None:
        """After each step: end the expired jobs, stop a group nobody wants, send frames to the watchers."""
        now = time.monotonic()
        for job in group:
            if not job._ended and now >= job.deadline:
                job.end("error", Expired("the request took longer than the server's time limit"))
        if not any(job.wanted(now) for job in group):
            raise _Abandoned
        for job, sl in zip(group, rows):
            if job.view is not None and job.wanted(now):
                job.notify("step", job.view.update(_rows_of(step, sl)))

