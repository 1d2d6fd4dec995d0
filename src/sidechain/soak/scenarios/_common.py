"""Helpers shared by the scenarios: timing, error names, waiting on the gateway."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from ...client import GatewayHTTPClient
from ..model import ScenarioResult
from ..probes import percentile
from ..wire import Comparison, post_message

__all__ = ["count_comparison", "exc_kind", "ms", "perf", "run_turn", "wait_for", "wait_turns_done"]

perf = time.perf_counter


def ms(values: list[float], q: float) -> float | None:
    """The ``q`` quantile of millisecond samples, rounded for the report (None for no samples)."""
    p = percentile(values, q)
    return None if p is None else round(p, 3)


def count_comparison(res: ScenarioResult, cmp: Comparison) -> None:
    """Add a comparison's lost and repeated events to the counters; events delivered out of order (an
    id after a higher one) are counted as errors."""
    res.lost_events += cmp.lost
    res.repeated_events += cmp.repeated
    if cmp.out_of_order:
        res.error("events delivered out of order", cmp.out_of_order)


def exc_kind(exc: BaseException | None) -> str:
    """The error's type name, as counted in the report."""
    return type(exc).__name__


async def wait_for(predicate: Callable[[], bool], within: float) -> bool:
    """Poll ``predicate`` every 20 ms for up to ``within`` seconds; whether it became true."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not predicate():
        if loop.time() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


async def wait_turns_done(http: GatewayHTTPClient, cid: str, within: float = 60.0) -> None:
    """Poll the conversation until no turn runs or waits (``TimeoutError`` after ``within`` s)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        conv = await http.request_json("GET", f"/v1/conversations/{cid}")
        if isinstance(conv, dict) and not conv.get("active_turn") and not conv.get("queued_turns"):
            return
        if loop.time() > deadline:
            raise TimeoutError(f"the turns of {cid} did not end within {within} s")
        await asyncio.sleep(0.02)


async def run_turn(http: GatewayHTTPClient, cid: str, text: str) -> None:
    """Send a message and wait until no turn of the conversation runs or waits."""
    await post_message(http, cid, text)
    await wait_turns_done(http, cid)
