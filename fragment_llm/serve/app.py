"""The HTTP application: routes, the order of checks on each request, and the page.

Each API request goes through, in this order, before the model does any work:
the Host header (loopback servers), the API key (in constant time), the media type
(JSON only: a browser cannot send it cross-origin without a CORS preflight, which fails
unless --cors-origin allows it), the body's size (read in chunks, refused past the cap),
its encoding and depth, then every field. Only then is a slot taken.

Every failure is an OpenAI-shaped error (serve/errors.py); an unexpected exception is a
500 with no detail in the response, and one line in the server's log. The Gatekeeper
turns it into that 500, so it carries the same security headers as every other
response (Starlette's own last-resort handler sits outside all middleware).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware

from fragment_llm.config import ServeConfig
from fragment_llm.inference.engine import Engine
from fragment_llm.safety.text import sanitize_prompt
from fragment_llm.serve import guard, protocol
from fragment_llm.serve.answer import (
    CHAT,
    COMPLETION,
    Answer,
    Served,
    Shape,
    chat_prompt,
    completion_prompt,
    sampling,
)
from fragment_llm.serve.body import MAX_BODY_SECONDS, parse_json, read_body
from fragment_llm.serve.errors import ApiError
from fragment_llm.serve.protocol import ChatRequest, CompletionRequest, R
from fragment_llm.serve.slots import Job, Prompt, SlotPool

log = logging.getLogger("fragment.serve")
PAGE_FILES = {"/": ("index.html", "text/html; charset=utf-8"),
              "/chat.js": ("chat.js", "text/javascript; charset=utf-8"),
              "/chat.css": ("chat.css", "text/css; charset=utf-8"),
              "/favicon.svg": ("favicon.svg", "image/svg+xml")}
Scope = MutableMapping[str, Any]
Asgi = Callable[[Scope, Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]],
                Awaitable[None]]


def create_app(served: Served, settings: ServeConfig, api_key: bytes | None) -> FastAPI:
    """The FastAPI app serving `served` under `settings`; `api_key` None = no key."""
    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
    routes = Routes(served, settings, api_key)
    app.get("/health")(routes.health)
    app.get("/v1/models")(routes.models)
    app.get("/v1/models/{model_id}")(routes.model)
    app.post("/v1/chat/completions")(routes.chat_completions)
    app.post("/v1/completions")(routes.completions)
    for path in PAGE_FILES:
        app.get(path)(routes.page)
    app.exception_handler(ApiError)(_api_error)
    app.exception_handler(StarletteHTTPException)(_http_error)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins),
                           allow_methods=["GET", "POST"],
                           allow_headers=["authorization", "content-type"], max_age=600)
    app.add_middleware(Gatekeeper, bound_host=settings.host, access_log=settings.access_log)
    app.state.routes = routes  # for tests and the benchmark: the pool's counters
    return app


class Routes:
    def __init__(self, served: Served, settings: ServeConfig, api_key: bytes | None) -> None:
        self.served, self.settings, self.api_key = served, settings, api_key
        self.page_files = {path: _page_file(name) for path, (name, _) in PAGE_FILES.items()}

    async def health(self) -> dict[str, str]:
        return {"status": "ok"}

    async def models(self, request: Request) -> dict[str, object]:
        guard.check_key(request.headers.get("authorization"), self.api_key)
        return protocol.model_list(self.served.model_id, self.served.created)

    async def model(self, request: Request, model_id: str) -> dict[str, object]:
        guard.check_key(request.headers.get("authorization"), self.api_key)
        self._check_model(model_id, param=None)
        return protocol.model_list(self.served.model_id, self.served.created)["data"][0]

    async def page(self, request: Request) -> Response:
        name, media_type = PAGE_FILES[request.url.path]
        return Response(self.page_files[request.url.path], media_type=media_type,
                        headers={"content-security-policy": guard.PAGE_POLICY})

    async def chat_completions(self, request: Request) -> Response:
        deadline = time.monotonic() + self.settings.max_time_s
        chat = await self._request(request, ChatRequest, deadline)
        settings = sampling(self.settings, chat, deadline)
        # Tokenizing up to a megabyte of messages takes a while: off the event loop, so
        # streams in progress keep flowing.
        prompt = await asyncio.to_thread(chat_prompt, self.served, settings, chat,
                                         self.settings.max_messages)
        return await self._answer(request, chat, prompt, CHAT, deadline)

    async def completions(self, request: Request) -> Response:
        deadline = time.monotonic() + self.settings.max_time_s
        completion = await self._request(request, CompletionRequest, deadline)
        settings = sampling(self.settings, completion, deadline)
        prompt = await asyncio.to_thread(completion_prompt, self.served, settings, completion)
        # The prompt as the model saw it: escape sequences and control characters that
        # the sanitiser removed must not come back to a terminal through the echo.
        echo = sanitize_prompt(completion.text) if completion.echo else ""
        return await self._answer(request, completion, prompt, COMPLETION, deadline, echo)

    async def _request(self, request: Request, kind: type[R], deadline: float) -> R:
        """Key, media type, capped body, bounded JSON, fields, model: in that order."""
        guard.check_key(request.headers.get("authorization"), self.api_key)
        media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
        if media_type != "application/json":
            raise ApiError(415, "the request body must be JSON (Content-Type: application/json)")
        body = await read_body(request.stream(), request.headers.get("content-length"),
                               self.settings.max_body_bytes,
                               min(MAX_BODY_SECONDS, deadline - time.monotonic()))
        data = await asyncio.to_thread(parse_json, body, self.settings.max_json_depth)
        parsed = protocol.validated(kind, data)
        self._check_model(parsed.model, param="model")
        return parsed

    def _check_model(self, model_id: str, param: str | None) -> None:
        if model_id != self.served.model_id:
            raise ApiError(404, f"the model {model_id!r} does not exist here; this server "
                                f"serves {self.served.model_id!r}", param=param,
                           code="model_not_found")

    async def _answer(self, request: Request, parsed: ChatRequest | CompletionRequest,
                      prompt: Prompt, shape: Shape, deadline: float, echo: str = "") -> Response:
        pool = self.served.pool
        engine = await self._slot(request, deadline)
        job = Job(asyncio.get_running_loop())
        try:
            # The time spent queueing is gone from the answer's budget.
            settings = prompt.settings.model_copy(
                update={"max_time_s": max(0.001, deadline - time.monotonic())})
            prompt = Prompt(prompt.ids, settings, prompt.stop_strings)
        except BaseException:
            pool.release_unused(engine)
            raise
        pool.start(job, engine, prompt)
        answer = Answer(self.served, job, prompt, shape, echo)
        request.state.answer = answer
        if not parsed.stream:
            return JSONResponse(await answer.collect(lambda: _disconnected(request)))
        include_usage = bool(parsed.stream_options and parsed.stream_options.include_usage)
        return StreamingResponse(answer.events(include_usage), media_type="text/event-stream",
                                 headers={"x-accel-buffering": "no"})

    async def _slot(self, request: Request, deadline: float) -> Engine:
        """A generation slot, after a wait in the queue if need be. A client that hangs
        up while it waits gives its place back at once, rather than holding it until a
        slot frees and then starting an answer nobody reads."""
        pool = self.served.pool
        acquiring = asyncio.ensure_future(pool.acquire(deadline))
        gone = _disconnected(request)
        try:
            done, _ = await asyncio.wait({acquiring, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not acquiring.done():
                acquiring.cancel()
                # A slot that comes free in the same instant goes back to the pool.
                acquiring.add_done_callback(lambda task: _give_back(pool, task))
        if acquiring not in done:
            raise ApiError(499, "the client closed the connection while its request waited "
                                "for a slot", code="client_closed")
        return acquiring.result()  # the engine, or Busy / 503 from the pool


def _give_back(pool: SlotPool, acquiring: asyncio.Future[Engine]) -> None:
    if not acquiring.cancelled() and acquiring.exception() is None:
        pool.release_unused(acquiring.result())


def _disconnected(request: Request) -> asyncio.Future[None]:
    """A future that completes when the client hangs up."""
    async def wait() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
    return asyncio.ensure_future(wait())


def _page_file(name: str) -> bytes:
    return resources.files("fragment_llm.serve").joinpath("page", name).read_bytes()


# ------------------------------------------------------------------------- errors


async def _api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    """Starlette's own refusals (unknown path, wrong method) in OpenAI's shape."""
    assert isinstance(exc, StarletteHTTPException)
    reason = {404: "no such endpoint", 405: "method not allowed on this endpoint"}
    error = ApiError(exc.status_code, reason.get(exc.status_code, "request refused"))
    return JSONResponse(error.body(), status_code=exc.status_code, headers=exc.headers)


INTERNAL_ERROR = ApiError(500, "internal server error", code="internal_error")


# ------------------------------------------------------------------------ gatekeeper


class Gatekeeper:
    """ASGI middleware around everything: the Host check, the common security headers,
    and one access-log line per request (its route, status and time, never its text)."""

    def __init__(self, app: Asgi, bound_host: str, access_log: bool) -> None:
        self.app, self.bound_host, self.access_log = app, bound_host, access_log

    async def __call__(self, scope: Scope, receive: Callable[[], Awaitable[Any]],
                       send: Callable[[Any], Awaitable[None]]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status = time.monotonic(), [0]

        async def send_with_headers(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                headers = list(message.get("headers", []))
                names = {name.lower() for name, _ in headers}
                headers += [(name.encode(), value.encode())
                            for name, value in guard.COMMON_HEADERS.items()
                            if name.encode() not in names]
                if b"content-security-policy" not in names:
                    headers.append((b"content-security-policy", guard.API_POLICY.encode()))
                message["headers"] = headers
            await send(message)

        try:
            headers = dict(scope.get("headers", []))
            host = headers.get(b"host", b"").decode("latin-1")
            try:
                guard.check_host_header(host, self.bound_host)
            except ApiError as exc:
                response = JSONResponse(exc.body(), status_code=exc.status)
                await response(scope, receive, send_with_headers)
                return
            await self.app(scope, receive, send_with_headers)
        except Exception as exc:  # noqa: BLE001 (the last resort: logged, answered, dropped)
            # The type only: an exception's text may quote the request.
            log.error("internal error: %s", type(exc).__name__,
                      exc_info=log.isEnabledFor(logging.DEBUG))
            if not status[0]:  # nothing sent yet; otherwise the connection just ends
                response = JSONResponse(INTERNAL_ERROR.body(), status_code=500)
                await response(scope, receive, send_with_headers)
        finally:
            if self.access_log:
                self._log(scope, status[0], time.monotonic() - started)

    def _log(self, scope: Scope, status: int, seconds: float) -> None:
        route = scope.get("route")
        path = getattr(route, "path", None) or "(no such path)"
        answer = getattr(scope.get("state", {}).get("answer"), "outcome", None)
        tokens = f" {answer.stats.new_tokens} tokens" if answer is not None else ""
        log.info("%s %s %s%s %.2fs", scope.get("method", "?"), path, status or "-", tokens,
                 seconds)
