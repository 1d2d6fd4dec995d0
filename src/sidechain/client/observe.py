"""Observation hooks: what a streaming call reports to logs and metrics."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Observer", "StreamObservation"]


@dataclass(frozen=True, slots=True)
class StreamObservation:
    """One moment in a stream's life.

    ``kind`` is one of ``connect`` (a request is being sent), ``first_byte`` (headers arrived),
    ``first_event``, ``retry`` (a failed attempt will be retried or resumed after ``info["delay"]``),
    ``stall`` (a deadline fired: ``info["deadline"]``) and ``close``. ``elapsed`` is seconds since the call
    started.
    """

    kind: str
    url: str
    elapsed: float
    info: dict[str, Any] = field(default_factory=dict)


Observer = Callable[[StreamObservation], None]
