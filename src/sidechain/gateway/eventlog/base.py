"""The event log protocol: what every store (memory, sqlite, later Redis Streams) guarantees.

Writes are *enqueued* synchronously and never block the event loop; they become durable in the order
they were enqueued. The log calls its ``sink`` (on the event loop, in append order) with events only
once they are durable, so no client ever sees an event a restart could forget. Event ids are assigned
by the caller: contiguous integers per conversation, starting at 1.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import msgspec

__all__ = [
    "ConversationRecord",
    "EventLog",
    "EventSink",
    "StoreClosed",
    "StoreInUse",
    "StoredEvent",
    "TurnRecord",
    "TurnState",
]


class StoredEvent(msgspec.Struct, frozen=True, gc=False):
    """One event of a conversation's log. ``data`` is the JSON object as text, encoded once."""

    conversation_id: str
    id: int
    type: str
    data: str


class TurnState:
    """The states a turn moves through: queued → running → completed | failed (or queued → failed).

    A note (``POST .../notes``) is stored in the same sequence as the turns, with the state ``note``:
    part of the history, never run."""

    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    NOTE = "note"
    UNFINISHED = (QUEUED, RUNNING)


class TurnRecord(msgspec.Struct, frozen=True):
    """A turn as stored: the user's message and, once completed, the assistant's answer."""

    turn_id: str
    seq: int
    user_text: str
    state: str
    assistant_text: str | None = None
    error_type: str | None = None


class StoreInUse(RuntimeError):
    """Another gateway process has the store open (a store takes one gateway at a time)."""


class StoreClosed(RuntimeError):
    """``flush`` was waiting when the store closed without making those writes durable."""


#: Longest wait, in seconds, before a durable store sends a failed batch again.
RETRY_MAX_DELAY = 2.0

#: Completed exchanges a btw thread keeps as context, in memory and in a store (the oldest go first).
MAX_THREAD_EXCHANGES = 50


class ThreadExchange(msgspec.Struct, frozen=True):
    """One completed btw of a thread, kept as context for the thread's next question."""

    thread_id: str
    seq: int
    question: str
    answer: str


class ConversationRecord(msgspec.Struct, frozen=True):
    """A conversation as loaded from a store: its turns in order, the last event id written, its btw
    threads' completed exchanges (by thread, in order) and its btw thread ids, least recently used
    first (a thread with no completed exchange yet is there too)."""

    id: str
    created_at: float
    turns: list[TurnRecord]
    last_event_id: int
    exchanges: list[ThreadExchange] = []
    threads: list[str] = []


EventSink = Callable[[Sequence[StoredEvent]], None]


class EventLog(Protocol):
    """A per-conversation append-only log of events plus the conversation and turn records.

    * ``create_conversation``, ``save_turn`` and ``append`` enqueue and return at once; they never raise
      for I/O reasons. A durable store sends a failed write again, in order, until it succeeds; its
      events reach the sink only then, and nothing enqueued after it is written before it.
    * ``flush`` returns once everything enqueued before the call is durable and delivered to the sink
      (it waits while the store fails: callers bound it).
    * At most ``retention`` events are kept per conversation: the oldest are trimmed first.
    * ``close`` flushes (a durable store gives up after its ``close_timeout``), then releases every
      resource (threads, files, connections). It is idempotent.
    """

    #: True when events survive a process restart.
    durable: bool
    @property
    def failing(self) -> bool:
        """True while the store's writes fail (a durable store sends them again until they succeed)."""
        ...
    #: Events kept per conversation.
    retention: int

    async def open(self, sink: EventSink) -> None:
        """Open the store; ``sink`` receives durable events from now on."""
        ...

    async def close(self) -> None:
        """Flush and release everything. After close, writes are ignored."""
        ...

    def create_conversation(self, conversation_id: str, created_at: float) -> None:
        """Enqueue the creation of a conversation."""
        ...

    def save_turn(self, conversation_id: str, turn: TurnRecord) -> None:
        """Enqueue an insert-or-update of a turn (keyed by ``turn_id``)."""
        ...

    def append(self, event: StoredEvent) -> None:
        """Enqueue one event; the sink gets it once durable."""
        ...

    def save_exchange(self, conversation_id: str, exchange: ThreadExchange) -> None:
        """Enqueue a completed btw of a thread (keyed by thread id and seq)."""
        ...

    def use_thread(self, conversation_id: str, thread_id: str) -> None:
        """Enqueue a use of a btw thread: it exists (even with no exchange yet) and is now the most
        recently used of its conversation."""
        ...

    def drop_thread(self, conversation_id: str, thread_id: str) -> None:
        """Enqueue the removal of a thread and its stored exchanges."""
        ...

    async def flush(self) -> None:
        """Wait until everything enqueued so far is durable and delivered to the sink."""
        ...

    async def load_conversation(self, conversation_id: str) -> ConversationRecord | None:
        """The stored conversation, or None when unknown."""
        ...

    async def read(self, conversation_id: str, after_id: int, limit: int) -> list[StoredEvent]:
        """Up to ``limit`` retained events with ``id > after_id``, in id order."""
        ...

    async def unfinished_turns(self) -> list[tuple[str, TurnRecord]]:
        """``(conversation_id, turn)`` for every turn left queued or running (after a crash)."""
        ...


#: One enqueued write of a durable store: ``("conv", id, created_at)`` | ``("turn", conv_id, TurnRecord)``
#: | ``("event", StoredEvent)`` | ``("exchange", conv_id, ThreadExchange)`` | ``("use_thread", conv_id,
#: thread_id)`` | ``("drop_thread", conv_id, thread_id)``.
Op = tuple[Any, ...]

_log = logging.getLogger("sidechain.gateway.eventlog")


class QueuedWrites:
    """The write side of a durable store: every write is enqueued (in order) and returns at once; the
    store sends batches from the front of ``_pending`` and calls :meth:`_written` for each one that is
    durable, which delivers its events to the sink and releases the ``flush`` callers it completes.

    Subclasses implement :meth:`_accepting` (open, not closed) and :meth:`_kick` (make sure a batch is
    on its way).
    """

    def __init__(self) -> None:
        self._pending: list[Op] = []
        self._enqueued = 0
        self._committed = 0
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._sink: EventSink | None = None
        #: Failed writes so far (each batch is sent again until it is durable).
        self.write_failures = 0
        self._streak = 0  # failures in a row of the batch at the front

    @property
    def failing(self) -> bool:
        """Whether the batch at the front failed and waits to be sent again."""
        return self._streak > 0

    def _accepting(self) -> bool:
        raise NotImplementedError

    def _kick(self) -> None:
        raise NotImplementedError

    def _enqueue(self, op: Op) -> None:
        if not self._accepting():
            _log.warning("write to a closed event log ignored: %s", op[0])
            return
        self._pending.append(op)
        self._enqueued += 1
        self._kick()

    def create_conversation(self, conversation_id: str, created_at: float) -> None:
        self._enqueue(("conv", conversation_id, created_at))

    def save_turn(self, conversation_id: str, turn: TurnRecord) -> None:
        self._enqueue(("turn", conversation_id, turn))

    def append(self, event: StoredEvent) -> None:
        self._enqueue(("event", event))

    def save_exchange(self, conversation_id: str, exchange: ThreadExchange) -> None:
        self._enqueue(("exchange", conversation_id, exchange))

    def use_thread(self, conversation_id: str, thread_id: str) -> None:
        self._enqueue(("use_thread", conversation_id, thread_id))

    def drop_thread(self, conversation_id: str, thread_id: str) -> None:
        self._enqueue(("drop_thread", conversation_id, thread_id))

    async def flush(self) -> None:
        """Wait until every write enqueued before this call is durable and its events delivered."""
        target = self._enqueued
        if self._committed >= target:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((target, fut))
        await fut

    def _written(self, batch: list[Op], what: str) -> None:
        """``batch`` (the front of what was enqueued) is durable: deliver its events, release waiters."""
        if self._streak:
            _log.warning("%s store writes again after %d failed writes", what, self._streak)
            self._streak = 0
        self._committed += len(batch)
        events = [op[1] for op in batch if op[0] == "event"]
        if events and self._sink is not None:
            try:
                self._sink(events)
            except Exception:
                _log.exception("event sink failed")
        self._release_waiters(closing=False)

    def _failed(self, batch: list[Op], exc: BaseException, what: str) -> float:
        """Writing ``batch`` failed: count it, log it (the first time, then every 20th), and return how
        long to wait before sending it again."""
        self.write_failures += 1
        self._streak += 1
        delay: float = min(RETRY_MAX_DELAY, 0.05 * 2.0 ** min(self._streak - 1, 10))
        if self._streak == 1 or self._streak % 20 == 0:
            _log.error("%s write of %d operations failed (%d in a row); sending it again in %.2fs",
                       what, len(batch), self._streak, delay, exc_info=exc)
        return delay

    async def _flush_before_close(self, within: float, what: str) -> None:
        """Flush for at most ``within`` seconds; what is still unwritten then is given up (logged)."""
        try:
            async with asyncio.timeout(within):
                await self.flush()
        except TimeoutError:
            _log.error("%s store still failing at close: %d operations never written", what,
                       len(self._pending))

    def _release_waiters(self, *, closing: bool) -> None:
        """Return the ``flush`` callers whose writes are durable; at close, fail the others with
        :class:`StoreClosed` (their writes were given up). Clears the sink at close."""
        still: list[tuple[int, asyncio.Future[None]]] = []
        for target, fut in self._waiters:
            if fut.done():
                continue
            if target <= self._committed:
                fut.set_result(None)
            elif closing:
                fut.set_exception(StoreClosed("the store closed before these writes were made durable"))
            else:
                still.append((target, fut))
        self._waiters = still
        if closing:
            self._sink = None
