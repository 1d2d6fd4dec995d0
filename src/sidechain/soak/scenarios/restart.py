"""Scenario 6: the gateway killed with SIGKILL and restarted under live event streams."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from ...client import EventStreamClient, Fault, GatewayHTTPClient
from ...sse import Event
from ..context import SoakContext
from ..model import ScenarioResult
from ..probes import await_or_hang
from ..wire import (
    EventTuple,
    compare_ids,
    create_conversations,
    decode,
    event_tuple,
    events_path,
    last_event_id,
    post_message,
)
from ._common import count_comparison, exc_kind, perf, wait_for


@dataclass
class _Follower:
    cid: str
    client: EventStreamClient
    events: list[EventTuple] = field(default_factory=list)
    faults: list[Fault] = field(default_factory=list)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    saw_delta: asyncio.Event = field(default_factory=asyncio.Event)
    final_turn: str | None = None
    finished_at: float | None = None

    def expect_final(self, turn_id: str) -> None:
        """The turn after the restart: done once it completed (it may have completed already)."""
        self.final_turn = turn_id
        if any(kind == "turn.completed" and decode(data).get("turn_id") == turn_id
               for _, kind, data in self.events):
            self.done.set()


async def _follow(f: _Follower, res: ScenarioResult) -> None:
    """Consume until the conversation's final turn completed (``f.final_turn``, set later)."""
    try:
        async for item in f.client.items():
            if isinstance(item, Fault):
                f.faults.append(item)
                continue
            if not isinstance(item, Event):
                continue
            if item.event == "gateway.shutdown":
                continue  # a control event: not in the log
            if item.event == "error":
                res.error(f"error event on the stream: {item.data[:80]}")
                continue
            f.events.append(event_tuple(item))
            if item.event == "message.delta":
                f.saw_delta.set()
            final = f.final_turn
            if item.event == "turn.completed" and final and decode(item.data).get("turn_id") == final:
                f.done.set()
            if f.done.is_set():
                return
    finally:
        f.finished_at = perf()


async def scenario_restart(ctx: SoakContext, res: ScenarioResult) -> None:
    """6. A gateway with a sqlite store is killed with SIGKILL and restarted on the same port while
    turns stream to N live :class:`EventStreamClient` streams. Every client must resume by itself, and
    each one's events must equal the conversation's full log (fetched afterwards): none lost, none
    repeated."""
    if ctx.targets.external:
        res.skipped = "needs a gateway this run can kill and restart (not with --url)"
        return
    from ...gateway.testing import GatewayProcess

    sizes = ctx.sizes
    n_convs = max(1, min(sizes.s6_conversations, sizes.s6_streams))
    loop = asyncio.get_running_loop()
    async with GatewayProcess("--echo-pace", "50", "--no-access-log") as gp:
        http = GatewayHTTPClient(gp.url, connect_timeout=5.0)
        convs = await create_conversations(http, n_convs)
        followers = [
            _Follower(convs[i % n_convs], EventStreamClient(
                http.url(events_path(convs[i % n_convs])), initial_reconnect_delay=0.1,
                max_reconnect_delay=1.0, connect_timeout=5.0))
            for i in range(sizes.s6_streams)
        ]
        tasks: list[asyncio.Task[None]] = []
        try:
            for f in followers:
                f.client.open()
                tasks.append(loop.create_task(_follow(f, res)))
            await wait_for(lambda: all(f.client.status == "open" for f in followers), 30.0)
            long_text = " ".join(f"word{i}" for i in range(80))  # ~2 s of deltas at 50 tokens/s
            for cid in convs:
                await post_message(http, cid, long_text)
            try:
                async with asyncio.timeout(20):
                    for f in followers:
                        await f.saw_delta.wait()
            except TimeoutError:
                res.error("not every stream saw the turn start before the kill")
            ctx.progress(f"scenario 6: SIGKILL under {len(followers)} live streams")
            await gp.kill()
            killed_at = perf()
            await gp.restart()
            restarted_at = perf()
            reconnected = await wait_for(
                lambda: all(f.client.connections >= 2 and f.client.status == "open" for f in followers), 30.0)
            resumed_at = perf()
            if not reconnected:
                res.error("streams not reconnected 30 s after the restart",
                          sum(1 for f in followers if f.client.connections < 2 or f.client.status != "open"))
            for cid in convs:
                turn = await post_message(http, cid, "after the restart")
                for f in followers:
                    if f.cid == cid:
                        f.expect_final(turn)
            try:
                async with asyncio.timeout(30):
                    for f in followers:
                        await f.done.wait()
            except TimeoutError:
                res.error("streams that did not receive the turn after the restart",
                          sum(1 for f in followers if not f.done.is_set()))
            res.operations += len(followers)
        finally:
            for f in followers:
                t0 = perf()
                await f.client.aclose()
                res.release_ms.append((perf() - t0) * 1000)
            res.release_label = "EventStreamClient.aclose() → connection and task released"
            for task in tasks:
                if not await await_or_hang(task, ctx.stuck):
                    res.hung_consumers += 1
                elif not task.cancelled() and task.exception() is not None:
                    res.error(f"follower raised {exc_kind(task.exception())}")
        # the full log of every conversation, read from the start by a fresh client
        logs = {cid: await _full_log(http, cid) for cid in convs}
    for f in followers:
        log = logs[f.cid]
        cmp = compare_ids(log, f.events, complete=False)
        count_comparison(res, cmp)
        if cmp.differing:
            res.error("delivered event differs from the log", cmp.differing)
        if not f.faults:
            res.error("a stream saw no fault across the kill")
    res.figures.update({
        "streams": len(followers), "conversations": n_convs,
        "restart_s": round(restarted_at - killed_at, 2),
        "all_resumed_after_restart_s": round(resumed_at - restarted_at, 2),
        "log_events": sum(len(v) for v in logs.values()),
    })
    res.notes.append(
        f"{len(followers)} streams on {n_convs} conversations; restart took "
        f"{restarted_at - killed_at:.2f} s, "
        f"every stream reconnected {resumed_at - restarted_at:.2f} s later; delivered ids compared with "
        f"{sum(len(v) for v in logs.values())} logged events"
    )


async def _full_log(http: GatewayHTTPClient, cid: str) -> list[EventTuple]:
    """Every logged event of a conversation, from id 1 to the newest, read by a fresh event stream."""
    last = await last_event_id(http, cid)
    out: list[EventTuple] = []
    if last == 0:
        return out
    async with asyncio.timeout(30):
        async with EventStreamClient(http.url(events_path(cid)), initial_reconnect_delay=0.05) as events:
            async for event in events:
                if event.id and event.event != "gateway.shutdown":
                    out.append(event_tuple(event))
                    if int(event.id) >= last:
                        break
    return out
