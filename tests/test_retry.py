"""RetryPolicy is pure: decisions checked with a seeded jitter and a fake clock."""

from __future__ import annotations

import email.utils
import random

import pytest

from sidechain import (
    ConnectError,
    HTTPStatusError,
    IdleTimeout,
    ProtocolError,
    ReadError,
    RetryExhausted,
    RetryPolicy,
    StreamInterrupted,
    StreamTruncated,
    TotalTimeout,
)
from sidechain.client import parse_retry_after
from sidechain.sse import Event

NOW = 1_800_000_000.0


def policy(**kw: object) -> RetryPolicy:
    rng = random.Random(7)
    return RetryPolicy(jitter=rng.uniform, clock=lambda: NOW, **kw)  # type: ignore[arg-type]


def test_full_jitter_backoff_is_bounded_and_grows() -> None:
    p = policy(base_delay=0.1, max_delay=1.0)
    for attempt, ceiling in [(1, 0.1), (2, 0.2), (3, 0.4), (4, 0.8), (5, 1.0), (9, 1.0)]:
        delays = [p.backoff(attempt) for _ in range(200)]
        assert all(0 <= d <= ceiling for d in delays)
        assert max(delays) > ceiling * 0.8  # really uses the range (full jitter)


def test_same_seed_same_decisions() -> None:
    a = [policy().decide(1, ReadError("x")).delay for _ in range(3)]
    b = [policy().decide(1, ReadError("x")).delay for _ in range(3)]
    assert a == b


@pytest.mark.parametrize("error", [ConnectError("c"), ReadError("r"), IdleTimeout("i"),
                                   HTTPStatusError(503), HTTPStatusError(429), HTTPStatusError(408),
                                   StreamTruncated("t", expected=frozenset({"done"}))])
def test_retryable_before_first_event(error: Exception) -> None:
    d = policy().decide(1, error)
    assert d.action == "retry" and d.delay >= 0


@pytest.mark.parametrize("error", [HTTPStatusError(400), HTTPStatusError(404), ProtocolError("p"),
                                   TotalTimeout("t"), ValueError("v")])
def test_not_retryable_gives_up_with_the_error_itself(error: Exception) -> None:
    d = policy().decide(1, error)
    assert d.action == "give_up" and d.error is error


def test_attempts_exhausted() -> None:
    d = policy(max_attempts=3).decide(3, ReadError("r"))
    assert d.action == "give_up"
    assert isinstance(d.error, RetryExhausted) and d.error.attempts == 3


def test_after_first_event_resumes_with_id_or_interrupts_without() -> None:
    d = policy().decide(1, ReadError("r"), delivered=4, last_event_id="17")
    assert d.action == "resume" and d.last_event_id == "17"
    events = [Event("a"), Event("b")]
    d = policy().decide(1, ReadError("r"), delivered=2, delivered_events=events)
    assert d.action == "give_up" and isinstance(d.error, StreamInterrupted)
    assert d.error.delivered == events


def test_resume_disabled() -> None:
    d = policy(resume=False).decide(1, ReadError("r"), delivered=1, last_event_id="3")
    assert isinstance(d.error, StreamInterrupted)


def test_retry_after_seconds_date_and_ms() -> None:
    assert parse_retry_after({"Retry-After": "3"}) == 3
    assert parse_retry_after({"retry-after-ms": "250"}) == 0.25
    date = email.utils.formatdate(NOW + 12, usegmt=True)
    assert parse_retry_after({"Retry-After": date}, now=NOW) == pytest.approx(12, abs=1)
    assert parse_retry_after({"Retry-After": "soon"}) is None
    assert parse_retry_after({"Retry-After": "-4"}) is None
    assert parse_retry_after({}) is None


def test_retry_after_honoured_and_capped() -> None:
    d = policy().decide(1, HTTPStatusError(429, headers={"Retry-After": "2"}))
    assert d.action == "retry" and d.delay == 2
    d = policy(retry_after_cap=30).decide(1, HTTPStatusError(503, headers={"Retry-After": "3600"}))
    assert d.action == "give_up" and isinstance(d.error, RetryExhausted)
    assert d.error.retry_after == 3600
    date = email.utils.formatdate(NOW + 5, usegmt=True)
    d = policy().decide(1, HTTPStatusError(503, headers={"Retry-After": date}))
    assert d.delay == pytest.approx(5, abs=1)


def test_policy_validates() -> None:
    with pytest.raises(ValueError):
        RetryPolicy(max_attempts=0)
    assert RetryPolicy.never().decide(1, ReadError("r")).action == "give_up"
