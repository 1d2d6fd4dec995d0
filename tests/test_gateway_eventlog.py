"""Event log implementations behind one protocol: ordering, durability, retention, release."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
from collections.abc import Sequence
from pathlib import Path

import aiohttp
import pytest

from conftest import start_redis, stop_redis
from gateway_helpers import SSEReader, create_conversation, data, ids, post_message, wait_until
from sidechain.gateway.eventlog import (
    EventLog,
    MemoryEventLog,
    RedisEventLog,
    SqliteEventLog,
    StoreClosed,
    StoredEvent,
    StoreInUse,
    ThreadExchange,
    TurnRecord,
    open_event_log,
)
from sidechain.gateway.testing import running_gateway


def make(kind: str, path: Path, retention: int = 100, request: pytest.FixtureRequest | None = None
         ) -> EventLog:
    if kind == "memory":
        return MemoryEventLog(retention=retention)
    if kind == "redis":
        assert request is not None
        return RedisEventLog(request.getfixturevalue("redis_store"), retention=retention)
    return SqliteEventLog(str(path / "log.sqlite3"), retention=retention)


def sqlite_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("sidechain-sqlite")]


@pytest.mark.parametrize("kind", ["memory", "sqlite", "redis"])
async def test_append_delivers_in_order_after_durable(kind: str, tmp_path: Path,
                                                      request: pytest.FixtureRequest) -> None:
    delivered: list[StoredEvent] = []

    def sink(events: Sequence[StoredEvent]) -> None:
        delivered.extend(events)

    log = make(kind, tmp_path, retention=5, request=request)
    await log.open(sink)
    try:
        log.create_conversation("c1", 1.0)
        log.create_conversation("c2", 2.0)
        for i in range(1, 9):
            log.append(StoredEvent("c1", i, "t", f'{{"i":{i}}}'))
            if i <= 2:
                log.append(StoredEvent("c2", i, "t", "{}"))
        log.save_turn("c1", TurnRecord("turn_a", 1, "hello", "running"))
        await log.flush()
        assert [(e.conversation_id, e.id) for e in delivered if e.conversation_id == "c1"] == [
            ("c1", i) for i in range(1, 9)
        ]
        # retention keeps the newest 5 of c1, both of c2
        assert [e.id for e in await log.read("c1", 0, 100)] == [4, 5, 6, 7, 8]
        assert [e.id for e in await log.read("c1", 5, 2)] == [6, 7]
        assert [e.id for e in await log.read("c2", 0, 100)] == [1, 2]
        record = await log.load_conversation("c1")
        assert record is not None and record.last_event_id == 8 and record.created_at == 1.0
        assert [t.turn_id for t in record.turns] == ["turn_a"]
        assert await log.load_conversation("nope") is None
        assert [(c, t.turn_id) for c, t in await log.unfinished_turns()] == [("c1", "turn_a")]
        log.save_turn("c1", TurnRecord("turn_a", 1, "hello", "completed", "hi there"))
        await log.flush()
        assert await log.unfinished_turns() == []
        record = await log.load_conversation("c1")
        assert record is not None and record.turns[0].assistant_text == "hi there"
    finally:
        await log.close()
        await log.close()  # idempotent


async def test_sqlite_survives_reopen_and_releases_its_thread(tmp_path: Path) -> None:
    assert sqlite_threads() == []
    log = SqliteEventLog(str(tmp_path / "sub" / "log.sqlite3"), retention=1000)
    await log.open(lambda events: None)
    log.create_conversation("c", 0.0)
    for i in range(1, 501):  # one burst: written in a few batched transactions
        log.append(StoredEvent("c", i, "t", "{}"))
    await log.close()  # close flushes
    assert sqlite_threads() == []
    again = open_event_log(f"sqlite:{tmp_path / 'sub' / 'log.sqlite3'}", retention=1000)
    await again.open(lambda events: None)
    try:
        record = await again.load_conversation("c")
        assert record is not None and record.last_event_id == 500
        assert len(await again.read("c", 0, 1000)) == 500
    finally:
        await again.close()
    assert sqlite_threads() == []


def test_store_spec() -> None:
    assert isinstance(open_event_log("memory", retention=1), MemoryEventLog)
    with pytest.raises(ValueError):
        open_event_log("postgres://x", retention=1)
    with pytest.raises(ValueError):
        open_event_log("sqlite:", retention=1)
    redis = open_event_log("redis://127.0.0.1:6379/2?prefix=gw1&socket_timeout=5", retention=1)
    assert isinstance(redis, RedisEventLog)
    assert (redis.url, redis.prefix) == ("redis://127.0.0.1:6379/2?socket_timeout=5", "gw1")
    with pytest.raises(ValueError, match="prefix"):
        open_event_log("redis://127.0.0.1:6379/0?prefix=a:b", retention=1)


async def test_sqlite_batches_writes_in_one_worker_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = SqliteEventLog(str(tmp_path / "log.sqlite3"), retention=10_000)
    batches: list[tuple[int, str]] = []
    real = log._write_sync

    def spy(batch: list[tuple[object, ...]]) -> None:
        batches.append((len(batch), threading.current_thread().name))
        real(batch)

    monkeypatch.setattr(log, "_write_sync", spy)
    delivered: list[int] = []
    await log.open(lambda events: delivered.extend(e.id for e in events))
    try:
        log.create_conversation("c", 0.0)
        for i in range(1, 1001):  # one loop step: one group commit
            log.append(StoredEvent("c", i, "t", "{}"))
        await log.flush()
        assert delivered == list(range(1, 1001))
        assert batches == [(1001, batches[0][1])]
        assert batches[0][1].startswith("sidechain-sqlite")
        for i in range(1001, 1011):  # ten steps while commits are in flight: still few transactions
            log.append(StoredEvent("c", i, "t", "{}"))
            await asyncio.sleep(0)
        await log.flush()
        assert delivered == list(range(1, 1011))
        assert 2 <= len(batches) <= 11
    finally:
        await log.close()


async def test_redis_survives_reopen_with_threads_turns_and_retention(
    redis_store: str, request: pytest.FixtureRequest
) -> None:
    """What one gateway wrote, the next one reads: events (trimmed exactly to ``retention``), turns,
    unfinished turns, btw threads in their order of use with their newest exchanges."""
    log = RedisEventLog(redis_store, retention=3)
    delivered: list[int] = []
    await log.open(lambda events: delivered.extend(e.id for e in events))
    log.create_conversation("c", 5.5)
    for i in range(1, 8):
        log.append(StoredEvent("c", i, "t", f'{{"i":{i}}}'))
    log.save_turn("c", TurnRecord("turn_a", 1, "first", "completed", "answer"))
    log.save_turn("c", TurnRecord("turn_b", 2, "second", "running"))
    for thread in ("thr_b", "thr_a", "thr_gone", "thr_b"):  # thr_b used last
        log.use_thread("c", thread)
    for seq in range(1, 53):  # a thread keeps its newest 50
        log.save_exchange("c", ThreadExchange("thr_a", seq, f"q{seq}", f"a{seq}"))
    log.drop_thread("c", "thr_gone")
    await log.close()
    assert delivered == list(range(1, 8))

    again = open_event_log(redis_store, retention=3)
    await again.open(lambda events: None)
    try:
        record = await again.load_conversation("c")
        assert record is not None
        assert (record.created_at, record.last_event_id) == (5.5, 7)
        assert [e.id for e in await again.read("c", 0, 100)] == [5, 6, 7]
        assert [(e.id, e.data) for e in await again.read("c", 5, 1)] == [(6, '{"i":6}')]
        assert [t.turn_id for t in record.turns] == ["turn_a", "turn_b"]
        assert [(c, t.turn_id) for c, t in await again.unfinished_turns()] == [("c", "turn_b")]
        assert record.threads == ["thr_a", "thr_b"]
        assert [x.seq for x in record.exchanges] == list(range(3, 53))
        assert record.exchanges[-1] == ThreadExchange("thr_a", 52, "q52", "a52")
        assert await again.load_conversation("unknown") is None
        # ids continue: a restart's next event is appended after the newest
        again.append(StoredEvent("c", 8, "t", "{}"))
        await again.flush()
        assert [e.id for e in await again.read("c", 6, 100)] == [7, 8]
    finally:
        await again.close()
        await again.close()  # idempotent


async def test_redis_unreachable_is_a_clear_error_at_open() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = RedisEventLog(f"redis://127.0.0.1:{port}/0", retention=10)
    before = len(os.listdir("/proc/self/fd"))
    with pytest.raises(ConnectionError, match=f"127.0.0.1:{port}"):
        await log.open(lambda events: None)
    assert len(os.listdir("/proc/self/fd")) == before


async def test_redis_outage_holds_writes_back_then_sends_them_in_order(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Redis stops while the gateway writes: the failed transaction is logged and sent again until it
    goes through; its events are not delivered (nor flush done) before, and nothing later overtakes
    it. Once Redis is back, everything is written in order."""
    proc, port = start_redis()
    log = RedisEventLog(f"redis://127.0.0.1:{port}/0?socket_timeout=1", retention=100, close_timeout=5)
    delivered: list[int] = []
    try:
        await log.open(lambda events: delivered.extend(e.id for e in events))
        log.create_conversation("c", 0.0)
        log.append(StoredEvent("c", 1, "t", "{}"))
        await log.flush()
        stop_redis(proc)
        with caplog.at_level(logging.ERROR, logger="sidechain.gateway.eventlog"):
            log.append(StoredEvent("c", 2, "t", "{}"))
            flushed = asyncio.ensure_future(log.flush())
            await wait_until(lambda: log.write_failures >= 2, what="a second failed write")
            log.append(StoredEvent("c", 3, "t", "{}"))
        assert delivered == [1] and not flushed.done()
        assert "Redis write of 1 operations failed" in caplog.text
        proc, _ = start_redis(port)  # a new, empty server (no persistence) on the same address
        await asyncio.wait_for(flushed, 10)
        await log.flush()
        assert delivered == [1, 2, 3]
        assert [e.id for e in await log.read("c", 0, 10)] == [2, 3]
    finally:
        await log.close()
        stop_redis(proc)


async def test_sqlite_failed_commit_is_sent_again_before_anything_else(tmp_path: Path) -> None:
    """The file locked by another process past busy_timeout: the batch rolls back and is sent again
    until it commits; meanwhile its events are not delivered and later writes wait behind it, so the
    store never has a hole and a restart never reuses an id a client saw."""
    import sqlite3

    path = tmp_path / "log.sqlite3"
    log = SqliteEventLog(str(path), retention=100, busy_timeout=0.05)
    delivered: list[int] = []
    await log.open(lambda events: delivered.extend(e.id for e in events))
    locker = sqlite3.connect(str(path), isolation_level=None)
    try:
        log.create_conversation("c", 0.0)
        log.append(StoredEvent("c", 1, "t", "{}"))
        await log.flush()
        locker.execute("BEGIN EXCLUSIVE")
        log.append(StoredEvent("c", 2, "t", "{}"))
        flushed = asyncio.ensure_future(log.flush())
        await wait_until(lambda: log.write_failures >= 2, what="a second failed write")
        log.append(StoredEvent("c", 3, "t", "{}"))
        await wait_until(lambda: log.write_failures >= 3, what="a third failed write")
        assert delivered == [1] and not flushed.done()
        locker.execute("COMMIT")
        await asyncio.wait_for(flushed, 10)
        await log.flush()
        assert delivered == [1, 2, 3]
        assert [e.id for e in await log.read("c", 0, 10)] == [1, 2, 3]
    finally:
        locker.close()
        await log.close()


async def test_gateway_on_a_failing_store_holds_events_refuses_writes_and_loses_nothing() -> None:
    """Redis goes away mid-turn: the turn's next events are held back (never delivered before they are
    stored), new work is refused with 503 ``store_unavailable`` (nothing taken), a btw still works
    (answered from memory); once Redis is back the held events go out in order, none lost or twice."""
    proc, port = start_redis()
    store = f"redis://127.0.0.1:{port}/0?socket_timeout=1"
    try:
        async with aiohttp.ClientSession() as session, \
                running_gateway(store=store, echo_pace=20, store_timeout=0.3, btw_grace=0) as gw:
            cid = await create_conversation(session, gw.url)
            url = f"{gw.url}/v1/conversations/{cid}"
            async with session.get(f"{url}/events") as resp:
                reader = SSEReader(resp)
                await post_message(session, gw.url, cid, "one two three four five six seven eight")
                seen = await reader.until("message.delta")
                stop_redis(proc)
                await wait_until(lambda: gw.gateway.log.failing, what="the store to fail")
                for path, body in ((f"{url}/messages", {"text": "more", "queue": True}),
                                   (f"{url}/notes", {"text": "n"}), (f"{gw.url}/v1/conversations", None)):
                    async with session.post(path, json=body) as r:
                        assert r.status == 503 and r.headers["Retry-After"] == "1", (path, r.status)
                        assert (await r.json())["error"]["type"] == "store_unavailable"
                async with session.post(f"{url}/btw", json={"question": "still there?"}) as r:
                    assert r.status == 200
                    btw = await SSEReader(r).rest()
                assert btw[-1].event == "btw.completed"
                held = len(gw.gateway.log._pending)
                assert held > 0 and gw.gateway.metrics.store_unavailable_total == 3
                proc, _ = start_redis(port)
                seen += await reader.until("turn.completed")
        assert ids(seen) == list(range(1, len(seen) + 1))
        text = "".join(data(e)["delta"] for e in seen if e.event == "message.delta")
        assert text.endswith("one two three four five six seven eight")
    finally:
        stop_redis(proc)


async def test_sqlite_store_is_one_gateways_at_a_time(tmp_path: Path) -> None:
    path = str(tmp_path / "log.sqlite3")
    first = SqliteEventLog(path, retention=10)
    await first.open(lambda events: None)
    try:
        second = SqliteEventLog(path, retention=10)
        before = len(os.listdir("/proc/self/fd"))
        with pytest.raises(StoreInUse, match="in use by another gateway"):
            await second.open(lambda events: None)
        assert len(os.listdir("/proc/self/fd")) == before
    finally:
        await first.close()
    again = SqliteEventLog(path, retention=10)  # free once the first one closed
    await again.open(lambda events: None)
    await again.close()


async def test_redis_prefix_is_one_gateways_at_a_time(redis_store: str) -> None:
    """A live gateway's claim keeps a second one out; one of a process that is gone (killed, on this
    host, boot and pid namespace) is taken over; one from elsewhere is not; it is given back on close."""
    import json
    import sys

    import redis.asyncio as aioredis

    first = RedisEventLog(redis_store, retention=10)
    raw = aioredis.Redis.from_url(first.url, decode_responses=True)
    owner = f"{first.prefix}:owner"
    try:
        await first.open(lambda events: None)
        try:
            claim = json.loads(await raw.get(owner))
            assert claim["pid"] == os.getpid() and claim["host"] == socket.gethostname()
            with pytest.raises(StoreInUse, match="in use by another gateway"):
                await RedisEventLog(redis_store, retention=10).open(lambda events: None)
        finally:
            await first.close()
        assert await raw.get(owner) is None  # given back
        gone = await asyncio.create_subprocess_exec(sys.executable, "-c", "pass")
        await gone.wait()  # a pid of this host that no longer runs
        await raw.set(owner, json.dumps({**claim, "pid": gone.pid}))
        taker = RedisEventLog(redis_store, retention=10)
        await taker.open(lambda events: None)
        await taker.close()
        for elsewhere in ({"host": "elsewhere"}, {"pidns": "1"}, {"boot": "another-boot"}):
            await raw.set(owner, json.dumps({**claim, "pid": gone.pid, **elsewhere}))
            with pytest.raises(StoreInUse):
                await RedisEventLog(redis_store, retention=10).open(lambda events: None)
    finally:
        await raw.aclose()


async def test_redis_writes_are_fenced_by_the_claim() -> None:
    """Redis restarted empty: the claim lapsed, the gateway claims it again before its next write (a
    second gateway then stays out) and a conversation that lost its record loads. A claim taken by
    another gateway stops every write (failing, retried) until it is this gateway's again."""
    import json

    import redis.asyncio as aioredis

    proc, port = start_redis()
    url = f"redis://127.0.0.1:{port}/0?socket_timeout=1"
    log = RedisEventLog(url, retention=100)
    raw = aioredis.Redis.from_url(f"redis://127.0.0.1:{port}/0", decode_responses=True)
    try:
        await log.open(lambda events: None)
        log.create_conversation("c", 1.0)
        log.append(StoredEvent("c", 1, "t", "{}"))
        await log.flush()
        stop_redis(proc)
        proc, _ = start_redis(port)  # empty: no claim, no conversation record
        log.append(StoredEvent("c", 2, "t", "{}"))
        await asyncio.wait_for(log.flush(), 15)
        with pytest.raises(StoreInUse):
            await RedisEventLog(url, retention=100).open(lambda events: None)
        record = await log.load_conversation("c")
        assert record is not None and record.last_event_id == 2
        mine = await raw.get("sidechain:owner")
        await raw.set("sidechain:owner", json.dumps({**json.loads(mine), "token": "someone else"}))
        log.append(StoredEvent("c", 3, "t", "{}"))
        await wait_until(lambda: log.failing, what="the fenced write to fail")
        assert [e.id for e in await log.read("c", 0, 10)] == [2]
        await raw.set("sidechain:owner", mine)
        await asyncio.wait_for(log.flush(), 15)
        assert [e.id for e in await log.read("c", 0, 10)] == [2, 3]
    finally:
        await raw.aclose()
        await log.close()
        stop_redis(proc)


async def test_sqlite_open_cancelled_releases_the_file_and_its_lock(tmp_path: Path) -> None:
    path = str(tmp_path / "log.sqlite3")
    before = len(os.listdir("/proc/self/fd"))
    log = SqliteEventLog(path, retention=10)
    opening = asyncio.ensure_future(log.open(lambda events: None))
    await asyncio.sleep(0)  # the open is under way in the worker thread
    opening.cancel()
    with pytest.raises(asyncio.CancelledError):
        await opening
    assert len(os.listdir("/proc/self/fd")) == before  # no connection, no lock file left open
    again = SqliteEventLog(path, retention=10)  # not StoreInUse
    await again.open(lambda events: None)
    await again.close()


async def test_close_that_gives_up_fails_the_flushes_it_leaves(tmp_path: Path) -> None:
    """A store still failing at close gives its writes up after close_timeout: a flush waiting for them
    gets StoreClosed, never a return that would mean they are durable."""
    import sqlite3

    path = tmp_path / "log.sqlite3"
    log = SqliteEventLog(str(path), retention=10, busy_timeout=0.05, close_timeout=0.3)
    await log.open(lambda events: None)
    locker = sqlite3.connect(str(path), isolation_level=None)
    try:
        log.create_conversation("c", 0.0)
        await log.flush()
        locker.execute("BEGIN EXCLUSIVE")
        log.append(StoredEvent("c", 1, "t", "{}"))
        waiting = asyncio.ensure_future(log.flush())
        await wait_until(lambda: log.failing, what="the write to fail")
        await log.close()
        with pytest.raises(StoreClosed):
            await waiting
    finally:
        locker.close()


async def test_store_that_cannot_be_read_is_503_not_500() -> None:
    proc, port = start_redis()
    try:
        async with aiohttp.ClientSession() as session, \
                running_gateway(store=f"redis://127.0.0.1:{port}/0?socket_timeout=1", echo_pace=0) as gw:
            cid = await create_conversation(session, gw.url)
            assert gw.gateway.evict_idle(asyncio.get_running_loop().time() + 10_000) == 1
            stop_redis(proc)
            for method, path in (("GET", ""), ("POST", "/btw"), ("GET", "/events")):
                async with session.request(method, f"{gw.url}/v1/conversations/{cid}{path}",
                                           json={"question": "q"} if method == "POST" else None) as r:
                    assert r.status == 503, (method, path, r.status, await r.text())
                    assert (await r.json())["error"]["type"] == "store_unavailable"
            assert gw.gateway.metrics.store_unavailable_total == 3
            proc, _ = start_redis(port)  # so that the gateway's close can give its claim back
    finally:
        stop_redis(proc)
