"""Loopback client benchmark: sidechain's streaming client against the SSE clients of its peers.

A benchmark SSE server (``bench/_server.py``: raw asyncio on uvloop, pre-encoded bytes, HTTP/1.1
chunked, keep-alive) runs in a **separate process**, so its CPU is not charged to the client under
test. Every client consumes a whole stream of N LLM-style events (``id`` / ``event: message.delta`` /
one JSON ``data`` line with non-ASCII tokens, then a ``done`` event) and is checked outside the timed
part: the number of events, the id and type of the last one and the data of event N/2.

Streams, by how the server cuts them:

* (a) 64 KiB HTTP chunks, one write each, not aligned to events or UTF-8 sequences;
* (b) one HTTP chunk frame per event (frames pre-built and written with ``writelines`` in batches of
  256, so the server keeps up while every event is still its own chunk on the wire).

Clients (all on the default asyncio loop unless ``--uvloop``):

* ``sidechain``       -- ``GatewayHTTPClient.stream_post`` (POST, a dedicated session per call);
* ``httpx-sse``       -- ``httpx.AsyncClient`` + ``httpx_sse.aconnect_sse(...).aiter_sse()`` (POST);
* ``aiohttp-sse-client`` -- ``aiohttp_sse_client.client.EventSource`` (POST via ``option``). It
  reconnects when a stream ends, so its loop stops at the ``done`` event (the last one);
* ``launchdarkly``    -- ``ld_eventsource.AsyncSSEClient(...).events`` over its default aiohttp
  transport (GET: its HTTP strategy only issues GET);
* ``openai-decoder``  -- ``openai._streaming.SSEDecoder().aiter_bytes(response.aiter_bytes())`` over
  ``openai.DefaultAsyncHttpxClient`` (openai's own httpx2 transport, POST). That is exactly what
  ``openai.AsyncStream._iter_events`` does; the ``[DONE]`` check and the pydantic model built per event
  by ``AsyncStream.__stream__`` are *not* measured, so real openai streams are slower than this;
* ``aiohttp-raw``     -- ``resp.content.iter_any()`` byte reading with plain aiohttp (POST), no SSE
  parsing at all: a ceiling reference, not a peer (checked by byte count and tail).

Rounds are interleaved: each round runs every client once per mode, starting with a different client
each round; the median events/s is reported, with the ratio sidechain / fastest peer (target >= 1.3x).

Time to first event: sequential short streams (5 events each), from the call to the first event,
for sidechain with a dedicated session per call (its default) vs one pooled ``Session``, aiohttp with
a fresh ``ClientSession`` per call vs one pooled (first event = ``content.readuntil(b"\\n\\n")``) and
httpx (+ httpx-sse) with a fresh ``AsyncClient`` per call vs one pooled, and the floor: raw asyncio
streams writing the request bytes and reading up to the first event, on a new connection per call vs
one kept-alive connection (what a new TCP connection costs, with no HTTP library). Variants are
interleaved in blocks. Reported: median and p99 ms, and the ratio dedicated / pooled (target for
sidechain <= 1.5x).

Usage::

    .venv/bin/python bench/client.py                     # 200k events, 5 rounds, 1000 short calls
    .venv/bin/python bench/client.py --quick             # 50k events, 3 rounds, 200 short calls
    .venv/bin/python bench/client.py --events 100000 --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from _server import body_size, event_bytes, event_data

SERVER = Path(__file__).with_name("_server.py")
MODES = ("a", "b")
MODE_TITLES = {"a": "(a) 64 KiB chunks", "b": "(b) one HTTP chunk per event"}
TARGET_THROUGHPUT = 1.3
TARGET_TTFE = 1.5
BODY = {"model": "bench", "input": "stream please"}
REFERENCE = "aiohttp-raw"


# -- outcome and checks -------------------------------------------------------------------------------


@dataclass
class Outcome:
    """What one client saw of one stream; ``nbytes`` is set by the byte-level reference only."""

    count: int = 0
    last_id: str | None = None
    last_type: str | None = None
    sample: str | None = None
    nbytes: int = 0
    tail: bytes = b""


def check(name: str, out: Outcome, n: int) -> None:
    """Raise if ``out`` is not the whole, correct ``n``-event stream."""
    if name == REFERENCE:
        expected = body_size(n)
        if out.nbytes != expected or not out.tail.endswith(event_bytes(n, n)):
            raise AssertionError(f"{name}: got {out.nbytes} bytes, expected {expected}")
        return
    problems = []
    if out.count != n:
        problems.append(f"count {out.count} != {n}")
    if out.last_id != str(n):
        problems.append(f"last id {out.last_id!r} != {str(n)!r}")
    if out.last_type != "done":
        problems.append(f"last type {out.last_type!r} != 'done'")
    want = event_data(n // 2, n)
    if out.sample != want:
        problems.append(f"data of event {n // 2} {out.sample!r} != {want!r}")
    if problems:
        raise AssertionError(f"{name}: " + "; ".join(problems))


# -- throughput clients ---------------------------------------------------------------------------------
# Each consumes the whole stream at ``url`` (``base + path``) and returns what it saw. The per-event work
# in every loop is the same: count, keep the last event, keep the data of event n/2, and (in the untimed
# verification round only) keep every event when ``keep`` is a list.

StreamFn = Callable[[str, str, int, list[Any] | None], Awaitable[Outcome]]


async def run_sidechain(base: str, path: str, n: int, keep: list[Any] | None = None) -> Outcome:
    from sidechain.client import GatewayHTTPClient

    client = GatewayHTTPClient(base)
    k = n // 2
    count = 0
    last: Any = None
    sample = None
    async with client.stream_post(path, BODY) as events:
        async for ev in events:
            count += 1
            last = ev
            if count == k:
                sample = ev.data
            if keep is not None:
                keep.append((ev.id, ev.event, ev.data))
    return Outcome(count, last and last.id, last and last.event, sample)


async def run_httpx_sse(base: str, path: str, n: int, keep: list[Any] | None = None) -> Outcome:
    import httpx
    from httpx_sse import aconnect_sse

    k = n // 2
    count = 0
    last: Any = None
    sample = None
    async with httpx.AsyncClient(timeout=None) as client, aconnect_sse(
        client, "POST", base + path, json=BODY
    ) as source:
        async for ev in source.aiter_sse():
            count += 1
            last = ev
            if count == k:
                sample = ev.data
            if keep is not None:
                keep.append((ev.id, ev.event, ev.data))
    return Outcome(count, last and last.id, last and last.event, sample)


async def run_aiohttp_sse_client(base: str, path: str, n: int, keep: list[Any] | None = None) -> Outcome:
    import aiohttp
    from aiohttp_sse_client.client import EventSource

    k = n // 2
    count = 0
    last: Any = None
    sample = None
    async with aiohttp.ClientSession() as session, EventSource(
        base + path, session=session, option={"method": "POST"}, json=BODY
    ) as source:
        async for ev in source:
            count += 1
            last = ev
            if count == k:
                sample = ev.data
            if keep is not None:
                keep.append((ev.last_event_id, ev.type, ev.data))
            if ev.type == "done":  # it would reconnect at the end of the body
                break
    return Outcome(count, last and last.last_event_id, last and last.type, sample)


async def run_launchdarkly(base: str, path: str, n: int, keep: list[Any] | None = None) -> Outcome:
    from ld_eventsource import AsyncSSEClient

    k = n // 2
    count = 0
    last: Any = None
    sample = None
    async with AsyncSSEClient(base + path) as client:
        async for ev in client.events:
            count += 1
            last = ev
            if count == k:
                sample = ev.data
            if keep is not None:
                keep.append((ev.id, ev.event, ev.data))
    return Outcome(count, last and last.id, last and last.event, sample)


async def run_openai_decoder(base: str, path: str, n: int, keep: list[Any] | None = None) -> Outcome:
    from openai import DefaultAsyncHttpxClient
    from openai._streaming import SSEDecoder

    k = n // 2
    count = 0
    last: Any = None
    sample = None
    async with DefaultAsyncHttpxClient() as client, client.stream(
        "POST", base + path, json=BODY, headers={"Accept": "text/event-stream"}
    ) as response:
        async for ev in SSEDecoder().aiter_bytes(response.aiter_bytes()):
            count += 1
            last = ev
            if count == k:
                sample = ev.data
            if keep is not None:
                keep.append((ev.id, ev.event, ev.data))
    return Outcome(count, last and last.id, last and last.event, sample)


async def run_aiohttp_raw(base: str, path: str, n: int, keep: list[Any] | None = None) -> Outcome:
    import aiohttp

    nbytes = 0
    chunk = b""
    async with aiohttp.ClientSession() as session, session.post(base + path, json=BODY) as resp:
        async for chunk in resp.content.iter_any():
            nbytes += len(chunk)
            if keep is not None:
                keep.append(chunk)
    return Outcome(nbytes=nbytes, tail=chunk[-200:])


def source_digest() -> str:
    """A short digest of the sidechain sources imported (the tree may change between runs)."""
    import hashlib

    import sidechain

    root = Path(sidechain.__file__).parent
    h = hashlib.sha256()
    for f in sorted(root.rglob("*.py")):
        h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:12]


def _version(dist: str) -> str:
    try:
        return version(dist)
    except PackageNotFoundError:
        return "?"


@dataclass(frozen=True)
class Contender:
    name: str
    dist: str
    run: StreamFn
    method: str


CONTENDERS = (
    Contender("sidechain", "sidechain", run_sidechain, "POST"),
    Contender("httpx-sse", "httpx-sse", run_httpx_sse, "POST"),
    Contender("aiohttp-sse-client", "aiohttp-sse-client", run_aiohttp_sse_client, "POST"),
    Contender("launchdarkly", "launchdarkly-eventsource", run_launchdarkly, "GET"),
    Contender("openai-decoder", "openai", run_openai_decoder, "POST"),
    Contender(REFERENCE, "aiohttp", run_aiohttp_raw, "POST"),
)


def _path(mode: str, n: int) -> str:
    return f"/v1/stream?mode={mode}&n={n}"


def verify_every_event(name: str, kept: list[Any], n: int) -> None:
    """Raise unless ``kept`` is exactly the ``n`` events the server sent: (id, type, data) of each, in
    order; for the byte-level reference, the body's exact bytes."""
    if name == REFERENCE:
        body = b"".join(kept)
        expected = b"".join(event_bytes(i, n) for i in range(1, n + 1))
        if body != expected:
            at = next((i for i, (a, b) in enumerate(zip(body, expected, strict=False)) if a != b),
                      min(len(body), len(expected)))
            raise AssertionError(f"{name}: body differs from what was sent at byte {at}")
        return
    if len(kept) != n:
        raise AssertionError(f"{name}: {len(kept)} events, expected {n}")
    for i, (event_id, event, data) in enumerate(kept, start=1):
        want = (str(i), "done" if i == n else "message.delta", event_data(i, n))
        if (event_id, event, data) != want:
            raise AssertionError(f"{name}: event {i} is {(event_id, event, data)!r}, expected {want!r}")


async def verify_all(base: str, n: int) -> None:
    """One untimed full-size run of every contender in every mode, checked event by event."""
    for c in CONTENDERS:
        for mode in MODES:
            kept: list[Any] = []
            out = await c.run(base, _path(mode, n), n, kept)
            check(c.name, out, n)
            verify_every_event(c.name, kept, n)
    print(f"  every contender's {n:,} events checked one by one in both modes", file=sys.stderr, flush=True)


async def _timed(c: Contender, base: str, mode: str, n: int) -> float:
    """One checked run; returns events per second."""
    gc.collect()
    t0 = time.perf_counter()
    out = await c.run(base, _path(mode, n), n, None)
    elapsed = time.perf_counter() - t0
    check(c.name, out, n)
    return n / elapsed


async def throughput(base: str, n: int, rounds: int, warm_n: int) -> dict[str, dict[str, list[float]]]:
    """``{mode: {client: [events/s per round]}}``."""
    for c in CONTENDERS:  # warm-up: imports, first connections, code paths (not reported)
        for mode in MODES:
            await _timed(c, base, mode, warm_n)
    await verify_all(base, n)
    results: dict[str, dict[str, list[float]]] = {m: {c.name: [] for c in CONTENDERS} for m in MODES}
    for r in range(rounds):
        order = CONTENDERS[r % len(CONTENDERS):] + CONTENDERS[: r % len(CONTENDERS)]
        for mode in MODES if r % 2 == 0 else MODES[::-1]:
            for c in order:
                eps = await _timed(c, base, mode, n)
                results[mode][c.name].append(eps)
        line = "  ".join(f"{m}: " + ", ".join(f"{c.name}={results[m][c.name][-1] / 1e3:.0f}k"
                                               for c in CONTENDERS) for m in MODES)
        print(f"  round {r + 1}/{rounds}  {line}", file=sys.stderr, flush=True)
    return results


# -- time to first event ----------------------------------------------------------------------------------

SHORT_N = 5
CallFn = Callable[[], Awaitable[tuple[float, float]]]  # -> (seconds to first event, seconds to the end)


class TTFEVariants:
    """The short-stream calls; pooled variants share one session/client opened in :meth:`open`."""

    def __init__(self, base: str) -> None:
        from sidechain.client import GatewayHTTPClient

        self.base = base
        self.path = _path("b", SHORT_N)
        self.url = base + self.path
        self.client = GatewayHTTPClient(base)
        # the same server under a name: what a dedicated call costs when the URL needs a DNS lookup
        self.named_client = GatewayHTTPClient(base.replace("127.0.0.1", "localhost"))
        self.sc_pool: Any = None
        self.aio_pool: Any = None
        self.httpx_pool: Any = None
        self.raw_conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        body = json.dumps(BODY).encode()
        host = base.split("://", 1)[1]
        self.raw_request = (f"POST {self.path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                            f"Content-Length: {len(body)}\r\n\r\n").encode() + body

    async def open(self) -> None:
        import aiohttp
        import httpx

        from sidechain.client import Session

        self.sc_pool = Session()
        self.aio_pool = aiohttp.ClientSession()
        self.httpx_pool = httpx.AsyncClient(timeout=None)

    async def close(self) -> None:
        await self.sc_pool.aclose()
        await self.aio_pool.close()
        await self.httpx_pool.aclose()
        if self.raw_conn is not None:
            self.raw_conn[1].close()
            await self.raw_conn[1].wait_closed()

    async def _raw(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, t0: float) -> float:
        """One request on a raw asyncio stream: the first event, then the body up to its last chunk."""
        writer.write(self.raw_request)
        head = await reader.readuntil(b"\n\n")  # the headers end in \r\n\r\n: this is the first event's end
        first = time.perf_counter() - t0
        if not head.startswith(b"HTTP/1.1 200") or b"\r\n\r\n" not in head:
            raise AssertionError("raw short stream: unexpected head")
        rest = await reader.readuntil(b"\r\n0\r\n\r\n")
        if rest.count(b"\n\n") != SHORT_N - 1:
            raise AssertionError("raw short stream: wrong number of events")
        return first

    async def raw_new(self) -> tuple[float, float]:
        t0 = time.perf_counter()
        host, port = self.base.split("://", 1)[1].rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            first = await self._raw(reader, writer, t0)
        finally:
            writer.close()
            await writer.wait_closed()
        return first, time.perf_counter() - t0

    async def raw_kept(self) -> tuple[float, float]:
        t0 = time.perf_counter()
        if self.raw_conn is None:
            host, port = self.base.split("://", 1)[1].rsplit(":", 1)
            self.raw_conn = await asyncio.open_connection(host, int(port))
        first = await self._raw(*self.raw_conn, t0)
        return first, time.perf_counter() - t0

    async def _sidechain(self, session: Any, client: Any = None) -> tuple[float, float]:
        client = client or self.client
        t0 = time.perf_counter()
        first = 0.0
        count = 0
        async with client.stream_post(self.path, BODY, session=session) as events:
            async for _ev in events:
                count += 1
                if count == 1:
                    first = time.perf_counter()
        end = time.perf_counter()
        if count != SHORT_N:
            raise AssertionError(f"sidechain short stream: {count} events")
        return first - t0, end - t0

    async def sidechain_dedicated(self) -> tuple[float, float]:
        return await self._sidechain(None)

    async def sidechain_pooled(self) -> tuple[float, float]:
        return await self._sidechain(self.sc_pool)

    async def sidechain_named_dedicated(self) -> tuple[float, float]:
        return await self._sidechain(None, self.named_client)

    async def sidechain_named_pooled(self) -> tuple[float, float]:
        return await self._sidechain(self.sc_pool, self.named_client)

    async def _aiohttp(self, session: Any, t0: float) -> tuple[float, bytes]:
        async with session.post(self.url, json=BODY) as resp:
            head = await resp.content.readuntil(b"\n\n")
            first = time.perf_counter() - t0
            rest = await resp.content.read()
        if (head + rest).count(b"\n\n") != SHORT_N:
            raise AssertionError("aiohttp short stream: wrong number of events")
        return first, rest

    async def aiohttp_fresh(self) -> tuple[float, float]:
        import aiohttp

        t0 = time.perf_counter()
        async with aiohttp.ClientSession() as session:
            first, _ = await self._aiohttp(session, t0)
        return first, time.perf_counter() - t0

    async def aiohttp_pooled(self) -> tuple[float, float]:
        t0 = time.perf_counter()
        first, _ = await self._aiohttp(self.aio_pool, t0)
        return first, time.perf_counter() - t0

    async def _httpx(self, client: Any, t0: float) -> float:
        from httpx_sse import aconnect_sse

        first = 0.0
        count = 0
        async with aconnect_sse(client, "POST", self.url, json=BODY) as source:
            async for _ev in source.aiter_sse():
                count += 1
                if count == 1:
                    first = time.perf_counter() - t0
        if count != SHORT_N:
            raise AssertionError(f"httpx short stream: {count} events")
        return first

    async def httpx_fresh(self) -> tuple[float, float]:
        import httpx

        t0 = time.perf_counter()
        async with httpx.AsyncClient(timeout=None) as client:
            first = await self._httpx(client, t0)
        return first, time.perf_counter() - t0

    async def httpx_pooled(self) -> tuple[float, float]:
        t0 = time.perf_counter()
        first = await self._httpx(self.httpx_pool, t0)
        return first, time.perf_counter() - t0


# (label, method name, library, dedicated/fresh?)
TTFE_VARIANTS = (
    ("sidechain dedicated (default)", "sidechain_dedicated", "sidechain", True),
    ("sidechain pooled Session", "sidechain_pooled", "sidechain", False),
    ("sidechain dedicated, URL http://localhost", "sidechain_named_dedicated", "sidechain, localhost", True),
    ("sidechain pooled, URL http://localhost", "sidechain_named_pooled", "sidechain, localhost", False),
    ("aiohttp fresh ClientSession", "aiohttp_fresh", "aiohttp", True),
    ("aiohttp pooled ClientSession", "aiohttp_pooled", "aiohttp", False),
    ("httpx-sse fresh AsyncClient", "httpx_fresh", "httpx", True),
    ("httpx-sse pooled AsyncClient", "httpx_pooled", "httpx", False),
    # the floor: raw asyncio streams, no HTTP library and no SSE parsing (what a new TCP connection costs)
    ("raw asyncio, new connection per call", "raw_new", "raw asyncio", True),
    ("raw asyncio, one kept-alive connection", "raw_kept", "raw asyncio", False),
)


def _p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(0.99 * len(ordered)) - 1)]


async def ttfe(base: str, iterations: int, httpx_fresh_iterations: int, blocks: int = 10
               ) -> dict[str, dict[str, Any]]:
    """``{label: {"first": [s...], "total": [s...]}}`` over interleaved blocks of calls."""
    variants = TTFEVariants(base)
    await variants.open()
    samples: dict[str, dict[str, list[float]]] = {v[0]: {"first": [], "total": []} for v in TTFE_VARIANTS}
    try:
        for _label, attr, _lib, _fresh in TTFE_VARIANTS:  # warm-up
            for _ in range(20):
                await getattr(variants, attr)()
        gc.collect()
        for b in range(blocks):
            k = b % len(TTFE_VARIANTS)
            for label, attr, _lib, _fresh in TTFE_VARIANTS[k:] + TTFE_VARIANTS[:k]:
                total = httpx_fresh_iterations if attr == "httpx_fresh" else iterations
                count = total // blocks + (1 if b < total % blocks else 0)
                fn: CallFn = getattr(variants, attr)
                for _ in range(count):
                    first, whole = await fn()
                    samples[label]["first"].append(first)
                    samples[label]["total"].append(whole)
    finally:
        await variants.close()
    return {label: dict(s) for label, s in samples.items()}


# -- report -----------------------------------------------------------------------------------------------


def _fmt_eps(eps: float) -> str:
    return f"{eps / 1e6:.3f}M" if eps >= 1e6 else f"{eps / 1e3:.0f}k"


def report(tp: dict[str, dict[str, list[float]]], tt: dict[str, dict[str, dict[str, Any]]],
           args: argparse.Namespace, meta: dict[str, Any]) -> dict[str, Any]:
    figures: dict[str, Any] = {"meta": meta, "throughput": {}, "throughput_ratio": {}, "ttfe": {},
                               "ttfe_ratio": {}}
    if tp:
        _report_throughput(tp, args, figures)
    for loop, samples in tt.items():
        figures["ttfe"][loop], figures["ttfe_ratio"][loop] = _report_ttfe(samples, loop)
    return figures


def _report_throughput(tp: dict[str, dict[str, list[float]]], args: argparse.Namespace,
                       figures: dict[str, Any]) -> None:
    print(f"\n## Throughput, {args.events:,} events per stream, median of {args.rounds} interleaved rounds\n")
    print("| client | version | method | " + " | ".join(MODE_TITLES[m] + " events/s" for m in MODES) + " |")
    print("| --- | --- | --- |" + " ---: |" * len(MODES))
    medians: dict[str, dict[str, float]] = {m: {} for m in MODES}
    for c in CONTENDERS:
        cells = []
        for m in MODES:
            runs = tp[m][c.name]
            med = statistics.median(runs)
            medians[m][c.name] = med
            figures["throughput"].setdefault(m, {})[c.name] = {
                "median_events_per_s": round(med), "runs": [round(x) for x in runs],
            }
            cells.append(_fmt_eps(med) + (" (min " + _fmt_eps(min(runs)) + ")"))
        name = c.name + (" *(ceiling ref.)*" if c.name == REFERENCE else "")
        print(f"| {name} | {_version(c.dist)} | {c.method} | " + " | ".join(cells) + " |")
    print(f"\n| mode | sidechain | fastest peer | ratio | target >= {TARGET_THROUGHPUT}x | vs {REFERENCE} |")
    print("| --- | ---: | --- | ---: | --- | ---: |")
    for m in MODES:
        peers = {k: v for k, v in medians[m].items() if k not in ("sidechain", REFERENCE)}
        best = max(peers, key=lambda k: peers[k])
        sc = medians[m]["sidechain"]
        ratio = sc / peers[best]
        ceiling = sc / medians[m][REFERENCE]
        figures["throughput_ratio"][m] = {"fastest_peer": best, "ratio": round(ratio, 3),
                                          "target": TARGET_THROUGHPUT, "met": ratio >= TARGET_THROUGHPUT,
                                          "of_raw_aiohttp": round(ceiling, 3)}
        verdict = "met" if ratio >= TARGET_THROUGHPUT else "**missed**"
        print(f"| {MODE_TITLES[m]} | {_fmt_eps(sc)} | {best} {_fmt_eps(peers[best])} | {ratio:.2f}x "
              f"| {verdict} | {ceiling:.2f} |")


def _report_ttfe(tt: dict[str, dict[str, Any]], loop: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The table of one loop's run; returns its figures and ratios."""
    figures: dict[str, Any] = {"ttfe": {}, "ttfe_ratio": {}}
    print(f"\n## Time to first event, sequential {SHORT_N}-event streams (POST), client loop: {loop}\n")
    print("| variant | calls | TTFE median ms | TTFE p99 ms | whole call median ms |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for label, _attr, _lib, _fresh in TTFE_VARIANTS:
        first = tt[label]["first"]
        whole = tt[label]["total"]
        row = {"calls": len(first), "median_ms": statistics.median(first) * 1e3, "p99_ms": _p99(first) * 1e3,
               "total_median_ms": statistics.median(whole) * 1e3}
        figures["ttfe"][label] = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}
        print(f"| {label} | {row['calls']} | {row['median_ms']:.3f} | {row['p99_ms']:.3f} "
              f"| {row['total_median_ms']:.3f} |")
    print("\n| library | dedicated/fresh ÷ pooled, median | p99 | target |")
    print("| --- | ---: | ---: | --- |")
    for lib in ("sidechain", "sidechain, localhost", "aiohttp", "httpx", "raw asyncio"):
        fresh = next(v[0] for v in TTFE_VARIANTS if v[2] == lib and v[3])
        pooled = next(v[0] for v in TTFE_VARIANTS if v[2] == lib and not v[3])
        r_med = figures["ttfe"][fresh]["median_ms"] / figures["ttfe"][pooled]["median_ms"]
        r_p99 = figures["ttfe"][fresh]["p99_ms"] / figures["ttfe"][pooled]["p99_ms"]
        entry: dict[str, Any] = {"median_ratio": round(r_med, 3), "p99_ratio": round(r_p99, 3)}
        target = ""
        if lib == "sidechain":
            entry.update(target=TARGET_TTFE, met=r_med <= TARGET_TTFE)
            target = f"<= {TARGET_TTFE}x: " + ("met" if r_med <= TARGET_TTFE else "**missed**")
        figures["ttfe_ratio"][lib] = entry
        print(f"| {lib} | {r_med:.2f}x | {r_p99:.2f}x | {target} |")
    return figures["ttfe"], figures["ttfe_ratio"]


# -- main ---------------------------------------------------------------------------------------------------


def start_server(prebuild: list[int]) -> tuple[subprocess.Popen[bytes], int]:
    cmd = [sys.executable, str(SERVER)]
    for n in prebuild:
        cmd += ["--prebuild", str(n)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    line = proc.stdout.readline().decode()
    if not line.startswith("PORT "):
        proc.kill()
        raise RuntimeError(f"benchmark server did not start: {line!r}")
    return proc, int(line.split()[1])


async def amain(args: argparse.Namespace, port: int) -> dict[str, dict[str, list[float]]]:
    """The throughput part (on the loop ``--uvloop`` chooses)."""
    if args.ttfe_only:
        return {}
    print(f"throughput: {args.events:,} events x {len(CONTENDERS)} clients x {len(MODES)} modes "
          f"x {args.rounds} rounds", file=sys.stderr, flush=True)
    return await throughput(f"http://127.0.0.1:{port}", args.events, args.rounds, args.warm_events)



def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Loopback SSE client benchmark (see the module doc).")
    parser.add_argument("--quick", action="store_true", help="50k events, 3 rounds, 200 short calls")
    parser.add_argument("--events", type=int, default=None, help="events per stream (default 200000)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 5)")
    parser.add_argument("--calls", type=int, default=None, help="short calls per TTFE variant (default 1000)")
    parser.add_argument("--json", metavar="PATH", help="write the figures as JSON")
    parser.add_argument("--uvloop", action="store_true", help="run the clients on uvloop")
    parser.add_argument("--ttfe-only", action="store_true", help="only the time-to-first-event part")
    parser.add_argument("--ttfe-loops", default="asyncio,uvloop",
                        help="client loops to run the time-to-first-event part on, in turn (default both)")
    args = parser.parse_args(argv)
    args.events = args.events or (50_000 if args.quick else 200_000)
    args.rounds = args.rounds or (3 if args.quick else 5)
    args.calls = args.calls or (200 if args.quick else 1000)
    args.httpx_fresh_calls = min(args.calls, 50 if args.quick else 200)
    args.warm_events = min(args.events, 5_000)
    if args.events < 4:
        parser.error("--events must be at least 4")
    args.ttfe_loops = [x for x in args.ttfe_loops.split(",") if x]
    if not set(args.ttfe_loops) <= {"asyncio", "uvloop"}:
        parser.error("--ttfe-loops: asyncio and/or uvloop")
    from sidechain import loops

    if loops.resolve_loop("auto") != "uvloop":
        if args.uvloop:
            parser.error("--uvloop: uvloop is not installed")
        if "uvloop" in args.ttfe_loops:
            print("uvloop is not installed: time to first event on asyncio only", file=sys.stderr)
            args.ttfe_loops = [x for x in args.ttfe_loops if x != "uvloop"]

    digest = source_digest()
    proc, port = start_server([args.events, args.warm_events, SHORT_N])
    seconds: dict[str, float] = {}
    tt: dict[str, dict[str, Any]] = {}
    try:
        t0 = time.perf_counter()
        tp = loops.run(amain(args, port), loop="uvloop" if args.uvloop else "asyncio")
        seconds["throughput"] = time.perf_counter() - t0
        for loop in args.ttfe_loops:
            t0 = time.perf_counter()
            print(f"time to first event on {loop}: {args.calls} calls per variant "
                  f"({args.httpx_fresh_calls} for httpx fresh)", file=sys.stderr, flush=True)
            short = ttfe(f"http://127.0.0.1:{port}", args.calls, args.httpx_fresh_calls)
            tt[loop] = loops.run(short, loop=loop)
            seconds[f"ttfe_{loop}"] = time.perf_counter() - t0
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    meta = {
        "python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
        "loop": "uvloop" if args.uvloop else "asyncio", "ttfe_loops": args.ttfe_loops, "events": args.events,
        "rounds": args.rounds,
        "calls": args.calls, "httpx_fresh_calls": args.httpx_fresh_calls,
        "versions": {c.dist: _version(c.dist) for c in CONTENDERS} | {"httpx": _version("httpx"),
                                                                     "httpx2": _version("httpx2")},
        "seconds": seconds, "sidechain_source_sha256": digest,
    }
    if source_digest() != digest:
        print("warning: the sidechain sources changed during the run", file=sys.stderr)
    print(f"\nPython {meta['python']} on {meta['platform']}, {meta['cpus']} CPUs, "
          f"throughput client loop: {meta['loop']}, server: separate process (bench/_server.py, uvloop), "
          f"sidechain sources sha256 {digest}")
    figures = report(tp, tt, args, meta)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
        print(f"\nfigures written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
