"""Client core guarantees, each proven against a real server on 127.0.0.1 by counting resources."""

from __future__ import annotations

import asyncio
import gc
import random
import statistics
import time
from typing import Any

import aiohttp
import pytest

from conftest import Resources, library_garbage, settle_resources
from sidechain import (
    ConnectError,
    EventStream,
    GatewayHTTPClient,
    HTTPStatusError,
    IdleTimeout,
    ProtocolError,
    ReadError,
    ReadTimeout,
    RetryExhausted,
    RetryPolicy,
    SafeByteStream,
    Session,
    SessionInvalidated,
    StreamInterrupted,
    StreamObservation,
    StreamTruncated,
    TotalTimeout,
)
from sidechain.sse import Event

FAST = RetryPolicy(base_delay=0.005, max_delay=0.02)


async def collect(stream: EventStream) -> list[Event]:
    return [e async for e in stream]


def ids(events: list[Event]) -> list[str]:
    return [e.id for e in events]


async def assert_released(before: Resources) -> None:
    after = await settle_resources(before)
    assert after.fds <= before.fds, f"leaked fds: {before} -> {after}"
    assert after.tasks <= before.tasks, f"leaked tasks: {before} -> {after}"


# -- 1. normal end, error, break -----------------------------------------------------------------


async def test_normal_end_releases_everything(fault_server: str) -> None:
    client = GatewayHTTPClient(fault_server)
    before = Resources.now()
    async with client.stream_post("/s?n=50", {"q": 1}) as stream:
        events = await collect(stream)
        assert stream.status == 200
        assert stream.headers["Content-Type"].startswith("text/event-stream")
        assert stream.last_event_id == "50"
    assert ids(events) == [str(i) for i in range(51)]
    assert events[-1].event == "done"
    assert '"delta": " wörld"' in events[1].data
    await assert_released(before)


async def test_break_out_of_loop_releases_everything(fault_server: str) -> None:
    client = GatewayHTTPClient(fault_server)
    before = Resources.now()
    async with client.stream_post("/s?n=1000&gap=0.001", {}) as stream:
        async for event in stream:
            if event.id == "3":
                break
    await assert_released(before)


async def test_error_inside_context_releases_everything(fault_server: str) -> None:
    client = GatewayHTTPClient(fault_server)
    before = Resources.now()
    with pytest.raises(ZeroDivisionError):
        async with client.stream_post("/s?n=1000&gap=0.001", {}) as stream:
            async for _ in stream:
                raise ZeroDivisionError
    await assert_released(before)


async def test_http_error_status_is_typed_and_released(fault_server: str) -> None:
    client = GatewayHTTPClient(fault_server)
    before = Resources.now()
    with pytest.raises(HTTPStatusError) as info:
        async with client.stream_post("/s?fault=status_always&code=404", {}):
            pass
    assert info.value.status == 404
    assert "injected" in info.value.body
    assert info.value.headers["Content-Type"].startswith("application/json")
    assert not info.value.retryable
    await assert_released(before)


async def test_wrong_content_type_is_protocol_error(fault_server: str) -> None:
    client = GatewayHTTPClient(fault_server)
    with pytest.raises(ProtocolError) as info:
        async with client.stream_post("/s?fault=html", {}):
            pass
    assert info.value.rule == "content_type"


async def test_connect_refused_is_connect_error() -> None:
    import socket

    with socket.socket() as s:  # a port that is certainly closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    client = GatewayHTTPClient(f"http://127.0.0.1:{port}")
    before = Resources.now()
    with pytest.raises(ConnectError):
        async with client.stream_post("/s", {}):
            pass
    with pytest.raises(RetryExhausted) as info:
        retry = RetryPolicy(max_attempts=3, base_delay=0.001)
        async with client.stream_post_with_retry("/s", {}, retry=retry):
            pass
    assert info.value.attempts == 3
    assert isinstance(info.value.last_error, ConnectError)
    await assert_released(before)


# -- 2. cancellation at random moments ------------------------------------------------------------


async def test_cancel_at_random_moments_leaks_nothing_and_releases_fast(fault_server: str) -> None:
    client = GatewayHTTPClient(fault_server)
    pooled = Session()
    rng = random.Random(1234)
    release_ms: list[float] = []
    before = Resources.now()
    outcomes: dict[str, int] = {"cancelled": 0, "completed": 0}

    async def consume(use_pool: bool) -> None:
        session = pooled if use_pool else None
        async with client.stream_post("/s?n=40&gap=0.0005", {"x": 1}, session=session) as s:
            async for _ in s:
                pass

    for i in range(300):
        task = asyncio.create_task(consume(use_pool=i % 3 == 0))
        await asyncio.sleep(rng.uniform(0, 0.02))  # the random moment of the cancel (the test's input)
        t0 = time.perf_counter()
        task.cancel()
        try:
            await task
            outcomes["completed"] += 1
        except asyncio.CancelledError:
            outcomes["cancelled"] += 1
            release_ms.append((time.perf_counter() - t0) * 1000)
    assert outcomes["cancelled"] > 150, outcomes  # the cancels really landed mid-flight
    await pooled.aclose()
    assert pooled.connection_count() == 0
    await assert_released(before)
    release_ms.sort()
    p99 = release_ms[int(len(release_ms) * 0.99) - 1]
    assert p99 <= 5.0, f"cancel-to-release p99 {p99:.2f} ms (median {statistics.median(release_ms):.2f})"


async def test_cancellation_propagates_and_is_not_swallowed(fault_server: str) -> None:
    client = GatewayHTTPClient(fault_server)
    started = asyncio.Event()

    async def consume() -> str:
        async with client.stream_post("/s?fault=stall", {}) as s:
            started.set()
            async for _ in s:
                pass
        return "finished"

    task = asyncio.create_task(consume())
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert task.cancelled()


async def test_pooled_session_releases_only_its_own_connection(fault_server: str) -> None:
    client = GatewayHTTPClient(fault_server)
    async with Session() as pool:
        async with client.stream_post("/s?n=3", {}, session=pool) as s:
            assert len(await collect(s)) == 4
        assert pool.connection_count() == 1  # back in the pool, reusable
        async with client.stream_post("/s?n=3", {}, session=pool) as s:
            assert pool.connection_count() == 1
            assert len(await collect(s)) == 4
        async with client.stream_post("/s?n=100&gap=0.01", {}, session=pool) as s:
            await s.__anext__()
        # broken off mid-body: that connection is closed, not returned dirty to the pool
        assert pool.connection_count() == 0
        assert not pool.closed


# -- 3. session closed under readers ----------------------------------------------------------------


async def test_session_closed_under_50_readers(fault_server: str) -> None:
    client = GatewayHTTPClient(fault_server, read_timeout=30)
    before = Resources.now()
    pool = Session()
    reading = 0
    all_reading = asyncio.Event()
    woke_at: list[float] = []

    async def reader() -> None:
        nonlocal reading
        async with client.stream_post("/s?fault=stall", {}, session=pool) as s:
            reading += 1
            if reading == 50:
                all_reading.set()
            try:
                async for _ in s:
                    pass
            finally:
                woke_at.append(time.perf_counter())

    tasks = [asyncio.create_task(reader()) for _ in range(50)]
    await asyncio.wait_for(all_reading.wait(), 10)
    await asyncio.sleep(0)  # let the last reader enter its read
    closer = asyncio.create_task(pool.aclose())
    t0 = time.perf_counter()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    await closer
    assert all(isinstance(r, SessionInvalidated) for r in results), results
    assert max(woke_at) - t0 < 0.050
    assert pool.connection_count() == 0
    await assert_released(before)


async def test_stream_on_closed_session_fails_at_once(fault_server: str) -> None:
    client = GatewayHTTPClient(fault_server)
    pool = Session()
    await pool.aclose()
    with pytest.raises(SessionInvalidated):
        async with client.stream_post("/s", {}, session=pool):
            pass


# -- 4. dropped without closing ---------------------------------------------------------------------


async def test_dropped_stream_is_released_by_finalizer_with_resource_warning(fault_server: str) -> None:
    client = GatewayHTTPClient(fault_server)
    pool = Session()
    before = Resources.now()
    ctx = client.stream_post("/s?fault=stall", {}, session=pool)
    stream = await ctx.__aenter__()
    assert pool.connection_count() == 1
    with pytest.warns(ResourceWarning, match="garbage collected without being closed"):
        del ctx, stream
        gc.collect()
    await settle_resources(before)
    assert pool.connection_count() == 0
    assert pool.open_streams == 0
    await pool.aclose()
    await assert_released(before)


async def test_dropped_stream_on_dedicated_session_is_released(fault_server: str) -> None:
    client = GatewayHTTPClient(fault_server)
    before = Resources.now()
    ctx = client.stream_post("/s?fault=stall", {})
    stream = await ctx.__aenter__()
    assert Resources.now().fds > before.fds
    with pytest.warns(ResourceWarning, match="garbage collected without being closed"):
        del ctx, stream
        gc.collect()
    await assert_released(before)


async def test_dropped_pooled_session_is_closed_by_finalizer_with_resource_warning(fault_server: str) -> None:
    """A pooled Session dropped without aclose(): its idle connection is closed by a finalizer, with a
    ResourceWarning; one closed with aclose() says nothing when it goes."""
    client = GatewayHTTPClient(fault_server)
    before = Resources.now()
    pool = Session()
    async with client.stream_post("/s?n=3", {}, session=pool) as s:
        await collect(s)
    assert pool.connection_count() == 1  # kept alive in the pool
    with pytest.warns(ResourceWarning, match="Session was garbage collected without aclose"):
        del pool, s  # the finished stream refers to its session too
        gc.collect()
    await assert_released(before)
    closed = Session()
    async with client.stream_post("/s?n=3", {}, session=closed) as s:
        await collect(s)
    await closed.aclose()
    del closed, s
    gc.collect()  # -W error: any warning here fails the test
    await assert_released(before)


# -- 5. close racing the connect --------------------------------------------------------------------


async def test_close_racing_connect_leaves_no_connection(fault_server: str) -> None:
    client = GatewayHTTPClient(fault_server)
    rng = random.Random(99)
    before = Resources.now()
    seen: set[str] = set()
    for _ in range(100):
        pool = Session()

        async def consume(pool: Session = pool) -> None:
            async with client.stream_post("/s?n=5", {}, session=pool) as s:
                await collect(s)

        task = asyncio.create_task(consume())
        await asyncio.sleep(rng.uniform(0, 0.003))
        await pool.aclose()
        try:
            await task
            seen.add("completed")
        except SessionInvalidated:
            seen.add("invalidated")
        assert pool.connection_count() == 0
    assert "invalidated" in seen
    await assert_released(before)


# -- 6. faults: typed errors, retry, resume -----------------------------------------------------------


@pytest.mark.parametrize("fault", ["fin", "rst"])
async def test_drop_without_retry_is_read_error(fault_server: str, fault: str) -> None:
    client = GatewayHTTPClient(fault_server)
    got: list[Event] = []
    with pytest.raises(ReadError):
        async with client.stream_post(f"/s?n=20&fault={fault}&at=7", {}) as s:
            async for e in s:
                got.append(e)
    assert ids(got) == [str(i) for i in range(7)]


@pytest.mark.parametrize("fault", ["fin", "rst"])
@pytest.mark.parametrize("chunk", ["event", "all"])
async def test_drop_with_ids_resumes_exactly(fault_server: str, fault: str, chunk: str) -> None:
    client = GatewayHTTPClient(fault_server, retry=FAST)
    before = Resources.now()
    path = f"/s?n=30&fault={fault}&at=11&faults=2&chunk={chunk}"
    async with client.stream_post_with_retry(path, {}, expect_terminal={"done"}) as s:
        got = await collect(s)
        attempts = s.attempts
    expected = [str(i) for i in range(31)]
    if chunk == "all":
        # one write for all events: the drop happens before any event reached the client
        assert ids(got) == expected
    else:
        assert ids(got) == expected, "each event exactly once, in order"
        assert attempts == 3
    await assert_released(before)


async def test_drop_without_ids_raises_stream_interrupted_with_prefix(fault_server: str) -> None:
    client = GatewayHTTPClient(fault_server, retry=FAST)
    got: list[Event] = []
    with pytest.raises(StreamInterrupted) as info:
        async with client.stream_post_with_retry("/s?n=20&ids=0&fault=fin&at=6", {}) as s:
            async for e in s:
                got.append(e)
    assert len(info.value.delivered) == 6
    assert info.value.delivered == got
    assert isinstance(info.value.cause, ReadError)


async def test_clean_early_end_is_truncated_or_resumed(fault_server: str) -> None:
    client = GatewayHTTPClient(fault_server, retry=FAST)
    with pytest.raises(StreamTruncated) as info:
        async with client.stream_post("/s?n=20&fault=early&at=4", {}, expect_terminal={"done"}) as s:
            await collect(s)
    assert info.value.last_event_id == "3"
    async with client.stream_post_with_retry("/s?n=20&fault=early&at=4", {}, expect_terminal={"done"}) as s:
        assert ids(await collect(s)) == [str(i) for i in range(21)]
    # without expect_terminal a clean end is just an end
    async with client.stream_post("/s?n=20&fault=early&at=4&fresh=1", {}) as s:
        assert len(await collect(s)) == 4


async def test_5xx_then_success_is_retried_before_first_event(fault_server: str) -> None:
    observed: list[StreamObservation] = []
    client = GatewayHTTPClient(fault_server, retry=FAST, observer=observed.append)
    async with client.stream_post_with_retry("/s?n=3&fault=status&faults=2&code=502", {}) as s:
        assert len(await collect(s)) == 4
        assert s.attempts == 3
    kinds = [o.kind for o in observed]
    assert kinds.count("retry") == 2
    assert kinds.count("connect") == 3
    assert "first_event" in kinds and kinds[-1] == "close"
    assert all(o.elapsed >= 0 for o in observed)


async def test_429_retry_after_is_honoured(fault_server: str) -> None:
    client = GatewayHTTPClient(fault_server, retry=FAST)
    t0 = time.perf_counter()
    async with client.stream_post_with_retry("/s?n=2&fault=status&code=429&retry_after=0.3", {}) as s:
        assert len(await collect(s)) == 3
    assert time.perf_counter() - t0 >= 0.3
    t0 = time.perf_counter()
    async with client.stream_post_with_retry("/s?n=2&fault=status&code=429&retry_after_ms=150", {}) as s:
        assert len(await collect(s)) == 3
    assert 0.15 <= time.perf_counter() - t0 < 2.0


async def test_retry_after_above_cap_gives_up(fault_server: str) -> None:
    client = GatewayHTTPClient(fault_server, retry=RetryPolicy(retry_after_cap=5))
    t0 = time.perf_counter()
    with pytest.raises(RetryExhausted) as info:
        async with client.stream_post_with_retry("/s?fault=status&code=429&retry_after=120", {}):
            pass
    assert info.value.retry_after == 120
    assert isinstance(info.value.last_error, HTTPStatusError)
    assert time.perf_counter() - t0 < 1


async def test_4xx_is_not_retried(fault_server: str) -> None:
    client = GatewayHTTPClient(fault_server, retry=FAST)
    with pytest.raises(HTTPStatusError) as info:
        async with client.stream_post_with_retry("/s?fault=status&faults=5&code=400", {}) as s:
            await collect(s)
    assert info.value.status == 400


async def test_idempotency_key_sent_and_shared_by_attempts(fault_server: str) -> None:
    # the fault server counts attempts per Idempotency-Key: with a fixed key, 2 faults then success
    client = GatewayHTTPClient(fault_server, retry=FAST)
    async with client.stream_post_with_retry("/s?n=1&fault=status&faults=2", {}, idempotency_key="k-1") as s:
        assert s.attempts == 3
    async with client.stream_post_with_retry("/s?n=1&fault=status&faults=2", {}, idempotency_key="k-1") as s:
        assert s.attempts == 1  # the same key continues the server's count: no more faults


async def test_stall_after_headers_caught_by_read_timeout(fault_server: str) -> None:
    client = GatewayHTTPClient(fault_server, read_timeout=0.2)
    before = Resources.now()
    with pytest.raises(ReadTimeout):
        async with client.stream_post("/s?fault=stall", {}) as s:
            await collect(s)
    await assert_released(before)


async def test_trickle_caught_by_idle_timeout_not_read_timeout(fault_server: str) -> None:
    observed: list[StreamObservation] = []
    client = GatewayHTTPClient(fault_server, read_timeout=1.0, idle_timeout=0.8, observer=observed.append)
    t0 = time.perf_counter()
    with pytest.raises(IdleTimeout) as info:
        async with client.stream_post("/s?fault=trickle", {}) as s:
            await collect(s)
    assert 0.8 <= time.perf_counter() - t0 < 2.0
    assert info.value.timeout == 0.8
    assert any(o.kind == "stall" and o.info["deadline"] == "idle_timeout" for o in observed)


async def test_no_compressed_body_is_offered_or_received(fault_server: str) -> None:
    """Bodies are read raw, so the client asks for none compressed (aiohttp offers gzip by default: a
    compressing server or proxy then sent bytes no decoder could read)."""
    client = GatewayHTTPClient(fault_server)
    async with client.stream_post("/s?fault=gzip&n=5", {}, expect_terminal={"done"}) as s:
        events = await collect(s)
        assert "Content-Encoding" not in s.headers
    assert [e.event for e in events] == ["delta"] * 5 + ["done"]
    async with Session() as pooled, client.stream_post("/s?fault=gzip&n=5", {}, session=pooled) as s:
        assert len(await collect(s)) == 6


@pytest.mark.parametrize("pooled", [False, True])
async def test_no_response_headers_caught_by_idle_timeout(fault_server: str, pooled: bool) -> None:
    """A server that accepts the request and never answers is idle: ``idle_timeout`` ends the wait for
    the headers (it waited forever with no read_timeout); a shorter total_timeout still wins."""
    before = Resources.now()
    async with Session() as session:
        use = session if pooled else None
        client = GatewayHTTPClient(fault_server, idle_timeout=0.3, total_timeout=5.0)
        t0 = time.perf_counter()
        with pytest.raises(IdleTimeout) as info:
            async with client.stream_post("/s?fault=stall_headers", {}, session=use) as s:
                await collect(s)
        assert 0.3 <= time.perf_counter() - t0 < 2.0 and info.value.timeout == 0.3
        short = GatewayHTTPClient(fault_server, idle_timeout=5.0, total_timeout=0.2)
        with pytest.raises(TotalTimeout):
            async with short.stream_post("/s?fault=stall_headers", {}, session=use) as s:
                await collect(s)
        retrying = GatewayHTTPClient(fault_server, idle_timeout=0.1,
                                     retry=RetryPolicy(max_attempts=2, base_delay=0.01, max_delay=0.01))
        with pytest.raises(RetryExhausted) as exhausted:  # retryable before the first event
            async with retrying.stream_post_with_retry("/s?fault=stall_headers", {}, session=use) as s:
                await collect(s)
        assert exhausted.value.attempts == 2 and isinstance(exhausted.value.last_error, IdleTimeout)
    await assert_released(before)


async def test_total_timeout(fault_server: str) -> None:
    client = GatewayHTTPClient(fault_server, total_timeout=0.3)
    t0 = time.perf_counter()
    with pytest.raises(TotalTimeout):
        async with client.stream_post_with_retry("/s?n=1000&gap=0.01", {}) as s:
            await collect(s)
    assert time.perf_counter() - t0 < 1.0
    assert not TotalTimeout("x").retryable


async def test_idle_timer_rearms_while_events_flow(fault_server: str) -> None:
    # events every 50 ms with idle_timeout 0.2 s: healthy; proves the lazy timer re-arms instead of firing
    client = GatewayHTTPClient(fault_server, idle_timeout=0.2)
    async with client.stream_post("/s?n=10&gap=0.05", {}) as s:
        assert len(await collect(s)) == 11


async def test_protocol_error_keeps_events_before_it(fault_server: str) -> None:
    client = GatewayHTTPClient(fault_server, max_line_bytes=40)
    got: list[Any] = []
    with pytest.raises(ProtocolError) as info:
        async with client.stream_post("/s?n=5&chunk=all", {}) as s:
            async for e in s:
                got.append(e)
    assert info.value.rule == "max_line_bytes"


# -- no reference cycles: a finished call is freed by reference counting, not by the collector ---------


async def test_finished_calls_leave_no_reference_cycles(fault_server: str) -> None:
    """Completion, ``break``, a dropped connection raised as ``ReadError``, an HTTP error, cancellation
    (mid-stream and before the headers), a total deadline (before and after the headers), a retry with
    resume (dedicated or pooled session) and a session closed under its reader: the call's stream,
    response, session and watchdog are freed as soon as the last reference goes. A cycle would leave all
    of it for the garbage collector, whose passes stop the whole process (they were the tail of the
    soak's cancel-to-release latency). The one cycle left per connection is asyncio's own selector
    transport (``_read_ready_cb``), which holds nothing of ours."""
    client = GatewayHTTPClient(fault_server, retry=FAST)
    pool = Session()
    runs = iter(range(1000))

    async def scenarios() -> None:
        for session in (None, pool):
            tag = next(runs)  # the fault server injects a fault once per path: each run gets its own
            async with client.stream_post("/s?n=20", {}, session=session) as s:
                await collect(s)
            async with client.stream_post("/s?n=200&gap=0.001", {}, session=session) as s:
                async for event in s:
                    if event.id == "2":
                        break
            with pytest.raises(ReadError):
                async with client.stream_post(f"/s?n=20&fault=rst&at=4&u={tag}", {}, session=session) as s:
                    await collect(s)
            with pytest.raises(HTTPStatusError):
                async with client.stream_post("/s?fault=status_always&code=404", {}, session=session) as s:
                    await collect(s)
            with pytest.raises(HTTPStatusError):  # with retry: given up at once, through the policy
                async with client.stream_post_with_retry("/s?fault=status_always&code=404", {},
                                                         session=session) as s:
                    await collect(s)
            async with client.stream_post_with_retry(f"/s?n=20&fault=fin&at=5&u={tag}", {}, session=session,
                                                     expect_terminal={"done"}) as s:
                assert len(await collect(s)) == 21
            reading = asyncio.Event()

            async def consume(session: Session | None = session, reading: asyncio.Event = reading) -> None:
                async with client.stream_post("/s?n=1000&gap=0.001", {}, session=session) as s:
                    async for _ in s:
                        reading.set()

            task = asyncio.create_task(consume())
            await reading.wait()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            del task

            async def before_headers(session: Session | None = session) -> None:
                async with client.stream_post("/s?fault=stall_headers", {}, session=session) as s:
                    await collect(s)

            task = asyncio.create_task(before_headers())  # cancelled while waiting for the headers
            await asyncio.sleep(0.02)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            del task
            deadline = GatewayHTTPClient(fault_server, total_timeout=0.03)
            with pytest.raises(TotalTimeout):  # before the headers
                async with deadline.stream_post("/s?fault=stall_headers", {}, session=session) as s:
                    await collect(s)
            deadline = GatewayHTTPClient(fault_server, total_timeout=0.3)
            entered = False
            with pytest.raises(TotalTimeout):  # mid-stream
                async with deadline.stream_post("/s?fault=stall", {}, session=session) as s:
                    entered = True
                    await collect(s)
            assert entered
        closing = Session()
        with pytest.raises(SessionInvalidated):
            async with client.stream_post("/s?n=1000&gap=0.001", {}, session=closing) as s:
                async for _ in s:
                    await closing.aclose()

    await scenarios()  # warm-up: imports and caches created once are not garbage
    before = Resources.now()
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        await scenarios()
        await settle_resources(before)  # connections finish closing (connection_lost ran)
        gc.collect()
        leftover = library_garbage()
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        if was_enabled:
            gc.enable()
        await pool.aclose()
    assert leftover == {}, f"reference cycles left by finished calls: {leftover}"


async def test_fail_with_an_error_raised_elsewhere_leaves_that_task_alone(fault_server: str) -> None:
    """``fail(error)`` from another task with an error that task raised and caught before: the reader
    gets it, and the frames it was raised through (that task's, suspended now) are left intact."""
    async with aiohttp.ClientSession() as http:
        response = await http.post(f"{fault_server}/s?fault=stall&hello=1&u=failother", json={})
        stream = SafeByteStream(response)
        assert (await stream.read()).startswith(b"event: hello")
        reading = asyncio.create_task(stream.read())
        carry_on = asyncio.Event()

        async def supervisor() -> str:
            try:
                raise SessionInvalidated("given up by a supervisor")
            except SessionInvalidated as exc:
                stream.fail(exc)
            await carry_on.wait()  # suspended here while the reader gets the error
            return "finished"

        supervising = asyncio.create_task(supervisor())
        with pytest.raises(SessionInvalidated, match="supervisor"):
            await reading
        carry_on.set()
        assert await asyncio.wait_for(supervising, 5) == "finished"
        await stream.aclose()


def test_on_drop_runs_once_unless_detached() -> None:
    from sidechain.client.finalize import detach, on_drop

    class Thing:
        pass

    calls: list[str] = []
    a, b = Thing(), Thing()
    handle_a = on_drop(a, calls.append, "a")
    handle_b = on_drop(b, calls.append, "b")
    assert detach(handle_b) is True
    assert detach(handle_b) is False  # only the first detach ends it
    del a, b
    gc.collect()
    assert calls == ["a"]
    assert detach(handle_a) is False  # already ran


async def test_idle_timeout_does_not_count_the_consumers_own_time(fault_server: str) -> None:
    """Events every 50 ms, idle_timeout 0.2 s, a consumer that spends 0.3 s on each event: the server
    is never idle for 0.2 s while the consumer waits, so the stream must not fail."""
    client = GatewayHTTPClient(fault_server, idle_timeout=0.2)
    got: list[str] = []
    async with client.stream_post("/s?n=4&gap=0.05", {}) as s:
        async for event in s:
            got.append(event.id)
            await asyncio.sleep(0.3)  # the consumer's own work (the behaviour under test)
    assert got == ["0", "1", "2", "3", "4"]
    # and idle time while the consumer waits still counts (a stall after headers)
    with pytest.raises(IdleTimeout):
        async with client.stream_post("/s?fault=stall", {}) as s:
            await collect(s)


async def test_no_request_after_the_final_error(fault_server: str) -> None:
    """Iterating again after the stream raised its final error ends it; it never sends the (perhaps
    non-idempotent) request again."""
    observed: list[StreamObservation] = []
    client = GatewayHTTPClient(fault_server, observer=observed.append, retry=FAST)
    path = "/s?n=10&ids=0&fault=fin&at=2"  # a drop after 2 events without ids: cannot resume
    async with client.stream_post(path + "&u=plain", {}) as s:
        with pytest.raises(ReadError):
            await collect(s)
        with pytest.raises(StopAsyncIteration):
            await s.__anext__()
    async with client.stream_post_with_retry(path + "&u=retry", {}) as s:
        with pytest.raises(StreamInterrupted):
            await collect(s)
        with pytest.raises(StopAsyncIteration):
            await s.__anext__()
    assert [o.kind for o in observed].count("connect") == 2  # one request per call


async def test_release_registrations_do_not_accumulate(fault_server: str) -> None:
    """Every stream and session registers a release-on-drop hook (client/finalize.py); completed,
    failed, cancelled and dropped calls all leave the registry as they found it."""
    from sidechain.client import finalize

    client = GatewayHTTPClient(fault_server, retry=FAST)
    pool = Session()
    gc.collect()  # what earlier tests dropped is gone: what is left is alive
    before = len(finalize._PENDING)
    for session in (None, pool):
        async with client.stream_post("/s?n=3", {}, session=session) as s:
            await collect(s)
        with pytest.raises(HTTPStatusError):
            async with client.stream_post("/s?fault=status_always&code=404", {}, session=session) as s:
                await collect(s)
        task = asyncio.create_task(collect_stream(client, session))
        await asyncio.sleep(0.02)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        ctx = client.stream_post("/s?fault=stall", {}, session=session)
        stream = await ctx.__aenter__()
        with pytest.warns(ResourceWarning):
            del ctx, stream
            gc.collect()
    assert len(finalize._PENDING) == before + 1  # the pool, still open
    await pool.aclose()
    assert len(finalize._PENDING) == before


async def collect_stream(client: GatewayHTTPClient, session: Session | None) -> None:
    async with client.stream_post("/s?fault=stall", {}, session=session) as s:
        await collect(s)
