"""The sidechain client: streaming calls that release every resource on every path."""

from __future__ import annotations

from .btw import BtwAnswer, BtwClient
from .conversation import Conversation
from .events import EventStreamClient, Fault, StreamEnded, StreamStatus
from .http import EventStream, GatewayHTTPClient, StreamContext
from .observe import Observer, StreamObservation
from .retry import Decision, RetryPolicy, parse_retry_after
from .safe_stream import SafeByteStream, StreamState
from .sessions import Session

__all__ = [
    "BtwAnswer",
    "BtwClient",
    "Conversation",
    "Decision",
    "EventStream",
    "EventStreamClient",
    "Fault",
    "GatewayHTTPClient",
    "Observer",
    "RetryPolicy",
    "SafeByteStream",
    "Session",
    "StreamContext",
    "StreamEnded",
    "StreamObservation",
    "StreamState",
    "StreamStatus",
    "parse_retry_after",
]
