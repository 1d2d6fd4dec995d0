"""Scenario 3: connections dropped with FIN or RST at random offsets; resumed answers byte-exact."""

from __future__ import annotations

import asyncio
from urllib.parse import urlsplit

from ...chaos import ChaosProxy, FaultPlan
from ...client import BtwClient, GatewayHTTPClient, RetryPolicy
from ...client.btw import BTW_TERMINAL
from ...errors import (
    SidechainError,
)
from ..context import SoakContext
from ..model import ScenarioResult
from ..wire import (
    QUESTION,
    BtwReference,
    EventTuple,
    btw_path,
    compare_deltas,
    compare_ids,
    create_conversations,
    event_tuple,
    normalize,
)
from ._common import count_comparison, exc_kind


def check_stream_result(ref: BtwReference, got: list[EventTuple], res: ScenarioResult) -> None:
    """A ``stream_post_with_retry`` result: lost, repeated and out-of-order ids counted, and the
    normalized event list must equal the uninterrupted one exactly (same events, same order, same bytes)."""
    events = normalize(got)
    count_comparison(res, compare_ids(ref.events, events, complete=True))
    if tuple(events) != ref.events:
        res.error("stream_post result differs from the uninterrupted one")


async def scenario_faults(ctx: SoakContext, res: ScenarioResult) -> None:
    """3. Connections dropped with FIN or RST at random byte offsets by a :class:`ChaosProxy`; every
    btw answer (``BtwClient``) and every ``stream_post_with_retry`` result must equal the uninterrupted
    one byte for byte, each event exactly once."""
    sizes = ctx.sizes
    base = ctx.targets.paced
    direct = GatewayHTTPClient(base, connect_timeout=10.0)
    conc = min(sizes.s3_concurrency, sizes.s3_calls)
    convs = await create_conversations(direct, conc)
    ref = await BtwReference.fetch(direct, convs[0])
    res.operations += 1
    # bytes of an answer on the wire: events plus chunk framing plus ~300 bytes of headers
    span = 300 + sum(len(f"id: {i}\nevent: {k}\ndata: {d}\n\n") + 8 for i, k, d in ref.events)
    rng = ctx.rng

    def plan(n: int) -> FaultPlan:
        if rng.random() < 0.5:
            return FaultPlan()
        return FaultPlan(rng.choice(("fin", "rst")), after_bytes=rng.randint(0, span))

    policy = RetryPolicy(max_attempts=40, base_delay=0.002, max_delay=0.02)
    parts = urlsplit(base)
    attempts: list[int] = []
    taken = 0
    step = max(1, sizes.s3_calls // 10)
    async with ChaosProxy(parts.hostname or "127.0.0.1", parts.port or 80, plan=plan) as proxy:
        http = GatewayHTTPClient(proxy.url, retry=policy, connect_timeout=10.0)
        btw = BtwClient(http, retry=policy)

        async def btw_call(cid: str) -> None:
            deltas: list[str] = []
            async with btw.send_message(cid, QUESTION) as answer:
                async for delta in answer:
                    deltas.append(delta)
            attempts.append(answer.attempts)
            count_comparison(res, compare_deltas(ref.deltas, deltas, complete=True))
            if not answer.completed or answer.text != ref.text or "".join(deltas) != ref.text:
                res.error("btw answer differs from the uninterrupted one")

        async def stream_call(cid: str) -> None:
            got: list[EventTuple] = []
            async with http.stream_post_with_retry(btw_path(cid), {"question": QUESTION},
                                                   expect_terminal=BTW_TERMINAL) as s:
                async for event in s:
                    got.append(event_tuple(event))
                attempts.append(s.attempts)
            check_stream_result(ref, got, res)

        async def worker(w: int) -> None:
            nonlocal taken
            while taken < sizes.s3_calls:
                taken += 1
                n = taken
                if n % step == 0:
                    ctx.progress(f"scenario 3: {n}/{sizes.s3_calls} calls through FIN/RST drops")
                try:
                    async with asyncio.timeout(30):
                        await (btw_call(convs[w]) if n % 2 else stream_call(convs[w]))
                except TimeoutError:
                    res.hung_consumers += 1
                except SidechainError as exc:
                    res.error(f"call failed: {exc_kind(exc)}")
                res.operations += 1

        async with asyncio.TaskGroup() as tg:
            for w in range(conc):
                tg.create_task(worker(w))
        injected, connections = proxy.faults_injected, proxy.connections
    resumed = sum(1 for a in attempts if a > 1)
    res.figures.update({"faults_injected": injected, "connections": connections, "resumed_calls": resumed,
                        "max_attempts": max(attempts, default=0), "answer_bytes": len(ref.text.encode())})
    res.notes.append(
        f"{injected} FIN/RST faults injected over {connections} connections; {resumed} calls needed "
        f"more than one attempt (max {max(attempts, default=0)}); all answers compared byte for byte"
    )
