"""Event log implementations behind one protocol: ordering, durability, retention, release."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from pathlib import Path

import pytest

from sidechain.gateway.eventlog import (
    EventLog,
    MemoryEventLog,
    SqliteEventLog,
    StoredEvent,
    TurnRecord,
    open_event_log,
)


def make(kind: str, path: Path, retention: int = 100) -> EventLog:
    if kind == "memory":
        return MemoryEventLog(retention=retention)
    return SqliteEventLog(str(path / "log.sqlite3"), retention=retention)


def sqlite_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("sidechain-sqlite")]


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
async def test_append_delivers_in_order_after_durable(kind: str, tmp_path: Path) -> None:
    delivered: list[StoredEvent] = []

    def sink(events: Sequence[StoredEvent]) -> None:
        delivered.extend(events)

    log = make(kind, tmp_path, retention=5)
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
        open_event_log("redis://x", retention=1)
    with pytest.raises(ValueError):
        open_event_log("sqlite:", retention=1)


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
