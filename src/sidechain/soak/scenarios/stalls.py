"""Scenario 4: stalls and trickles, each caught by the right deadline with its typed error."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from urllib.parse import urlsplit

from ...chaos import ChaosProxy, FaultKind, FaultPlan
from ...client import EventStreamClient, Fault, GatewayHTTPClient
from ...errors import (
    IdleTimeout,
    ReadTimeout,
    SidechainError,
    TotalTimeout,
)
from ...sse import Event
from ..context import SoakContext
from ..model import ScenarioResult
from ..wire import (
    QUESTION,
    btw_path,
    compare_id_list,
    create_conversations,
    events_path,
    last_event_id,
)
from ._common import count_comparison, exc_kind, ms, perf, run_turn


@dataclass(frozen=True)
class _DeadlineCase:
    name: str
    expected: type[SidechainError]
    kind: FaultKind  # "stall" | "trickle"
    where: str  # "headers" | "body"
    deadline: float
    read_timeout: float | None = None
    idle_timeout: float | None = None
    total_timeout: float | None = None


_DEADLINE_CASES = (
    _DeadlineCase("stall before headers → ReadTimeout", ReadTimeout, "stall", "headers", 0.3,
                  read_timeout=0.3),
    _DeadlineCase("stall before headers → TotalTimeout", TotalTimeout, "stall", "headers", 0.4,
                  total_timeout=0.4),
    _DeadlineCase("stall mid-body → ReadTimeout", ReadTimeout, "stall", "body", 0.3, read_timeout=0.3),
    _DeadlineCase("stall mid-body → IdleTimeout", IdleTimeout, "stall", "body", 0.3, idle_timeout=0.3),
    _DeadlineCase("trickle mid-body → IdleTimeout", IdleTimeout, "trickle", "body", 0.3, read_timeout=1.0,
                  idle_timeout=0.3),
    _DeadlineCase("trickle mid-body → TotalTimeout", TotalTimeout, "trickle", "body", 0.5,
                  total_timeout=0.5),
    _DeadlineCase("trickled headers → TotalTimeout", TotalTimeout, "trickle", "headers", 0.5,
                  total_timeout=0.5),
)


#: how early a deadline error may come: uvloop's timers may fire up to 1 ms early, and the client's
#: watchdog already allows 1 ms of slack
EARLY_SLACK = 0.002


def fired_in_time(deadline: float, elapsed: float) -> bool:
    """Whether a deadline error ``elapsed`` s after the call's start came in time: not before the
    deadline (minus :data:`EARLY_SLACK`) and at most 1 s after it."""
    return deadline - EARLY_SLACK <= elapsed <= deadline + 1.0


async def _response_head_length(base: str, method: str, path: str, body: bytes | None) -> int:
    """Bytes of the status line and headers the gateway sends for this request (raw socket)."""
    parts = urlsplit(base)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    try:
        head = f"{method} {path} HTTP/1.1\r\nHost: {parts.netloc}\r\nAccept: text/event-stream\r\n"
        if body is not None:
            head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        writer.write(head.encode() + b"\r\n" + (body or b""))
        await writer.drain()
        async with asyncio.timeout(10):
            data = await reader.readuntil(b"\r\n\r\n")
        return len(data)
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except OSError:
            pass


async def scenario_stalls(ctx: SoakContext, res: ScenarioResult) -> None:
    """4. Stalls and trickles injected by a :class:`ChaosProxy`, before the headers and mid-body: each
    must be caught by the deadline made for it, with its own typed error, in time. Plus an
    :class:`EventStreamClient` whose stream stalls: an ``IdleTimeout`` fault, a resume, nothing lost."""
    sizes = ctx.sizes
    base = ctx.targets.fast
    direct = GatewayHTTPClient(base, connect_timeout=10.0)
    repeats = sizes.s4_repeats
    convs = await create_conversations(direct, len(_DEADLINE_CASES) * repeats)
    head = await _response_head_length(base, "POST", btw_path(convs[0]), b'{"question": "x"}')
    parts = urlsplit(base)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    rng = ctx.rng
    overshoot: dict[str, list[float]] = {}
    wrong: dict[str, int] = {}

    async def run_case(index: int, case: _DeadlineCase) -> None:
        def plan(n: int) -> FaultPlan:
            after = 0 if case.where == "headers" else head + rng.randint(20, 160)
            if case.where == "headers" and case.kind == "trickle":
                after = rng.randint(1, 40)
            return FaultPlan(case.kind, after_bytes=after, trickle_interval=0.05)

        async with ChaosProxy(host, port, plan=plan) as proxy:
            http = GatewayHTTPClient(proxy.url, connect_timeout=5.0, read_timeout=case.read_timeout,
                                     idle_timeout=case.idle_timeout, total_timeout=case.total_timeout)

            async def one(r: int) -> None:
                cid = convs[index * repeats + r]
                t0 = perf()
                try:
                    async with asyncio.timeout(case.deadline + 5.0):
                        async with http.stream_post(btw_path(cid), {"question": QUESTION}) as s:
                            async for _ in s:
                                pass
                    res.error(f"{case.name}: no deadline fired")
                except TimeoutError:
                    res.hung_consumers += 1
                except SidechainError as exc:
                    elapsed = perf() - t0
                    if type(exc) is not case.expected:
                        res.error(f"{case.name}: got {exc_kind(exc)}")
                        wrong[case.name] = wrong.get(case.name, 0) + 1
                    elif not fired_in_time(case.deadline, elapsed):
                        res.error(f"{case.name}: fired after {elapsed:.3f} s")
                    else:
                        overshoot.setdefault(case.name, []).append((elapsed - case.deadline) * 1000)
                res.operations += 1

            async with asyncio.TaskGroup() as tg:
                for r in range(repeats):
                    tg.create_task(one(r))

    async with asyncio.TaskGroup() as tg:
        for index, case in enumerate(_DEADLINE_CASES):
            tg.create_task(run_case(index, case))
    await _stalled_event_stream(ctx, res, direct, host, port, rounds=max(1, repeats // 4))
    # measured from the call's start: for read and idle deadlines this includes the connect, the
    # headers and the bytes before the stall, so it bounds the lateness from above
    res.figures["error_after_deadline_ms_p99"] = {k: ms(v, 0.99) for k, v in overshoot.items()}
    total = [x for k, v in overshoot.items() if "TotalTimeout" in k for x in v]
    other = [x for k, v in overshoot.items() if "TotalTimeout" not in k for x in v]
    res.notes.append(
        f"{len(_DEADLINE_CASES)} cases x {repeats} (stall/trickle x before headers/mid-body x read/idle/"
        f"total deadline) + EventStreamClient idle stall with resume; every error of the expected type; "
        f"call start → error minus the deadline, p99: total_timeout {ms(total, 0.99)} ms, read/idle "
        f"{ms(other, 0.99)} ms (includes connect, headers and the bytes before the stall)"
    )


async def _stalled_event_stream(ctx: SoakContext, res: ScenarioResult, direct: GatewayHTTPClient, host: str,
                                port: int, *, rounds: int) -> None:
    (cid,) = await create_conversations(direct, 1)
    await run_turn(direct, cid, "a short turn to give the event stream something to replay")
    last = await last_event_id(direct, cid)
    head = await _response_head_length(ctx.targets.fast, "GET", events_path(cid), None)
    for _ in range(rounds):
        stall = FaultPlan("stall", after_bytes=head + ctx.rng.randint(30, 200))

        def plan(n: int, first: FaultPlan = stall) -> FaultPlan:
            return first if n == 1 else FaultPlan()

        async with ChaosProxy(host, port, plan=plan) as proxy:
            ids: list[int] = []
            faults: list[Fault] = []
            try:
                async with asyncio.timeout(10):
                    async with EventStreamClient(f"{proxy.url}{events_path(cid)}", idle_timeout=0.3,
                                                 initial_reconnect_delay=0.05) as events:
                        async for item in events.items():
                            if isinstance(item, Fault):
                                faults.append(item)
                            elif isinstance(item, Event):
                                ids.append(int(item.id))
                                if ids[-1] >= last:
                                    break
            except TimeoutError:
                res.hung_consumers += 1
            res.operations += 1
        if [type(f.error) for f in faults] != [IdleTimeout] or not faults[0].will_retry:
            res.error(f"event stream stall: faults {[repr(f.error) for f in faults]}")
        count_comparison(res, compare_id_list(ids, last))
