"""Gateway metrics, rendered in the Prometheus text exposition format (version 0.0.4)."""

from __future__ import annotations

__all__ = ["Metrics"]

_HELP: dict[str, tuple[str, str]] = {
    "event_streams_open": ("gauge", "Open conversation event streams (GET .../events)."),
    "btw_streams_open": ("gauge", "Open btw response streams."),
    "turns_active": ("gauge", "Main turns currently generating."),
    "btws_active": ("gauge", "btw answers currently generating."),
    "conversations_loaded": ("gauge", "Conversations held in memory."),
    "conversations_evicted_total": ("counter", "Idle conversations dropped from memory (reloaded on use)."),
    "events_written_total": ("counter", "Events appended to the conversation event logs."),
    "resumes_total": ("counter", "Streams resumed with Last-Event-ID (event streams and btws)."),
    "client_disconnects_total": ("counter", "Streams that ended because the client went away."),
    "slow_consumers_total": ("counter", "Event-stream subscribers dropped for falling behind."),
    "upstream_errors_total": (
        "counter",
        "Model generations that failed upstream (HTTP error, drop, truncation).",
    ),
    "store_unavailable_total": ("counter", "Requests answered 503 store_unavailable (the store failed)."),
    "http_requests_total": ("counter", "HTTP requests answered."),
}


class Metrics:
    """Plain integer counters and gauges, updated on the event loop thread only."""

    __slots__ = tuple(_HELP)

    def __init__(self) -> None:
        for name in _HELP:
            setattr(self, name, 0)

    event_streams_open: int
    btw_streams_open: int
    turns_active: int
    btws_active: int
    conversations_loaded: int
    conversations_evicted_total: int
    events_written_total: int
    resumes_total: int
    client_disconnects_total: int
    slow_consumers_total: int
    upstream_errors_total: int
    store_unavailable_total: int
    http_requests_total: int

    def snapshot(self) -> dict[str, int]:
        """The current values by name (without the ``sidechain_`` prefix)."""
        return {name: int(getattr(self, name)) for name in _HELP}

    def render(self) -> str:
        """The Prometheus text format, every metric prefixed ``sidechain_``."""
        lines: list[str] = []
        for name, (kind, help_text) in _HELP.items():
            full = "sidechain_" + name
            lines.append(f"# HELP {full} {help_text}")
            lines.append(f"# TYPE {full} {kind}")
            lines.append(f"{full} {int(getattr(self, name))}")
        return "\n".join(lines) + "\n"
