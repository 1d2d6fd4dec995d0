"""EventStreamClient against the fault server: reconnects, Last-Event-ID, retry hints, 204, errors."""

from __future__ import annotations

import asyncio
import gc
import json
import socket
import uuid

import pytest

from conftest import Resources, library_garbage, settle_resources
from sidechain import EventStreamClient, Fault, HTTPStatusError, ProtocolError, ReadError, RetryPolicy
from sidechain.client import StreamEnded
from sidechain.errors import IdleTimeout
from sidechain.sse import Comment, Event


def fresh() -> str:
    """A unique query value: the fault server counts attempts per URL."""
    return uuid.uuid4().hex[:8]


async def take(client: EventStreamClient, count: int) -> list[Event | Comment | Fault]:
    out: list[Event | Comment | Fault] = []
    async for item in client.items():
        out.append(item)
        if sum(isinstance(i, Event) for i in out) >= count:
            break
    return out


async def test_reconnects_after_drop_with_last_event_id_and_server_retry(fault_server: str) -> None:
    url = f"{fault_server}/s?n=12&fault=fin&at=5&retry=30&hello=1&u={fresh()}"
    before = Resources.now()
    async with EventStreamClient(url, initial_reconnect_delay=5) as client:
        items = await take(client, 2 + 12 + 1)  # hello, 0..4, hello, 5..11, done
    events = [i for i in items if isinstance(i, Event)]
    faults = [i for i in items if isinstance(i, Fault)]
    hellos = [json.loads(e.data) for e in events if e.event == "hello"]
    deltas = [e.id for e in events if e.event in ("delta", "done")]
    assert deltas == [str(i) for i in range(13)], "every event once, in order"
    assert hellos[0]["last_event_id"] is None, "no Last-Event-ID on the first request"
    assert hellos[1]["last_event_id"] == "4"
    assert hellos[0]["accept"] == "text/event-stream" and hellos[0]["cache"] == "no-cache"
    assert len(faults) == 1 and faults[0].will_retry
    assert isinstance(faults[0].error, ReadError)
    assert faults[0].delay == 0.030, "the server's retry: value, exactly"
    assert client.status == "closed"
    after = await settle_resources(before)
    assert after.fds <= before.fds and after.tasks <= before.tasks


async def test_clean_end_reconnects_and_initial_last_event_id_is_sent(fault_server: str) -> None:
    url = f"{fault_server}/s?n=3&retry=10&hello=1&u={fresh()}"
    async with EventStreamClient(url, last_event_id="0") as client:
        items = await take(client, 5)
    events = [i for i in items if isinstance(i, Event)]
    assert json.loads(events[0].data)["last_event_id"] == "0"
    assert [e.id for e in events if e.event != "hello"] == ["1", "2", "3"]
    assert json.loads(events[-1].data)["last_event_id"] == "3"
    assert any(isinstance(i, Fault) and isinstance(i.error, StreamEnded) for i in items)


async def test_post_body_and_headers_sent_on_every_reconnect(fault_server: str) -> None:
    url = f"{fault_server}/s?n=4&fault=fin&at=2&retry=5&hello=1&u={fresh()}"
    async with EventStreamClient(url, method="POST", body={"q": "é"}, headers={"X-Custom": "yes"}) as client:
        items = await take(client, 7)
    hellos = [json.loads(i.data) for i in items if isinstance(i, Event) and i.event == "hello"]
    assert len(hellos) == 2
    for h in hellos:
        assert h["method"] == "POST" and json.loads(h["body"]) == {"q": "é"} and h["custom"] == "yes"


async def test_204_stops_for_good(fault_server: str) -> None:
    async with EventStreamClient(f"{fault_server}/s?fault=204") as client:
        got = [e async for e in client]
    assert got == []
    assert client.connections == 1


async def test_4xx_is_final_and_raised(fault_server: str) -> None:
    async with EventStreamClient(f"{fault_server}/s?fault=status_always&code=404&u={fresh()}") as client:
        with pytest.raises(HTTPStatusError) as info:
            async for _ in client:
                pass
    assert info.value.status == 404
    assert client.connections == 1


async def test_503_is_retried(fault_server: str) -> None:
    url = f"{fault_server}/s?n=2&fault=status&faults=2&code=503&u={fresh()}"
    async with EventStreamClient(url, initial_reconnect_delay=0.01) as client:
        items = await take(client, 3)
    faults = [i for i in items if isinstance(i, Fault)]
    assert [f.error.status for f in faults if isinstance(f.error, HTTPStatusError)] == [503, 503]
    assert faults[1].delay >= faults[0].delay / 2  # backoff, with jitter


async def test_wrong_content_type_is_final(fault_server: str) -> None:
    async with EventStreamClient(f"{fault_server}/s?fault=html") as client:
        with pytest.raises(ProtocolError):
            async for _ in client:
                pass


async def test_follows_307(fault_server: str) -> None:
    async with EventStreamClient(f"{fault_server}/s?n=2&fault=redirect&u={fresh()}") as client:
        items = await take(client, 3)
    assert [i.id for i in items if isinstance(i, Event)] == ["0", "1", "2"]


async def test_aclose_from_another_task_wakes_every_iterator(fault_server: str) -> None:
    before = Resources.now()
    opened = asyncio.Event()
    client = EventStreamClient(f"{fault_server}/s?fault=stall",
                               observer=lambda o: opened.set() if o.kind == "first_byte" else None)
    await client.__aenter__()

    async def consume() -> int:
        return len([e async for e in client])

    readers = [asyncio.create_task(consume()) for _ in range(3)]
    await asyncio.wait_for(opened.wait(), 5)
    assert client.status == "open"
    await asyncio.gather(client.aclose(), client.aclose())  # idempotent, concurrent
    assert await asyncio.wait_for(asyncio.gather(*readers), 1) == [0, 0, 0]
    after = await settle_resources(before)
    assert after.fds <= before.fds and after.tasks <= before.tasks


async def test_restart_reconnects_with_last_event_id(fault_server: str) -> None:
    url = f"{fault_server}/s?n=400&gap=0.01&hello=1&u={fresh()}"
    async with EventStreamClient(url) as client:
        seen: list[Event] = []
        async for event in client:
            seen.append(event)
            if event.event == "delta" and event.id == "3":
                await client.restart()
            if event.event == "delta" and event.id == "6":
                break
    hellos = [json.loads(e.data) for e in seen if e.event == "hello"]
    assert [h["last_event_id"] for h in hellos] == [None, "3"]
    assert [e.id for e in seen if e.event == "delta"] == ["0", "1", "2", "3", "4", "5", "6"]


async def test_idle_timeout_reconnects(fault_server: str) -> None:
    url = f"{fault_server}/s?fault=trickle&retry=10&u={fresh()}"
    async with EventStreamClient(url, idle_timeout=0.4) as client:
        async for item in client.items():
            if isinstance(item, Fault):
                assert isinstance(item.error, IdleTimeout) and item.will_retry
                break


async def test_backoff_grows_on_repeated_failures() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    async with EventStreamClient(f"http://127.0.0.1:{port}/s", initial_reconnect_delay=0.01,
                                 max_reconnect_delay=0.2) as client:
        delays = []
        async for item in client.items():
            assert isinstance(item, Fault)
            delays.append(item.delay)
            if len(delays) == 6:
                break
    assert delays[0] == 0.01
    assert max(delays[3:]) > 0.04  # grew (jittered in [ceiling/2, ceiling])
    assert all(d <= 0.2 for d in delays)


async def test_buffer_never_holds_more_than_buffer_items(fault_server: str) -> None:
    """One read that decodes 300 events (the server writes them all at once) still fills the buffer
    only up to ``buffer_items``; the rest waits, and nothing is lost or reordered."""
    url = f"{fault_server}/s?n=300&chunk=all&retry=10&u={fresh()}"
    peak = 0
    ids: list[str] = []
    async with EventStreamClient(url, buffer_items=8) as client:
        async for event in client:
            peak = max(peak, client.buffered + 1)  # + the event just handed out
            ids.append(event.id)
            if event.event == "done":
                break
    assert ids == [str(i) for i in range(301)]
    assert peak == 8, f"the buffer held {peak} items with buffer_items=8"


async def test_closed_client_leaves_no_reference_cycles(fault_server: str) -> None:
    """After ``aclose`` (also after a drop and a resume) the client, its watchdog, streams and
    responses are freed by reference counting, not left for the garbage collector."""
    url = f"{fault_server}/s?n=30&fault=rst&at=5&retry=10"

    async def follow(tag: str) -> None:
        async with EventStreamClient(f"{url}&u={tag}", idle_timeout=30) as client:
            async for event in client:
                if event.event == "done":
                    break

    await follow(fresh())  # warm-up
    before = Resources.now()
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        await follow(fresh())
        await settle_resources(before)
        gc.collect()
        leftover = library_garbage()
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert leftover == {}, f"reference cycles left by a closed EventStreamClient: {leftover}"


async def test_slow_consumer_with_a_full_buffer_is_not_an_idle_server(fault_server: str) -> None:
    """An event every 100 ms, idle_timeout 0.25 s, a buffer of 1, a consumer that spends 0.3 s on each
    event: the reader waits on the full buffer longer than 0.25 s after each event it read, which is
    the consumer's time, not the server idling, so no IdleTimeout and no reconnect."""
    url = f"{fault_server}/s?n=6&gap=0.1&retry=10&u={fresh()}"
    items: list[Event | Comment | Fault] = []
    async with EventStreamClient(url, idle_timeout=0.25, buffer_items=1) as client:
        async for item in client.items():
            items.append(item)
            if isinstance(item, Event):
                if item.event == "done":
                    break
                await asyncio.sleep(0.3)  # the consumer's own work (the behaviour under test)
    assert [i for i in items if isinstance(i, Fault)] == []  # no IdleTimeout before the last event
    assert [i.id for i in items if isinstance(i, Event)] == [str(i) for i in range(7)]


@pytest.mark.parametrize("digits", [400, 5000])
async def test_huge_retry_value_is_capped_not_a_crash(fault_server: str, digits: int) -> None:
    url = f"{fault_server}/s?n=1&retry={'9' * digits}&u={fresh()}"
    async with EventStreamClient(url, max_reconnect_delay=0.05) as client:
        async for item in client.items():
            if isinstance(item, Fault):
                break
    assert isinstance(item, Fault) and isinstance(item.error, StreamEnded) and item.will_retry
    assert item.delay == 0.05, "the server's huge retry: value, capped at max_reconnect_delay"
    assert client.retry_hint is not None and client.retry_hint >= 10**14


async def test_a_server_that_ends_every_stream_at_once_is_retried_without_end(fault_server: str) -> None:
    """Over a thousand reconnects in a row, never healthy: the backoff stays at its cap (the doubling
    once overflowed a float after 1,025 failures and crashed the client)."""
    url = f"{fault_server}/s?n=0&retry=0&u={fresh()}"  # after the first, every stream is empty
    faults = 0
    async with EventStreamClient(url, max_reconnect_delay=0.0005) as client:
        async for item in client.items():
            if isinstance(item, Fault):
                assert item.will_retry and item.delay <= 0.0005
                faults += 1
                if faults == 1100:
                    break
    assert client.failures >= 1100


@pytest.mark.parametrize(("query", "delay"), [("retry_after=120", 0.2), ("retry_after_ms=30", 0.03)])
async def test_retry_after_of_an_error_is_honoured_up_to_the_cap(fault_server: str, query: str,
                                                                delay: float) -> None:
    url = f"{fault_server}/s?n=1&fault=status&code=503&{query}&u={fresh()}"
    async with EventStreamClient(url, max_reconnect_delay=0.2, initial_reconnect_delay=1.0) as client:
        items = await take(client, 1)
    faults = [i for i in items if isinstance(i, Fault)]
    assert isinstance(faults[0].error, HTTPStatusError) and faults[0].error.status == 503
    assert faults[0].delay == pytest.approx(delay)


async def test_events_before_a_protocol_error_are_delivered(fault_server: str) -> None:
    url = f"{fault_server}/s?n=5&fault=longline&at=3&chunk=all&u={fresh()}"
    got: list[str] = []
    async with EventStreamClient(url, max_line_bytes=1000, retry=RetryPolicy(max_attempts=1)) as client:
        with pytest.raises(ProtocolError) as info:
            async for event in client:
                got.append(event.id)
    assert info.value.rule == "max_line_bytes"
    assert got == ["0", "1", "2"] and client.last_event_id == "2"


async def test_iterating_a_closed_client_ends(fault_server: str) -> None:
    client = EventStreamClient(f"{fault_server}/s?n=3&u={fresh()}")
    await client.aclose()
    assert [item async for item in client.items()] == []
