"""The ``sidechain`` command line."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from . import __version__
from .errors import SidechainError
from .sse import Comment, Decoder


def _cmd_decode(args: argparse.Namespace) -> int:
    """Decode an SSE stream from a file or stdin and print one JSON object per event."""
    decoder = Decoder(comments=args.comments)
    source = open(args.file, "rb") if args.file != "-" else sys.stdin.buffer  # noqa: SIM115
    try:
        while chunk := source.read1(65536) if hasattr(source, "read1") else source.read(65536):
            for item in decoder.feed(chunk):
                if isinstance(item, Comment):
                    print(json.dumps({"comment": item.text}, ensure_ascii=False))
                else:
                    print(json.dumps({"event": item.event, "id": item.id, "data": item.data},
                                     ensure_ascii=False))
        decoder.close()
    except SidechainError as exc:
        print(f"sidechain decode: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    finally:
        if source is not sys.stdin.buffer:
            source.close()
    if decoder.retry is not None:
        print(json.dumps({"retry": decoder.retry}))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sidechain", description=__doc__)
    parser.add_argument("--version", action="version", version=f"sidechain {__version__}")
    sub = parser.add_subparsers(dest="command")
    dec = sub.add_parser("decode", help="decode an SSE stream (file or stdin) to JSON lines")
    dec.add_argument("file", nargs="?", default="-")
    dec.add_argument("--comments", action="store_true", help="also print comment lines")
    dec.set_defaults(func=_cmd_decode)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    result: int = args.func(args)
    return result
