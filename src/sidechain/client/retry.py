"""RetryPolicy: pure decisions about retrying and resuming streams. It never sleeps and never sends.

Given the attempt number, the error and what was already delivered, :meth:`RetryPolicy.decide` answers
"retry after N s", "resume from id X after N s" or "give up with this error". The jitter source and
the wall clock are parameters, so the policy is unit-testable with a seeded RNG and a fake clock.
"""

from __future__ import annotations

import email.utils
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from ..errors import (
    HTTPStatusError,
    RetryExhausted,
    SidechainError,
    StreamInterrupted,
    StreamTruncated,
    TotalTimeout,
    TransportError,
)
from ..sse import Event

__all__ = ["DEFAULT_RETRY_STATUSES", "Decision", "RetryPolicy", "parse_retry_after"]

DEFAULT_RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})


@dataclass(frozen=True, slots=True)
class Decision:
    """What to do after a failed attempt.

    ``action`` is ``"retry"`` (send the request again from the start), ``"resume"`` (send it again with
    ``Last-Event-ID: last_event_id``) or ``"give_up"`` (raise ``error``). ``delay`` is the wait in
    seconds before the next attempt.
    """

    action: Literal["retry", "resume", "give_up"]
    delay: float = 0.0
    last_event_id: str | None = None
    error: BaseException | None = None


def parse_retry_after(headers: Mapping[str, str], *, now: float | None = None) -> float | None:
    """The wait a response asks for, in seconds, or None.

    Understands ``retry-after-ms`` (milliseconds, as OpenAI-compatible servers send) and ``Retry-After``
    as delay-seconds or an HTTP date (relative to ``now``, a Unix time; defaults to the wall clock).
    Negative or unparseable values are ignored.
    """
    lowered = {k.lower(): v for k, v in headers.items()}
    ms = lowered.get("retry-after-ms")
    if ms is not None:
        try:
            value = float(ms) / 1000.0
            if value >= 0:
                return value
        except ValueError:
            pass
    raw = lowered.get("retry-after")
    if raw is None:
        return None
    raw = raw.strip()
    try:
        seconds = float(raw)
        return seconds if seconds >= 0 else None
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:  # pragma: no cover - older Pythons returned None
        return None
    current = time.time() if now is None else now
    return max(0.0, when.timestamp() - current)


@dataclass(frozen=True)
class RetryPolicy:
    """How a streaming call retries.

    * Before the first event: connect errors, timeouts and ``retry_statuses`` are retried with
      full-jitter exponential backoff (``uniform(0, min(max_delay, base_delay * 2**(attempt-1)))``),
      or after the server's ``Retry-After`` when it gave one. A ``Retry-After`` above
      ``retry_after_cap`` gives up at once with :class:`RetryExhausted` carrying the asked wait.
    * After the first event: when the server gave ids (``last_event_id``) and ``resume`` is true, the
      call resumes with ``Last-Event-ID``; otherwise it gives up with :class:`StreamInterrupted`
      carrying the delivered events.
    * Other 4xx statuses, protocol errors and :class:`TotalTimeout` give up at once with that error.
    * ``max_attempts`` counts every request sent, resumes included.
    """

    max_attempts: int = 5
    base_delay: float = 0.2
    max_delay: float = 10.0
    retry_after_cap: float = 60.0
    retry_statuses: frozenset[int] = DEFAULT_RETRY_STATUSES
    resume: bool = True
    jitter: Callable[[float, float], float] = field(default=random.uniform, repr=False, compare=False)
    clock: Callable[[], float] = field(default=time.time, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if self.base_delay < 0 or self.max_delay < 0 or self.retry_after_cap < 0:
            raise ValueError("delays must be non-negative")

    @classmethod
    def never(cls) -> RetryPolicy:
        """A policy that never retries."""
        return cls(max_attempts=1)

    def backoff(self, attempt: int) -> float:
        """Full-jitter exponential backoff for the given attempt (1 = the first retry)."""
        ceiling = min(self.max_delay, self.base_delay * (2 ** max(0, attempt - 1)))
        return self.jitter(0.0, ceiling)

    def is_retryable(self, error: BaseException) -> bool:
        """Whether this error, by its kind alone, may succeed if the request is sent again."""
        if isinstance(error, HTTPStatusError):
            return error.status in self.retry_statuses
        if isinstance(error, TotalTimeout):
            return False
        return isinstance(error, TransportError | StreamTruncated)

    def decide(
        self,
        attempt: int,
        error: BaseException,
        *,
        delivered: int = 0,
        last_event_id: str = "",
        delivered_events: Sequence[Event] = (),
    ) -> Decision:
        """Decide what follows attempt number ``attempt`` (1-based) failing with ``error``.

        ``delivered`` counts the events the caller already received, ``delivered_events`` holds them
        (for :class:`StreamInterrupted`), ``last_event_id`` is the id in force.
        """
        if not self.is_retryable(error):
            return Decision("give_up", error=error)
        asked: float | None = None
        if isinstance(error, HTTPStatusError):
            asked = parse_retry_after(error.headers, now=self.clock())
            if asked is not None and asked > self.retry_after_cap:
                return Decision(
                    "give_up",
                    error=RetryExhausted(
                        f"server asked to retry after {asked:.1f}s, above the cap of {self.retry_after_cap}s",
                        attempts=attempt,
                        last_error=error,
                        retry_after=asked,
                    ),
                )
        if attempt >= self.max_attempts:
            return Decision(
                "give_up",
                error=RetryExhausted(
                    f"gave up after {attempt} attempt(s): {error}", attempts=attempt, last_error=error
                ),
            )
        delay = asked if asked is not None else self.backoff(attempt)
        if not delivered:
            # nothing delivered: a plain retry, resuming only if the stream already set an id
            if last_event_id and self.resume:
                return Decision("resume", delay=delay, last_event_id=last_event_id)
            return Decision("retry", delay=delay)
        if last_event_id and self.resume:
            return Decision("resume", delay=delay, last_event_id=last_event_id)
        cause = error if isinstance(error, SidechainError) else None
        return Decision(
            "give_up",
            error=StreamInterrupted(
                f"stream broke after {delivered} event(s) and the server gave no id to resume from: "
                f"{error}",
                delivered=list(delivered_events),
                cause=cause,
            ),
        )
