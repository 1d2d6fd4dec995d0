"""Gateway configuration: one frozen dataclass, every limit named and documented."""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
from dataclasses import dataclass

from .eventlog import open_event_log

__all__ = ["GatewayConfig", "default_store_spec", "is_loopback_host"]


def default_store_spec() -> str:
    """The default durable store: ``sqlite:`` in the user's data directory (created if missing)."""
    import platformdirs

    directory = platformdirs.user_data_dir("sidechain", appauthor=False)
    return "sqlite:" + os.path.join(directory, "gateway.sqlite3")


def is_loopback_host(host: str) -> bool:
    """Whether ``host`` only accepts connections from this machine (127.0.0.0/8, ::1, localhost)."""
    if host.lower() in {"localhost", "localhost.localdomain"}:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    """Everything the gateway needs to run. Immutable; derive variants with :meth:`replace`.

    Limits are enforced by the gateway and documented in ``docs/protocol.md``.
    """

    #: Interface to listen on. Anything but loopback requires a bearer token.
    host: str = "127.0.0.1"
    #: TCP port; 0 picks a free one (the real port is printed and exposed).
    port: int = 8765
    #: ``echo`` (embedded offline model) or ``openai:BASE_URL:MODEL``.
    model: str = "echo"
    #: ``memory``, ``sqlite:PATH`` or ``redis://HOST:PORT/DB[?prefix=P]``. The ``serve`` command defaults
    #: to :func:`default_store_spec`.
    store: str = "memory"
    #: Bearer token required on every route but ``/healthz``; None disables auth (loopback only).
    token: str | None = None
    #: Echo model pace in tokens per second; 0 streams as fast as the loop allows.
    echo_pace: float = 30.0
    #: Seconds of silence on an event stream before a ``: keepalive`` comment is sent.
    keepalive_interval: float = 15.0
    #: Seconds a btw keeps generating after its last reader left, and is kept after it ended.
    btw_grace: float = 30.0
    #: Events kept per conversation; older ones are trimmed (a resume before them gets ``resume_gap``).
    retention: int = 10_000
    #: Largest request body accepted, in bytes (413 beyond, checked while reading).
    max_body_bytes: int = 256 * 1024
    #: Longest user message, in characters (400 beyond).
    max_message_chars: int = 32_000
    #: Longest btw question, in characters (400 beyond).
    max_question_chars: int = 8_000
    #: Queued (not yet started) turns allowed per conversation (429 beyond).
    max_queued_turns: int = 16
    #: Unfinished btws allowed per conversation (429 beyond).
    max_active_btws: int = 8
    #: btw threads kept per conversation; beyond, the least recently used one is dropped (memory and store).
    max_btw_threads: int = 256
    #: How many events a live subscriber may lag behind the newest before it is dropped (slow_consumer).
    subscriber_queue: int = 1024
    #: Seconds a dropped slow subscriber gets to take its final ``error`` event before the connection closes.
    slow_consumer_grace: float = 5.0
    #: Reconnection hint sent once per stream as ``retry:``, in milliseconds.
    retry_ms: int = 2_000
    #: Origins allowed by CORS; empty means CORS is off.
    cors_origins: tuple[str, ...] = ()
    #: Seconds a loaded conversation may stay unused (no request, no open stream, no turn or btw running)
    #: before it is dropped from memory; it is loaded again from the store when next asked for. Its btw
    #: threads' completed exchanges are stored with it. 0 keeps every conversation loaded.
    conversation_idle_evict: float = 900.0
    #: Seconds to wait for open streams to take their ``gateway.shutdown`` event on shutdown.
    shutdown_grace: float = 5.0
    #: Seconds a request waits for the store to confirm its writes (a failing store is retried until
    #: it works) before it is answered 503 ``store_unavailable``.
    store_timeout: float = 10.0
    #: Upstream (openai) connect timeout, seconds.
    upstream_connect_timeout: float = 10.0
    #: Upstream (openai) time allowed between two received events, seconds.
    upstream_idle_timeout: float = 60.0
    #: Upstream requests sent per generation: failures before the first delta (connect errors,
    #: timeouts, 408/429/5xx) are retried with backoff and ``Retry-After``, up to this many requests.
    upstream_max_attempts: int = 3
    #: A ``Retry-After`` longer than this (seconds) fails the generation at once instead of waiting.
    upstream_retry_after_cap: float = 5.0
    #: Log one line per request to the ``sidechain.gateway.access`` logger.
    access_log: bool = True

    def replace(self, **changes: object) -> GatewayConfig:
        """A copy with ``changes`` applied (unknown names raise ``TypeError``)."""
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    @property
    def requires_token(self) -> bool:
        """True when the listening host is reachable from other machines."""
        return not is_loopback_host(self.host)

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first setting that makes no sense."""
        positive = {
            "retention": self.retention,
            "max_body_bytes": self.max_body_bytes,
            "max_message_chars": self.max_message_chars,
            "max_question_chars": self.max_question_chars,
            "subscriber_queue": self.subscriber_queue,
            "keepalive_interval": self.keepalive_interval,
            "max_active_btws": self.max_active_btws,
            "max_btw_threads": self.max_btw_threads,
        }
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{f.name} must be a finite number, got {value!r}")
        for name, value in positive.items():
            if value <= 0:
                raise ValueError(f"{name} must be positive, got {value!r}")
        for name, value in {
            "echo_pace": self.echo_pace,
            "btw_grace": self.btw_grace,
            "retry_ms": self.retry_ms,
            "max_queued_turns": self.max_queued_turns,
            "slow_consumer_grace": self.slow_consumer_grace,
            "shutdown_grace": self.shutdown_grace,
            "store_timeout": self.store_timeout,
            "conversation_idle_evict": self.conversation_idle_evict,
        }.items():
            if value < 0:
                raise ValueError(f"{name} must not be negative, got {value!r}")
        if not (0 <= self.port <= 65535):
            raise ValueError(f"port must be 0..65535, got {self.port}")
        if self.requires_token and not self.token:
            raise ValueError(f"a token is required when listening on {self.host!r} (not loopback)")
        open_event_log(self.store, retention=max(1, self.retention))  # ValueError for a bad spec; no I/O
