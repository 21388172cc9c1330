"""What `dimba serve` answers: completion objects (OpenAI's ``text_completion`` with a ``dimba`` extension holding
timing and, when streaming, the canvas) and their server-sent-event framing.

A streamed request gets one ``data:`` event per denoising step whose choices hold no text yet (so a client that
concatenates OpenAI stream deltas ends with the final text), with the canvas under ``dimba.canvas``; then one
event with the final texts, ``usage`` and timing; then ``data: [DONE]``.
"""

from __future__ import annotations

import json
import math
import secrets
import time

import torch

from dimba.canvas_view import Frame, Pieces
from dimba.generation import generated_ids
from dimba.serve.engine import Job


def completion_text(tokenizer, prompt: list[int], row: list[int]) -> str:
    """The text ``row`` adds after ``prompt`` (decoded together, so a character split across the boundary is
    whole)."""
    head, full = tokenizer.decode(prompt), tokenizer.decode(prompt + row)
    return full[len(head):] if full.startswith(head) else tokenizer.decode(row)


def _cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (text[: min(found)], True) if found else (text, False)


def canvas_json(frame: Frame, pieces: Pieces) -> list[dict]:
    """The rows of a frame: token texts, kinds (one letter per position, `dimba.canvas_view.KINDS`), confidence
    (null where unknown)."""
    return [{"index": k, "tokens": pieces.row(ids), "kinds": kinds,
             "confidence": [None if math.isnan(c) else round(c, 3) for c in conf.tolist()]}
            for k, (ids, kinds, conf) in enumerate(zip(frame.ids, frame.kinds, frame.confidence))]


class Reply:
    """The answers to one request: ``model`` is the served model's id, ``stops`` the request's stop strings."""

    def __init__(self, model: str, job: Job, stops: list[str]):
        self.id, self.created = f"cmpl-{secrets.token_hex(12)}", int(time.time())
        self.model, self.job, self.stops = model, job, stops

    def _head(self) -> dict:
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model}

    def step(self, frame: Frame, pieces: Pieces) -> dict:
        """A streamed step: no text yet, the canvas under ``dimba``."""
        choices = [{"index": k, "text": "", "finish_reason": None, "logprobs": None} for k in range(self.job.n)]
        elapsed = time.monotonic() - (self.job.started or self.job.arrived)
        return {**self._head(), "choices": choices,
                "dimba": {"step": frame.step, "num_steps": frame.num_steps, "elapsed_s": round(elapsed, 4),
                          "canvas": canvas_json(frame, pieces)}}

    def completion(self, ids: torch.Tensor, tokenizer, pieces: Pieces | None = None) -> dict:
        """The completion of the generated ids (n, P + canvas); with ``pieces`` (streaming) the final canvas."""
        job, choices, tokens = self.job, [], 0
        for k, row in enumerate(generated_ids(ids, len(job.prompt), job.length, tokenizer.eos_id)):
            text, stopped = _cut_at_stop(completion_text(tokenizer, job.prompt, row), self.stops)
            reason = "stop" if stopped or len(row) < job.length else "length"
            choices.append({"index": k, "text": text, "finish_reason": reason, "logprobs": None})
            tokens += len(row)
        now = time.monotonic()
        latency = now - job.arrived
        extra = {"latency_s": round(latency, 4), "queued_s": round((job.started or now) - job.arrived, 4),
                 "tokens_per_s": round(tokens / max(latency, 1e-9), 2), "batch_rows": job.batch_rows,
                 "steps": job.settings.num_steps}
        if pieces is not None and job.view is not None:
            extra["canvas"] = canvas_json(job.view.final(ids, len(job.prompt)), pieces)
        usage = {"prompt_tokens": len(job.prompt), "completion_tokens": tokens,
                 "total_tokens": len(job.prompt) + tokens}
        return {**self._head(), "choices": choices, "usage": usage, "dimba": extra}


def sse(data: dict | str) -> str:
    """One server-sent event carrying ``data`` (JSON, or a plain marker such as ``[DONE]``)."""
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, allow_nan=False)
    return f"data: {text}\n\n"
