"""Scenario 2: pooled sessions closed from another task under active readers."""

from __future__ import annotations

import asyncio

from ...client import EventStreamClient, GatewayHTTPClient, Session
from ...client.btw import BTW_TERMINAL
from ...errors import (
    SessionInvalidated,
    SidechainError,
)
from ...sse import Event
from ..context import SoakContext
from ..model import ScenarioResult
from ..probes import await_or_hang
from ..wire import (
    QUESTION,
    btw_path,
    create_conversations,
    events_path,
    post_message,
)
from ._common import exc_kind, perf


def wrong_outcome(outcome: str, *, before_close: bool, can_end: bool) -> str | None:
    """The error kind for a reader's outcome, or None when it is right.

    Every reader must end with :class:`SessionInvalidated`, whenever it ended. The only other legitimate
    outcome: a btw stream (``can_end``) whose whole answer, terminal event included, arrived before the
    close (the slow gateway answers in ~9 s, so this needs a reader start delayed by that much).
    """
    if outcome == "invalidated" or (outcome == "ended" and before_close and can_end):
        return None
    when = "before" if before_close else "after"
    return f"reader ended with {outcome} {when} the close instead of SessionInvalidated"


async def scenario_session_close(ctx: SoakContext, res: ScenarioResult) -> None:
    """2. Pooled :class:`Session` objects closed (from another task) while 4 readers are blocked in a
    read on each: 2 ``stream_post`` btw streams and 2 :class:`EventStreamClient` streams. Every reader
    must end with :class:`SessionInvalidated` within 1 s. Release latency: ``aclose()`` → reader done.
    """
    sizes = ctx.sizes
    http = GatewayHTTPClient(ctx.targets.slow, connect_timeout=10.0)
    res.release_label = "Session.aclose() → reader finished"
    slots = min(sizes.s2_parallel, sizes.s2_sessions)
    slot_convs = await create_conversations(http, slots)
    for cid in slot_convs:  # events to read at once, then an idle stream blocked in a read
        await post_message(http, cid, "hello")
    outcomes: dict[str, int] = {}
    taken = 0
    step = max(1, sizes.s2_sessions // 10)

    async def one_session(events_cid: str) -> None:
        (btw_cid,) = await create_conversations(http, 1)
        session = Session()
        ready = [asyncio.Event() for _ in range(4)]
        finished: list[float | None] = [None] * 4
        outcome: list[str] = ["?"] * 4

        async def stream_post_reader(i: int) -> None:
            try:
                async with http.stream_post(btw_path(btw_cid), {"question": QUESTION}, session=session,
                                            expect_terminal=BTW_TERMINAL) as s:
                    async for _ in s:
                        ready[i].set()
                outcome[i] = "ended"
            except SessionInvalidated:
                outcome[i] = "invalidated"
            except SidechainError as exc:
                outcome[i] = exc_kind(exc)
            finally:
                finished[i] = perf()
                ready[i].set()

        async def event_stream_reader(i: int) -> None:
            try:
                async with EventStreamClient(http.url(events_path(events_cid)), session=session,
                                             initial_reconnect_delay=0.05) as events:
                    async for item in events.items():
                        if isinstance(item, Event):
                            ready[i].set()
                outcome[i] = "ended"
            except SessionInvalidated:
                outcome[i] = "invalidated"
            except SidechainError as exc:
                outcome[i] = exc_kind(exc)
            finally:
                finished[i] = perf()
                ready[i].set()

        loop = asyncio.get_running_loop()
        readers = [loop.create_task(stream_post_reader(i)) for i in (0, 1)]
        readers += [loop.create_task(event_stream_reader(i)) for i in (2, 3)]
        try:
            async with asyncio.timeout(15):
                for r in ready:
                    await r.wait()
        except TimeoutError:
            res.error("a reader did not start within 15 s")
        await asyncio.sleep(0)  # let the last reader enter its read
        t0 = perf()
        await session.aclose()
        _, pending = await asyncio.wait(readers, timeout=1.0)
        for task in pending:
            res.hung_consumers += 1
            await await_or_hang(task, ctx.stuck, grace=0.0)
        for i, task in enumerate(readers):
            if task in pending:
                outcomes["hung"] = outcomes.get("hung", 0) + 1
                continue
            end = finished[i]
            if end is not None and end >= t0:
                res.release_ms.append((end - t0) * 1000)
            if not task.cancelled() and task.exception() is not None:
                res.error(f"reader raised {exc_kind(task.exception())}")
            elif wrong := wrong_outcome(outcome[i], before_close=end is not None and end < t0,
                                         can_end=i < 2):
                res.error(wrong)
            key = outcome[i] if end is None or end >= t0 else f"{outcome[i]} before the close"
            outcomes[key] = outcomes.get(key, 0) + 1
        if session.connection_count():
            res.error("the closed session still holds connections")

    async def slot_loop(slot: int) -> None:
        nonlocal taken
        while taken < sizes.s2_sessions:
            taken += 1
            if taken % step == 0:
                ctx.progress(f"scenario 2: {taken}/{sizes.s2_sessions} sessions closed under readers")
            await one_session(slot_convs[slot])
            res.operations += 1

    async with asyncio.TaskGroup() as tg:
        for slot in range(slots):
            tg.create_task(slot_loop(slot))
    res.figures["reader_outcomes"] = outcomes
    res.notes.append(
        f"{res.operations} sessions x 4 readers (2 stream_post, 2 EventStreamClient); outcomes {outcomes}"
    )
