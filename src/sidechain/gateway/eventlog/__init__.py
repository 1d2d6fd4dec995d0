"""Event logs behind one protocol: ``memory`` and ``sqlite:PATH``."""

from __future__ import annotations

import os

from .base import (
    MAX_THREAD_EXCHANGES,
    ConversationRecord,
    EventLog,
    EventSink,
    StoredEvent,
    ThreadExchange,
    TurnRecord,
    TurnState,
)
from .memory import MemoryEventLog
from .sqlite import SqliteEventLog

__all__ = [
    "MAX_THREAD_EXCHANGES",
    "ConversationRecord",
    "EventLog",
    "EventSink",
    "MemoryEventLog",
    "SqliteEventLog",
    "StoredEvent",
    "ThreadExchange",
    "TurnRecord",
    "TurnState",
    "open_event_log",
]


def open_event_log(spec: str, *, retention: int) -> EventLog:
    """Build (not open) the log named by ``spec``: ``memory`` or ``sqlite:PATH``. ``ValueError`` otherwise."""
    if spec == "memory":
        return MemoryEventLog(retention=retention)
    if spec.startswith("sqlite:") and len(spec) > len("sqlite:"):
        return SqliteEventLog(os.path.expanduser(spec[len("sqlite:") :]), retention=retention)
    raise ValueError(f"unknown store {spec!r}: use 'memory' or 'sqlite:PATH'")
