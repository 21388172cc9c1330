"""What `dimba serve` accepts: the body of ``POST /v1/completions`` (an OpenAI subset plus dimba's sampler fields),
parsed and checked against the served model into a `Job`, and the one JSON shape of its errors (OpenAI's:
``{"error": {"message", "type", "param", "code"}}``)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from dimba.config import SAMPLE_NAMES, SampleConfig
from dimba.generation import build_generation, canvas_length
from dimba.serve.engine import Job

MAX_BODY_BYTES = 1 << 20  # a request body above this is refused (413)
MAX_PROMPT_CHARS = 100_000
MAX_STOP, MAX_STOP_CHARS = 4, 100


class ApiError(Exception):
    """An error answered as JSON with HTTP ``status``: ``kind`` is OpenAI's error type, ``param`` the request
    field at fault, ``code`` a short machine-readable name."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass
class Limits:
    """What one request may ask: at most ``max_tokens`` new tokens, ``max_steps`` steps, ``max_n`` completions,
    ``timeout`` seconds from arrival to answer."""

    max_tokens: int
    max_steps: int = 1024
    max_n: int = 32
    timeout: float = 120.0


@dataclass
class Served:
    """The model a server serves: its ``name`` (the API's model id), tokenizer, sampler ``defaults`` (a run's
    `sample` config) and request `Limits`."""

    model: object
    tokenizer: object
    name: str
    defaults: SampleConfig
    limits: Limits

    @property
    def context(self) -> int:
        return self.model.config.context_length or 256

    def settings_fields(self) -> list[str]:
        """The request's sampler fields that apply to the model's family (`Family.sample_settings`)."""
        return [name for name, field in REQUEST_SAMPLE_NAMES.items() if field in self.model.family.sample_settings]


class CompletionRequest(BaseModel):
    """The body of ``POST /v1/completions``. Unknown fields, wrong JSON types and non-finite numbers are refused."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    model: str | None = Field(None, description="the served model's id (GET /v1/models); optional")
    prompt: str = Field(description="the text to continue (not empty)")
    max_tokens: int = Field(16, description="new tokens at most")
    n: int = Field(1, description="completions of the prompt")
    seed: int | None = Field(None, description="a request with a seed runs alone and is reproducible")
    stop: str | list[str] | None = Field(None, description="up to 4 strings: the text ends before the first")
    stream: bool = Field(False, description="stream the denoising steps as server-sent events")
    temperature: float | None = Field(None, description="0 = greedy")
    top_p: float | None = Field(None, description="sample within the nucleus of this mass")
    top_k: int | None = Field(None, description="sample among the k most likely tokens")
    steps: int | None = Field(None, description="denoising steps (diffusion families)")
    guidance: float | None = Field(None, description="classifier-free guidance scale")
    eta: float | None = Field(None, description="continuous / hybrid: 0 = DDIM, 1 = ancestral")
    remasking: str | None = Field(None, description="masked: ancestral, low_confidence or random")
    block_length: int | None = Field(None, description="masked: semi-autoregressive blocks of this many tokens")
    unmask_threshold: float | None = Field(None, description="masked: commit every token above this probability")
    unmask_entropy: float | None = Field(None, description="masked: commit tokens within this entropy bound (nats)")
    dual_cache: bool | None = Field(None, description="masked, full-sequence models: the approximate DualCache")
    clamp: str | None = Field(None, description="continuous / hybrid: none, soft or hard")
    score_temperature: float | None = Field(None, description="continuous logits models: score temperature")
    commit: str | None = Field(None, description="continuous: commit tokens while denoising (none, confidence, random)")


# the sampler fields a request may set (not a guide model: a served run's own `sample.guide_model` is the one)
REQUEST_SAMPLE_NAMES = {name: field for name, field in SAMPLE_NAMES.items() if name in CompletionRequest.model_fields}


def _bad(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, param=param)


def parse_body(body: bytes) -> CompletionRequest:
    """The `CompletionRequest` in a request body; `ApiError` 400 naming what is wrong."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _bad(f"the request body is not UTF-8 (invalid byte at offset {exc.start}): send JSON encoded as "
                   "UTF-8") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _bad(f"the request body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except RecursionError:
        raise _bad("the request body is not valid JSON: nested too deeply") from None
    if not isinstance(data, dict):
        raise _bad(f"the request body must be a JSON object, not {type(data).__name__}")
    try:
        return CompletionRequest.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        param = ".".join(str(p) for p in first["loc"][:1] + tuple(p for p in first["loc"][1:] if isinstance(p, int)))
        raise _bad(f"{param}: {first['msg']}" if param else first["msg"], param or None) from None


def _check_range(name: str, value: int, low: int, high: int, why: str = "") -> None:
    if not low <= value <= high:
        raise _bad(f"{name} must be between {low} and {high}{why}, got {value}", name)


def _stops(stop: str | list[str] | None) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOP:
        raise _bad(f"stop takes at most {MAX_STOP} strings, got {len(stops)}", "stop")
    if any(not 0 < len(s) <= MAX_STOP_CHARS for s in stops):
        raise _bad(f"stop strings must be 1 to {MAX_STOP_CHARS} characters long", "stop")
    return stops


def _prompt_ids(served: Served, prompt: str) -> list[int]:
    if not prompt:
        raise _bad("prompt is empty: give the text to continue", "prompt")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise _bad(f"prompt is {len(prompt)} characters, more than the {MAX_PROMPT_CHARS} this server reads", "prompt")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError:
        raise _bad("prompt holds an unpaired UTF-16 surrogate (\\ud800-\\udfff): send valid Unicode text",
                   "prompt") from None
    ids = served.tokenizer.encode(prompt)
    if len(ids) >= served.context:
        raise _bad(f"prompt is {len(ids)} tokens, not shorter than the model context of {served.context} tokens: "
                   "shorten it", "prompt")
    return ids


def sample_settings(served: Served, req: CompletionRequest) -> SampleConfig:
    """The served model's sampler defaults overridden by the request's sampler fields; 400 for a field that does
    not apply to the family or a value out of range."""
    family = served.model.family
    given = {name: getattr(req, name) for name in REQUEST_SAMPLE_NAMES if getattr(req, name) is not None}
    for name in given:
        if SAMPLE_NAMES[name] not in family.sample_settings:
            raise _bad(f"{name} does not apply to the {family} family: its sampler takes "
                       f"{', '.join(served.settings_fields())}", name)
    try:
        settings = SampleConfig(**{**served.defaults.model_dump(), **{SAMPLE_NAMES[k]: v for k, v in given.items()}})
    except ValidationError as err:
        first = err.errors()[0]
        name = next(k for k, field in SAMPLE_NAMES.items() if field == first["loc"][0])
        raise _bad(f"{name}: {first['msg']}", name) from None
    if settings.num_steps > served.limits.max_steps:
        raise _bad(f"steps must be at most {served.limits.max_steps} on this server, got {settings.num_steps}",
                   "steps")
    return settings


def _check_generation(served: Served, prompt_len: int, length: int, settings: SampleConfig) -> None:
    """Let the family refuse settings that only its generation can judge (e.g. fewer steps than blocks)."""
    model = served.model
    canvas = canvas_length(model, prompt_len, length)
    prompt = torch.zeros(1, prompt_len, dtype=torch.long)
    try:
        with torch.no_grad():
            build_generation(model, prompt, canvas, settings, None, served.tokenizer.eos_id, True)
    except ValueError as exc:
        raise _bad(str(exc).splitlines()[0] if str(exc) else "the sampler settings do not fit together") from None


def to_job(served: Served, req: CompletionRequest) -> tuple[Job, list[str]]:
    """The `Job` of a request and its stop strings; `ApiError` for anything this server cannot do."""
    if req.model is not None and req.model != served.name:
        raise ApiError(404, f"model {req.model!r} is not served here: this server serves {served.name!r}",
                       param="model", code="model_not_found")
    prompt = _prompt_ids(served, req.prompt)
    room = served.context - len(prompt)
    limit = min(room, served.limits.max_tokens)
    why = f" (the model context of {served.context} tokens minus the prompt's {len(prompt)})" if limit == room \
        else " (the server's --max-tokens)"
    _check_range("max_tokens", req.max_tokens, 1, limit, why)
    _check_range("n", req.n, 1, served.limits.max_n, " (the server's --max-batch)")
    if req.seed is not None:
        _check_range("seed", req.seed, 0, 2**63 - 1)
    stops = _stops(req.stop)
    settings = sample_settings(served, req)
    _check_generation(served, len(prompt), req.max_tokens, settings)
    job = Job(prompt, req.max_tokens, req.n, settings, time.monotonic() + served.limits.timeout, seed=req.seed,
              watch=req.stream)
    return job, stops
