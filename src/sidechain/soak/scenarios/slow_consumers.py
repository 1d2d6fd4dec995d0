"""Scenario 7: slow consumers against bounded client buffers and the gateway's subscriber bound."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from typing import Any, cast

from ...client import EventStreamClient, Fault, GatewayHTTPClient
from ...sse import Event
from ..context import SoakContext
from ..model import ScenarioResult
from ..probes import rss_mb
from ..wire import (
    compare_id_list,
    create_conversations,
    decode,
    events_path,
    fetch_metrics,
    post_message,
)
from ._common import count_comparison, exc_kind, perf


def _reader_buffer_bytes(client: EventStreamClient) -> int:
    """Bytes waiting in aiohttp's read buffer of the client's current connection (0 when none)."""
    stream: Any = getattr(client, "_stream", None)
    if stream is None:
        return 0
    content: Any = stream.response.content
    return int(getattr(content, "_size", 0))


#: bytes one socket read may add on top of a ``StreamReader`` at its high-water mark before reading
#: pauses (asyncio and uvloop read up to 256 KiB at a time)
_READ_CHUNK = 256 * 1024


def _reader_high_water(client: EventStreamClient) -> int | None:
    """The high-water mark (bytes) past which aiohttp pauses reading the client's connection."""
    stream: Any = getattr(client, "_stream", None)
    if stream is None:
        return None
    high = getattr(stream.response.content, "_high_water", None)
    return high if isinstance(high, int) else None


def read_buffer_bound(high_water: int) -> int:
    """The most bytes aiohttp's read buffer may hold: its high-water mark plus one socket read."""
    return high_water + _READ_CHUNK


def check_bounds(res: ScenarioResult, *, items_peak: int, items_bound: int, bytes_peak: int,
                 bytes_bound: int, dropped: bool, past_grace: bool, slow_consumer_events: int) -> None:
    """Count an error for each bound exceeded, and for a missing ``slow_consumer`` event: a consumer
    that reads again within the grace after the gateway dropped it must receive one."""
    if items_peak > items_bound:
        res.error(f"client item buffer held {items_peak} items, more than buffer_items={items_bound}")
    if bytes_peak > bytes_bound:
        res.error(f"aiohttp read buffer held {bytes_peak} bytes, more than its bound {bytes_bound}")
    if dropped and not past_grace and not slow_consumer_events:
        res.error("dropped within the grace but no slow_consumer error event received")


async def scenario_slow_consumers(ctx: SoakContext, res: ScenarioResult) -> None:
    """7. A consumer that stops reading while the gateway produces a burst far larger than every buffer.

    Shown: the client's item buffer stays at ``buffer_items`` (+ one decoded read), aiohttp's read
    buffer stays bounded (reading pauses), the client's RSS stays flat; the gateway drops the
    subscriber once it lags more than its ``subscriber_queue`` events (an ``error`` ``slow_consumer``
    event when the consumer reads again within the grace, else the connection is closed); the client
    reconnects with ``Last-Event-ID`` and receives every event exactly once.
    """
    variants = ["resume within the grace"]
    if ctx.sizes.s7_past_grace:
        variants.append("stay stalled past the grace")
    summaries: list[str] = []
    for variant in variants:
        summaries.append(await _slow_consumer_once(ctx, res, past_grace=variant != variants[0]))
    res.notes.extend(summaries)


async def _slow_consumer_once(ctx: SoakContext, res: ScenarioResult, *, past_grace: bool) -> str:
    url = ctx.targets.fast
    http = GatewayHTTPClient(url, connect_timeout=10.0)
    (cid,) = await create_conversations(http, 1)
    buffer_items = 64
    metrics0 = await fetch_metrics(url)
    drops0 = metrics0.get("sidechain_slow_consumers_total", 0.0)
    gw_pid = ctx.targets.pids.get("fast")
    gw_rss0 = rss_mb(gw_pid) if gw_pid else None
    big = " ".join(["x" * 1000] * 30)  # 30 deltas of ~1 KB, plus ~30 KB in message.created/completed
    peak_items = peak_bytes = 0
    high_water: int | None = None
    rss0 = rss_mb()
    peak_rss = rss0
    dropped_after: float | None = None
    turns = 0
    error_events: list[str] = []
    faults: list[str] = []
    ids: list[int] = []
    loop = asyncio.get_running_loop()
    async with EventStreamClient(http.url(events_path(cid)), buffer_items=buffer_items,
                                 initial_reconnect_delay=0.05) as events:
        items = cast(AsyncGenerator[Any, None], events.items())
        last_turn = await post_message(http, cid, "hello")
        while not ids:
            first = await anext(items)
            if isinstance(first, Event) and first.id:
                ids.append(int(first.id))
        # the consumer now stops reading; the producer sends turns until the gateway drops it
        stop = asyncio.Event()

        async def produce() -> None:
            nonlocal turns, last_turn
            while not stop.is_set() and turns < 200:
                last_turn = await post_message(http, cid, big)
                turns += 1

        producer = loop.create_task(produce())
        t0 = perf()
        try:
            while perf() - t0 < 60:
                peak_items = max(peak_items, len(getattr(events, "_buffer", ())))
                peak_bytes = max(peak_bytes, _reader_buffer_bytes(events))
                high_water = high_water or _reader_high_water(events)
                peak_rss = max(peak_rss, rss_mb())
                if (await fetch_metrics(url)).get("sidechain_slow_consumers_total", 0.0) > drops0:
                    dropped_after = perf() - t0
                    break
                await asyncio.sleep(0.02)
        finally:
            stop.set()
            await asyncio.wait({producer})
        if producer.exception() is not None:
            res.error(f"producer failed: {exc_kind(producer.exception())}")
        if dropped_after is None:
            if ctx.targets.external:  # its pace may be too slow to outrun the buffers: no verdict
                res.notes.append("the gateway did not drop the stalled subscriber within 60 s "
                                 "(with --url its pace may be too slow for a burst)")
            else:
                res.error("the gateway never dropped the stalled subscriber")
        if past_grace:
            await asyncio.sleep(7.0)  # slow_consumer_grace (5 s) passes: the gateway closes the connection
            peak_items = max(peak_items, len(getattr(events, "_buffer", ())))
            peak_bytes = max(peak_bytes, _reader_buffer_bytes(events))
        # the client's own value (what it was built with), not only what the soak asked for
        configured_items = int(getattr(events, "_max_items", buffer_items))
        # read again, until the last turn sent has ended (not polling the history: it holds megabytes)
        last = 0
        try:
            async with asyncio.timeout(60):
                async for item in items:
                    if isinstance(item, Fault):
                        faults.append(type(item.error).__name__)
                    elif isinstance(item, Event):
                        if item.event == "error" and "slow_consumer" in item.data:
                            error_events.append(item.data)
                            continue
                        ids.append(int(item.id))
                        if item.event in ("turn.completed", "turn.failed") and \
                                decode(item.data).get("turn_id") == last_turn:
                            last = ids[-1]
                            break
        except TimeoutError:
            res.hung_consumers += 1
        await items.aclose()
    res.operations += len(ids)
    count_comparison(res, compare_id_list(ids, last))
    # no connection seen (so no bytes either): aiohttp's default read_bufsize (256 KiB) pauses at 512 KiB
    bytes_bound = read_buffer_bound(high_water or 2 * 256 * 1024)
    check_bounds(res, items_peak=peak_items, items_bound=buffer_items, bytes_peak=peak_bytes,
                 bytes_bound=bytes_bound, dropped=dropped_after is not None, past_grace=past_grace,
                 slow_consumer_events=len(error_events))
    gw_rss1 = rss_mb(gw_pid) if gw_pid else None
    bound = "?"
    for data in error_events:
        message = str(decode(data).get("message", ""))
        bound = next((w for w in message.split() if w.isdigit()), bound)
    label = "past the grace" if past_grace else "within the grace"
    key = "stalled_past_grace" if past_grace else "resumed_within_grace"
    res.figures[key] = {
        "events": last, "turns": turns,
        "dropped_after_s": None if dropped_after is None else round(dropped_after, 2),
        "client_buffer_items_peak": peak_items, "client_buffer_items_bound": buffer_items,
        "client_buffer_items_configured": configured_items,
        "aiohttp_read_buffer_peak_bytes": peak_bytes, "aiohttp_read_buffer_bound_bytes": bytes_bound,
        "client_rss_growth_mb": round(peak_rss - rss0, 1),
        "gateway_bound_events": bound, "slow_consumer_events": len(error_events), "faults": faults,
        "gateway_rss_mb": None if gw_rss0 is None or gw_rss1 is None
        else [round(gw_rss0, 1), round(gw_rss1, 1)],
    }
    drop = f"dropped after {dropped_after:.2f} s" if dropped_after is not None else "NOT dropped"
    told = ("told with an error slow_consumer event (bound: more than "
            f"{bound} events behind)" if error_events else "its connection closed without the final event")
    return (f"stalled consumer, reading again {label}: {drop}, {told}; client buffer peak {peak_items} "
            f"items (buffer_items={configured_items}), aiohttp read buffer peak {peak_bytes / 1024:.0f} KiB "
            f"(bound {bytes_bound / 1024:.0f} KiB), "
            f"client RSS +{peak_rss - rss0:.1f} MB; resumed (faults {faults}) and got all {last} events "
            "exactly once")
