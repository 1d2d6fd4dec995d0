"""Running the gateway under uvicorn: ``sidechain serve`` and the in-process test server.

:class:`GatewayServer` is a ``uvicorn.Server`` that, on shutdown, first runs the gateway's graceful
shutdown (open event streams get ``gateway.shutdown`` and end) and only then lets uvicorn wait for
connections to close; otherwise uvicorn would wait on the never-ending streams before the lifespan
shutdown ever ran.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import secrets
import socket
import sys
from collections.abc import Callable
from types import FrameType
from typing import TextIO

import uvicorn
from starlette.applications import Starlette

from .app import create_app
from .config import GatewayConfig, default_store_spec
from .service import Gateway, describe_error

__all__ = ["GatewayServer", "GatewayStartupError", "config_from_args", "run", "serve_main", "uvicorn_config"]

log = logging.getLogger("sidechain.gateway")


class GatewayStartupError(RuntimeError):
    """The server could not start (port in use, store cannot open, ...); the cause is chained."""


class _ErrorRecords(logging.Handler):
    """Keeps the messages of the ERROR records logged while it is attached."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


class GatewayServer(uvicorn.Server):
    """A uvicorn server for the gateway app: graceful stream shutdown, bound URL, clean exit on signals.

    ``listening`` is set once the socket is bound; ``url`` is then ``http://HOST:PORT`` with the real
    port (also when configured with port 0). SIGTERM and Ctrl-C shut down gracefully and ``run``
    returns normally (the signal is not re-raised).
    """

    def __init__(
        self, config: uvicorn.Config, gateway: Gateway, *, on_listening: Callable[[str], None] | None = None
    ) -> None:
        super().__init__(config)
        self.gateway = gateway
        self.url = ""
        self.port = 0
        self.listening = asyncio.Event()
        self._on_listening = on_listening

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        # uvicorn logs why it could not bind (then exits): kept, to say it on the last line too
        errors = _ErrorRecords()
        uvicorn_log = logging.getLogger("uvicorn.error")
        uvicorn_log.addHandler(errors)
        try:
            await super().startup(sockets)
        except SystemExit as exc:  # uvicorn exits the process on startup failure; make it an error
            cause = self.gateway.startup_error
            if cause is not None:
                why = f": {describe_error(cause)}"
            elif errors.messages:
                why = f": {errors.messages[-1]}"
            else:
                why = f" (uvicorn exit {exc.code})"
            raise GatewayStartupError(f"the gateway failed to start{why}") from None
        finally:
            uvicorn_log.removeHandler(errors)
        if self.started:
            sock = self.servers[0].sockets[0]
            host, port = sock.getsockname()[:2]
            self.port = int(port)
            shown = f"[{host}]" if ":" in host else host
            self.url = f"http://{shown}:{self.port}"
            self.listening.set()
            if self._on_listening is not None:
                self._on_listening(self.url)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        try:
            await self.gateway.shutdown()
        finally:
            await super().shutdown(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        # uvicorn re-raises captured signals after serving; a graceful shutdown should exit 0 instead.
        self._captured_signals.clear()


#: The ASGI scope extension through which a stream can abort its connection (see ``abortable_http``).
ABORT_EXTENSION = "sidechain.abort"


def abortable_http() -> type[asyncio.Protocol]:
    """The HTTP protocol uvicorn would choose (httptools when installed, else h11), giving each request
    scope ``extensions["sidechain.abort"]``: the connection's ``transport.abort``.

    A stream that drops a stalled reader calls it. ASGI has no way to end a response that cannot be
    completed: returning early makes uvicorn close the transport gracefully, and that waits for the
    unsent bytes, so a reader that never reads would keep its socket and buffers, with an error logged
    for each. Aborting resets the connection at once.
    """
    base: type[asyncio.Protocol]
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

        base = HttpToolsProtocol
    except ImportError:  # pragma: no cover - httptools comes with uvicorn[standard]
        from uvicorn.protocols.http.h11_impl import H11Protocol

        base = H11Protocol

    class AbortableHTTP(base):  # type: ignore[valid-type, misc]
        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            # a request parsed from this data has its scope now and its app task not yet started
            scope = getattr(self, "scope", None)
            transport = getattr(self, "transport", None)
            if isinstance(scope, dict) and transport is not None:
                scope.setdefault("extensions", {})[ABORT_EXTENSION] = transport.abort

    return AbortableHTTP


def uvicorn_config(app: Starlette, config: GatewayConfig) -> uvicorn.Config:
    """uvicorn settings for the gateway: our lifespan, our access log, no logging reconfiguration,
    streams that can abort their connection."""
    return uvicorn.Config(
        app,
        host=config.host,
        port=config.port,
        http=abortable_http(),
        lifespan="on",
        access_log=False,
        log_config=None,
        timeout_graceful_shutdown=int(config.shutdown_grace) + 5,
        timeout_keep_alive=5,
    )


def resolve_token(config: GatewayConfig) -> tuple[GatewayConfig, bool]:
    """A config with a token when one is required and none was given (generated); True if generated."""
    if config.requires_token and not config.token:
        return config.replace(token=secrets.token_urlsafe(32)), True
    return config, False


def run(config: GatewayConfig, *, out: TextIO | None = None) -> int:
    """Serve until SIGTERM/Ctrl-C; return the exit status.

    Prints ``sidechain gateway listening on URL`` once bound (and a generated token, once).
    """
    stream = out if out is not None else sys.stdout
    config, generated = resolve_token(config)
    if generated:
        print(f"sidechain gateway token (generated, shown once): {config.token}", file=stream, flush=True)
    app = create_app(config)
    gateway: Gateway = app.state.gateway

    def announce(url: str) -> None:
        print(f"sidechain gateway listening on {url}", file=stream, flush=True)

    server = GatewayServer(uvicorn_config(app, config), gateway, on_listening=announce)
    try:
        server.run()
    except GatewayStartupError as exc:
        print(f"sidechain serve: {exc}", file=sys.stderr)
        return 1
    return 0


def config_from_args(args: argparse.Namespace) -> GatewayConfig:
    """Map the ``serve`` command's options onto a :class:`GatewayConfig` (store defaults to sqlite)."""
    config = GatewayConfig(
        host=args.host,
        port=args.port,
        model=args.model,
        store=args.store or default_store_spec(),
        token=args.token,
        echo_pace=args.echo_pace,
        access_log=not args.no_access_log,
    )
    if args.keepalive is not None:
        config = config.replace(keepalive_interval=args.keepalive)
    if args.btw_grace is not None:
        config = config.replace(btw_grace=args.btw_grace)
    if args.retention is not None:
        config = config.replace(retention=args.retention)
    if getattr(args, "conversation_idle_evict", None) is not None:
        config = config.replace(conversation_idle_evict=args.conversation_idle_evict)
    if getattr(args, "store_timeout", None) is not None:
        config = config.replace(store_timeout=args.store_timeout)
    if args.cors_origin:
        config = config.replace(cors_origins=tuple(args.cors_origin))
    return config


def serve_main(args: argparse.Namespace) -> int:
    """``sidechain serve``: configure logging, build the config, run. Exit status 2 for a bad config."""
    level = getattr(logging, str(getattr(args, "log_level", "info")).upper())
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    try:
        config = config_from_args(args)
        resolve_token(config)[0].validate()  # the token itself is generated (and printed) by run()
        from .models import parse_model_spec

        parse_model_spec(config.model)
    except ValueError as exc:
        print(f"sidechain serve: {exc}", file=sys.stderr)
        return 2
    return run(config)
