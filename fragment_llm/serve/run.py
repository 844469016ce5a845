"""Start the server: check the settings, bind the port, run uvicorn until Ctrl-C.

The socket is bound here, not by uvicorn, so a port in use (or an address this machine
does not have) is a one-line error naming it, and `--port 0` can report the port it got.
Importing this module is cheap (no torch, no FastAPI): `fragment serve` checks its
settings, its key and its port with it before it loads the model, so a refusal is
immediate rather than seconds later.
uvicorn runs with its own limits tightened: headers capped, idle connections closed,
and at most `slots + queue + 32` connections open at once (past that, 503).
"""

from __future__ import annotations

import contextlib
import logging
import re
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fragment_llm.config import ServeConfig
from fragment_llm.errors import ConfigError, FragmentError
from fragment_llm.serve import guard
from fragment_llm.tokenizer.tokenizer import Tokenizer

if TYPE_CHECKING:  # torch and FastAPI: imported where the app is built
    import uvicorn
    from fastapi import FastAPI

    from fragment_llm.model.gpt import GPT

MAX_HEADER_BYTES = 16 * 1024
KEEP_ALIVE_S = 5
SPARE_CONNECTIONS = 32


class ServeExtraMissing(FragmentError):
    """FastAPI or uvicorn is not installed."""


@dataclass(frozen=True)
class ServeRequest:
    model: GPT
    tokenizer: Tokenizer
    chat_format: str | None
    checkpoint_path: Path
    created: int
    settings: ServeConfig
    api_key: bytes | None
    worker_processes: bool = False  # slots as worker processes (fragment serve), or threads


def model_id_for(settings: ServeConfig, checkpoint_path: Path) -> str:
    """`--model-name`, else the run folder's name made into an id (`checkpoints-chat`)."""
    if settings.model_name:
        return settings.model_name
    path = checkpoint_path.resolve()
    name = path.parent.name if path.name.startswith("step-") else path.name
    cleaned = re.sub(r"[^A-Za-z0-9._:-]+", "-", name).strip("-.") or "fragment"
    return cleaned[:64]


def check_settings(settings: ServeConfig, api_key: bytes | None) -> None:
    """Everything about the settings that can be refused before the model is loaded."""
    guard.check_bind(settings.host, api_key)
    guard.check_origins(settings.cors_origins)


def require_serve_extra() -> None:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise ServeExtraMissing("fragment serve needs FastAPI and uvicorn, which are not "
                                "installed", hint="pip install 'fragment-llm[serve]'") from None


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port, or ConfigError naming what went wrong."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except socket.gaierror:
        raise ConfigError(f"--host {host} is not an address of this machine") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}",
                          hint="choose another --port (0 picks a free one)") from None
    sock.set_inheritable(True)
    return sock


def build_app(request: ServeRequest) -> FastAPI:
    """The app for `request` (FastAPI is imported here: it is the serve extra's)."""
    from fragment_llm.serve.answer import Served
    from fragment_llm.serve.app import create_app
    from fragment_llm.serve.slots import SlotPool

    settings = request.settings
    pool = SlotPool(request.model, request.tokenizer, settings.slots, settings.queue,
                    processes=request.worker_processes, threads=settings.threads)
    served = Served(pool, request.tokenizer, request.chat_format,
                    model_id_for(settings, request.checkpoint_path), request.created)
    return create_app(served, settings, request.api_key)


def serve(request: ServeRequest, on_listening: Callable[[str], None],
          sock: socket.socket | None = None) -> None:
    """Serve until interrupted; `on_listening(url)` once the port is bound. `sock`: a
    socket `bind` made already (closed on return), else the settings' host and port."""
    require_serve_extra()
    check_settings(request.settings, request.api_key)
    app = build_app(request)
    sock = sock or bind(request.settings.host, request.settings.port)
    _log_to_stderr(request.settings.access_log)
    on_listening(url_of(sock))
    try:
        _server(app, request.settings).run(sockets=[sock])
    finally:
        app.state.routes.served.pool.close()
        sock.close()


def dry_run(request: ServeRequest, sock: socket.socket | None = None) -> str:
    """Everything `serve` does before it accepts a connection (the settings, the app,
    binding the port), then let go; the URL it would have served. `sock` as for serve."""
    require_serve_extra()
    check_settings(request.settings, request.api_key)
    app = build_app(request)
    sock = sock or bind(request.settings.host, request.settings.port)
    try:
        return url_of(sock)
    finally:
        app.state.routes.served.pool.close()
        sock.close()


@contextlib.contextmanager
def serving_in_thread(request: ServeRequest, ready_timeout_s: float = 30.0) -> Iterator[Running]:
    """The server on a background thread, for tests and benchmarks: yields once it
    accepts connections, stops (and frees its port) on exit."""
    require_serve_extra()
    check_settings(request.settings, request.api_key)
    app = build_app(request)
    sock = bind(request.settings.host, request.settings.port)
    server = _server(app, request.settings)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + ready_timeout_s
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.01)
        yield Running(url_of(sock), app)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        app.state.routes.served.pool.close()
        sock.close()


@dataclass(frozen=True)
class Running:
    url: str  # http://host:port, no trailing slash
    app: FastAPI


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _server(app: FastAPI, settings: ServeConfig) -> uvicorn.Server:
    """uvicorn's server, whose shutdown (Ctrl-C, SIGTERM) first ends the answers in
    progress: their responses then complete within a token, and the shutdown is
    graceful, rather than uvicorn waiting out its grace period and cancelling each
    request (a traceback on the terminal, a client cut off mid-stream)."""
    import uvicorn

    served = app.state.routes.served

    class Server(uvicorn.Server):
        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            served.stop_all()
            await super().shutdown(sockets)

    return Server(_uvicorn_config(app, settings))


def _uvicorn_config(app: FastAPI, settings: ServeConfig) -> uvicorn.Config:
    import uvicorn

    from fragment_llm.serve.connection import GuardedH11Protocol

    return uvicorn.Config(
        app, http=GuardedH11Protocol, log_level="warning", access_log=False, server_header=False,
        timeout_keep_alive=KEEP_ALIVE_S, h11_max_incomplete_event_size=MAX_HEADER_BYTES,
        limit_concurrency=settings.slots + settings.queue + SPARE_CONNECTIONS,
        timeout_graceful_shutdown=2)


def _log_to_stderr(access_log: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    logger = logging.getLogger("fragment.serve")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO if access_log else logging.WARNING)
    logger.propagate = False
