"""A small SSE server with fault switches, run as a separate process by the tests.

Run: ``python tests/faultserver.py`` — prints ``PORT <n>`` once listening on 127.0.0.1 (ephemeral port).
It is a separate process so that the client's file descriptors and tasks can be counted exactly.

Every route streams LLM-style delta events ``id: k`` / ``event: delta`` / ``data: {...}`` and, unless
told otherwise, ends with ``event: done``. Query parameters:

* ``n`` events (default 20), ``ids=0`` to send no ids, ``chunk=event|all`` write granularity,
* ``gap`` seconds between events (default 0),
* ``fault``: ``fin`` / ``rst`` after ``at`` events (only on the first ``faults`` attempts of an
  Idempotency-Key, default 1), ``stall`` after headers, ``stall_headers`` before them, ``trickle``
  (one comment byte every 300 ms),
  ``status`` (answer ``code`` for the first ``faults`` attempts, with ``retry_after`` if given),
  ``early`` (end cleanly after ``at`` events, no ``done``), ``html`` (wrong content type),
  ``status_always`` (always ``code``), ``longline`` (a ``size``-byte data line, default 2000, before
  event ``at``), ``gzip`` (a compressed body if the request's ``Accept-Encoding`` allows one).
* ``Last-Event-ID`` resumes after that id.
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import sys
from collections import Counter

from aiohttp import web

attempts: Counter[str] = Counter()
TOKENS = ["Hello", " wörld", ",", " 中文", " 🎉", " the", " quick", " brown", " fox", " é"]


def event_bytes(k: int, ids: bool) -> bytes:
    payload = json.dumps({"type": "delta", "index": k, "delta": TOKENS[k % len(TOKENS)]}, ensure_ascii=False)
    head = f"id: {k}\n" if ids else ""
    return f"{head}event: delta\ndata: {payload}\n\n".encode()


def _rst(request: web.Request) -> None:
    transport = request.transport
    assert transport is not None
    sock = transport.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


async def stream(request: web.Request) -> web.StreamResponse:
    q = request.query
    n = int(q.get("n", "20"))
    ids = q.get("ids", "1") == "1"
    gap = float(q.get("gap", "0"))
    fault = q.get("fault", "")
    at = int(q.get("at", "5"))
    faults = int(q.get("faults", "1"))
    key = request.headers.get("Idempotency-Key", "") + request.path_qs
    attempts[key] += 1
    attempt = attempts[key]
    faulty = attempt <= faults
    await request.read()  # aiohttp caches the body: a later read() returns it again

    if fault == "status_always" or (fault == "status" and faulty):
        headers = {}
        if "retry_after" in q:
            headers["Retry-After"] = q["retry_after"]
        if "retry_after_ms" in q:
            headers["retry-after-ms"] = q["retry_after_ms"]
        return web.json_response({"error": {"type": "injected", "message": f"attempt {attempt}"}},
                                 status=int(q.get("code", "503")), headers=headers)
    if fault == "html":
        return web.Response(text="<html>not a stream</html>", content_type="text/html")
    if fault == "204":
        return web.Response(status=204)
    if fault == "redirect":
        target = request.path_qs.replace("fault=redirect", "fault=none")
        raise web.HTTPTemporaryRedirect(target)

    start = 0
    last = request.headers.get("Last-Event-ID")
    if last:
        start = int(last) + 1

    if fault == "stall_headers":
        await asyncio.sleep(3600)
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    if fault == "gzip":  # compressed when the request's Accept-Encoding allows it, as a proxy might
        resp.enable_compression()
    await resp.prepare(request)
    if "retry" in q:
        await resp.write(f"retry: {q['retry']}\n\n".encode())
    if q.get("hello") == "1":
        body = await request.read()
        hello = {"last_event_id": last, "method": request.method, "body": body.decode(), "attempt": attempt,
                 "accept": request.headers.get("Accept"), "cache": request.headers.get("Cache-Control"),
                 "custom": request.headers.get("X-Custom")}
        await resp.write(f"event: hello\ndata: {json.dumps(hello)}\n\n".encode())
    if fault == "stall":
        await asyncio.sleep(3600)
    if fault == "trickle":
        for _ in range(200):
            await resp.write(b":")
            await asyncio.sleep(0.3)
    chunk = q.get("chunk", "event")
    buf = bytearray()
    for k in range(start, n):
        if k == at and fault == "longline":  # a line over any small max_line_bytes, then the rest
            line = b"data: " + b"x" * int(q.get("size", "2000")) + b"\n\n"
            if chunk == "all":
                buf += line
            else:
                await resp.write(line)
        if faulty and k == at and fault in ("fin", "rst", "early"):
            if buf:
                await resp.write(bytes(buf))
            if fault == "fin":
                assert request.transport is not None
                request.transport.close()
                return resp
            if fault == "rst":
                _rst(request)
                return resp
            await resp.write_eof()
            return resp
        if chunk == "all":
            buf += event_bytes(k, ids)
        else:
            await resp.write(event_bytes(k, ids))
        if gap:
            await asyncio.sleep(gap)
    if start <= n:
        buf += f"{'id: ' + str(n) + chr(10) if ids else ''}event: done\ndata: {{}}\n\n".encode()
    await resp.write(bytes(buf))
    await resp.write_eof()
    return resp


async def main() -> None:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", stream)
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, backlog=1024)
    await site.start()
    server = site._server
    assert server is not None
    port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    print(f"PORT {port}", flush=True)
    try:
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # exit when the parent goes
    finally:
        await runner.cleanup()


if __name__ == "__main__":
    import logging

    logging.getLogger("aiohttp").setLevel(logging.CRITICAL)  # injected faults are expected here
    asyncio.run(main())
