"""The HTTP face of `dimba serve` (FastAPI): the routes, the error answers, and the bridge from the engine's worker
thread to each request.

- ``GET /``: the live page (``static/``); ``GET /health``: status and the engine's queue and counts;
- ``GET /v1/models``: the served model, its family, sampler fields (with defaults and ranges) and limits;
- ``POST /v1/completions``: a completion, or with ``"stream": true`` the denoising steps as server-sent events
  (`dimba.serve.replies`).

Every error is a JSON body ``{"error": {...}}``: 400 for a bad request (with the field at fault), 404 for an
unknown route or model, 413 for a body over 1 MiB, 503 when the queue is full or the request ran past its time
limit. A client that goes away cancels its job: it leaves the queue, or stops being computed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException

from dimba.canvas_view import Pieces
from dimba.config import SAMPLE_NAMES, SampleConfig
from dimba.errors import first_line
from dimba.serve.engine import Engine, Expired, Job, QueueFull
from dimba.serve.replies import Reply, sse
from dimba.serve.schema import MAX_BODY_BYTES, ApiError, CompletionRequest, Served, parse_body, to_job

STATIC = Path(__file__).parent / "static"
GRACE_S = 1.0  # how long past a job's deadline a request waits for the engine to say it expired
POLL_S = 0.25  # how often a waiting (non-streamed) request checks that its client is still there
log = logging.getLogger("dimba.serve")


class _Gone(Exception):
    """The client of a non-streamed request disconnected."""


def _control(field: str) -> dict:
    """The JSON schema of a `SampleConfig` field, a null alternative folded into ``nullable``."""
    prop = dict(SampleConfig.model_json_schema()["properties"][field])
    options = prop.pop("anyOf", None)
    if options:
        prop.update(next(o for o in options if o.get("type") != "null"))
        prop["nullable"] = True
    prop.pop("title", None)
    return prop


def model_card(served: Served, engine: Engine) -> dict:
    """The ``/v1/models`` entry of the served model."""
    model, family, limits = served.model, served.model.family, served.limits
    fields = served.settings_fields()
    defaults = served.defaults.model_dump()
    return {"id": served.name, "object": "model", "created": int(time.time()), "owned_by": "dimba",
            "dimba": {"family": str(family), "description": family.description, "context_length": served.context,
                      "parameters": sum(p.numel() for p in model.parameters()),
                      "sampler": {name: {**_control(SAMPLE_NAMES[name]), "default": defaults[SAMPLE_NAMES[name]]}
                                  for name in fields},
                      "limits": {"max_tokens": min(limits.max_tokens, served.context - 1), "max_steps": limits.max_steps,
                                 "max_n": limits.max_n, "timeout_s": limits.timeout, "max_batch": engine.max_batch,
                                 "max_queue": engine.max_queue}}}


async def _read_body(request: Request) -> bytes:
    """The request body, refused (413) past `MAX_BODY_BYTES`."""
    too_big = ApiError(413, f"the request body is larger than {MAX_BODY_BYTES} bytes", code="body_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


def _failure(exc: BaseException, served: Served) -> ApiError:
    """The answer to a job that ended with ``exc``."""
    if isinstance(exc, Expired):
        return ApiError(503, f"{exc} ({served.limits.timeout:g} s): retry with fewer steps or tokens, or later",
                        "server_busy", code="timeout", headers={"Retry-After": "1"})
    return ApiError(500, f"generation failed: {first_line(exc, 300)}", "server_error", code="generation_failed")


class _Bridge:
    """Events of one job, from the engine's worker thread to the request's event loop."""

    def __init__(self, job: Job, served: Served):
        self.job, self.served = job, served
        self.events: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()

        def notify(kind, payload):
            try:
                loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))
            except RuntimeError:  # the event loop is closed: the server is stopping
                job.cancel()
        job.notify = notify

    async def next(self, request: Request | None = None) -> tuple[str, object]:
        """The next event; with ``request``, `_Gone` once its client disconnected; 503 past the deadline."""
        while True:
            left = self.job.deadline + GRACE_S - time.monotonic()
            if left <= 0:
                raise _failure(Expired("the request took longer than the server's time limit"), self.served)
            try:
                return await asyncio.wait_for(self.events.get(), min(left, POLL_S) if request else left)
            except asyncio.TimeoutError:
                if request is not None and await request.is_disconnected():
                    raise _Gone from None

    async def result(self, request: Request, reply: Reply) -> dict:
        """The completion, once the job is done."""
        while True:
            kind, payload = await self.next(request)
            if kind == "done":
                return reply.completion(payload, self.served.tokenizer)
            if kind == "error":
                raise _failure(payload, self.served)

    async def stream(self, reply: Reply, pieces: Pieces):
        """Server-sent events: the steps, then the completion and ``[DONE]``, or an error."""
        try:
            while True:
                kind, payload = await self.next()
                if kind == "step":
                    yield sse(reply.step(payload, pieces))
                elif kind == "done":
                    yield sse(reply.completion(payload, self.served.tokenizer, pieces))
                    yield sse("[DONE]")
                    return
                else:
                    yield sse(_failure(payload, self.served).body())
                    return
        except ApiError as exc:
            yield sse(exc.body())
        finally:
            self.job.cancel()


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return JSONResponse(exc.body(), exc.status, headers=exc.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        kind = "not_found" if exc.status_code == 404 else "invalid_request_error"
        body = ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", kind).body()
        return JSONResponse(body, exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        log.exception("unexpected error")
        return JSONResponse(ApiError(500, f"internal error: {first_line(exc, 300)}", "server_error").body(), 500)


def create_app(served: Served, engine: Engine) -> FastAPI:
    """The app serving ``served`` through ``engine`` (started by the caller; closed when the app shuts down)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await asyncio.to_thread(engine.close, 5.0)

    app = FastAPI(title="dimba", summary="A diffusion language model, served", lifespan=lifespan)
    app.state.served, app.state.engine = served, engine
    _install_error_handlers(app)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    pieces = Pieces(served.tokenizer)
    body_schema = {"requestBody": {"required": True, "content": {"application/json": {
        "schema": CompletionRequest.model_json_schema()}}}}

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html")

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": served.name, **engine.stats()}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card(served, engine)]}

    @app.post("/v1/completions", openapi_extra=body_schema)
    async def completions(request: Request):
        req = parse_body(await _read_body(request))
        job, stops = to_job(served, req)
        bridge = _Bridge(job, served)
        try:
            engine.submit(job)
        except QueueFull as exc:
            raise ApiError(503, f"{exc}: retry later", "server_busy", code="queue_full",
                           headers={"Retry-After": "1"}) from None
        reply = Reply(served.name, job, stops)
        if req.stream:
            return StreamingResponse(bridge.stream(reply, pieces), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            return await bridge.result(request, reply)
        except _Gone:
            return JSONResponse(ApiError(400, "the client disconnected", code="client_gone").body(), 400)
        finally:
            job.cancel()

    return app
