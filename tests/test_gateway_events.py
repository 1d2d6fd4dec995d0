"""The conversation event stream: resume with Last-Event-ID, retention gaps, slow consumers, disconnects."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway_helpers import (
    SSEReader,
    create_conversation,
    data,
    get_json,
    ids,
    open_fds,
    other_tasks,
    post_message,
    store_spec,
    wait_until,
)
from sidechain.gateway.testing import running_gateway
from sidechain.sse import Decoder, Event


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


@pytest.fixture(params=["memory", "sqlite", "redis"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return store_spec(request.param, tmp_path, request)


async def test_resume_with_last_event_id(session: aiohttp.ClientSession, store: str) -> None:
    async with running_gateway(store=store, echo_pace=200) as gw:
        cid = await create_conversation(session, gw.url)
        url = f"{gw.url}/v1/conversations/{cid}/events"
        await post_message(session, gw.url, cid, "one two three four five six seven eight nine ten")
        async with session.get(url) as resp:
            first = await SSEReader(resp).until("message.delta")
        # cut after a few events; resume from the last id seen, by header and by query parameter
        last = first[-1].id
        async with session.get(url, headers={"Last-Event-ID": last}) as resp:
            rest = await SSEReader(resp).until("turn.completed")
        assert ids(first + rest) == list(range(1, len(first) + len(rest) + 1))
        async with session.get(f"{url}?last_event_id={last}") as resp:
            again = await SSEReader(resp).until("turn.completed")
        assert [(e.id, e.event, e.data) for e in again] == [(e.id, e.event, e.data) for e in rest]
        # resuming at the very end gets nothing until something new happens
        async with session.get(url, headers={"Last-Event-ID": rest[-1].id}) as resp:
            reader = SSEReader(resp)
            turn = await post_message(session, gw.url, cid, "next")
            created = await reader.event()
            assert created is not None and created.event == "message.created"
            assert int(created.id) == int(rest[-1].id) + 1 and data(created)["turn_id"] == turn["turn_id"]
            await reader.until("turn.completed")
        assert gw.gateway.metrics.resumes_total == 3


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
async def test_resume_from_store_beyond_the_ring(session: aiohttp.ClientSession, tmp_path: Path, kind: str,
                                                 request: pytest.FixtureRequest) -> None:
    """A reader further behind than the in-memory ring reads from the durable log, in order."""
    store = store_spec(kind, tmp_path, request)
    async with running_gateway(store=store, echo_pace=0, subscriber_queue=4, max_message_chars=10_000) as gw:
        cid = await create_conversation(session, gw.url)
        url = f"{gw.url}/v1/conversations/{cid}/events"
        words = " ".join(f"w{i}" for i in range(300))
        await post_message(session, gw.url, cid, words)
        conv = gw.gateway._convs[cid]
        await wait_until(lambda: conv.active is None and not conv.busy)
        await gw.gateway.log.flush()
        assert conv.ring.oldest > 10  # the early events are only in the log now
        async with session.get(url, headers={"Last-Event-ID": "3"}) as resp:
            events = await SSEReader(resp).until("turn.completed")
        assert ids(events) == list(range(4, conv.last_event_id + 1))
        text = "".join(data(e)["delta"] for e in events if e.event == "message.delta")
        assert text.endswith(words)


async def test_resume_gap_after_retention(session: aiohttp.ClientSession, store: str) -> None:
    async with running_gateway(store=store, echo_pace=0, retention=10) as gw:
        cid = await create_conversation(session, gw.url)
        url = f"{gw.url}/v1/conversations/{cid}/events"
        await post_message(session, gw.url, cid, "a b c d e f g h i j k l m n o p q r s t")
        conv = gw.gateway._convs[cid]
        await wait_until(lambda: not conv.busy)
        await gw.gateway.log.flush()
        newest = conv.last_event_id
        oldest = newest - 10 + 1
        async with session.get(url, headers={"Last-Event-ID": "2"}) as resp:
            reader = SSEReader(resp)
            gap = await reader.event()
            assert gap is not None and gap.event == "error"
            assert data(gap)["type"] == "resume_gap"
            assert data(gap)["requested_after"] == "2" and data(gap)["oldest_available"] == str(oldest)
            assert gap.id == str(oldest - 1)
            rest = await reader.until("turn.completed")
        assert ids(rest) == list(range(oldest, newest + 1))
        # no Last-Event-ID: silently from the oldest retained event
        async with session.get(url) as resp:
            fresh = await SSEReader(resp).until("turn.completed")
        assert ids(fresh) == list(range(oldest, newest + 1))
        if store != "memory":
            rows = await gw.gateway.log.read(cid, 0, 1000)
            assert [e.id for e in rows] == list(range(oldest, newest + 1))


async def test_several_subscribers_get_the_same_events(session: aiohttp.ClientSession) -> None:
    async with running_gateway(echo_pace=0) as gw:
        cid = await create_conversation(session, gw.url)
        url = f"{gw.url}/v1/conversations/{cid}/events"
        async with session.get(url) as r1, session.get(url) as r2:
            readers = [SSEReader(r1), SSEReader(r2)]
            await wait_until(lambda: gw.gateway.metrics.event_streams_open == 2)
            await post_message(session, gw.url, cid, "fan out")
            got = [await r.until("turn.completed") for r in readers]
        assert [(e.id, e.event, e.data) for e in got[0]] == [(e.id, e.event, e.data) for e in got[1]]


async def test_disconnect_frees_stream_state_within_a_second(session: aiohttp.ClientSession) -> None:
    async with running_gateway(echo_pace=0) as gw:
        cid = await create_conversation(session, gw.url)
        url = f"{gw.url}/v1/conversations/{cid}/events"
        conv = gw.gateway._convs[cid]
        async with aiohttp.ClientSession() as warm, warm.get(url):  # lazily-made tasks/fds exist after this
            await wait_until(lambda: len(conv.subscribers) == 1)
        await wait_until(lambda: not conv.subscribers)
        fds_before, tasks_before = open_fds(), other_tasks()
        disconnects = gw.gateway.metrics.client_disconnects_total
        for _ in range(3):
            async with aiohttp.ClientSession() as client:
                resp = await client.get(url)
                assert resp.status == 200
                await wait_until(lambda: len(conv.subscribers) == 1)
                assert len(other_tasks()) > len(tasks_before)
                resp.close()  # drop the connection mid-stream, no more reads
            loop = asyncio.get_running_loop()
            start = loop.time()
            await wait_until(lambda: not conv.subscribers and gw.gateway.open_streams == 0, within=1.0)
            assert loop.time() - start < 1.0
        assert gw.gateway.metrics.client_disconnects_total == disconnects + 3
        assert gw.gateway.metrics.event_streams_open == 0
        await wait_until(lambda: other_tasks() <= tasks_before, within=2.0, what="stream tasks to end")
        await wait_until(lambda: open_fds() <= fds_before, within=2.0, what="sockets to close")


async def test_slow_consumer_is_dropped_and_catches_up(session: aiohttp.ClientSession) -> None:
    async with running_gateway(subscriber_queue=8) as gw:
        cid = await create_conversation(session, gw.url)
        conv = gw.gateway._convs[cid]
        url = f"{gw.url}/v1/conversations/{cid}/events"
        async with session.get(url) as resp:
            reader = SSEReader(resp)
            await wait_until(lambda: any(s.live for s in conv.subscribers), what="subscriber live")
            # a burst the subscriber cannot possibly keep up with: 200 events in one loop step
            for i in range(200):
                conv.emit("test.burst", {"i": i})
            events = await reader.rest()
        assert events[-1].event == "error"
        assert data(events[-1])["type"] == "slow_consumer"
        assert "8" in data(events[-1])["message"]
        logged = [e for e in events if e.event == "test.burst"]
        assert len(logged) < 200
        assert ids(logged) == list(range(1, len(logged) + 1))
        assert events[-1].id == logged[-1].id if logged else events[-1].id == ""
        assert gw.gateway.metrics.slow_consumers_total == 1
        await wait_until(lambda: not conv.subscribers)
        last = logged[-1].id if logged else "0"
        async with session.get(url, headers={"Last-Event-ID": last}) as resp:
            reader = SSEReader(resp)
            rest = [await reader.event() for _ in range(200 - len(logged))]
        assert [data(e)["i"] for e in logged + rest if e is not None] == list(range(200))


async def stalled_reader(port: int, target: str) -> socket.socket:
    """A raw connection with a 4 KiB receive buffer that sent ``GET target`` and will not read (the
    caller closes it)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    try:
        await loop.sock_connect(sock, ("127.0.0.1", port))
        await loop.sock_sendall(sock, f"GET {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    except BaseException:
        sock.close()
        raise
    return sock


async def test_stalled_reader_memory_is_bounded_and_connection_closed() -> None:
    """A client that stops reading: dropped after the bound, its connection aborted after the grace."""
    async with running_gateway(subscriber_queue=16, slow_consumer_grace=0.3, echo_pace=0) as gw:
        async with aiohttp.ClientSession() as session:
            cid = await create_conversation(session, gw.url)
        conv = gw.gateway._convs[cid]
        loop = asyncio.get_running_loop()
        sock = await stalled_reader(gw.port, f"/v1/conversations/{cid}/events")
        try:
            await wait_until(lambda: any(s.live for s in conv.subscribers), what="subscriber live")
            (sub,) = conv.subscribers
            payload = {"blob": "x" * 4000}
            for _ in range(4000):  # ~16 MB: more than every socket buffer on the way
                conv.emit("test.blob", payload)
                if gw.gateway.metrics.slow_consumers_total:
                    break
                await asyncio.sleep(0)
            await wait_until(lambda: gw.gateway.metrics.slow_consumers_total == 1, what="drop")
            # dropped the moment it lagged more than the bound: nothing else is buffered for it
            assert sub.dropped and conv.last_event_id - sub.cursor == 16 + 1
            await wait_until(lambda: not conv.subscribers, within=5, what="stalled stream released")
            # the server let go of the connection while the client still does not read (a graceful
            # close would wait for it to take every unsent byte): no socket or buffer of it is left
            connections = gw.server.server_state.connections
            await wait_until(lambda: not connections, within=5, what="connection released by the server")
            received = bytearray()
            async with asyncio.timeout(10):  # what the kernel still had in flight, then the end
                with contextlib.suppress(ConnectionResetError):
                    while chunk := await loop.sock_recv(sock, 1 << 16):
                        received += chunk
        finally:
            sock.close()
        assert not received.endswith(b"0\r\n\r\n")  # it never took a final event


async def test_reader_that_stops_while_catching_up_is_bounded_and_closed() -> None:
    """A client that asks for the whole log and never reads: it is not live, so the lag rule does not
    reach it. Each catch-up write is at most 256 KiB and must finish within slow_consumer_grace, or the
    connection is closed (it used to hold 512 events, 59 MB with large ones, for as long as it stayed)."""
    async with running_gateway(slow_consumer_grace=0.3, echo_pace=0) as gw:
        async with aiohttp.ClientSession() as session:
            cid = await create_conversation(session, gw.url)
        conv = gw.gateway._convs[cid]
        payload = {"blob": "x" * 30_000}
        for _ in range(200):  # ~6 MB of history
            conv.emit("test.blob", payload)
        await gw.gateway.log.flush()
        sock = await stalled_reader(gw.port, f"/v1/conversations/{cid}/events?last_event_id=0")
        try:
            await wait_until(lambda: bool(conv.subscribers), what="subscriber")
            (sub,) = conv.subscribers
            await wait_until(lambda: gw.gateway.metrics.slow_consumers_total == 1, within=5, what="drop")
            assert not sub.live and sub.cursor < 200
            await wait_until(lambda: not conv.subscribers, within=5, what="stalled stream released")
            connections = gw.server.server_state.connections
            await wait_until(lambda: not connections, within=5, what="connection released by the server")
        finally:
            sock.close()


async def test_event_data_round_trips_through_decoder(session: aiohttp.ClientSession) -> None:
    """Multi-line and non-ASCII text survives the JSON + SSE framing."""
    async with running_gateway(echo_pace=0) as gw:
        cid = await create_conversation(session, gw.url)
        text = "line one\nline two\r\nwörld ✓ \u2028 end"
        async with session.get(f"{gw.url}/v1/conversations/{cid}/events") as resp:
            reader = SSEReader(resp)
            await post_message(session, gw.url, cid, text)
            events = await reader.until("turn.completed")
        assert data(events[0])["text"] == text
        completed = next(e for e in events if e.event == "message.completed")
        deltas = "".join(data(e)["delta"] for e in events if e.event == "message.delta")
        assert data(completed)["text"] == deltas and deltas.endswith("end")
        history = await get_json(session, f"{gw.url}/v1/conversations/{cid}")
        assert history["messages"][0]["text"] == text
        # JSON keeps every event's data on one line, so the framing never depends on the text
        assert reader.raw.count(b"\ndata: ") == len(events)
        decoded = Decoder().feed(bytes(reader.raw))
        assert [(e.id, e.event, e.data) for e in decoded if isinstance(e, Event)] == [
            (e.id, e.event, e.data) for e in events
        ]


async def test_snapshot_and_its_last_event_id_agree_with_sqlite(tmp_path: Path) -> None:
    """``GET /v1/conversations/{id}`` while a turn streams (sqlite: events become durable a little after
    they happen): the snapshot's partial text is exactly the deltas up to its ``last_event_id``, so a
    client that shows it and resumes from that id gets no delta twice and misses none."""
    async with running_gateway(store=f"sqlite:{tmp_path / 'gw.sqlite3'}", echo_pace=200) as gw, \
            aiohttp.ClientSession() as session:
        cid = await create_conversation(session, gw.url)
        url = f"{gw.url}/v1/conversations/{cid}"
        turn = await post_message(session, gw.url, cid, " ".join(f"w{i}" for i in range(60)))
        snapshots: list[dict[str, Any]] = []
        while True:
            snap = await get_json(session, url)
            if snap["active_turn"] is None:
                break
            snapshots.append(snap)
            await asyncio.sleep(0)
        assert len(snapshots) >= 5, "the turn should have been seen streaming"
        async with session.get(f"{url}/events", headers={"Last-Event-ID": "0"}) as resp:
            events = await SSEReader(resp).until("turn.completed")
        deltas = [(int(e.id), data(e)["delta"]) for e in events
                  if e.event == "message.delta" and data(e)["turn_id"] == turn["turn_id"]]
        for snap in snapshots:
            upto = int(snap["last_event_id"])
            assert snap["active_turn"]["partial_text"] == "".join(d for i, d in deltas if i <= upto)
