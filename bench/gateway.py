"""Gateway fan-out benchmark: N event-stream subscribers receiving a turn, sidechain vs sse-starlette.

Each server runs in its own process (uvicorn, uvloop when installed) so its CPU and memory are its
own; the subscribers are raw asyncio connections in this process (they only find each event's
timestamp, no full SSE parsing, so the client costs the same for every server).

* ``sidechain-memory`` / ``sidechain-sqlite``: the real gateway app (``create_app``) with a bench model
  whose deltas carry the wall-clock time they were generated at (``T<epoch seconds>``). All N
  subscribers follow one conversation; a message starts a turn of ``--events`` deltas at ``--rate``
  per second. Latency = arrival at the subscriber - generation in the model, so it includes the log
  (the sqlite commit, for the sqlite store), fan-out, the socket and the client.
* ``sse-starlette``: a minimal app, the way sse-starlette is commonly used for fan-out: a publisher
  task puts each event (JSON encoded once) into one ``asyncio.Queue`` per subscriber, each subscriber's
  ``EventSourceResponse`` yields from its queue.

Server memory per subscriber = (server RSS with N idle subscribers connected - RSS before) / N.

Usage::

    python bench/gateway.py                       # 100, 1000, 5000 subscribers, every target
    python bench/gateway.py --subscribers 1000 --events 50 --rate 10 --targets sse-starlette
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import resource
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

TARGETS = ("sidechain-memory", "sidechain-sqlite", "sse-starlette")
_TS = re.compile(rb'"delta": ?"T(\d+\.\d+)')  # only deltas: message.completed repeats them all


def _raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# -- servers (run in a child process) --------------------------------------------------------------


class TimestampModel:
    """A model whose every delta is the wall-clock time it was generated at."""

    name = "bench"

    def __init__(self, rate: float, count: int) -> None:
        self.rate = rate
        self.count = count

    async def stream(self, request: Any) -> AsyncGenerator[str, None]:
        loop = asyncio.get_running_loop()
        start = loop.time()
        for i in range(self.count):
            await asyncio.sleep(max(0.0, start + i / self.rate - loop.time()))
            yield f"T{time.time():.6f} "

    async def aclose(self) -> None:
        return None


def serve_sidechain(store: str, rate: float, count: int) -> None:
    import uvicorn

    from sidechain.gateway import Gateway, GatewayConfig, create_app
    from sidechain.gateway.server import GatewayServer, uvicorn_config

    config = GatewayConfig(
        host="127.0.0.1", port=0, store=store, access_log=False, subscriber_queue=4096, keepalive_interval=15
    )
    gateway = Gateway(config, model=TimestampModel(rate, count))
    app = create_app(config, gateway=gateway)
    ucfg: uvicorn.Config = uvicorn_config(app, config)
    ucfg.backlog = 8192
    server = GatewayServer(ucfg, gateway, on_listening=lambda url: print(f"listening on {url}", flush=True))
    server.run()


def serve_sse_starlette(rate: float, count: int) -> None:
    import uvicorn
    from sse_starlette.sse import EventSourceResponse
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    queues: set[asyncio.Queue[dict[str, str]]] = set()
    tasks: set[asyncio.Task[None]] = set()

    async def events(request: Request) -> Response:
        queue: asyncio.Queue[dict[str, str]] = asyncio.Queue(maxsize=4096)
        queues.add(queue)

        async def gen() -> AsyncIterator[dict[str, str]]:
            try:
                while True:
                    yield await queue.get()
            finally:
                queues.discard(queue)

        return EventSourceResponse(gen(), ping=15)

    async def publisher() -> None:
        loop = asyncio.get_running_loop()
        start = loop.time()
        for i in range(count):
            await asyncio.sleep(max(0.0, start + i / rate - loop.time()))
            item = {
                "id": str(i + 1),
                "event": "message.delta",
                "data": json.dumps({"delta": f"T{time.time():.6f} "}),
            }
            for q in list(queues):
                with contextlib.suppress(asyncio.QueueFull):
                    q.put_nowait(item)

    async def publish(request: Request) -> Response:
        task = asyncio.get_running_loop().create_task(publisher())
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        return JSONResponse({"ok": True}, status_code=202)

    async def stats(request: Request) -> Response:
        return JSONResponse({"subscribers": len(queues)})

    app = Starlette(
        routes=[
            Route("/events", events),
            Route("/publish", publish, methods=["POST"]),
            Route("/stats", stats),
        ]
    )

    class Server(uvicorn.Server):
        async def startup(self, sockets: Any = None) -> None:
            await super().startup(sockets)
            port = self.servers[0].sockets[0].getsockname()[1]
            print(f"listening on http://127.0.0.1:{port}", flush=True)

    Server(
        uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", access_log=False, backlog=8192)
    ).run()


# -- the client side -------------------------------------------------------------------------------


class Subscriber(asyncio.Protocol):
    """One SSE connection that records the latency of every timestamped event it receives."""

    def __init__(
        self, request: bytes, latencies: list[float], expected: int, done: asyncio.Future[None]
    ) -> None:
        self.request = request
        self.latencies = latencies
        self.expected = expected
        self.done = done
        self.received = 0
        self.buffer = b""
        self.headers = False
        self.ok = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not an asyncio.Transport
        transport.write(self.request)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        now = time.time()
        buf = self.buffer + data
        if not self.headers:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                self.buffer = buf
                return
            if not self.ok.done():
                self.ok.set_result(buf.startswith(b"HTTP/1.1 200"))
            self.headers = True
            buf = buf[end + 4 :]
        cut = buf.rfind(b"\n")
        if cut < 0:
            self.buffer = buf
            return
        complete, self.buffer = buf[: cut + 1], buf[cut + 1 :]
        for match in _TS.finditer(complete):
            self.latencies.append(now - float(match.group(1)))
            self.received += 1
        if self.received >= self.expected and not self.done.done():
            self.done.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.ok.done():
            self.ok.set_result(False)
        if not self.done.done():
            self.done.set_result(None)


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def http(method: str, url: str, body: dict[str, Any] | None = None) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read() or b"null")


class ServerProcess:
    def __init__(self, target: str, rate: float, count: int, tmp: str) -> None:
        self.target = target
        cmd = [
            sys.executable,
            __file__,
            "--serve",
            target,
            "--rate",
            str(rate),
            "--events",
            str(count),
            "--tmp",
            tmp,
        ]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        match = re.search(r"listening on (http://\S+)", line)
        if not match:
            self.close()
            raise RuntimeError(f"{target} did not start: {line!r}")
        self.url = match.group(1)
        self.port = int(self.url.rsplit(":", 1)[1])

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


async def run_one(target: str, n: int, count: int, rate: float, tmp: str) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    server = await asyncio.to_thread(ServerProcess, target, rate, count, tmp)
    transports: list[asyncio.Transport] = []
    try:
        if target.startswith("sidechain"):
            cid = (await asyncio.to_thread(http, "POST", f"{server.url}/v1/conversations"))["id"]
            path = f"/v1/conversations/{cid}/events"

            async def registered() -> int:
                text = await asyncio.to_thread(lambda: urllib.request.urlopen(f"{server.url}/metrics").read())
                match = re.search(rb"sidechain_event_streams_open (\d+)", text)
                return int(match.group(1)) if match else 0

            async def start() -> None:
                await asyncio.to_thread(
                    http, "POST", f"{server.url}/v1/conversations/{cid}/messages", {"text": "go"}
                )
        else:
            path = "/events"

            async def registered() -> int:
                return int((await asyncio.to_thread(http, "GET", f"{server.url}/stats"))["subscribers"])

            async def start() -> None:
                await asyncio.to_thread(http, "POST", f"{server.url}/publish", {})

        await asyncio.sleep(0.5)
        rss_before = rss_kib(server.proc.pid)
        latencies: list[float] = []
        request = f"GET {path} HTTP/1.1\r\nHost: bench\r\nAccept: text/event-stream\r\n\r\n".encode()
        subs: list[Subscriber] = []
        dones: list[asyncio.Future[None]] = []
        limit = asyncio.Semaphore(256)

        async def connect() -> None:
            async with limit:
                done: asyncio.Future[None] = loop.create_future()
                transport, proto = await loop.create_connection(
                    lambda: Subscriber(request, latencies, count, done), "127.0.0.1", server.port
                )
                transports.append(transport)  # type: ignore[arg-type]
                subs.append(proto)
                dones.append(done)
                if not await proto.ok:
                    raise RuntimeError("subscription refused")

        async with asyncio.TaskGroup() as tg:
            for _ in range(n):
                tg.create_task(connect())
        deadline = loop.time() + 60
        while await registered() < n:
            if loop.time() > deadline:
                raise RuntimeError("subscribers did not register")
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.5)
        rss_idle = rss_kib(server.proc.pid)
        t0 = loop.time()
        await start()
        try:
            async with asyncio.timeout(count / rate + 120):
                await asyncio.gather(*dones)
        except TimeoutError:
            pass
        elapsed = loop.time() - t0
        rss_after = rss_kib(server.proc.pid)
        got = sum(s.received for s in subs)
        latencies.sort()

        def pct(p: float) -> float:
            return (
                latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000
                if latencies
                else float("nan")
            )

        return {
            "target": target,
            "subscribers": n,
            "delivered": got,
            "expected": n * count,
            "p50_ms": pct(0.50),
            "p99_ms": pct(0.99),
            "max_ms": latencies[-1] * 1000 if latencies else float("nan"),
            "kib_per_sub_idle": (rss_idle - rss_before) / n,
            "kib_per_sub_after": (rss_after - rss_before) / n,
            "seconds": elapsed,
        }
    finally:
        for t in transports:
            t.abort()
        await asyncio.to_thread(server.close)


async def main_async(args: argparse.Namespace) -> None:
    rows = []
    with tempfile.TemporaryDirectory(prefix="sidechain-bench-") as tmp:
        for n in args.subscribers:
            for target in args.targets:
                row = await run_one(target, n, args.events, args.rate, tmp)
                rows.append(row)
                print(
                    f"{row['target']:<18} N={n:<5} delivered {row['delivered']}/{row['expected']}"
                    f"  p50 {row['p50_ms']:8.1f} ms  p99 {row['p99_ms']:8.1f} ms"
                    f"  mem {row['kib_per_sub_idle']:6.1f} KiB/sub idle,"
                    f" {row['kib_per_sub_after']:6.1f} after",
                    flush=True,
                )
    print()
    print(f"{args.events} events at {args.rate}/s per run; latency = generation to arrival at the subscriber")
    print()
    print("| server | subscribers | delivered | p50 ms | p99 ms | KiB/sub (idle) | KiB/sub (after events) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['target']} | {r['subscribers']} | {r['delivered']}/{r['expected']} | {r['p50_ms']:.1f} |"
            f" {r['p99_ms']:.1f} | {r['kib_per_sub_idle']:.1f} | {r['kib_per_sub_after']:.1f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--subscribers", default="100,1000,5000", type=lambda s: [int(x) for x in s.split(",")]
    )
    parser.add_argument("--targets", default=",".join(TARGETS), type=lambda s: s.split(","))
    parser.add_argument("--events", type=int, default=40, help="deltas per turn")
    parser.add_argument("--rate", type=float, default=10.0, help="deltas per second")
    parser.add_argument("--serve", choices=TARGETS, help=argparse.SUPPRESS)
    parser.add_argument("--tmp", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    _raise_fd_limit()
    if args.serve:
        if args.serve == "sse-starlette":
            serve_sse_starlette(args.rate, args.events)
        else:
            store = (
                "memory"
                if args.serve == "sidechain-memory"
                else f"sqlite:{os.path.join(args.tmp, 'b.sqlite3')}"
            )
            serve_sidechain(store, args.rate, args.events)
        return
    try:
        import uvloop

        runner: Any = uvloop.run
    except ImportError:  # pragma: no cover
        runner = asyncio.run
    runner(main_async(args))


if __name__ == "__main__":
    main()
