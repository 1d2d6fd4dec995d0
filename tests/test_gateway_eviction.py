"""Idle conversations are dropped from memory and loaded again from the store, with nothing lost."""

from __future__ import annotations

import asyncio
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
    post_message,
    store_spec,
    wait_until,
)
from sidechain.gateway.errors import ServiceUnavailable
from sidechain.gateway.eventlog import SqliteEventLog, ThreadExchange
from sidechain.gateway.testing import RunningGateway, running_gateway

LATER = 10_000.0  # seconds added to the loop time: "long after", without waiting for it
#: The store each way of reloading a conversation runs on: evicted from memory, or a gateway restart.
RELOAD_STORE = {"evicted": "memory", "restarted": "sqlite", "restarted-redis": "redis"}


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


def far_future() -> float:
    return asyncio.get_running_loop().time() + LATER


async def finished_turn(gw: RunningGateway, session: aiohttp.ClientSession, cid: str, text: str) -> None:
    url = f"{gw.url}/v1/conversations/{cid}"
    newest = (await get_json(session, url))["last_event_id"]
    async with session.get(f"{url}/events", headers={"Last-Event-ID": newest}) as resp:
        reader = SSEReader(resp)
        await post_message(session, gw.url, cid, text)
        await reader.until("turn.completed")


@pytest.mark.parametrize("store", ["memory", "sqlite", "redis"])
async def test_idle_conversation_is_evicted_and_reloaded_intact(
    store: str, tmp_path: Path, session: aiohttp.ClientSession, request: pytest.FixtureRequest
) -> None:
    spec = store_spec(store, tmp_path, request)
    async with running_gateway(store=spec, echo_pace=0, btw_grace=0) as gw:
        cid = await create_conversation(session, gw.url)
        await finished_turn(gw, session, cid, "first")
        async with session.post(f"{gw.url}/v1/conversations/{cid}/notes", json={"text": "a note"}) as r:
            assert r.status == 201
        before = await get_json(session, f"{gw.url}/v1/conversations/{cid}")
        assert gw.gateway.evict_idle() == 0, "just used: not idle"
        assert gw.gateway.evict_idle(far_future()) == 1
        metrics = gw.gateway.metrics
        assert metrics.conversations_loaded == 0 and metrics.conversations_evicted_total == 1

        after = await get_json(session, f"{gw.url}/v1/conversations/{cid}")  # loaded again
        assert after == before
        assert metrics.conversations_loaded == 1
        await finished_turn(gw, session, cid, "second")
        async with session.get(f"{gw.url}/v1/conversations/{cid}/events",
                               headers={"Last-Event-ID": "0"}) as resp:
            reader = SSEReader(resp)
            events = await reader.until("turn.completed")
            events += await reader.until("turn.completed")
        assert [int(e.id) for e in events] == list(range(1, len(events) + 1)), "ids continue, none twice"
        texts = [data(e)["text"] for e in events if e.event == "message.created"]
        assert texts == ["first", "second"]


async def test_conversation_in_use_is_never_evicted(session: aiohttp.ClientSession) -> None:
    async with running_gateway(echo_pace=20) as gw:
        cid = await create_conversation(session, gw.url)
        # an open event stream holds it
        async with session.get(f"{gw.url}/v1/conversations/{cid}/events") as resp:
            reader = SSEReader(resp)
            turn = await post_message(session, gw.url, cid, "a long enough message to keep the turn running")
            await reader.until("message.delta")
            assert gw.gateway.evict_idle(far_future()) == 0
        # a running turn holds it (the stream is closed now)
        assert gw.gateway.evict_idle(far_future()) == 0
        async with session.post(f"{gw.url}/v1/conversations/{cid}/turns/{turn['turn_id']}/cancel") as r:
            assert r.status == 202
        # a btw kept for resumes (btw_grace) holds it: its thread must stay reachable
        async with session.post(f"{gw.url}/v1/conversations/{cid}/btw", json={"question": "side?"}) as r:
            body = await SSEReader(r).rest()
        assert body[-1].event == "btw.completed"
        assert gw.gateway.evict_idle(far_future()) == 0
        assert gw.gateway.metrics.conversations_evicted_total == 0


async def test_eviction_off_and_config_checked() -> None:
    async with running_gateway(conversation_idle_evict=0) as gw:
        await gw.gateway.create_conversation()
        assert gw.gateway.evict_idle(far_future()) == 0
    with pytest.raises(ValueError, match="conversation_idle_evict"):
        async with running_gateway(conversation_idle_evict=-1):
            pass


async def ask_btw(gw: RunningGateway, session: aiohttp.ClientSession, cid: str, question: str,
                  thread_id: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"question": question}
    if thread_id:
        body["thread_id"] = thread_id
    async with session.post(f"{gw.url}/v1/conversations/{cid}/btw", json=body) as resp:
        assert resp.status == 200, await resp.text()
        events = await SSEReader(resp).rest()
    assert events[-1].event == "btw.completed", events[-1]
    result: dict[str, Any] = data(events[-1])
    return result


@pytest.mark.parametrize("how", ["evicted", "restarted", "restarted-redis"])
async def test_btw_thread_survives_eviction_and_restart(
    how: str, tmp_path: Path, session: aiohttp.ClientSession, request: pytest.FixtureRequest
) -> None:
    store = store_spec(RELOAD_STORE[how], tmp_path, request)
    async with running_gateway(store=store, echo_pace=0, btw_grace=0) as gw:
        cid = await create_conversation(session, gw.url)
        first = await ask_btw(gw, session, cid, "what is a btw?")
        thread = first["thread_id"]
        if how == "evicted":
            await wait_until(lambda: not gw.gateway.btws.conversations_in_use(), what="the btw to be freed")
            assert gw.gateway.evict_idle(far_future()) == 1
            follow = await ask_btw(gw, session, cid, "and then?", thread)
    if how.startswith("restarted"):
        async with running_gateway(store=store, echo_pace=0) as gw:
            follow = await ask_btw(gw, session, cid, "and then?", thread)
    assert follow["thread_id"] == thread
    assert 'Earlier in this side thread you asked 1 question, the last was "what is a btw?"' in follow["text"]


async def test_request_with_a_slow_body_never_uses_an_evicted_object(session: aiohttp.ClientSession) -> None:
    """A handler that looked the conversation up, then waited for a slow body while the conversation
    was evicted and loaded again, works on the loaded object: no second object, no duplicate ids."""
    async with running_gateway(echo_pace=0) as gw:
        cid = await create_conversation(session, gw.url)
        url = f"{gw.url}/v1/conversations/{cid}"
        conv = await gw.gateway.conversation(cid)
        looked_up_at = conv.last_used
        rest = asyncio.Event()

        async def slow_body() -> AsyncIterator[bytes]:
            yield b'{"text": "sent slowly'
            await rest.wait()
            yield b'"}'

        slow = asyncio.create_task(session.post(f"{url}/notes", data=slow_body(),
                                                headers={"Content-Type": "application/json"}))
        # the handler has looked the conversation up and now waits for the rest of the body
        await wait_until(lambda: conv.last_used > looked_up_at, what="the slow request's lookup")
        assert gw.gateway.evict_idle(far_future()) == 1 and conv.evicted
        async with session.post(f"{url}/notes", json={"text": "sent meanwhile"}) as r:
            assert r.status == 201
        rest.set()
        async with await slow as r:
            assert r.status == 201, await r.text()
        history = await get_json(session, url)
        assert [m["text"] for m in history["messages"]] == ["sent meanwhile", "sent slowly"]
        async with session.get(f"{url}/events", headers={"Last-Event-ID": "0"}) as resp:
            reader = SSEReader(resp)
            events = await reader.until("note.created")
            events += await reader.until("note.created")
        assert [int(e.id) for e in events] == [1, 2]
        with pytest.raises(ServiceUnavailable) as refused:
            conv.add_note("through the evicted object")
        assert refused.value.type == "conversation_reloading"


@pytest.mark.parametrize("store", ["memory", "sqlite", "redis"])
async def test_btw_threads_per_conversation_are_bounded(
    store: str, tmp_path: Path, session: aiohttp.ClientSession, request: pytest.FixtureRequest
) -> None:
    """Beyond ``max_btw_threads`` the least recently used thread is dropped, in memory and in the store."""
    spec = store_spec(store, tmp_path, request)
    async with running_gateway(store=spec, echo_pace=0, btw_grace=0, max_btw_threads=2) as gw:
        cid = await create_conversation(session, gw.url)
        first = (await ask_btw(gw, session, cid, "one?"))["thread_id"]
        second = (await ask_btw(gw, session, cid, "two?"))["thread_id"]
        await ask_btw(gw, session, cid, "one again?", first)  # `first` is now the most recently used
        third = (await ask_btw(gw, session, cid, "three?"))["thread_id"]  # drops `second`
        async with session.post(f"{gw.url}/v1/conversations/{cid}/btw",
                                json={"question": "two again?", "thread_id": second}) as resp:
            assert resp.status == 404 and (await resp.json())["error"]["type"] == "thread_not_found"
        await gw.gateway.log.flush()
        record = await gw.gateway.log.load_conversation(cid)
        assert record is not None
        assert {x.thread_id for x in record.exchanges} == {first, third}
        assert [x.seq for x in record.exchanges if x.thread_id == first] == [1, 2]


async def test_no_new_work_once_shutdown_began(tmp_path: Path, session: aiohttp.ClientSession) -> None:
    """A conversation loaded from the store after shutdown began (it was evicted, so shutdown did not
    close it) takes no message, note or btw: each is 503 ``shutting_down``, not work that outlives the
    gateway."""
    async with running_gateway(store=f"sqlite:{tmp_path / 'gw.sqlite3'}", echo_pace=0, btw_grace=0) as gw:
        cid = await create_conversation(session, gw.url)
        assert gw.gateway.evict_idle(far_future()) == 1
        shutting = asyncio.create_task(gw.gateway.shutdown())  # the server still listens meanwhile
        url = f"{gw.url}/v1/conversations/{cid}"
        work = (("/messages", {"text": "hi"}), ("/notes", {"text": "n"}), ("/btw", {"question": "q"}))
        for tail, body in work:
            async with session.post(url + tail, json=body) as resp:
                assert resp.status == 503, (tail, resp.status, await resp.text())
                assert (await resp.json())["error"]["type"] == "shutting_down"
        await shutting
        assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("sidechain-turn")]


async def test_a_thread_dropped_while_its_btw_runs_does_not_come_back(session: aiohttp.ClientSession) -> None:
    """max_btw_threads=1: a second thread drops the first while the first's btw is still answering.
    That btw still completes for its asker, but stores nothing: the dropped thread stays gone."""
    async with running_gateway(echo_pace=40, btw_grace=0, max_btw_threads=1) as gw:
        cid = await create_conversation(session, gw.url)
        async with session.post(f"{gw.url}/v1/conversations/{cid}/btw",
                                json={"question": "one two three four five six seven eight"}) as first:
            reader = SSEReader(first)
            started = await reader.until("btw.started")
            dropped = data(started[-1])["thread_id"]
            kept = (await ask_btw(gw, session, cid, "two?"))["thread_id"]  # drops `dropped`
            rest = await reader.rest()
        assert rest[-1].event == "btw.completed" and data(rest[-1])["thread_id"] == dropped
        await gw.gateway.log.flush()
        record = await gw.gateway.log.load_conversation(cid)
        assert record is not None
        assert {x.thread_id for x in record.exchanges} == {kept}


async def reload(gw: RunningGateway, how: str) -> None:
    """Drop every conversation from memory (``evicted``); a restart is the test's own (a new gateway)."""
    if how == "evicted":
        await wait_until(lambda: not gw.gateway.btws.conversations_in_use(), what="the btws to be freed")
        assert gw.gateway.evict_idle(far_future()) == 1


@pytest.mark.parametrize("how", ["evicted", "restarted", "restarted-redis"])
async def test_least_recently_used_order_of_threads_survives(
    how: str, tmp_path: Path, session: aiohttp.ClientSession, request: pytest.FixtureRequest
) -> None:
    """The order in which threads were last used comes back from the store: after a reload, a new
    thread drops the thread used least recently, not whichever the store lists first."""
    store = store_spec(RELOAD_STORE[how], tmp_path, request)
    opts: dict[str, Any] = {"store": store, "echo_pace": 0, "btw_grace": 0, "max_btw_threads": 3}
    async with running_gateway(**opts) as gw:
        cid = await create_conversation(session, gw.url)
        threads = [(await ask_btw(gw, session, cid, f"{n}?"))["thread_id"] for n in ("one", "two", "three")]
        # used again in an order unlike both their creation order and any order of their random ids
        for index in (2, 0, 1):
            await ask_btw(gw, session, cid, "again?", threads[index])
        await reload(gw, how)
        if how == "evicted":
            await ask_btw(gw, session, cid, "four?")  # drops the least recently used: threads[2]
            survivors = set((await gw.gateway.conversation(cid)).threads)
    if how.startswith("restarted"):
        async with running_gateway(**opts) as gw:
            await ask_btw(gw, session, cid, "four?")
            survivors = set((await gw.gateway.conversation(cid)).threads)
    assert threads[2] not in survivors and {threads[0], threads[1]} <= survivors


@pytest.mark.parametrize("how", ["evicted", "restarted", "restarted-redis"])
async def test_thread_without_a_completed_exchange_survives(
    how: str, tmp_path: Path, session: aiohttp.ClientSession, request: pytest.FixtureRequest
) -> None:
    """A thread whose only btw was cancelled has no exchange to store, but the client was told its id
    (``btw.started``): after a reload, asking in it again is not ``thread_not_found``."""
    store = store_spec(RELOAD_STORE[how], tmp_path, request)
    opts: dict[str, Any] = {"store": store, "echo_pace": 40, "btw_grace": 0}
    async with running_gateway(**opts) as gw:
        cid = await create_conversation(session, gw.url)
        url = f"{gw.url}/v1/conversations/{cid}/btw"
        async with session.post(url, json={"question": "one two three four five six seven"}) as resp:
            started = data((await SSEReader(resp).until("btw.started"))[-1])
            async with session.delete(f"{url}/{started['btw_id']}") as cancel:
                assert cancel.status in (200, 202, 204), await cancel.text()
        thread = started["thread_id"]
        await reload(gw, how)
        if how == "evicted":
            follow = await ask_btw(gw, session, cid, "still there?", thread)
    if how.startswith("restarted"):
        async with running_gateway(**opts) as gw:
            follow = await ask_btw(gw, session, cid, "still there?", thread)
    assert follow["thread_id"] == thread
    assert "Earlier in this side thread" not in follow["text"], "nothing was completed in it before"


async def test_threads_of_a_store_without_their_order_of_use_load(
    tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    """A store written before thread uses were recorded holds exchanges only: their threads load (as the
    least recently used) and follow-ups in them keep their context."""
    path = tmp_path / "gw.sqlite3"
    cid = "0123456789abcdef0123456789abcdef"  # the shape of the gateway's conversation ids
    log = SqliteEventLog(str(path), retention=1000)
    await log.open(lambda events: None)
    log.create_conversation(cid, 1.0)
    log.save_exchange(cid, ThreadExchange("thr_old", 1, "what is a btw?", "a side question"))
    await log.close()
    async with running_gateway(store=f"sqlite:{path}", echo_pace=0, btw_grace=0) as gw:
        follow = await ask_btw(gw, session, cid, "and then?", "thr_old")
        assert 'you asked 1 question, the last was "what is a btw?"' in follow["text"]
        assert list((await gw.gateway.conversation(cid)).threads) == ["thr_old"]
