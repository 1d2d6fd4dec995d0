"""Scenario 1: calls cancelled at uniformly random moments, many at a time."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from ...client import BtwClient, GatewayHTTPClient
from ...client.btw import BTW_TERMINAL
from ...client.observe import StreamObservation
from ...errors import (
    SidechainError,
)
from ...sse import Event
from ..context import SoakContext
from ..model import ScenarioResult
from ..probes import await_or_hang, percentile
from ..wire import (
    QUESTION,
    BtwReference,
    btw_path,
    compare_deltas,
    compare_ids,
    create_conversations,
    event_tuple,
    normalize,
)
from ._common import count_comparison, exc_kind, ms, perf


@dataclass
class _Call:
    kind: str
    deltas: list[str] = field(default_factory=list)
    # the Event objects themselves (msgspec structs the collector does not track): the harness's own
    # bookkeeping must not add to the collector's work it measures (a tuple per event would)
    events: list[Event] = field(default_factory=list)
    completed: bool = False
    text: str | None = None
    released_at: float | None = None
    finished_at: float | None = None


_CURRENT_CALL: ContextVar[_Call | None] = ContextVar("sidechain_soak_call", default=None)


def _observe_release(observation: StreamObservation) -> None:
    """Observer of the soak's clients: the moment a stream released its connection (``close``)."""
    if observation.kind == "close":
        call = _CURRENT_CALL.get()
        if call is not None and call.released_at is None:
            call.released_at = perf()


async def _btw_call(btw: BtwClient, cid: str, call: _Call) -> None:
    _CURRENT_CALL.set(call)
    try:
        async with btw.send_message(cid, QUESTION) as answer:
            async for delta in answer:
                call.deltas.append(delta)
        call.completed = answer.completed
        call.text = answer.text
    finally:
        now = perf()
        if call.released_at is None:
            call.released_at = now
        call.finished_at = now


async def _stream_post_call(http: GatewayHTTPClient, cid: str, call: _Call) -> None:
    _CURRENT_CALL.set(call)
    try:
        async with http.stream_post(btw_path(cid), {"question": QUESTION}, expect_terminal=BTW_TERMINAL) as s:
            async for event in s:
                call.events.append(event)
        call.completed = True
    finally:
        now = perf()
        if call.released_at is None:
            call.released_at = now
        call.finished_at = now


def _check_call(call: _Call, ref: BtwReference, res: ScenarioResult, *, returned: bool) -> None:
    """Count lost and repeated events of one call against the uninterrupted reference.

    ``returned``: the call's task returned normally (no cancel took effect, no error), so it must have
    completed and is compared in full; otherwise what it delivered is compared as a prefix.
    """
    if returned and not call.completed:
        res.error("call returned without completing")
    complete = returned or call.completed
    if call.kind == "btw":
        cmp = compare_deltas(ref.deltas, call.deltas, complete=complete)
        if call.completed and (call.text != ref.text or "".join(call.deltas) != ref.text):
            res.error("completed btw answer differs from the uninterrupted one")
    else:
        got = normalize([event_tuple(e) for e in call.events])
        cmp = compare_ids(ref.events, got, complete=complete)
        if cmp.differing:
            res.error("event bytes differ from the uninterrupted stream", cmp.differing)
    count_comparison(res, cmp)


async def scenario_cancel_storm(ctx: SoakContext, res: ScenarioResult) -> None:
    """1. btw and ``stream_post`` calls, N at a time, each cancelled at a uniformly random moment.

    The moment is drawn from [0, 1.25 x the median duration of an uninterrupted call at the same
    concurrency], so cancels land before the headers, mid-answer and (sometimes) after the end.
    Release latency: ``task.cancel()`` → the stream's connection released (for btw, before the
    client's best-effort DELETE, which is reported separately as ``finish``).
    """
    sizes = ctx.sizes
    conc = min(sizes.s1_concurrency, sizes.s1_calls)
    http = GatewayHTTPClient(ctx.targets.paced, connect_timeout=10.0, observer=_observe_release)
    # the best-effort DELETE of a cancelled btw is bounded well under the 1 s hang grace
    btw = BtwClient(http, cancel_timeout=0.5)
    res.release_label = "task.cancel() → connection released"
    convs = await create_conversations(http, conc)
    ref = await BtwReference.fetch(http, convs[0])
    res.operations += 1
    loop = asyncio.get_running_loop()
    finish_ms: list[float] = []
    queued_ms: list[float] = []
    work_ms: list[float] = []
    no_gc_ms: list[float] = []
    counts = {"cancelled": 0, "completed": 0}

    def start(kind: str, cid: str, call: _Call) -> Coroutine[Any, Any, None]:
        return _btw_call(btw, cid, call) if kind == "btw" else _stream_post_call(http, cid, call)

    # calibration: one uninterrupted call per worker, all at once
    durations: list[float] = []

    async def calibrate(i: int) -> None:
        call = _Call("btw" if i % 2 else "stream_post")
        t0 = perf()
        try:
            await start(call.kind, convs[i], call)
        except SidechainError as exc:
            res.error(f"uninterrupted call failed: {exc_kind(exc)}")
            return
        durations.append(perf() - t0)
        _check_call(call, ref, res, returned=True)

    async with asyncio.TaskGroup() as tg:
        for i in range(conc):
            tg.create_task(calibrate(i))
    res.operations += conc
    window = 1.25 * (percentile(durations, 0.5) or 0.5)
    remaining = max(0, sizes.s1_calls - conc)
    issued = 0
    step = max(1, remaining // 10)

    async def one(worker: int, kind: str) -> None:
        call = _Call(kind)
        task = loop.create_task(start(kind, convs[worker], call))
        done, _ = await asyncio.wait({task}, timeout=ctx.rng.uniform(0.0, window))
        returned = False
        if not done:
            # the callback runs on the loop iteration that also runs the cancelled task, just before
            # it: it splits the latency into waiting for the loop and the release work itself
            turn: list[float] = []
            loop.call_soon(lambda: turn.append(perf()))
            t0 = perf()
            task.cancel()
            if not await await_or_hang(task, ctx.stuck):
                res.hung_consumers += 1
                return
            if not task.cancelled():
                exc = task.exception()
                res.error("cancellation swallowed (the call returned)" if exc is None
                          else f"cancel raised {exc_kind(exc)} instead of CancelledError")
            else:
                counts["cancelled"] += 1
            if call.released_at is not None and call.released_at >= t0:
                res.release_ms.append((call.released_at - t0) * 1000)
                if not ctx.gc_pauses.overlaps(t0, call.released_at):
                    no_gc_ms.append((call.released_at - t0) * 1000)
                if turn and call.released_at >= turn[0]:
                    queued_ms.append((turn[0] - t0) * 1000)
                    work_ms.append((call.released_at - turn[0]) * 1000)
            if call.finished_at is not None and call.finished_at >= t0:
                finish_ms.append((call.finished_at - t0) * 1000)
        else:
            exc = task.exception()
            if exc is not None:
                res.error(f"call failed: {exc_kind(exc)}")
            else:
                counts["completed"] += 1
                returned = True
        _check_call(call, ref, res, returned=returned)

    async def worker(w: int) -> None:
        nonlocal issued
        while issued < remaining:
            issued += 1
            n = issued
            if n % step == 0:
                ctx.progress(f"scenario 1: {n}/{remaining} cancel-storm calls")
            await one(w, "btw" if n % 2 else "stream_post")
            res.operations += 1

    async with asyncio.TaskGroup() as tg:
        for w in range(conc):
            tg.create_task(worker(w))
    res.figures.update(
        {
            "concurrency": conc,
            "cancel_window_ms": round(window * 1000, 1),
            "cancelled": counts["cancelled"],
            "completed_before_cancel": counts["completed"],
            "finish_p50_ms": ms(finish_ms, 0.5),
            "finish_p99_ms": ms(finish_ms, 0.99),
            "release_p99_ms_without_gc": ms(no_gc_ms, 0.99),
            "release_samples_during_gc": len(res.release_ms) - len(no_gc_ms),
            "loop_wait_p50_ms": ms(queued_ms, 0.5),
            "loop_wait_p99_ms": ms(queued_ms, 0.99),
            "release_work_p50_ms": ms(work_ms, 0.5),
            "release_work_p99_ms": ms(work_ms, 0.99),
            "reference_deltas": len(ref.deltas),
        }
    )
    res.notes.append(
        f"cancel→release split: waiting for the loop to run the task p50 {ms(queued_ms, 0.5)} / p99 "
        f"{ms(queued_ms, 0.99)} ms, the release work itself p50 {ms(work_ms, 0.5)} / p99 "
        f"{ms(work_ms, 0.99)} ms; p99 of the {len(no_gc_ms)} cancels no garbage collection ran into: "
        f"{ms(no_gc_ms, 0.99)} ms"
    )
    res.notes.append(
        f"{counts['cancelled']} cancelled mid-call, {counts['completed']} completed before their cancel "
        f"(window {window * 1000:.0f} ms); cancel→task end incl. the btw DELETE: p50 "
        f"{ms(finish_ms, 0.5)} ms, p99 {ms(finish_ms, 0.99)} ms"
    )
