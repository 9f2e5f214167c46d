"""The HTTP side of `semantic serve`: a Starlette app on uvicorn's asyncio loop.

A request is checked here (key, body size, fields), becomes a `worker.Job`, and waits on
an asyncio queue that the engine thread fills through `loop.call_soon_threadsafe`. The
engine never runs on the asyncio loop and handlers never touch the model or the stores'
write paths, so a slow client cannot stall the batch.

Routes: the OpenAI subset (`GET /v1/models`, `POST /v1/chat/completions`), the CLI's
own turn stream (`POST /semantic/v1/turns`, NDJSON: see wire.py), `GET /semantic/v1/status`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..errors import BadInputError, BusyError, NotFoundError, PromptTooLongError, SemanticError, UsageError
from ..events import TokenEvent
from ..store import Store
from ..turn import GenSettings, TurnNotSaved, TurnRecorded
from . import openai_api, wire
from .accesslog import AccessLog
from .jobs import END, STARTED, Job, OtherModel, Saturated, ShuttingDown
from .worker import Worker


@dataclass(frozen=True)
class Limits:
    max_body: int = 4 << 20  # bytes
    max_tokens: int = 8192  # per reply
    max_queue: int = 64  # requests waiting for the engine (503 beyond)
    body_timeout: float = 30.0  # seconds a client may take to send its body (408 beyond)


@dataclass(frozen=True)
class Settings:
    api_key: str | None
    limits: Limits
    version: str


def status_of(exc: SemanticError) -> tuple[int, str, str | None]:
    """HTTP status, OpenAI error type and code for one of our errors."""
    if isinstance(exc, NotFoundError):
        return 404, "invalid_request_error", "model_not_found"
    if isinstance(exc, openai_api.ConflictError):
        return 409, "invalid_request_error", "conversation_diverged"
    if isinstance(exc, BusyError):
        return 409, "invalid_request_error", "agent_busy"
    if isinstance(exc, (Saturated, ShuttingDown)):
        return 503, "server_error", "overloaded"
    if isinstance(exc, PromptTooLongError):
        return 400, "invalid_request_error", "context_length_exceeded"
    if isinstance(exc, (BadInputError, UsageError)):
        return 400, "invalid_request_error", None
    if isinstance(exc, OtherModel):
        return 400, "invalid_request_error", "model_not_served"
    return 500, "server_error", None


LOOPBACK_NAMES = {"127.0.0.1", "localhost", "::1", "[::1]"}


def _host_of(url: str) -> str:
    from urllib.parse import urlsplit

    try:
        return (urlsplit(url).hostname or "").lower()
    except ValueError:
        return ""


def _error(status: int, message: str, kind: str = "invalid_request_error", code: str | None = None) -> JSONResponse:
    # Clients retry 409 and 5xx by default; a diverged history or a refused request fails the same way again.
    headers = {"x-should-retry": "false"} if status < 500 and status != 429 else None
    return JSONResponse(openai_api.error_body(message, kind, code), status_code=status, headers=headers)


def _from_exc(exc: SemanticError) -> JSONResponse:
    status, kind, code = status_of(exc)
    return _error(status, exc.message, kind, code)


class Submission:
    """A job in flight: the asyncio side of its queue."""

    def __init__(self, worker: Worker, job_args: dict[str, Any]) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[object] = asyncio.Queue()
        self.job = Job(emit=self._emit, **job_args)
        self.worker = worker
        self.early: list[object] = []  # what the job said before it started (a room's busy agents)

    def _emit(self, item: object) -> None:
        with contextlib.suppress(RuntimeError):  # the loop has closed (a second signal): the engine still records the turn
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)

    async def start(self, request: Request) -> None:
        """Submit, and wait until the job runs: its errors before that are the response's
        status. A client that leaves while its job waits (a busy agent) cancels it."""
        self.worker.submit(self.job)
        watch = asyncio.ensure_future(self.cancel_on_disconnect(request))
        try:
            await self._started()
        finally:
            watch.cancel()

    async def cancel_on_disconnect(self, request: Request) -> None:
        while not await request.is_disconnected():
            await asyncio.sleep(0.2)
        self.cancel()

    async def _started(self) -> None:
        while True:
            item = await self.queue.get()
            if item is STARTED:
                return
            if isinstance(item, SemanticError):
                raise item
            if item is END:
                raise SemanticError("the request ended before it started")
            self.early.append(item)

    async def events(self) -> AsyncIterator[object]:
        for item in self.early:
            yield item
        while True:
            item = await self.queue.get()
            if item is END:
                return
            yield item

    def cancel(self) -> None:
        self.job.cancelled.set()


def build(worker: Worker, settings: Settings) -> Starlette:
    async def read_body(request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > settings.limits.max_body:
            raise _TooLarge()
        body = b""
        async for part in request.stream():
            body += part
            if len(body) > settings.limits.max_body:
                raise _TooLarge()
        return body

    def refused(request: Request) -> Response | None:
        """Why this request may not go on (None: it may): the key on TCP; and, with no key,
        what a web page could send. A browser page can POST to 127.0.0.1 without asking
        (a "simple" request: no JSON content type), and after DNS rebinding read the answer
        under a name of its own: such requests are refused by their Origin and Host."""
        if request.scope.get("client") is None:  # the Unix socket: the user's own
            return None
        if settings.api_key is not None:
            scheme, _, given = request.headers.get("authorization", "").partition(" ")
            # Header values arrive as latin-1 text: compared as the bytes the client sent.
            ok = scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode("latin-1"), settings.api_key.encode("utf-8"))
            if not ok:
                return _error(401, "missing or wrong API key: send Authorization: Bearer KEY", "invalid_request_error", "invalid_api_key")
            return None
        origin = request.headers.get("origin")
        if origin is not None and _host_of(origin) not in LOOPBACK_NAMES:
            return _error(403, f"requests from web pages ({origin}) are refused; start the server with --api-key to allow them")
        if _host_of("//" + request.headers.get("host", "")) not in LOOPBACK_NAMES:
            return _error(403, "this server answers loopback names only (127.0.0.1, localhost); use --api-key to serve others")
        if request.method == "POST" and not request.headers.get("content-type", "").lower().startswith("application/json"):
            return _error(415, "send the body as application/json")
        return None

    def checked(gen: GenSettings) -> GenSettings:
        """A request's settings within the server's limits: one that asks for more tokens is
        refused, and one that asks for none gets the agent's or config's default, capped."""
        if gen.max_tokens is not None and gen.max_tokens > settings.limits.max_tokens:
            raise BadInputError(f"max_tokens: at most {settings.limits.max_tokens} on this server")
        return dataclasses.replace(gen, max_tokens_limit=settings.limits.max_tokens)

    async def models(request: Request) -> Response:
        if (no := refused(request)) is not None:
            return no
        agents = await run_in_threadpool(_agents)
        return JSONResponse(openai_api.model_list(agents, worker.model_name))

    async def model(request: Request) -> Response:
        if (no := refused(request)) is not None:
            return no
        name = request.path_params["name"]
        agents = await run_in_threadpool(_agents)
        found = [m for m in openai_api.model_list(agents, worker.model_name)["data"] if m["id"] == name]
        if not found:
            return _error(404, f"no agent or model named {name!r}: GET /v1/models lists them", code="model_not_found")
        return JSONResponse(found[0])

    async def status(request: Request) -> Response:
        if (no := refused(request)) is not None:
            return no
        return JSONResponse(
            {"wire": wire.WIRE_VERSION, "version": settings.version, "model": worker.ref.spec, "model_path": worker.ref.path, "pid": _pid()}
        )

    async def completions(request: Request) -> Response:
        if (no := refused(request)) is not None:
            return no
        try:
            body = await asyncio.wait_for(read_body(request), settings.limits.body_timeout)
            req = openai_api.parse(body)
            text = req.new_message()
            gen = checked(req.settings())
            messages = [m.as_dict() for m in req.messages]
            is_agent = await run_in_threadpool(_is_agent, req.model)
            if is_agent:
                args: dict[str, Any] = {"settings": gen, "targets": [(req.model, text)], "history": messages[:-1]}
            elif req.model in (worker.model_name, worker.ref.spec):
                args = {"settings": gen, "messages": messages, "slot": req.prompt_cache_key or req.user}
            else:
                raise NotFoundError(f"no agent or model named {req.model!r}: GET /v1/models lists them")
            args["stop"] = req.stops()
            args["wait_until"] = time.monotonic() + 120  # a second request to an agent waits its turn
            sub = Submission(worker, args)
            await sub.start(request)
        except _TooLarge:
            return _error(413, f"request body over {settings.limits.max_body} bytes")
        except asyncio.TimeoutError:  # a body sent too slowly (or never finished) holds nothing longer
            return _error(408, f"the request body did not arrive within {settings.limits.body_timeout:g} s")
        except ClientDisconnect:  # the client hung up while sending: nobody reads the answer
            return _error(400, "the client disconnected before its request body ended")
        except SemanticError as exc:
            return _from_exc(exc)
        cid = openai_api.completion_id()
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(_sse(sub, cid, req.model, include_usage), media_type="text/event-stream")
        watch = asyncio.ensure_future(sub.cancel_on_disconnect(request))  # a client that gives up stops its turn
        try:
            rec = await _collect(sub)
        finally:
            watch.cancel()
            sub.cancel()  # a no-op once the turn ended; stops it if this handler was cancelled
        if isinstance(rec, SemanticError):
            return _from_exc(rec)
        return JSONResponse(openai_api.completion(cid, req.model, rec))

    async def turns(request: Request) -> Response:
        """The CLI's turn: its fields as `semantic chat` takes them; NDJSON events back. Only
        on the Unix socket (the user's own): it creates agents and changes their settings."""
        if request.scope.get("client") is not None:
            return _error(403, "this route is the semantic CLI's, on the Unix socket only", "invalid_request_error")
        try:
            body = json.loads(await request.body())  # the user's own: no API limits (the turn checks its context)
            if not isinstance(body, dict):
                raise ValueError("not a JSON object")
            if body.get("wire") != wire.WIRE_VERSION:
                return JSONResponse(wire.other_version(body.get("wire"), _pid()), status_code=409)
            sub = Submission(worker, wire.turn_job(body))
            await sub.start(request)
        except (ValueError, KeyError, TypeError) as exc:
            return _error(400, f"malformed turn request: {exc}")
        except SemanticError as exc:
            return JSONResponse(wire.error(exc, _kind(exc)), status_code=status_of(exc)[0])
        return StreamingResponse(_ndjson(sub), media_type="application/x-ndjson")

    async def no_route(request: Request, exc: Exception) -> Response:
        """Unknown paths and methods answer in OpenAI's error shape too."""
        assert isinstance(exc, HTTPException)
        what = "no such route" if exc.status_code == 404 else f"{request.method} is not allowed here"
        response = _error(exc.status_code, f"{what}: {request.method} {request.url.path} (see GET /v1/models)")
        response.headers.update(exc.headers or {})  # 405's Allow
        return response

    routes = [
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/models/{name:path}", model, methods=["GET"]),
        Route("/v1/chat/completions", completions, methods=["POST"]),
        Route("/semantic/v1/turns", turns, methods=["POST"]),
        Route("/semantic/v1/status", status, methods=["GET"]),
    ]
    app = Starlette(routes=routes, middleware=[Middleware(AccessLog)], exception_handlers={404: no_route, 405: no_route})
    # A trailing slash is a 404, not a redirect: the redirect's Location is built from the
    # request's Host header, before any key or Host check.
    app.router.redirect_slashes = False
    return app


class _TooLarge(Exception):
    pass


def _pid() -> int:
    import os

    return os.getpid()


def _agents() -> list[tuple[str, float]]:
    store = Store()
    try:
        return [(a.name, a.created_at) for a in store.list_agents()]
    finally:
        store.close()


def _is_agent(name: str) -> bool:
    store = Store()
    try:
        return store.find_agent(name) is not None
    finally:
        store.close()


def _kind(exc: SemanticError) -> str:
    if isinstance(exc, OtherModel):
        return "other_model"
    if isinstance(exc, ShuttingDown):
        return "shutting_down"
    if isinstance(exc, TurnNotSaved):
        return "not_saved"
    return "error"


async def _collect(sub: Submission) -> TurnRecorded | SemanticError:
    rec: TurnRecorded | SemanticError = SemanticError("the turn ended without a reply")
    async for item in sub.events():
        if isinstance(item, (TurnRecorded, SemanticError)):
            rec = item
    return rec


def _sse_line(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


async def _sse(sub: Submission, cid: str, model: str, include_usage: bool) -> AsyncIterator[str]:
    try:
        yield _sse_line(openai_api.chunk(cid, model, {"role": "assistant", "content": ""}))
        async for item in sub.events():
            if isinstance(item, TokenEvent) and item.text:
                yield _sse_line(openai_api.chunk(cid, model, {"content": item.text}))
            elif isinstance(item, TurnRecorded):
                yield _sse_line(openai_api.chunk(cid, model, {}, item.done.finish_reason))
                if include_usage:
                    yield _sse_line(openai_api.usage_chunk(cid, model, item.done.stats))
            elif isinstance(item, SemanticError):
                _, kind, code = status_of(item)
                yield _sse_line(openai_api.error_body(item.message, kind, code))
        yield "data: [DONE]\n\n"
    finally:
        sub.cancel()  # the client went away mid-stream: its sequence stops now, the others go on


async def _ndjson(sub: Submission) -> AsyncIterator[bytes]:
    try:
        for p in list(sub.job.pendings.values()):  # filled before the job said STARTED
            yield wire.line(wire.started(p))
        async for item in sub.events():
            if isinstance(item, SemanticError):
                names = list(item.errors) if isinstance(item, TurnNotSaved) else []
                yield wire.line(wire.error(item, _kind(item), names))
            else:
                yield wire.line(wire.encode(item))  # type: ignore[arg-type]
        yield wire.line({"event": "end"})
    finally:
        sub.cancel()
