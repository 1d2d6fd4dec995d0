"""sidechain: a streaming stack for agent gateways.

The public API is re-exported here; import from ``sidechain``, not from its submodules.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from . import sse
from .client import (
    BtwAnswer,
    BtwClient,
    Conversation,
    EventStream,
    EventStreamClient,
    Fault,
    GatewayHTTPClient,
    RetryPolicy,
    SafeByteStream,
    Session,
    StreamObservation,
)
from .errors import (
    ConnectError,
    ConnectTimeout,
    DeadlineExceeded,
    EncodeError,
    HTTPStatusError,
    IdleTimeout,
    ProtocolError,
    ReadError,
    ReadTimeout,
    RemoteError,
    RetryExhausted,
    SessionInvalidated,
    SidechainError,
    StreamInterrupted,
    StreamTruncated,
    TotalTimeout,
    TransportError,
)
from .sse import Comment, Decoder, Encoder, Event, encode

try:
    __version__ = version("sidechain")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0.0.0"

__all__ = [
    "BtwAnswer",
    "BtwClient",
    "Comment",
    "ConnectError",
    "ConnectTimeout",
    "Conversation",
    "DeadlineExceeded",
    "Decoder",
    "EncodeError",
    "Encoder",
    "Event",
    "EventStream",
    "EventStreamClient",
    "Fault",
    "GatewayHTTPClient",
    "HTTPStatusError",
    "IdleTimeout",
    "ProtocolError",
    "ReadError",
    "ReadTimeout",
    "RemoteError",
    "RetryExhausted",
    "RetryPolicy",
    "SafeByteStream",
    "Session",
    "SessionInvalidated",
    "SidechainError",
    "StreamInterrupted",
    "StreamObservation",
    "StreamTruncated",
    "TotalTimeout",
    "TransportError",
    "__version__",
    "encode",
    "sse",
]
