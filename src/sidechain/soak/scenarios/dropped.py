"""Scenario 5: streams dropped without being closed, then garbage collection."""

from __future__ import annotations

import asyncio
import gc
import math
from typing import Any

from ...client import GatewayHTTPClient, Session
from ...errors import SidechainError
from ..context import SoakContext
from ..model import ScenarioResult
from ..probes import Snapshot, settle
from ..wire import QUESTION, btw_path, create_conversations, fetch_metrics
from ._common import exc_kind, ms, perf

_GAUGE = "sidechain_btw_streams_open"


async def scenario_dropped_streams(ctx: SoakContext, res: ScenarioResult) -> None:
    """5. Streams entered, their first event read, then dropped without being closed, and
    ``gc.collect()``. Per batch: half the streams on dedicated sessions, half on a long-lived pooled
    :class:`Session` (which stays open: only the stream's finalizer can release those), plus one stream
    on a pooled Session dropped with it. Each dropped stream and Session warns once with
    ``ResourceWarning`` (expected, counted apart) and nothing is left: fds back to the baseline, the
    long-lived Session holds no connection, and the gateway sees every stream disconnect while its
    answer is still being generated (it would go on for seconds)."""
    sizes = ctx.sizes
    url = ctx.targets.slow
    http = GatewayHTTPClient(url, connect_timeout=10.0)
    convs = await create_conversations(http, math.ceil((sizes.s5_streams + sizes.s5_batch) / 4))
    baseline_open = (await fetch_metrics(url)).get(_GAUGE)
    expected = 0
    release_ms: list[float] = []
    still_open_at_drop = 0
    done = 0
    async with Session() as shared:
        while done < sizes.s5_streams:
            n = min(sizes.s5_batch, sizes.s5_streams - done)
            before = Snapshot.now()
            opened, serving = await _open_and_drop(http, url, shared, convs, done, n, res)
            expected += opened + 1  # every stream, and the throwaway Session dropped with one of them
            still_open_at_drop += serving
            t0 = perf()
            after = await settle(before, within=3.0)
            if after.fds <= before.fds:
                release_ms.append((perf() - t0) * 1000)
            res.leaked_fds += max(0, after.fds - before.fds)  # still open 3 s after gc
            if shared.connection_count() or shared.open_streams:
                res.error("the long-lived Session still holds dropped streams' connections after gc",
                          max(shared.connection_count(), shared.open_streams))
            done += n
            res.operations += opened
            ctx.progress(f"scenario 5: {done}/{sizes.s5_streams} streams dropped and collected")
    if baseline_open is not None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 3.0
        left = 0.0
        while loop.time() < deadline:
            left = (await fetch_metrics(url)).get(_GAUGE, 0.0) - baseline_open
            if left <= 0:
                break
            await asyncio.sleep(0.05)
        if left > 0:
            res.error("the gateway still serves streams the client dropped", int(left))
    res.figures.update({"expected_finalizer_warnings": expected,
                        "gc_to_fds_released_ms_p99": ms(release_ms, 0.99),
                        "gateway_streams_open_at_drop": still_open_at_drop})
    res.notes.append(
        f"{res.operations} streams dropped mid-answer (the gateway was serving {still_open_at_drop} of them "
        f"when they were dropped); gc → fds back to baseline p99 {ms(release_ms, 0.99)} ms"
    )


async def _open_and_drop(http: GatewayHTTPClient, url: str, shared: Session, convs: list[str], first: int,
                         n: int, res: ScenarioResult) -> tuple[int, int]:
    """Open ``n`` streams (and one more on a throwaway pooled Session), read their first event, then
    drop every reference to them and to the throwaway Session and collect garbage. Returns (streams
    opened and dropped; streams the gateway was serving for this batch just before the drop)."""
    throwaway = Session()
    held: list[Any] = []

    async def open_one(i: int, session: Session | None) -> None:
        cid = convs[(first + i) // 4]
        context = http.stream_post(btw_path(cid), {"question": QUESTION}, session=session)
        try:
            stream = await context.__aenter__()
            await stream.__anext__()
        except (SidechainError, StopAsyncIteration) as exc:
            res.error(f"could not open a stream to drop: {exc_kind(exc)}")
            await context.__aexit__(None, None, None)
            return
        held.append((context, stream))  # no __aexit__, no aclose: dropped below

    before = (await fetch_metrics(url)).get(_GAUGE, 0.0)
    async with asyncio.TaskGroup() as tg:
        for i in range(n):
            tg.create_task(open_one(i, shared if i % 2 else None))
        tg.create_task(open_one(n, throwaway))
    serving = int((await fetch_metrics(url)).get(_GAUGE, 0.0) - before)
    opened = len(held)
    if shared.connection_count() != n // 2:
        res.error("the pooled streams were not all open when dropped")
    held.clear()
    del throwaway
    gc.collect()
    return opened, serving
