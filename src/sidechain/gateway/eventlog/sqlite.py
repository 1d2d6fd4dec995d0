"""Durable event log on stdlib sqlite3, written from one worker thread in batches.

Every write is enqueued on the event loop and returns at once; batches (all that accumulated while the
previous batch was committing, up to ``max_batch`` operations) go to a single dedicated thread, which
commits each in one transaction (WAL, ``synchronous=NORMAL``: durable across a killed process).
Only after the commit are the batch's events handed to the sink, so a client never
sees an event that a restart could forget, and ids continue after a restart without a gap or reuse.

A batch that fails to commit (the file locked past ``busy_timeout``, the disk full) is rolled back and
sent again, first, with backoff up to :data:`~.base.RETRY_MAX_DELAY`, until it commits: nothing after it
commits before it, none of its events is delivered before it, and ``flush`` waits meanwhile (the
gateway bounds those waits and answers 503 ``store_unavailable``). ``close`` gives up after
``close_timeout`` seconds, logging what was never written.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import sqlite3
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

from .base import (
    MAX_THREAD_EXCHANGES,
    ConversationRecord,
    EventSink,
    Op,
    QueuedWrites,
    StoredEvent,
    StoreInUse,
    ThreadExchange,
    TurnRecord,
    TurnState,
)

__all__ = ["SqliteEventLog"]

log = logging.getLogger("sidechain.gateway.eventlog")

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS conversations (
    id TEXT PRIMARY KEY,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS turns (
    conversation_id TEXT NOT NULL,
    turn_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    user_text TEXT NOT NULL,
    state TEXT NOT NULL,
    assistant_text TEXT,
    error_type TEXT,
    PRIMARY KEY (conversation_id, turn_id)
);
CREATE INDEX IF NOT EXISTS turns_unfinished ON turns (state) WHERE state IN ('queued', 'running');
CREATE TABLE IF NOT EXISTS btw_exchanges (
    conversation_id TEXT NOT NULL,
    thread_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    question TEXT NOT NULL,
    answer TEXT NOT NULL,
    PRIMARY KEY (conversation_id, thread_id, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS btw_threads (
    conversation_id TEXT NOT NULL,
    thread_id TEXT NOT NULL,
    used INTEGER NOT NULL,
    PRIMARY KEY (conversation_id, thread_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS events (
    conversation_id TEXT NOT NULL,
    id INTEGER NOT NULL,
    type TEXT NOT NULL,
    data TEXT NOT NULL,
    PRIMARY KEY (conversation_id, id)
) WITHOUT ROWID;
"""



class SqliteEventLog(QueuedWrites):
    """An :class:`~.base.EventLog` in a sqlite file.

    Owns one thread (a single-worker executor). Commits are pumped without a task: the first write
    of a loop step schedules a batch for the end of that step; while a batch commits in the thread,
    new writes accumulate into the next one (group commit). The commit's completion comes back to
    the loop with ``call_soon_threadsafe``, which hands the events to the sink and starts the next
    batch. :meth:`close` commits everything (giving up after ``close_timeout``), closes the connection
    and joins the thread.
    """

    durable = True

    def __init__(self, path: str, *, retention: int, max_batch: int = 4096, busy_timeout: float = 5.0,
                 close_timeout: float = 10.0) -> None:
        super().__init__()
        self.path = path
        self.retention = retention
        self.busy_timeout = busy_timeout
        self.close_timeout = close_timeout
        self._retry: asyncio.TimerHandle | None = None
        self._max_batch = max_batch
        self._busy = False  # a batch is scheduled or committing
        self._closed = False
        self._conn: sqlite3.Connection | None = None
        self._lock: int | None = None  # the fd holding the store's lock file
        self._executor: ThreadPoolExecutor | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- lifecycle ---------------------------------------------------------------------------------

    async def open(self, sink: EventSink) -> None:
        """Open (creating if needed) the database file. On failure the thread is already joined."""
        self._sink = sink
        self._loop = asyncio.get_running_loop()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sidechain-sqlite")
        try:
            await self._run(self._open_sync)
        except BaseException:
            self._executor.shutdown(wait=True)  # an open cancelled meanwhile has run to its end by now
            self._executor = None
            self._close_sync()
            raise

    async def close(self) -> None:
        """Commit everything enqueued (delivering its events; given up after ``close_timeout``), close the
        file and join the thread.

        Idempotent; writes after close are ignored with a warning. If cancelled while waiting for the
        last commit, the connection is still closed and the thread joined (in the worker) before
        ``CancelledError`` propagates.
        """
        if self._closed:
            return
        try:
            await self._flush_before_close(self.close_timeout, "sqlite")
        finally:
            self._closed = True
            if self._retry is not None:
                self._retry.cancel()
                self._retry = None
            executor, self._executor = self._executor, None
            if executor is not None:
                executor.submit(self._close_sync)
                await asyncio.shield(
                    asyncio.get_running_loop().run_in_executor(None, executor.shutdown, True)
                )
            self._release_waiters(closing=True)

    # -- writes (enqueue only) ---------------------------------------------------------------------

    def _accepting(self) -> bool:
        return not self._closed and self._executor is not None

    def _kick(self) -> None:
        if not self._busy:
            self._busy = True
            assert self._loop is not None
            self._loop.call_soon(self._start_batch)

    # -- reads -------------------------------------------------------------------------------------

    async def load_conversation(self, conversation_id: str) -> ConversationRecord | None:
        await self.flush()
        return await self._run(self._load_sync, conversation_id)

    async def read(self, conversation_id: str, after_id: int, limit: int) -> list[StoredEvent]:
        return await self._run(self._read_sync, conversation_id, after_id, limit)

    async def unfinished_turns(self) -> list[tuple[str, TurnRecord]]:
        await self.flush()
        return await self._run(self._unfinished_sync)

    # -- internals ---------------------------------------------------------------------------------

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        if self._executor is None:
            raise RuntimeError("the sqlite event log is not open")
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _start_batch(self) -> None:
        self._retry = None
        executor, loop = self._executor, self._loop
        if not self._pending or executor is None or loop is None:
            self._busy = False
            return
        batch = self._pending[: self._max_batch]
        del self._pending[: len(batch)]

        def done(f: Future[None]) -> None:  # in the worker thread
            try:
                loop.call_soon_threadsafe(self._on_committed, batch, f)
            except RuntimeError:  # the loop is closed: nobody is left to tell
                pass

        executor.submit(self._write_sync, batch).add_done_callback(done)

    def _on_committed(self, batch: list[Op], f: Future[None]) -> None:
        exc = f.exception()
        if exc is not None:
            delay = self._failed(batch, exc, "sqlite")
            if self._executor is None or self._loop is None:  # closed meanwhile: given up
                return
            self._pending[:0] = batch  # first again: nothing commits before it
            self._retry = self._loop.call_later(delay, self._start_batch)
            return
        self._written(batch, "sqlite")
        self._start_batch()  # the next group, if any accumulated meanwhile

    def _open_sync(self) -> None:
        directory = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(directory, exist_ok=True)
        # One gateway per file, enforced: a second one would recover (fail) the first one's running
        # turns and write ids it also writes. The lock goes with the process, a killed one included.
        lock_path = self.path + ".lock"
        lock = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lock)
            raise StoreInUse(f"the store {self.path} is in use by another gateway (it holds {lock_path})"
                             ) from None
        except BaseException:
            os.close(lock)
            raise
        try:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        except BaseException:
            os.close(lock)
            raise
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute(f"PRAGMA busy_timeout={int(self.busy_timeout * 1000)}")
            conn.executescript(_SCHEMA)
        except BaseException:
            conn.close()
            os.close(lock)
            raise
        self._conn = conn
        self._lock = lock

    def _close_sync(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
        lock, self._lock = self._lock, None
        if lock is not None:
            os.close(lock)  # releases the flock

    def _write_sync(self, batch: list[Op]) -> None:
        conn = self._conn
        assert conn is not None
        convs: list[tuple[str, float]] = []
        turns: list[tuple[Any, ...]] = []
        events: list[tuple[str, int, str, str]] = []
        exchanges: list[tuple[str, str, int, str, str]] = []
        used: list[tuple[str, str, str]] = []
        dropped: list[tuple[str, str]] = []
        newest: dict[str, int] = {}
        for op in batch:
            kind = op[0]
            if kind == "event":
                ev: StoredEvent = op[1]
                events.append((ev.conversation_id, ev.id, ev.type, ev.data))
                newest[ev.conversation_id] = ev.id
            elif kind == "turn":
                t: TurnRecord = op[2]
                turns.append((op[1], t.turn_id, t.seq, t.user_text, t.state, t.assistant_text, t.error_type))
            elif kind == "exchange":
                x: ThreadExchange = op[2]
                exchanges.append((op[1], x.thread_id, x.seq, x.question, x.answer))
            elif kind == "use_thread":
                used.append((op[1], op[2], op[1]))
            elif kind == "drop_thread":
                dropped.append((op[1], op[2]))
            else:
                convs.append((op[1], op[2]))
        conn.execute("BEGIN IMMEDIATE")
        try:
            if convs:
                conn.executemany("INSERT OR IGNORE INTO conversations (id, created_at) VALUES (?, ?)", convs)
            if events:
                conn.executemany(
                    "INSERT OR REPLACE INTO events (conversation_id, id, type, data) VALUES (?, ?, ?, ?)",
                    events,
                )
            if turns:
                conn.executemany(
                    "INSERT INTO turns"
                    " (conversation_id, turn_id, seq, user_text, state, assistant_text, error_type)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (conversation_id, turn_id) DO UPDATE SET"
                    " state = excluded.state, assistant_text = excluded.assistant_text,"
                    " error_type = excluded.error_type",
                    turns,
                )
            if exchanges:
                conn.executemany(
                    "INSERT OR REPLACE INTO btw_exchanges (conversation_id, thread_id, seq, question, answer)"
                    " VALUES (?, ?, ?, ?, ?)",
                    exchanges,
                )
                conn.executemany(  # a thread keeps its newest exchanges only, as in memory
                    "DELETE FROM btw_exchanges WHERE conversation_id = ? AND thread_id = ? AND seq <= ?",
                    [(cid, tid, seq - MAX_THREAD_EXCHANGES) for cid, tid, seq, _, _ in exchanges
                     if seq > MAX_THREAD_EXCHANGES],
                )
            if used:  # in order: each use numbers its thread the newest of its conversation
                conn.executemany(
                    "INSERT INTO btw_threads (conversation_id, thread_id, used) VALUES (?, ?,"
                    " (SELECT COALESCE(MAX(used), 0) + 1 FROM btw_threads WHERE conversation_id = ?))"
                    " ON CONFLICT (conversation_id, thread_id) DO UPDATE SET used = excluded.used",
                    used,
                )
            if dropped:  # after the inserts: a thread is dropped only once it is the least recently used
                conn.executemany(
                    "DELETE FROM btw_exchanges WHERE conversation_id = ? AND thread_id = ?", dropped
                )
                conn.executemany(
                    "DELETE FROM btw_threads WHERE conversation_id = ? AND thread_id = ?", dropped
                )
            trims = [(cid, last - self.retention) for cid, last in newest.items() if last > self.retention]
            if trims:
                conn.executemany("DELETE FROM events WHERE conversation_id = ? AND id <= ?", trims)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def _load_sync(self, conversation_id: str) -> ConversationRecord | None:
        conn = self._conn
        assert conn is not None
        row = conn.execute("SELECT created_at FROM conversations WHERE id = ?", (conversation_id,)).fetchone()
        if row is None:
            return None
        turns = [
            TurnRecord(
                turn_id=r[0], seq=r[1], user_text=r[2], state=r[3], assistant_text=r[4], error_type=r[5]
            )
            for r in conn.execute(
                "SELECT turn_id, seq, user_text, state, assistant_text, error_type FROM turns"
                " WHERE conversation_id = ? ORDER BY seq",
                (conversation_id,),
            )
        ]
        last = conn.execute(
            "SELECT MAX(id) FROM events WHERE conversation_id = ?", (conversation_id,)
        ).fetchone()
        exchanges = [
            ThreadExchange(thread_id=r[0], seq=r[1], question=r[2], answer=r[3])
            for r in conn.execute(
                "SELECT thread_id, seq, question, answer FROM btw_exchanges WHERE conversation_id = ?"
                " ORDER BY thread_id, seq",
                (conversation_id,),
            )
        ]
        threads = [
            r[0]
            for r in conn.execute(
                "SELECT thread_id FROM btw_threads WHERE conversation_id = ? ORDER BY used",
                (conversation_id,),
            )
        ]
        return ConversationRecord(
            conversation_id, float(row[0]), turns, int(last[0] or 0), exchanges, threads
        )

    def _read_sync(self, conversation_id: str, after_id: int, limit: int) -> list[StoredEvent]:
        conn = self._conn
        assert conn is not None
        rows = conn.execute(
            "SELECT id, type, data FROM events WHERE conversation_id = ? AND id > ? ORDER BY id LIMIT ?",
            (conversation_id, after_id, limit),
        ).fetchall()
        return [StoredEvent(conversation_id, int(r[0]), r[1], r[2]) for r in rows]

    def _unfinished_sync(self) -> list[tuple[str, TurnRecord]]:
        conn = self._conn
        assert conn is not None
        rows = conn.execute(
            "SELECT conversation_id, turn_id, seq, user_text, state, assistant_text, error_type FROM turns"
            f" WHERE state IN ('{TurnState.QUEUED}', '{TurnState.RUNNING}') ORDER BY conversation_id, seq"
        ).fetchall()
        return [
            (
                r[0],
                TurnRecord(
                    turn_id=r[1], seq=r[2], user_text=r[3], state=r[4], assistant_text=r[5], error_type=r[6]
                ),
            )
            for r in rows
        ]
