"""Benchmark SSE server for ``bench/client.py``: a raw asyncio HTTP/1.1 server with pre-encoded bodies.

Run in its own process (so its CPU is not charged to the client under test)::

    python bench/_server.py [--host 127.0.0.1] [--port 0]

It prints ``PORT <n>`` on stdout once it listens. Every request (``GET`` or ``POST``, any path; a
request body is read and ignored) is answered ``200`` with ``Content-Type: text/event-stream`` and
``Transfer-Encoding: chunked``; connections are kept alive unless the client sends ``Connection:
close``. The query string chooses the stream:

* ``n`` -- the number of events, ``n - 1`` LLM-style deltas (ids ``1 .. n-1``, type ``message.delta``,
  JSON data with tokens that include non-ASCII text) followed by one ``done`` event (id ``n``);
* ``mode=a`` -- the body is cut into 64 KiB HTTP chunks that ignore event and UTF-8 boundaries, one
  transport write per chunk;
* ``mode=b`` -- one HTTP chunk per event. All chunk frames are built beforehand and written in batches
  with ``writelines``, so the server is not the bottleneck while every event is still its own
  chunk frame on the wire.

Bodies are built once per ``(mode, n)`` and cached. ``event_data``/``event_bytes`` are imported by the
client to check what it received.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from urllib.parse import parse_qs, urlsplit

SLICE = 64 * 1024
BATCH = 256  # chunk frames per writelines() call in mode b
TOKENS = (
    "Hello", ",", " world", " —", " café", " naïve", " über", " 中文", " 日本語", " 🙂", " 🚀",
    " the", " quick", " brown", " fox", " jumps", " over", " lazy", " dog", ".", "\u00e9t\u00e9",
    " Ελληνικά", " русский", " ✓",
)
DELTA_TYPE = "message.delta"
DONE_TYPE = "done"

_HEAD = (
    b"HTTP/1.1 200 OK\r\n"
    b"Content-Type: text/event-stream\r\n"
    b"Cache-Control: no-cache\r\n"
    b"Transfer-Encoding: chunked\r\n"
)
_LAST_CHUNK = b"0\r\n\r\n"


def event_data(i: int, n: int) -> str:
    """The ``data`` of event ``i`` (1-based) of an ``n``-event stream."""
    if i == n:
        return '{"type":"done"}'
    token = TOKENS[i % len(TOKENS)]
    return json.dumps({"type": DELTA_TYPE, "delta": token}, ensure_ascii=False, separators=(",", ":"))


def event_type(i: int, n: int) -> str:
    return DONE_TYPE if i == n else DELTA_TYPE


def event_bytes(i: int, n: int) -> bytes:
    return f"id: {i}\nevent: {event_type(i, n)}\ndata: {event_data(i, n)}\n\n".encode()


def _frame(payload: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(payload), payload)


def build_frames(mode: str, n: int) -> list[bytes]:
    """The chunk frames of a stream (without the last-chunk marker)."""
    events = [event_bytes(i, n) for i in range(1, n + 1)]
    if mode == "b":
        return [_frame(e) for e in events]
    body = b"".join(events)
    return [_frame(body[i : i + SLICE]) for i in range(0, len(body), SLICE)]


def body_size(n: int) -> int:
    """Bytes of SSE payload (not counting chunk framing) of an ``n``-event stream."""
    return sum(len(event_bytes(i, n)) for i in range(1, n + 1))


class _Cache:
    def __init__(self) -> None:
        self._frames: dict[tuple[str, int], list[bytes]] = {}

    def get(self, mode: str, n: int) -> list[bytes]:
        key = (mode, n)
        frames = self._frames.get(key)
        if frames is None:
            frames = self._frames[key] = build_frames(mode, n)
        return frames


_CACHE = _Cache()


def _parse_target(target: str) -> tuple[str, int]:
    query = parse_qs(urlsplit(target).query)
    mode = query.get("mode", ["b"])[0]
    if mode not in ("a", "b"):
        mode = "b"
    try:
        n = max(1, int(query.get("n", ["5"])[0]))
    except ValueError:
        n = 5
    return mode, n


async def _respond(writer: asyncio.StreamWriter, mode: str, n: int, close: bool) -> None:
    frames = _CACHE.get(mode, n)
    head = _HEAD + (b"Connection: close\r\n\r\n" if close else b"\r\n")
    if mode == "a":
        writer.write(head)
        for frame in frames:
            writer.write(frame)
            await writer.drain()
    else:
        writer.writelines([head, *frames[:BATCH]])
        await writer.drain()
        for start in range(BATCH, len(frames), BATCH):
            writer.writelines(frames[start : start + BATCH])
            await writer.drain()
    writer.write(_LAST_CHUNK)
    await writer.drain()


async def _handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    transport = writer.transport
    if isinstance(transport, asyncio.WriteTransport):
        transport.set_write_buffer_limits(high=1 << 20)
    try:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                return
            lines = head.decode("latin-1").split("\r\n")
            parts = lines[0].split(" ")
            if len(parts) != 3:
                return
            _method, target, version = parts
            headers: dict[str, str] = {}
            for line in lines[1:]:
                name, sep, value = line.partition(":")
                if sep:
                    headers[name.strip().lower()] = value.strip()
            length = int(headers.get("content-length", "0") or "0")
            if length:
                await reader.readexactly(length)
            elif headers.get("transfer-encoding", "").lower() == "chunked":
                while True:  # a chunked request body: read and drop it
                    size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                    await reader.readexactly(size + 2)
                    if size == 0:
                        break
            conn = headers.get("connection", "").lower()
            close = conn == "close" or (version == "HTTP/1.0" and conn != "keep-alive")
            mode, n = _parse_target(target)
            await _respond(writer, mode, n, close)
            if close:
                return
    except (ConnectionError, asyncio.IncompleteReadError, ValueError):
        return
    finally:
        writer.close()


async def serve(host: str, port: int, prebuild: list[int]) -> None:
    for n in prebuild:
        _CACHE.get("a", n)
        _CACHE.get("b", n)
    server = await asyncio.start_server(_handle, host, port, backlog=1024)
    bound = server.sockets[0].getsockname()[1]
    sys.stdout.write(f"PORT {bound}\n")
    sys.stdout.flush()
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--prebuild", type=int, action="append", default=[],
                        help="build the bodies of an N-event stream before listening (repeatable)")
    parser.add_argument("--no-uvloop", action="store_true", help="use the default asyncio loop")
    args = parser.parse_args(argv)
    coro = serve(args.host, args.port, args.prebuild)
    if not args.no_uvloop:
        try:
            import uvloop
        except ImportError:
            pass
        else:
            uvloop.run(coro)
            return
    asyncio.run(coro)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        pass
