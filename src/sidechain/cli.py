"""The ``sidechain`` command line."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from . import __version__
from .errors import ProtocolError, SidechainError
from .sse import Comment, Decoder


def _cmd_decode(args: argparse.Namespace) -> int:
    """Decode an SSE stream from a file or stdin and print one JSON object per event."""
    decoder = Decoder(comments=args.comments)
    source = open(args.file, "rb") if args.file != "-" else sys.stdin.buffer  # noqa: SIM115

    def show(items: list[Any]) -> None:
        for item in items:
            if isinstance(item, Comment):
                print(json.dumps({"comment": item.text}, ensure_ascii=False))
            else:
                print(json.dumps({"event": item.event, "id": item.id, "data": item.data}, ensure_ascii=False))

    try:
        while chunk := source.read1(65536) if hasattr(source, "read1") else source.read(65536):
            show(decoder.feed(chunk))
        decoder.close()
    except SidechainError as exc:
        if isinstance(exc, ProtocolError):
            show(exc.events)  # decoded from the same chunk before the error: printed, not lost
        print(f"sidechain decode: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    finally:
        if source is not sys.stdin.buffer:
            source.close()
    if decoder.retry is not None:
        print(json.dumps({"retry": decoder.retry}))
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    """Run the gateway until SIGTERM or Ctrl-C (imported lazily: other commands do not need it)."""
    from .gateway.server import serve_main

    return serve_main(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sidechain", description=__doc__)
    parser.add_argument("--version", action="version", version=f"sidechain {__version__}")
    sub = parser.add_subparsers(dest="command")
    dec = sub.add_parser("decode", help="decode an SSE stream (file or stdin) to JSON lines")
    dec.add_argument("file", nargs="?", default="-")
    dec.add_argument("--comments", action="store_true", help="also print comment lines")
    dec.set_defaults(func=_cmd_decode)
    srv = sub.add_parser("serve", help="run the gateway (Starlette on uvicorn)")
    srv.add_argument("--host", default="127.0.0.1", help="interface (default 127.0.0.1; others need a token)")
    srv.add_argument("--port", type=int, default=8765, help="TCP port (0 = any free port; default 8765)")
    srv.add_argument("--model", default="echo", help="echo (offline, default) or openai:BASE_URL:MODEL")
    srv.add_argument("--store", default=None, help="sqlite:PATH (default: in the user data dir), memory, "
                     "or redis://HOST:PORT/DB[?prefix=P]")
    srv.add_argument("--token", default=None, help="bearer token (generated when needed and not given)")
    srv.add_argument("--echo-pace", type=float, default=30.0, help="echo model tokens per second (0 = max)")
    srv.add_argument("--keepalive", type=float, default=None, help="seconds between keepalive comments")
    srv.add_argument("--btw-grace", type=float, default=None, help="seconds a btw outlives its reader")
    srv.add_argument("--retention", type=int, default=None, help="events kept per conversation")
    srv.add_argument("--conversation-idle-evict", type=float, default=None, metavar="SECONDS",
                     help="drop a conversation unused this long from memory (reloaded on use; 0: never)")
    srv.add_argument("--store-timeout", type=float, default=None, metavar="SECONDS",
                     help="seconds a request waits for the store to confirm writes before a 503 (default 10)")
    srv.add_argument("--cors-origin", action="append", default=[], help="allow this origin (repeatable)")
    srv.add_argument("--no-access-log", action="store_true", help="do not log one line per request")
    srv.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                     help="log messages from this level up (default info; debug adds the traceback of a "
                     "failed start)")
    srv.set_defaults(func=_cmd_serve)
    from .commands import add_client_commands

    add_client_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    result: int = args.func(args)
    return result
