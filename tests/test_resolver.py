"""The DNS cache every session shares: dedicated calls to a name look it up once per ttl, not per call.

The cache's rules run against a resolver that counts its lookups (aiohttp's public resolver interface);
the sessions' use of it runs against the fault server on 127.0.0.1 under the name ``localhost``.
"""

from __future__ import annotations

import asyncio
import socket
import threading

import aiohttp.abc
import pytest

from conftest import Resources, settle_resources
from sidechain import ConnectError, GatewayHTTPClient, Session
from sidechain.client.resolver import SHARED_RESOLVER, SharedResolver


class Counted(aiohttp.abc.AbstractResolver):
    """Resolves every name to ``addresses``, counting lookups and closes (shared between instances)."""

    lookups = 0
    closes = 0
    addresses = ["127.0.0.1"]
    fail: Exception | None = None
    gate: asyncio.Event | None = None  # when set, a lookup waits for it
    closed: asyncio.Event | None = None  # when set, set by close()

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
                      ) -> list[aiohttp.abc.ResolveResult]:
        Counted.lookups += 1
        if Counted.gate is not None:
            await Counted.gate.wait()
        if Counted.fail is not None:
            raise Counted.fail
        return [{"hostname": host, "host": a, "port": port, "family": socket.AF_INET, "proto": 0, "flags": 0}
                for a in Counted.addresses]

    async def close(self) -> None:
        Counted.closes += 1
        if Counted.closed is not None:
            Counted.closed.set()


@pytest.fixture
def counted() -> type[Counted]:
    Counted.lookups = Counted.closes = 0
    Counted.addresses = ["127.0.0.1"]
    Counted.fail = None
    Counted.gate = Counted.closed = None
    return Counted


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def test_a_name_is_looked_up_once_per_ttl_and_each_resolver_closed(counted: type[Counted]) -> None:
    clock = Clock()
    cache = SharedResolver(ttl=10, clock=clock, lookup=counted)
    for _ in range(5):
        got = await cache.resolve("gateway.test", 80)
        assert [r["host"] for r in got] == ["127.0.0.1"]
    assert (counted.lookups, counted.closes, cache.lookups) == (1, 1, 1)
    await cache.resolve("gateway.test", 81)  # another port, another entry
    await cache.resolve("gateway.test", 80, family=socket.AF_INET6)  # another family too
    assert counted.lookups == 3
    clock.now += 9.9
    await cache.resolve("gateway.test", 80)
    assert counted.lookups == 3
    clock.now += 0.2  # past the ttl
    await cache.resolve("gateway.test", 80)
    assert counted.lookups == 4
    cache.forget("gateway.test")  # every port and family
    for port in (80, 81):
        await cache.resolve("gateway.test", port)
    assert counted.lookups == 6


async def test_addresses_are_handed_out_in_turn(counted: type[Counted]) -> None:
    counted.addresses = ["127.0.0.1", "127.0.0.2", "127.0.0.3"]
    cache = SharedResolver(lookup=counted)
    firsts = [(await cache.resolve("multi.test", 80))[0]["host"] for _ in range(4)]
    assert firsts == ["127.0.0.1", "127.0.0.2", "127.0.0.3", "127.0.0.1"]
    assert sorted(r["host"] for r in await cache.resolve("multi.test", 80)) == counted.addresses
    assert counted.lookups == 1


async def test_failed_lookups_are_not_cached_and_the_cache_is_bounded(counted: type[Counted]) -> None:
    cache = SharedResolver(max_hosts=3, lookup=counted)
    counted.fail = OSError("no such name")
    for _ in range(2):
        with pytest.raises(OSError, match="no such name"):
            await cache.resolve("missing.test", 80)
    assert (counted.lookups, counted.closes) == (2, 2)
    counted.fail = None
    for i in range(5):
        await cache.resolve(f"h{i}.test", 80)
    assert counted.lookups == 7
    await cache.resolve("h4.test", 80)
    await cache.resolve("h2.test", 80)
    assert counted.lookups == 7  # the three newest are kept
    await cache.resolve("h0.test", 80)
    assert counted.lookups == 8  # the oldest were dropped
    uncached = SharedResolver(ttl=0, lookup=counted)
    await uncached.resolve("h0.test", 80)
    await uncached.resolve("h0.test", 80)
    assert counted.lookups == 10  # ttl 0: nothing is kept
    with pytest.raises(ValueError):
        SharedResolver(max_hosts=0)


async def test_dedicated_calls_share_the_lookup_and_a_refused_connect_forgets_it(
    fault_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every dedicated session used to resolve its name again (a worker-thread getaddrinfo per call)."""
    port = int(fault_server.rsplit(":", 1)[1])
    monkeypatch.setattr(SHARED_RESOLVER, "ttl", 3600.0)  # nothing expires during the test
    SHARED_RESOLVER.clear()
    before = SHARED_RESOLVER.lookups
    resources = Resources.now()
    client = GatewayHTTPClient(f"http://localhost:{port}")
    for _ in range(5):
        async with client.stream_post("/s?n=2", {}) as stream:
            assert len([e async for e in stream]) == 3
    assert SHARED_RESOLVER.lookups - before == 1
    SHARED_RESOLVER.clear()
    async with Session() as pool:  # a pooled session uses the same cache
        for _ in range(2):
            async with client.stream_post("/s?n=2", {}, session=pool) as stream:
                assert len([e async for e in stream]) == 3
    assert SHARED_RESOLVER.lookups - before == 2
    with socket.socket() as s:  # bound, never listening: refused
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    refused = GatewayHTTPClient(f"http://localhost.:{closed}")  # trailing dot: forgotten all the same
    for expected in (3, 4):
        with pytest.raises(ConnectError):
            async with refused.stream_post("/s", {}):
                pass
        assert SHARED_RESOLVER.lookups - before == expected  # forgotten after each failure
    async with client.stream_post("/s?n=1", {}) as stream:  # "localhost" was forgotten too
        assert len([e async for e in stream]) == 2
    assert SHARED_RESOLVER.lookups - before == 5
    after = await settle_resources(resources)
    assert after.fds <= resources.fds and after.tasks <= resources.tasks, (resources, after)


async def test_concurrent_calls_share_one_lookup_that_a_cancelled_caller_does_not_cancel(
    counted: type[Counted],
) -> None:
    counted.gate = asyncio.Event()
    cache = SharedResolver(lookup=counted)
    callers = [asyncio.create_task(cache.resolve("busy.test", 80)) for _ in range(20)]
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    callers[0].cancel()
    counted.gate.set()
    results = await asyncio.gather(*callers[1:])
    assert all(r[0]["host"] == "127.0.0.1" for r in results)
    assert counted.lookups == 1 and cache.lookups == 1
    assert callers[0].cancelled()
    # the only caller cancelled: the lookup still ends, fills the cache, and its error is not lost
    counted.gate, counted.closed = asyncio.Event(), asyncio.Event()
    lone = asyncio.create_task(cache.resolve("alone.test", 80))
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    lone.cancel()
    with pytest.raises(asyncio.CancelledError):
        await lone
    counted.gate.set()
    async with asyncio.timeout(5):
        await counted.closed.wait()  # the lookup ended (its resolver is closed then)
    await cache.resolve("alone.test", 80)
    assert counted.lookups == 2


async def test_a_lookup_with_no_address_is_an_os_error(counted: type[Counted]) -> None:
    counted.addresses = []
    cache = SharedResolver(lookup=counted)
    with pytest.raises(OSError, match=r"no address found for 'empty\.test'"):
        await cache.resolve("empty.test", 80)


def test_loops_in_several_threads_share_it(counted: type[Counted]) -> None:
    """Each thread runs its own loop; one more keeps forgetting names under them."""
    cache = SharedResolver(ttl=0.001, max_hosts=4, lookup=counted)
    errors: list[BaseException] = []
    stop = threading.Event()

    def resolving(seed: int) -> None:
        async def body() -> None:
            for i in range(400):
                got = await cache.resolve(f"h{(i * seed) % 7}.test", 80)
                assert got[0]["host"] == "127.0.0.1"

        try:
            asyncio.run(body())
        except BaseException as exc:
            errors.append(exc)

    def forgetting() -> None:
        try:
            while not stop.is_set():
                for i in range(7):
                    cache.forget(f"h{i}.test")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=resolving, args=(seed,)) for seed in (1, 3, 5)]
    forgetter = threading.Thread(target=forgetting)
    forgetter.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    stop.set()
    forgetter.join(timeout=10)
    assert not any(t.is_alive() for t in [*threads, forgetter]), "a thread hung"
    assert errors == []
    assert counted.lookups > 7
