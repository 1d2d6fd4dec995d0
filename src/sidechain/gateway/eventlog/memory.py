"""In-memory event log: fast, bounded by ``retention`` per conversation, gone when the process exits."""

from __future__ import annotations

from collections import deque

from .base import (
    MAX_THREAD_EXCHANGES,
    ConversationRecord,
    EventSink,
    StoredEvent,
    ThreadExchange,
    TurnRecord,
    TurnState,
)

__all__ = ["MemoryEventLog"]


class _Conv:
    __slots__ = ("created_at", "events", "exchanges", "last_id", "threads", "turns")

    def __init__(self, created_at: float, retention: int) -> None:
        self.created_at = created_at
        self.events: deque[StoredEvent] = deque(maxlen=retention)
        self.turns: dict[str, TurnRecord] = {}
        self.exchanges: dict[tuple[str, int], ThreadExchange] = {}
        #: Thread ids, least recently used first (dicts keep insertion order).
        self.threads: dict[str, None] = {}
        self.last_id = 0


class MemoryEventLog:
    """An :class:`~.base.EventLog` in process memory. Events are "durable" (delivered) on append."""

    durable = False
    failing = False

    def __init__(self, *, retention: int) -> None:
        self.retention = retention
        self._convs: dict[str, _Conv] = {}
        self._sink: EventSink | None = None
        self._closed = False

    async def open(self, sink: EventSink) -> None:
        self._sink = sink

    async def close(self) -> None:
        self._closed = True
        self._sink = None

    def create_conversation(self, conversation_id: str, created_at: float) -> None:
        if not self._closed:
            self._convs.setdefault(conversation_id, _Conv(created_at, self.retention))

    def save_turn(self, conversation_id: str, turn: TurnRecord) -> None:
        conv = self._convs.get(conversation_id)
        if conv is not None and not self._closed:
            conv.turns[turn.turn_id] = turn

    def save_exchange(self, conversation_id: str, exchange: ThreadExchange) -> None:
        conv = self._convs.get(conversation_id)
        if conv is not None and not self._closed:
            conv.exchanges[(exchange.thread_id, exchange.seq)] = exchange
            conv.exchanges.pop((exchange.thread_id, exchange.seq - MAX_THREAD_EXCHANGES), None)

    def use_thread(self, conversation_id: str, thread_id: str) -> None:
        conv = self._convs.get(conversation_id)
        if conv is not None and not self._closed:
            conv.threads.pop(thread_id, None)
            conv.threads[thread_id] = None

    def drop_thread(self, conversation_id: str, thread_id: str) -> None:
        conv = self._convs.get(conversation_id)
        if conv is not None and not self._closed:
            conv.threads.pop(thread_id, None)
            for key in [k for k in conv.exchanges if k[0] == thread_id]:
                del conv.exchanges[key]

    def append(self, event: StoredEvent) -> None:
        conv = self._convs.get(event.conversation_id)
        if conv is None or self._closed:
            return
        conv.events.append(event)
        conv.last_id = event.id
        if self._sink is not None:
            self._sink((event,))

    async def flush(self) -> None:
        return None

    async def load_conversation(self, conversation_id: str) -> ConversationRecord | None:
        conv = self._convs.get(conversation_id)
        if conv is None:
            return None
        turns = sorted(conv.turns.values(), key=lambda t: t.seq)
        exchanges = [conv.exchanges[k] for k in sorted(conv.exchanges)]
        return ConversationRecord(conversation_id, conv.created_at, turns, conv.last_id, exchanges,
                                  list(conv.threads))

    async def read(self, conversation_id: str, after_id: int, limit: int) -> list[StoredEvent]:
        conv = self._convs.get(conversation_id)
        if conv is None or not conv.events:
            return []
        start = max(0, after_id + 1 - conv.events[0].id)
        out: list[StoredEvent] = []
        for i in range(start, min(len(conv.events), start + limit)):
            out.append(conv.events[i])
        return out

    async def unfinished_turns(self) -> list[tuple[str, TurnRecord]]:
        return [
            (cid, t)
            for cid, c in self._convs.items()
            for t in c.turns.values()
            if t.state in TurnState.UNFINISHED
        ]
