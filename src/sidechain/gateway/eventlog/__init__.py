"""Event logs behind one protocol: ``memory``, ``sqlite:PATH`` and ``redis://HOST:PORT/DB``."""

from __future__ import annotations

import os

from .base import (
    MAX_THREAD_EXCHANGES,
    ConversationRecord,
    EventLog,
    EventSink,
    StoreClosed,
    StoredEvent,
    StoreInUse,
    ThreadExchange,
    TurnRecord,
    TurnState,
)
from .memory import MemoryEventLog
from .redis import SCHEMES as REDIS_SCHEMES
from .redis import RedisEventLog
from .sqlite import SqliteEventLog

__all__ = [
    "MAX_THREAD_EXCHANGES",
    "ConversationRecord",
    "EventLog",
    "EventSink",
    "MemoryEventLog",
    "RedisEventLog",
    "SqliteEventLog",
    "StoreClosed",
    "StoreInUse",
    "StoredEvent",
    "ThreadExchange",
    "TurnRecord",
    "TurnState",
    "open_event_log",
]


#: What ``--store`` accepts, for error messages.
STORE_SPECS = "'memory', 'sqlite:PATH' or 'redis://HOST:PORT/DB[?prefix=P]' (also rediss://, unix://)"


def open_event_log(spec: str, *, retention: int) -> EventLog:
    """Build (not open) the log named by ``spec`` (see :data:`STORE_SPECS`); ``ValueError`` otherwise."""
    if spec == "memory":
        return MemoryEventLog(retention=retention)
    if spec.startswith("sqlite:") and len(spec) > len("sqlite:"):
        return SqliteEventLog(os.path.expanduser(spec[len("sqlite:") :]), retention=retention)
    if spec.startswith(REDIS_SCHEMES):
        return RedisEventLog(spec, retention=retention)
    raise ValueError(f"unknown store {spec!r}: use {STORE_SPECS}")
