"""HTTP concerns only: routes, request parsing and limits, auth, CORS, access log, JSON errors.

``create_app(config)`` returns a Starlette app whose lifespan starts and closes the :class:`Gateway`
(``app.state.gateway``). Everything the routes do is documented in ``docs/protocol.md``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from hmac import compare_digest
from typing import Any, TypeVar

import msgspec
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .. import __version__
from .config import GatewayConfig
from .conversations import Conversation
from .errors import BadRequest, GatewayError, NotFound, PayloadTooLarge, ServiceUnavailable
from .models import parse_model_spec
from .service import EXPECTED_STARTUP_ERRORS, Gateway, describe_error
from .streaming import BtwStreamResponse, EventStreamResponse

__all__ = ["create_app"]

log = logging.getLogger("sidechain.gateway")
access_log = logging.getLogger("sidechain.gateway.access")

T = TypeVar("T")

_MAX_ID_DIGITS = 18


class JSONResponse(Response):
    """A JSON response encoded with msgspec."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return msgspec.json.encode(content)


def error_response(
    status: int, type: str, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    """The one error body shape: ``{"error": {"type", "message"}}``."""
    return JSONResponse({"error": {"type": type, "message": message}}, status_code=status, headers=headers)


# -- request bodies --------------------------------------------------------------------------------


class MessageBody(msgspec.Struct):
    text: str
    queue: bool = False


class NoteBody(msgspec.Struct):
    text: str


class BtwBody(msgspec.Struct):
    question: str
    thread_id: str | None = None


async def read_body(request: Request, limit: int) -> bytes:
    """The request body; ``PayloadTooLarge`` as soon as more than ``limit`` bytes are declared or read."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(
            "body_too_large",
            f"request body of {declared} bytes exceeds {limit} bytes",
            headers={"Connection": "close"},
        )
    size = 0
    chunks: list[bytes] = []
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(
                    "body_too_large", f"request body exceeds {limit} bytes", headers={"Connection": "close"}
                )
            chunks.append(chunk)
    except ClientDisconnect:
        raise ClientGone from None
    return b"".join(chunks)


class ClientGone(Exception):
    """The client went away while its request body was being read: nobody is left to answer."""


async def read_json(request: Request, type_: type[T], limit: int) -> T:
    """Decode the body as ``type_``; ``BadRequest`` (``invalid_json`` / ``invalid_request``) otherwise."""
    body = await read_body(request, limit)
    if not body.strip():
        raise BadRequest("invalid_json", "the request body must be a JSON object")
    try:
        return msgspec.json.decode(body, type=type_)
    except msgspec.ValidationError as exc:
        raise BadRequest("invalid_request", str(exc)) from None
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:  # bad UTF-8 in a string is not a DecodeError
        raise BadRequest("invalid_json", f"the request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise BadRequest("invalid_json", "the request body is nested too deeply") from None


def last_event_id(request: Request) -> int | None:
    """``Last-Event-ID`` header, else ``?last_event_id=``; None when absent or empty.

    Raises ``BadRequest`` (``invalid_last_event_id``) when it is not a decimal id.
    """
    raw = request.headers.get("last-event-id")
    if raw is None or not raw.strip():
        raw = request.query_params.get("last_event_id")
    if raw is None or not raw.strip():
        return None
    raw = raw.strip()
    if not raw.isdigit() or not raw.isascii() or len(raw) > _MAX_ID_DIGITS:
        raise BadRequest(
            "invalid_last_event_id", f"Last-Event-ID must be a decimal event id, got {raw[:40]!r}"
        )
    return int(raw)


def _text_limit(text: str, limit: int, field: str, type: str) -> None:
    if not text.strip():
        raise BadRequest("invalid_request", f"{field} must not be empty")
    if len(text) > limit:
        raise BadRequest(type, f"{field} is {len(text)} characters; the limit is {limit}")


# -- middleware ------------------------------------------------------------------------------------


def _loggable_path(scope: Scope) -> str:
    """The path as sent, percent-encoded (a decoded ``%0A`` would forge a second log line)."""
    raw = scope.get("raw_path")
    if isinstance(raw, bytes):
        return raw.decode("ascii", "backslashreplace")
    return str(scope["path"]).encode("unicode_escape").decode("ascii")


class StartupFailureMessage:
    """Turns the traceback a failed lifespan startup reports to the server into one line.

    Starlette sends the whole traceback in ``lifespan.startup.failed`` and uvicorn logs it at ERROR,
    which buried the cause of an expected failure (a store that cannot open, or is in use) under
    thirty lines. For the gateway's own start failing with one of :data:`EXPECTED_STARTUP_ERRORS`,
    the cause is sent instead, as ``TypeName: message``, and the traceback goes to the
    ``sidechain.gateway`` logger at DEBUG. Any other failure (a bug) keeps its traceback.
    """

    def __init__(self, app: ASGIApp, gateway: Gateway) -> None:
        self.app = app
        self.gateway = gateway

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return

        async def send_wrapper(message: Message) -> None:
            cause = self.gateway.startup_error
            if message["type"] == "lifespan.startup.failed" and isinstance(cause, EXPECTED_STARTUP_ERRORS):
                log.debug("the gateway failed to start", exc_info=cause)
                message = {**message, "message": describe_error(cause)}
            await send(message)

        await self.app(scope, receive, send_wrapper)


class AccessLogMiddleware:
    """Logs one line per HTTP request when it ends: client, method, path, status, duration, bytes."""

    def __init__(self, app: ASGIApp, gateway: Gateway, enabled: bool = True) -> None:
        self.app = app
        self.gateway = gateway
        self.enabled = enabled

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 0
        sent = 0

        async def send_wrapper(message: Message) -> None:
            nonlocal status, sent
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body":
                sent += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self.gateway.metrics.http_requests_total += 1
            if self.enabled:
                client = scope.get("client")
                access_log.info(
                    '%s "%s %s" %d %.1fms %dB',
                    f"{client[0]}:{client[1]}" if client else "-",
                    scope["method"],
                    _loggable_path(scope),
                    status,
                    (time.perf_counter() - start) * 1000,
                    sent,
                )


class JSONErrorCORSMiddleware(CORSMiddleware):
    """Starlette's CORS handling, with its refused preflight answered in the one error body shape."""

    def preflight_response(self, request_headers: Any) -> Response:
        response = super().preflight_response(request_headers)
        if response.status_code == 400:
            reason = bytes(response.body).decode("utf-8", "replace")
            return error_response(400, "cors_preflight_refused", reason,
                                  {k: v for k, v in response.headers.items() if k.lower().startswith("vary")})
        return response


class BearerAuthMiddleware:
    """Requires ``Authorization: Bearer <token>`` on every path but ``/healthz`` (constant-time compare)."""

    OPEN_PATHS = frozenset({"/healthz"})

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self.expected = token.encode("utf-8")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.OPEN_PATHS or self._authorized(scope):
            await self.app(scope, receive, send)
            return
        response = error_response(
            401,
            "unauthorized",
            "a valid 'Authorization: Bearer <token>' header is required",
            headers={"WWW-Authenticate": 'Bearer realm="sidechain"'},
        )
        await response(scope, receive, send)

    def _authorized(self, scope: Scope) -> bool:
        presented = b""
        for name, value in scope["headers"]:
            if name == b"authorization":
                scheme, _, credentials = value.partition(b" ")
                if scheme.lower() == b"bearer":
                    presented = credentials.strip()
                break
        # constant time in the content of the token (only its length can leak)
        return compare_digest(presented, self.expected)


# -- routes ----------------------------------------------------------------------------------------


def _gateway(request: Request) -> Gateway:
    gw: Gateway = request.app.state.gateway
    return gw


async def healthz(request: Request) -> Response:
    gw = _gateway(request)
    if gw.shutting_down:
        return JSONResponse({"status": "shutting_down"}, status_code=503)
    # the model spec without the upstream URL (no credentials or hosts leak from an open endpoint)
    kind, _base, name = parse_model_spec(gw.config.model)
    model = kind if kind == "echo" else f"{kind}:{name}"
    return JSONResponse({"status": "ok", "model": model, "version": __version__})


async def metrics(request: Request) -> Response:
    return Response(_gateway(request).metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


async def create_conversation(request: Request) -> Response:
    gw = _gateway(request)
    await read_body(request, gw.config.max_body_bytes)
    conv = await gw.create_conversation()
    return JSONResponse(
        {"id": conv.id}, status_code=201, headers={"Location": f"/v1/conversations/{conv.id}"}
    )


async def get_conversation(request: Request) -> Response:
    gw = _gateway(request)
    conv = await gw.conversation(request.path_params["cid"])
    snapshot = conv.to_json()
    await gw.durable()  # the events up to its last_event_id are durable (and resumable from) first
    return JSONResponse(snapshot)


async def _conversation_and_body(request: Request, type_: type[T], *, writes: bool = True
                                 ) -> tuple[Conversation, T]:
    """The path's conversation and the decoded body. An unknown conversation is a 404 before the body
    is read; the lookup is repeated after it, because a slow body can outlast the conversation's stay
    in memory (eviction), and work must go to the object that is loaded now."""
    gw = _gateway(request)
    await gw.conversation(request.path_params["cid"])
    body = await read_json(request, type_, gw.config.max_body_bytes)
    if gw.shutting_down:  # a conversation loaded during shutdown would take work that outlives it
        raise ServiceUnavailable("shutting_down", "the gateway is shutting down; retry later")
    if writes:  # a btw is answered from memory: it works while the store fails
        gw.refuse_if_store_failing()
    return await gw.conversation(request.path_params["cid"]), body


async def post_message(request: Request) -> Response:
    gw = _gateway(request)
    conv, body = await _conversation_and_body(request, MessageBody)
    _text_limit(body.text, gw.config.max_message_chars, "text", "message_too_long")
    queued = conv.busy
    turn = conv.post_message(body.text, queue=body.queue)
    await gw.durable()
    return JSONResponse({"turn_id": turn.id, "queued": queued}, status_code=202)


async def post_note(request: Request) -> Response:
    gw = _gateway(request)
    conv, body = await _conversation_and_body(request, NoteBody)
    _text_limit(body.text, gw.config.max_message_chars, "text", "message_too_long")
    note = conv.add_note(body.text)
    await gw.durable()
    return JSONResponse({"note_id": note.id}, status_code=201)


async def cancel_turn(request: Request) -> Response:
    gw = _gateway(request)
    conv = await gw.conversation(request.path_params["cid"])
    turn = await conv.cancel_turn(request.path_params["turn_id"])
    await gw.durable()
    return JSONResponse({"turn_id": turn.id, "state": turn.state}, status_code=202)


def _no_head(request: Request) -> None:
    """A stream is GET only: Starlette answers HEAD on GET routes, and a HEAD response to a stream
    would hold its subscription (and the keep-alive connection) without ever sending it."""
    if request.method == "HEAD":
        raise HTTPException(405, "HEAD is not served on a stream; use GET", headers={"Allow": "GET"})


async def events(request: Request) -> Response:
    _no_head(request)
    gw = _gateway(request)
    conv = await gw.conversation(request.path_params["cid"])
    after = last_event_id(request)
    if after is not None:
        if after > conv.last_event_id:
            raise BadRequest(
                "invalid_last_event_id",
                f"Last-Event-ID {after} is ahead of this conversation's newest event {conv.last_event_id}",
            )
        gw.metrics.resumes_total += 1
    if gw.shutting_down:
        raise ServiceUnavailable("shutting_down", "the gateway is shutting down; reconnect later")
    return EventStreamResponse(gw, conv, after)


async def post_btw(request: Request) -> Response:
    gw = _gateway(request)
    conv, body = await _conversation_and_body(request, BtwBody, writes=False)
    _text_limit(body.question, gw.config.max_question_chars, "question", "question_too_long")
    key = request.headers.get("idempotency-key")
    if key is not None and (not key.strip() or len(key) > 255):
        raise BadRequest("invalid_idempotency_key", "Idempotency-Key must be 1 to 255 characters")
    after = last_event_id(request)
    if key is None:
        if after is not None:
            raise BadRequest(
                "invalid_last_event_id", "resuming a btw needs the Idempotency-Key of the original"
            )
        btw = gw.btws.start_btw(conv, body.question, body.thread_id, None)
        return BtwStreamResponse(gw, btw, 0, resumed=False)
    existing = gw.btws.by_key(conv.id, key)
    if existing is None:
        if after is not None:
            raise NotFound(
                "btw_expired",
                "no btw with this Idempotency-Key is retained (it expired); ask again without Last-Event-ID",
            )
        btw = gw.btws.start_btw(conv, body.question, body.thread_id, key)
        return BtwStreamResponse(gw, btw, 0, resumed=False)
    gw.btws.check_same_request(existing, body.question, body.thread_id)
    return _btw_replay(gw, existing, after)


def _btw_replay(gw: Gateway, btw: Any, after: int | None) -> Response:
    if after is not None and after > len(btw.blocks):
        raise BadRequest(
            "invalid_last_event_id", f"Last-Event-ID {after} is ahead of this btw ({len(btw.blocks)})"
        )
    return BtwStreamResponse(gw, btw, after or 0, resumed=after is not None)


async def btw_resource(request: Request) -> Response:
    """``GET`` (replay) or ``DELETE`` (cancel) one btw: one route, so a 405 lists both in ``Allow``."""
    if request.method == "DELETE":
        return await delete_btw(request)
    return await get_btw(request)


async def get_btw(request: Request) -> Response:
    _no_head(request)
    gw = _gateway(request)
    conv = await gw.conversation(request.path_params["cid"])
    btw = gw.btws.get(conv.id, request.path_params["btw_id"])
    return _btw_replay(gw, btw, last_event_id(request))


async def delete_btw(request: Request) -> Response:
    gw = _gateway(request)
    conv = await gw.conversation(request.path_params["cid"])
    btw = gw.btws.get(conv.id, request.path_params["btw_id"])
    await gw.btws.cancel(btw)
    return JSONResponse({"btw_id": btw.id, "state": btw.state}, status_code=202)


# -- errors ----------------------------------------------------------------------------------------


async def _gateway_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, GatewayError)
    return error_response(exc.status, exc.type, exc.message, exc.headers or None)


_HTTP_TYPES = {404: "not_found", 405: "method_not_allowed"}


async def _client_gone(request: Request, exc: Exception) -> Response:
    _gateway(request).metrics.client_disconnects_total += 1
    return Response(status_code=499)  # logged as nginx does ("client closed request"); never sent


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    headers = dict(exc.headers) if exc.headers else None
    return error_response(
        exc.status_code, _HTTP_TYPES.get(exc.status_code, "http_error"), str(exc.detail), headers
    )


# -- the app ---------------------------------------------------------------------------------------


def create_app(config: GatewayConfig, *, gateway: Gateway | None = None) -> Starlette:
    """The gateway as an ASGI app. ``ValueError`` if ``config`` is invalid (e.g. no token off loopback).

    The lifespan starts the gateway and closes it (store flushed and closed, every task ended). For a
    graceful end of open streams the server must call ``app.state.gateway.shutdown()`` before waiting
    for connections to close; :mod:`sidechain.gateway.server` does.
    """
    config.validate()
    gw = gateway if gateway is not None else Gateway(config)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with gw:
            yield

    cid = "/v1/conversations/{cid}"
    routes = [
        Route("/healthz", healthz, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/v1/conversations", create_conversation, methods=["POST"]),
        Route(cid, get_conversation, methods=["GET"]),
        Route(cid + "/messages", post_message, methods=["POST"]),
        Route(cid + "/notes", post_note, methods=["POST"]),
        Route(cid + "/events", events, methods=["GET"]),
        Route(cid + "/turns/{turn_id}/cancel", cancel_turn, methods=["POST"]),
        Route(cid + "/btw", post_btw, methods=["POST"]),
        Route(cid + "/btw/{btw_id}", btw_resource, methods=["GET", "DELETE"]),
    ]
    middleware = [
        Middleware(StartupFailureMessage, gateway=gw),
        Middleware(AccessLogMiddleware, gateway=gw, enabled=config.access_log),
    ]
    if config.cors_origins:
        middleware.append(
            Middleware(
                JSONErrorCORSMiddleware,
                allow_origins=list(config.cors_origins),
                allow_methods=["GET", "POST", "DELETE"],
                allow_headers=["Authorization", "Content-Type", "Last-Event-ID", "Idempotency-Key"],
                expose_headers=["X-Btw-Id", "X-Thread-Id"],
            )
        )
    if config.token:
        middleware.append(Middleware(BearerAuthMiddleware, token=config.token))
    app = Starlette(
        routes=routes,
        middleware=middleware,
        lifespan=lifespan,
        exception_handlers={GatewayError: _gateway_error, HTTPException: _http_error,
                            ClientGone: _client_gone},
    )
    app.state.gateway = gw
    app.state.config = config
    return app
