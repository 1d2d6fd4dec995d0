"""ChaosProxy: a loopback TCP proxy that breaks connections on purpose, for chaos tests and the soak.

It forwards bytes between clients and an upstream (the gateway) and applies, per connection, a
:class:`FaultPlan` to the response direction: drop with FIN or RST after ``after_bytes``, stall after
``after_bytes``, or trickle one byte every ``trickle_interval`` seconds. The plan for each new
connection comes from a callable, so a scenario can fault the first attempt and let the retry through.
Everything it opens is owned and released by :meth:`ChaosProxy.aclose`.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

__all__ = ["ChaosProxy", "FaultPlan"]

FaultKind = Literal["none", "fin", "rst", "stall", "trickle"]


@dataclass(frozen=True, slots=True)
class FaultPlan:
    kind: FaultKind = "none"
    after_bytes: int = 0
    trickle_interval: float = 0.3


NO_FAULT = FaultPlan()


class ChaosProxy:
    """``async with ChaosProxy(upstream_host, upstream_port, plan=...) as proxy:`` then use ``proxy.url``."""

    def __init__(self, upstream_host: str, upstream_port: int, *,
                 plan: Callable[[int], FaultPlan] | None = None) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.plan = plan or (lambda n: NO_FAULT)
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self.connections = 0
        self.faults_injected = 0
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def __aenter__(self) -> ChaosProxy:
        self._server = await asyncio.start_server(self._on_client, "127.0.0.1", 0, backlog=2048)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(set(self._tasks))
        if server is not None:
            await server.wait_closed()

    def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.get_running_loop().create_task(self._serve(reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        self.connections += 1
        plan = self.plan(self.connections)
        self._writers.add(client_w)
        upstream_w: asyncio.StreamWriter | None = None
        try:
            upstream_r, upstream_w = await asyncio.open_connection(*self.upstream)
            self._writers.add(upstream_w)
            loop = asyncio.get_running_loop()
            pipes = {
                loop.create_task(self._pipe(client_r, upstream_w, NO_FAULT, client_w)),
                loop.create_task(self._pipe(upstream_r, client_w, plan, client_w)),
            }
            try:
                # either side ending (a client gone, a server done, a fault) ends the connection
                await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for pipe in pipes:
                    pipe.cancel()
                await asyncio.wait(pipes)
                for pipe in pipes:
                    if not pipe.cancelled():
                        pipe.exception()  # retrieved: injected faults and resets are expected here
        except OSError:
            pass
        finally:
            for w in (client_w, upstream_w):
                if w is not None:
                    self._writers.discard(w)
                    w.transport.abort()

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, plan: FaultPlan,
                    client_w: asyncio.StreamWriter) -> None:
        sent = 0
        while True:
            data = await src.read(65536)
            if not data:
                with contextlib.suppress(OSError):
                    dst.write_eof()
                return
            if plan.kind != "none" and sent + len(data) >= plan.after_bytes:
                head = data[: max(0, plan.after_bytes - sent)]
                if head:
                    dst.write(head)
                    await dst.drain()
                self.faults_injected += 1
                if plan.kind == "fin":
                    client_w.close()
                    raise ConnectionAbortedError("injected FIN")
                if plan.kind == "rst":
                    sock = client_w.get_extra_info("socket")
                    if sock is not None:
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    client_w.transport.abort()
                    raise ConnectionAbortedError("injected RST")
                if plan.kind == "stall":
                    await asyncio.Event().wait()  # until the proxy closes or the client leaves
                if plan.kind == "trickle":
                    rest = data[len(head):]
                    while True:
                        for i in range(len(rest)):
                            dst.write(rest[i : i + 1])
                            await dst.drain()
                            await asyncio.sleep(plan.trickle_interval)
                        rest = await src.read(65536)
                        if not rest:
                            return
            dst.write(data)
            sent += len(data)
            await dst.drain()
