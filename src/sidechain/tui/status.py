"""What the status bar says about the event stream: a pure function of the client's state."""

from __future__ import annotations

from dataclasses import dataclass

from ..client import EventStreamClient

__all__ = ["StreamState", "describe_stream", "stream_state"]


@dataclass(frozen=True, slots=True)
class StreamState:
    """A snapshot of an :class:`EventStreamClient`'s connection state, in display terms.

    ``level`` is ``ok`` (connected), ``warning`` (connecting or reconnecting) or ``error`` (closed),
    ``text`` the words the status bar shows.
    """

    level: str
    text: str


def describe_stream(
    status: str, *, failures: int = 0, reconnect_at: float | None = None, now: float = 0.0,
    error: str | None = None,
) -> StreamState:
    """``connected``, ``connecting…``, ``reconnecting in N s (attempt k)`` or ``closed``.

    ``failures`` is the client's count of consecutive failed connections, so the connection attempt
    that comes next is attempt ``failures``; ``reconnect_at`` and ``now`` are loop times.
    """
    if status == "open":
        return StreamState("ok", "connected")
    if status in ("idle", "connecting"):
        return StreamState("warning", "connecting…")
    if status == "reconnecting":
        attempt = f"attempt {max(failures, 1)}"
        if reconnect_at is not None:
            wait = max(0.0, reconnect_at - now)
            shown = f"{wait:.0f}" if wait >= 10 else f"{wait:.1f}"
            return StreamState("warning", f"reconnecting in {shown} s ({attempt})")
        return StreamState("warning", f"reconnecting… ({attempt})")
    return StreamState("error", f"closed: {error}" if error else "closed")


def stream_state(events: EventStreamClient | None, now: float, error: str | None = None) -> StreamState:
    """:func:`describe_stream` for a live client (``connecting…`` before there is one)."""
    if events is None:
        return describe_stream("closed", error=error) if error else describe_stream("idle")
    return describe_stream(events.status, failures=events.failures, reconnect_at=events.reconnect_at,
                           now=now, error=error)
