"""The whole sidechain exception tree.

Every error a caller can see is a :class:`SidechainError`; each carries what a caller needs to decide
what to do next (retry, resume, give up) and says which rule or deadline was broken.

```
SidechainError
├── TransportError            (retryable: the request may succeed if sent again)
│   ├── ConnectError
│   │   └── ConnectTimeout
│   ├── ReadError             (the connection broke while reading)
│   └── DeadlineExceeded
│       ├── ReadTimeout       (no byte for read_timeout)
│       ├── IdleTimeout       (no event for idle_timeout; comments do not count)
│       └── TotalTimeout      (the whole call took longer than total_timeout)
├── HTTPStatusError           (non-2xx answer: status, headers, body excerpt)
├── ProtocolError             (malformed SSE, a limit exceeded, wrong content type)
├── EncodeError               (an event that cannot be written as SSE; also a ValueError)
├── StreamInterrupted         (broke after events were delivered and cannot resume)
├── StreamTruncated           (ended cleanly but before its terminal event)
├── SessionInvalidated        (the session was closed under the stream)
├── RetryExhausted            (retries used up, or the server asked to wait too long)
└── RemoteError               (the gateway ended a stream with an ``error`` event)
```
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from .sse import Event

__all__ = [
    "ConnectError",
    "ConnectTimeout",
    "DeadlineExceeded",
    "EncodeError",
    "HTTPStatusError",
    "IdleTimeout",
    "ProtocolError",
    "ReadError",
    "ReadTimeout",
    "RemoteError",
    "RetryExhausted",
    "SessionInvalidated",
    "SidechainError",
    "StreamInterrupted",
    "StreamTruncated",
    "TotalTimeout",
    "TransportError",
]


class SidechainError(Exception):
    """Base of every error raised by sidechain."""

    #: Whether sending the same request again may succeed.
    retryable: bool = False


class TransportError(SidechainError):
    """The network failed us: connecting, reading or a deadline."""

    retryable = True


class ConnectError(TransportError):
    """The connection could not be opened (refused, reset, DNS, TLS)."""


class ReadError(TransportError):
    """The connection broke while the response was being read (FIN/RST mid-body)."""


class DeadlineExceeded(TransportError):
    """A named deadline passed. ``timeout`` is the configured value in seconds."""

    def __init__(self, message: str, *, timeout: float | None = None) -> None:
        super().__init__(message)
        self.timeout = timeout


class ConnectTimeout(ConnectError, DeadlineExceeded):
    """No connection within ``connect_timeout``."""


class ReadTimeout(DeadlineExceeded):
    """No byte arrived within ``read_timeout``."""


class IdleTimeout(DeadlineExceeded):
    """No event arrived within ``idle_timeout`` (comments and keepalives do not reset it)."""


class TotalTimeout(DeadlineExceeded):
    """The whole call exceeded ``total_timeout``. Not retried: the budget is spent."""

    retryable = False


class HTTPStatusError(SidechainError):
    """The server answered with a status that is not a success.

    ``status``, ``headers`` and ``body`` (the first bytes of the body, decoded) say what it answered;
    ``retryable`` is true for 408, 429 and 5xx gateway errors.
    """

    def __init__(
        self,
        status: int,
        *,
        headers: Mapping[str, str] | None = None,
        body: str = "",
        url: str = "",
        retryable: bool = False,
    ) -> None:
        self.status = status
        self.headers: dict[str, str] = dict(headers or {})
        self.body = body
        self.url = url
        self.retryable = retryable
        excerpt = body[:200]
        super().__init__(f"HTTP {status} from {url or 'server'}" + (f": {excerpt}" if excerpt else ""))


class ProtocolError(SidechainError):
    """The peer broke the protocol: malformed stream, a size limit exceeded, a wrong content type.

    ``rule`` names the broken rule; ``limit`` and ``size`` are set for size limits. ``events`` holds the
    events decoded from the same ``feed`` call before the error, so nothing already parsed is lost.
    """

    def __init__(
        self,
        message: str,
        *,
        rule: str = "",
        limit: int | None = None,
        size: int | None = None,
        events: Sequence[Any] = (),
    ) -> None:
        super().__init__(message)
        self.rule = rule
        self.limit = limit
        self.size = size
        self.events: list[Any] = list(events)


class EncodeError(SidechainError, ValueError):
    """An event cannot be written as SSE (CR, LF or NUL in an id or event name, bad retry value)."""


class StreamInterrupted(SidechainError):
    """The stream broke after delivering events and could not resume (the server gave no ids).

    ``delivered`` holds every event already yielded to the caller, ``cause`` the transport error.
    """

    def __init__(self, message: str, *, delivered: Sequence[Event], cause: BaseException | None) -> None:
        super().__init__(message)
        self.delivered: list[Event] = list(delivered)
        self.cause = cause


class StreamTruncated(SidechainError):
    """The body ended cleanly before any of the expected terminal events.

    ``expected`` is the set of terminal event types, ``last_event_id`` the last id received.
    """

    retryable = True

    def __init__(self, message: str, *, expected: frozenset[str], last_event_id: str = "") -> None:
        super().__init__(message)
        self.expected = expected
        self.last_event_id = last_event_id


class SessionInvalidated(SidechainError):
    """The session the stream was reading from was closed (by any task) while it was open."""


class RetryExhausted(SidechainError):
    """Retries are used up, or the server asked to wait longer than the cap.

    ``attempts`` is how many requests were sent, ``last_error`` the error of the last one and
    ``retry_after`` the wait the server asked for, when that is why we gave up.
    """

    def __init__(
        self,
        message: str,
        *,
        attempts: int,
        last_error: BaseException | None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.attempts = attempts
        self.last_error = last_error
        self.retry_after = retry_after


class RemoteError(SidechainError):
    """The gateway ended a stream with an ``error`` event (or a ``turn.failed``).

    ``type`` is the gateway's machine-readable error type (``cancelled``, ``upstream_error``, ...),
    ``message`` its explanation, ``data`` the whole decoded payload.
    """

    def __init__(self, type: str, message: str, *, data: Mapping[str, Any] | None = None) -> None:
        super().__init__(f"{type}: {message}")
        self.type = type
        self.message = message
        self.data: dict[str, Any] = dict(data or {})
