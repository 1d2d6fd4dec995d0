"""What every scenario is given: the gateways to target, the sizes, a seeded RNG, a progress line."""

from __future__ import annotations

import asyncio
import dataclasses
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .probes import GcPauses

__all__ = ["FULL", "QUICK", "Sizes", "SoakContext", "Targets"]


@dataclass(frozen=True)
class Sizes:
    """How big each scenario runs. :data:`FULL` is the issue's size, :data:`QUICK` the CI one."""

    s1_calls: int
    s1_concurrency: int
    s2_sessions: int
    s2_parallel: int
    s3_calls: int
    s3_concurrency: int
    s4_repeats: int
    s5_streams: int
    s5_batch: int
    s6_streams: int
    s6_conversations: int
    s7_past_grace: bool
    s8_duration: float

    def replace(self, **changes: Any) -> Sizes:
        return dataclasses.replace(self, **changes)


FULL = Sizes(
    s1_calls=10_000, s1_concurrency=200,
    s2_sessions=1_000, s2_parallel=25,
    s3_calls=1_000, s3_concurrency=50,
    s4_repeats=20,
    s5_streams=1_000, s5_batch=100,
    s6_streams=200, s6_conversations=20,
    s7_past_grace=True,
    s8_duration=1800.0,
)

QUICK = Sizes(
    s1_calls=1_000, s1_concurrency=50,
    s2_sessions=200, s2_parallel=20,
    s3_calls=200, s3_concurrency=40,
    s4_repeats=4,
    s5_streams=200, s5_batch=50,
    s6_streams=50, s6_conversations=10,
    s7_past_grace=False,
    s8_duration=120.0,
)


@dataclass(frozen=True)
class Targets:
    """Base URLs of the gateways the scenarios use.

    ``paced`` streams its echo answers at 100 tokens/s (cancels and faults land mid-answer), ``slow`` at
    5 tokens/s with a 1 s btw grace (streams stay open for seconds), ``fast`` as fast as it can (bursts
    for slow consumers; whole answers sent before a stall, so a deadline's lateness is measurable).
    With ``--url`` all three are that gateway and ``external`` is true. ``pids`` maps a name to the
    process id of a gateway this run started (for its RSS).
    """

    paced: str
    slow: str
    fast: str
    external: bool = False
    pids: dict[str, int] = field(default_factory=dict)


@dataclass
class SoakContext:
    targets: Targets
    sizes: Sizes
    rng: random.Random
    progress: Callable[[str], None]
    #: Tasks still running after a forced cancel: the runner reaps and reports them.
    stuck: list[asyncio.Future[Any]] = field(default_factory=list)
    quick: bool = False
    gc_pauses: GcPauses = field(default_factory=GcPauses)
    #: Tallies the warnings caught so far (a long scenario calls it now and then to keep memory flat).
    flush_warnings: Callable[[], None] = field(default=lambda: None)
