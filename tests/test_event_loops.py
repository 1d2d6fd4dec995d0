"""The client on both event loops it meets: asyncio and uvloop (which uvicorn, and so the gateway, runs on).

The connection path (``DirectConnector``) and the deadlines differ between the two loops: uvloop connects
natively and its timers tick in whole milliseconds.

Each test runs its body on a fresh loop of each kind (``asyncio.run`` / ``uvloop.run``, debug on) against
the fault server on 127.0.0.1, and counts fds and tasks before and after.
"""

from __future__ import annotations

import asyncio
import random
import select
import socket
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any

import aiohappyeyeballs
import aiohttp
import aiohttp.abc
import pytest
import uvloop

from conftest import Resources, settle_resources
from sidechain import (
    ConnectError,
    ConnectTimeout,
    GatewayHTTPClient,
    IdleTimeout,
    ReadTimeout,
    Session,
    TotalTimeout,
    loops,
)
from sidechain.cli import main as cli_main
from sidechain.client import sessions
from sidechain.client.sessions import CONNECTOR, DirectConnector, _single_address
from sidechain.loops import resolve_loop

LOOPS = ["asyncio", "uvloop"]


def closed_port() -> int:
    with socket.socket() as s:  # bound, never listening: connecting is refused
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def run_on(loop_kind: str, body: Callable[[], Awaitable[None]]) -> None:
    async def checked() -> None:
        # libuv opens one fd (/dev/null) for itself on the first connect of a loop: made before counting
        with pytest.raises(ConnectionRefusedError):
            await asyncio.get_running_loop().create_connection(asyncio.Protocol, "127.0.0.1", closed_port())
        before = Resources.now()
        await body()
        after = await settle_resources(before)
        assert after.fds <= before.fds, f"leaked fds: {before} -> {after}"
        assert after.tasks <= before.tasks, f"leaked tasks: {before} -> {after}"

    if loop_kind == "uvloop":
        uvloop.run(checked(), debug=True)
    else:
        asyncio.run(checked(), debug=True)


def test_installed_aiohttp_takes_the_direct_path() -> None:
    """Fails when an aiohttp upgrade changes the hook: then every connection would go the slow way."""
    assert CONNECTOR is DirectConnector, f"aiohttp {aiohttp.__version__}: the connect hook changed"


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_dedicated_and_pooled_calls_on_each_loop(loop_kind: str, fault_server: str) -> None:
    port = int(fault_server.rsplit(":", 1)[1])

    async def body() -> None:
        for base in (fault_server, f"http://localhost:{port}"):  # one address; maybe two (::1 too)
            client = GatewayHTTPClient(base)
            for _ in range(3):
                async with client.stream_post("/s?n=5", {}) as s:
                    assert [e.id async for e in s] == ["0", "1", "2", "3", "4", "5"]
            async with Session() as pool:
                for _ in range(3):
                    async with client.stream_post("/s?n=3", {}, session=pool) as s:
                        assert len([e async for e in s]) == 4
                assert pool.connection_count() == 1

    run_on(loop_kind, body)


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_refused_connection_is_connect_error(loop_kind: str) -> None:
    port = closed_port()

    async def body() -> None:
        client = GatewayHTTPClient(f"http://127.0.0.1:{port}")
        for _ in range(3):
            with pytest.raises(ConnectError) as info:
                async with client.stream_post("/s", {}):
                    pass
            cause = info.value.__cause__
            assert isinstance(cause, aiohttp.ClientConnectorError)
            assert isinstance(cause.os_error, ConnectionRefusedError)

    run_on(loop_kind, body)


@contextmanager
def unanswered_port() -> Iterator[int]:
    """A listening port whose accept queue is full: the kernel drops new SYNs, so a connect hangs."""
    server = socket.socket()
    fillers: list[socket.socket] = []
    try:
        server.bind(("127.0.0.1", 0))
        server.listen(0)
        address = server.getsockname()
        for _ in range(8):
            filler = socket.socket()
            filler.setblocking(False)
            fillers.append(filler)
            filler.connect_ex(address)
            _, writable, _ = select.select([], [filler], [], 0.2)
            if not writable:  # this one hangs: the queue is full
                yield address[1]
                return
        pytest.skip("the kernel accepted every connection; cannot make a connect hang here")
    finally:
        for filler in fillers:
            filler.close()
        server.close()


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_hanging_connect_is_connect_timeout_and_leaves_nothing(loop_kind: str) -> None:
    with unanswered_port() as port:

        async def body() -> None:
            client = GatewayHTTPClient(f"http://127.0.0.1:{port}", connect_timeout=0.15)
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            with pytest.raises(ConnectTimeout):
                async with client.stream_post("/s", {}):
                    pass
            assert 0.1 <= loop.time() - t0 < 1.0

        run_on(loop_kind, body)


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_cancel_during_connect_leaves_nothing(loop_kind: str, fault_server: str) -> None:
    """Cancel while the direct connect is in flight (a hanging one, and real ones at random moments)."""
    with unanswered_port() as port:

        async def body() -> None:
            hanging = GatewayHTTPClient(f"http://127.0.0.1:{port}")
            live = GatewayHTTPClient(fault_server)
            rng = random.Random(7)

            async def call(client: GatewayHTTPClient) -> None:
                async with client.stream_post("/s?n=3", {}) as s:
                    async for _ in s:
                        pass

            task = asyncio.create_task(call(hanging))
            await asyncio.sleep(0.05)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            for _ in range(60):
                task = asyncio.create_task(call(live))
                await asyncio.sleep(rng.uniform(0, 0.002))
                task.cancel()
                try:
                    await task
                except asyncio.CancelledError:
                    pass

        run_on(loop_kind, body)


class Resolver(aiohttp.abc.AbstractResolver):
    """Resolves every name to ``count`` entries of 127.0.0.1 (aiohttp's public resolver interface)."""

    def __init__(self, count: int) -> None:
        self.count = count

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
                      ) -> list[aiohttp.abc.ResolveResult]:
        entry: aiohttp.abc.ResolveResult = {"hostname": host, "host": "127.0.0.1", "port": port,
                                            "family": socket.AF_INET, "proto": 0, "flags": 0}
        return [dict(entry) for _ in range(self.count)]  # type: ignore[misc]

    async def close(self) -> None:
        pass


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_only_one_plain_address_skips_happy_eyeballs(
    loop_kind: str, fault_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """aiohttp's happy-eyeballs path is skipped for one address, still taken for several."""
    port = int(fault_server.rsplit(":", 1)[1])
    calls: list[int] = []
    real = aiohappyeyeballs.start_connection

    async def counted(addr_infos: Any, **kwargs: Any) -> socket.socket:
        calls.append(len(addr_infos))
        return await real(addr_infos, **kwargs)

    monkeypatch.setattr(aiohappyeyeballs, "start_connection", counted)

    async def body() -> None:
        async with Session() as pool:  # an IP literal: no resolver at all
            client = GatewayHTTPClient(fault_server)
            async with client.stream_post("/s?n=2", {}, session=pool) as s:
                assert len([e async for e in s]) == 3
        assert calls == []
        for count, expected in ((1, []), (2, [2])):
            connector = DirectConnector(resolver=Resolver(count))
            async with (aiohttp.ClientSession(connector=connector) as session,
                        session.get(f"http://gateway.test:{port}/s?n=1") as resp):
                assert resp.status == 200
                await resp.read()
            assert calls == expected, count
            calls.clear()

    run_on(loop_kind, body)


def test_single_address_rules() -> None:
    def info(family: int, sockaddr: tuple[Any, ...]) -> tuple[Any, ...]:
        return (family, socket.SOCK_STREAM, 6, "", sockaddr)

    v4 = info(socket.AF_INET, ("127.0.0.1", 80))
    assert _single_address([v4]) == (socket.AF_INET, 6, "127.0.0.1", 80)
    assert _single_address([info(socket.AF_INET6, ("::1", 80, 0, 0))]) == (socket.AF_INET6, 6, "::1", 80)
    assert _single_address([v4, v4]) is None
    assert _single_address([]) is None
    assert _single_address([info(socket.AF_INET6, ("fe80::1%eth0", 80, 0, 0))]) is None  # aiohttp's form
    assert _single_address([info(socket.AF_INET6, ("fe80::1", 80, 0, 2))]) is None


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_each_deadline_gives_its_own_error(loop_kind: str, fault_server: str) -> None:
    """uvloop fires a timer up to a millisecond before loop.time() reaches it: still the deadline's error."""

    async def body() -> None:
        async with Session() as pool:
            for session in (None, pool):
                # deadlines with varied fractions of a millisecond: the old clock comparison failed 2-3 of 12
                for i in range(12):
                    client = GatewayHTTPClient(fault_server, total_timeout=0.03 + i * 0.0137)
                    with pytest.raises(TotalTimeout):  # before the headers
                        async with client.stream_post("/s?fault=stall_headers", {}, session=session):
                            pass
                for i in range(3):
                    client = GatewayHTTPClient(fault_server, total_timeout=0.3 + i * 0.0137)
                    entered = False
                    with pytest.raises(TotalTimeout):  # after them
                        async with client.stream_post("/s?fault=stall", {}, session=session) as s:
                            entered = True
                            async for _ in s:
                                pass
                    assert entered
                client = GatewayHTTPClient(fault_server, read_timeout=0.05)
                with pytest.raises(ReadTimeout):
                    async with client.stream_post("/s?fault=stall_headers", {}, session=session):
                        pass
                client = GatewayHTTPClient(fault_server, idle_timeout=0.05)
                with pytest.raises(IdleTimeout):
                    async with client.stream_post("/s?fault=stall", {}, session=session) as s:
                        async for _ in s:
                            pass

    run_on(loop_kind, body)


def test_loop_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SIDECHAIN_LOOP", raising=False)
    assert resolve_loop() == "uvloop"  # installed with uvicorn[standard]
    assert resolve_loop("asyncio") == "asyncio"
    monkeypatch.setenv("SIDECHAIN_LOOP", "asyncio")
    assert resolve_loop() == "asyncio"
    assert resolve_loop("uvloop") == "uvloop"  # an explicit choice wins over the environment
    with pytest.raises(ValueError, match="unknown event loop 'trio'"):
        resolve_loop("trio")


def test_loops_run_uses_the_chosen_loop() -> None:
    async def which() -> str:
        return type(asyncio.get_running_loop()).__module__.split(".")[0]

    assert loops.run(which(), loop="uvloop") == "uvloop"
    assert loops.run(which(), loop="asyncio") == "asyncio"
    with pytest.raises(ValueError):
        loops.run(which(), loop="bogus")  # the coroutine is closed, not left "never awaited"


def test_cli_rejects_an_unknown_loop(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("SIDECHAIN_LOOP", "bogus")
    assert cli_main(["btw", "--conversation", "c_x", "hi", "--url", "http://127.0.0.1:9"]) == 2
    assert "unknown event loop 'bogus'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["soak", "--loop", "bogus"])  # argparse: not one of the choices


def test_selector_connect_waits_only_for_a_handshake_still_going_on(
    monkeypatch: pytest.MonkeyPatch, fault_server: str
) -> None:
    """On the standard loop a loopback handshake is done inside ``connect()``: no wait for writability.
    A handshake that is still going on (a full accept queue) is awaited as asyncio does, and a
    refused one raises the errno's own ``OSError``. Dedicated calls connect this way."""
    waits: list[tuple[str, int]] = []
    real = asyncio.selector_events.BaseSelectorEventLoop.sock_connect

    async def spied(self: Any, sock: socket.socket, address: Any) -> None:
        waits.append(address)
        await real(self, sock, address)

    monkeypatch.setattr(asyncio.selector_events.BaseSelectorEventLoop, "sock_connect", spied)
    direct: list[int] = []
    real_direct = sessions._selector_connect

    async def counted(*args: Any) -> socket.socket:
        direct.append(1)
        return await real_direct(*args)

    monkeypatch.setattr(sessions, "_selector_connect", counted)

    async def body() -> None:
        waits.clear()  # run_on's own refused connect went through asyncio's sock_connect
        loop = asyncio.get_running_loop()
        with socket.socket() as server:
            server.bind(("127.0.0.1", 0))
            server.listen(64)
            port = server.getsockname()[1]
            for _ in range(20):
                sock = await real_direct(loop, socket.AF_INET, 0, "127.0.0.1", port)
                with sock:
                    assert sock.getpeername() == ("127.0.0.1", port)
                    assert not sock.getblocking()
            # the kernel may finish a handshake later under load (then it is waited for); not 20 times
            assert len(waits) < 20, waits
        waits.clear()
        with pytest.raises(ConnectionRefusedError, match="Connect call failed"):
            await real_direct(loop, socket.AF_INET, 0, "127.0.0.1", closed_port())
        with unanswered_port() as port:
            waits.clear()
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.1):
                    await real_direct(loop, socket.AF_INET, 0, "127.0.0.1", port)
            assert waits == [("127.0.0.1", port)]
        async with GatewayHTTPClient(fault_server).stream_post("/s?n=1", {}) as s:
            assert len([e async for e in s]) == 2
        assert direct == [1]

    run_on("asyncio", body)
