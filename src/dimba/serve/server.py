"""Start `dimba serve`: load the model like `dimba generate`, check where to listen, and run uvicorn."""

from __future__ import annotations

import ipaddress
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from dimba.config import SampleConfig
from dimba.errors import UsageError
from dimba.loading import guide_model, load_for_inference
from dimba.training.files import run_of_checkpoint
from dimba.serve.engine import Engine
from dimba.serve.schema import Limits, Served


def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine only (localhost, 127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_address(host: str, port: int, allow_remote: bool) -> None:
    """One-line `UsageError`s for a host other than loopback without ``allow_remote`` and for a bad port."""
    if not is_loopback(host) and not allow_remote:
        raise UsageError(f"--host {host} is not a loopback address and the server has no authentication: add "
                         "--allow-remote to serve other machines")
    if not 0 <= port <= 65535:
        raise UsageError(f"--port must be between 0 and 65535, got {port}")


def listen(host: str, port: int) -> socket.socket:
    """A listening socket on ``host``:``port`` (port 0: a free one); a one-line `UsageError` if it cannot be bound."""
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family)
    except OSError as exc:
        raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror or exc}: choose another --port (0 picks a "
                         "free one) or --host") from None


@dataclass
class Options:
    """How `dimba serve` serves: where it listens, how it batches and what one request may ask (the CLI flags)."""

    host: str = "127.0.0.1"
    port: int = 8000
    max_batch: int = 32
    max_queue: int = 64
    max_tokens: int | None = None
    max_steps: int = 1024
    timeout: float = 120.0
    batch_wait: float = 0.01
    allow_remote: bool = False
    name: str | None = None
    threads: int | None = None  # torch's intra-op threads (None: torch's default, one per core)


def prepare(model_path: str, defaults: SampleConfig, options: Options, start: bool = True):
    """Load the model of ``model_path`` (a run or an export folder; ``defaults`` its sampler settings) and bind the
    listening socket: the uvicorn `Server`, the socket and the `Engine` (started unless ``start`` is False).
    One-line `UsageError`s for a bad address, a busy port or a model that cannot be loaded."""
    import uvicorn

    from dimba.serve.app import create_app

    check_address(options.host, options.port, options.allow_remote)
    if options.threads:
        torch.set_num_threads(options.threads)
    model, tokenizer = load_for_inference(model_path)
    if defaults.guide_model is not None:  # the run's autoguidance model: refused here, not at every request
        guide_model(defaults.guide_model, model)
    context = model.config.context_length or 256
    limits = Limits(max_tokens=min(options.max_tokens or context, context), max_steps=options.max_steps,
                    max_n=options.max_batch, timeout=options.timeout)
    served = Served(model, tokenizer, options.name or _model_name(model_path), defaults, limits)
    sock = listen(options.host, options.port)
    engine = Engine(model, tokenizer.eos_id, options.max_batch, options.max_queue, options.batch_wait)
    if start:
        engine.start()
    config = uvicorn.Config(create_app(served, engine), log_level="warning", access_log=False,
                            timeout_graceful_shutdown=3)
    return uvicorn.Server(config), sock, engine


def url_of(sock: socket.socket) -> str:
    """The http URL of a listening socket."""
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


def _model_name(model_path: str) -> str:
    """The served model's default name: its folder's (a run's checkpoint: RUN-best for RUN/checkpoints/best.ckpt)."""
    found = run_of_checkpoint(model_path)
    if found is None:
        return Path(model_path).resolve().name
    run, checkpoint = found
    return f"{run.resolve().name}-{checkpoint.stem}"


def run_server(model_path: str, defaults: SampleConfig, options: Options) -> None:
    """Serve the model of ``model_path`` until interrupted (see `prepare`); prints the address on stderr once
    listening."""
    server, sock, engine = prepare(model_path, defaults, options)
    app = server.config.app
    print(f"dimba: serving {app.state.served.name} ({app.state.served.model.family} family) at {url_of(sock)} "
          f"(max batch {engine.max_batch}); Ctrl-C stops", file=sys.stderr, flush=True)
    server.run(sockets=[sock])
