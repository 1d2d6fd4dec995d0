"""btw side questions: snapshot answers, threads, resume and replay, cancel, grace and expiry."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Mapping
from typing import Any

import aiohttp
import pytest

from gateway_helpers import (
    SSEReader,
    create_conversation,
    data,
    error_of,
    get_json,
    ids,
    open_fds,
    other_tasks,
    post_message,
    wait_until,
)
from sidechain.gateway.testing import RunningGateway, running_gateway
from sidechain.sse import Event

LONG = " ".join(f"word{i}" for i in range(80))


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


def btw_url(gw: RunningGateway, cid: str) -> str:
    return f"{gw.url}/v1/conversations/{cid}/btw"


def answer_of(events: list[Event]) -> str:
    return "".join(data(e)["delta"] for e in events if e.event == "btw.delta")


async def ask(
    session: aiohttp.ClientSession, gw: RunningGateway, cid: str, question: str, **extra: Any
) -> tuple[list[Event], Mapping[str, str]]:
    payload = {"question": question, **extra}
    async with session.post(btw_url(gw, cid), json=payload) as resp:
        assert resp.status == 200, await resp.text()
        return await SSEReader(resp).rest(), resp.headers.copy()


def check_btw_stream(events: list[Event], headers: Mapping[str, str]) -> dict[str, Any]:
    assert headers["Content-Type"] == "text/event-stream; charset=utf-8"
    assert headers["Cache-Control"] == "no-cache"
    assert ids(events) == list(range(1, len(events) + 1))
    assert events[0].event == "btw.started"
    assert data(events[0]) == {"btw_id": headers["X-Btw-Id"], "thread_id": headers["X-Thread-Id"]}
    assert {e.event for e in events[1:-1]} == {"btw.delta"}
    assert events[-1].event == "btw.completed"
    done: dict[str, Any] = data(events[-1])
    assert done == {
        "btw_id": headers["X-Btw-Id"],
        "thread_id": headers["X-Thread-Id"],
        "text": answer_of(events),
    }
    return done


async def test_btw_during_a_streaming_turn(session: aiohttp.ClientSession) -> None:
    async with running_gateway(echo_pace=100) as gw:
        cid = await create_conversation(session, gw.url)
        loop = asyncio.get_running_loop()
        async with session.get(f"{gw.url}/v1/conversations/{cid}/events") as resp:
            reader = SSEReader(resp)
            turn = await post_message(session, gw.url, cid, LONG)
            main: list[tuple[float, Event]] = []

            async def follow_main() -> None:
                while True:
                    ev = await reader.event()
                    assert ev is not None
                    main.append((loop.time(), ev))
                    if ev.event in ("turn.completed", "turn.failed"):
                        return

            async with asyncio.TaskGroup() as tg:
                follower = tg.create_task(follow_main())
                await wait_until(lambda: sum(e.event == "message.delta" for _, e in main) >= 5)
                events, headers = await ask(session, gw, cid, "what is this about?")
                btw_done_at = loop.time()
                assert not follower.done()  # the main turn is still streaming
                # asking a btw never makes the conversation busy or 409s
                async with session.get(f"{gw.url}/v1/conversations/{cid}") as r:
                    assert (await r.json())["active_turn"]["turn_id"] == turn["turn_id"]
        done = check_btw_stream(events, headers)
        assert "offline echo model" in done["text"]
        assert '"what is this about?"' in done["text"]
        assert f'"{LONG[:100]}' in done["text"] and "1 turn." in done["text"]
        assert "A main answer is being written" in done["text"]
        main_events = [e for _, e in main]
        assert main_events[-1].event == "turn.completed"
        assert btw_done_at < main[-1][0]
        assert not any(e.event.startswith("btw") for e in main_events)
        # the main turn was not delayed: deltas kept their 10 ms pace while the btw streamed
        times = [t for t, e in main if e.event == "message.delta"]
        assert max(b - a for a, b in itertools.pairwise(times)) < 0.3
        conv = await get_json(session, f"{gw.url}/v1/conversations/{cid}")
        assert [m["role"] for m in conv["messages"]] == ["user", "assistant"]
        assert all("what is this about" not in m["text"] for m in conv["messages"])
        assert gw.gateway.metrics.btws_active == 0 and gw.gateway.metrics.turns_active == 0


async def test_btw_does_not_make_the_conversation_busy(session: aiohttp.ClientSession) -> None:
    async with running_gateway(echo_pace=50) as gw:
        cid = await create_conversation(session, gw.url)
        async with session.post(btw_url(gw, cid), json={"question": "idle?"}) as resp:
            reader = SSEReader(resp)
            first = await reader.event()
            assert first is not None and first.event == "btw.started"
            turn = await post_message(session, gw.url, cid, "not blocked")  # 202, not 409
            assert turn["queued"] is False
            events = [first, *await reader.rest()]
        done = data(events[-1])
        assert "no messages yet" in done["text"]


async def test_btw_thread_continuation(session: aiohttp.ClientSession) -> None:
    async with running_gateway(echo_pace=0) as gw:
        cid = await create_conversation(session, gw.url)
        await post_message(session, gw.url, cid, "the main topic")
        conv = gw.gateway._convs[cid]
        await wait_until(lambda: not conv.busy)
        first, h1 = await ask(session, gw, cid, "first side question")
        thread = h1["X-Thread-Id"]
        second, h2 = await ask(session, gw, cid, "second side question", thread_id=thread)
        third, h3 = await ask(session, gw, cid, "third side question", thread_id=thread)
        other, h4 = await ask(session, gw, cid, "unrelated")
        for events, headers in ((first, h1), (second, h2), (third, h3), (other, h4)):
            check_btw_stream(events, headers)
        assert h2["X-Thread-Id"] == h3["X-Thread-Id"] == thread != h4["X-Thread-Id"]
        assert len({h["X-Btw-Id"] for h in (h1, h2, h3, h4)}) == 4
        assert "Earlier in this side thread" not in answer_of(first)
        assert 'asked 1 question, the last was "first side question"' in answer_of(second)
        assert 'asked 2 questions, the last was "second side question"' in answer_of(third)
        assert "Earlier in this side thread" not in answer_of(other)
        # the model context holds the thread's questions and answers
        request = conv.btw_request("q", conv.threads[thread])
        contents = [m.content for m in request.messages]
        assert contents[1:3] == ["the main topic", conv.turns[0].assistant_text]
        assert contents[3:7] == [
            "first side question",
            answer_of(first),
            "second side question",
            answer_of(second),
        ]
        assert request.messages[0].role == "system" and contents[-1] == "q"


async def test_btw_resume_with_idempotency_key_and_last_event_id(session: aiohttp.ClientSession) -> None:
    async with running_gateway(echo_pace=100) as gw:
        cid = await create_conversation(session, gw.url)
        await post_message(session, gw.url, cid, "context for the side question")
        key = {"Idempotency-Key": "key-123"}
        resp = await session.post(btw_url(gw, cid), json={"question": "resumable?"}, headers=key)
        try:
            assert resp.status == 200
            btw_id = resp.headers["X-Btw-Id"]
            reader = SSEReader(resp)
            head = [await reader.event() for _ in range(5)]
        finally:
            resp.close()  # the connection drops mid-answer
        btw = gw.gateway.btws.get(cid, btw_id)
        await wait_until(lambda: btw.readers == 0)
        assert not btw.finished  # still generating during the grace period
        got = [e for e in head if e is not None]
        assert ids(got) == [1, 2, 3, 4, 5]
        resume = {**key, "Last-Event-ID": got[-1].id}
        async with session.post(btw_url(gw, cid), json={"question": "resumable?"}, headers=resume) as resp:
            assert resp.status == 200 and resp.headers["X-Btw-Id"] == btw_id
            tail = await SSEReader(resp).rest()
        events = got + tail
        check_btw_stream(events, resp.headers)
        assert ids(tail)[0] == 6  # nothing repeated
        assert len(gw.gateway.btws) == 1  # not generated again
        assert gw.gateway.metrics.resumes_total == 1
        # same key, no Last-Event-ID: a replay of the whole answer, byte for byte the same events
        async with session.post(btw_url(gw, cid), json={"question": "resumable?"}, headers=key) as resp:
            replay = await SSEReader(resp).rest()
        assert [(e.id, e.event, e.data) for e in replay] == [(e.id, e.event, e.data) for e in events]
        # and by id
        async with session.get(f"{btw_url(gw, cid)}/{btw_id}", headers={"Last-Event-ID": "3"}) as resp:
            by_id = await SSEReader(resp).rest()
        assert by_id == events[3:]
        # a different question under the same key is refused
        async with session.post(btw_url(gw, cid), json={"question": "other"}, headers=key) as resp:
            assert resp.status == 409
            assert error_of(await resp.json())[0] == "idempotency_key_reused"
        async with session.post(
            btw_url(gw, cid), json={"question": "resumable?"}, headers={**key, "Last-Event-ID": "999"}
        ) as resp:
            assert resp.status == 400


async def test_btw_expired_key_with_last_event_id_is_404(session: aiohttp.ClientSession) -> None:
    async with running_gateway(echo_pace=0, btw_grace=0.05) as gw:
        cid = await create_conversation(session, gw.url)
        headers = {"Idempotency-Key": "k"}
        async with session.post(btw_url(gw, cid), json={"question": "q"}, headers=headers) as resp:
            events = await SSEReader(resp).rest()
        await wait_until(lambda: len(gw.gateway.btws) == 0, within=2, what="btw freed after grace")
        async with session.post(
            btw_url(gw, cid), json={"question": "q"}, headers={**headers, "Last-Event-ID": events[2].id}
        ) as resp:
            assert resp.status == 404
            assert error_of(await resp.json())[0] == "btw_expired"
        async with session.get(f"{btw_url(gw, cid)}/{data(events[0])['btw_id']}") as resp:
            assert resp.status == 404
        # without Last-Event-ID the expired key simply asks again
        async with session.post(btw_url(gw, cid), json={"question": "q"}, headers=headers) as resp:
            assert resp.status == 200 and resp.headers["X-Btw-Id"] != data(events[0])["btw_id"]
            await SSEReader(resp).rest()


async def test_btw_keeps_generating_while_disconnected_then_abandoned(session: aiohttp.ClientSession) -> None:
    async with running_gateway(echo_pace=20, btw_grace=0.3) as gw:
        cid = await create_conversation(session, gw.url)
        resp = await session.post(btw_url(gw, cid), json={"question": "walk away"})
        try:
            btw = gw.gateway.btws.get(cid, resp.headers["X-Btw-Id"])
            await SSEReader(resp).until("btw.delta")
        finally:
            resp.close()
        await wait_until(lambda: btw.readers == 0, within=1.0)
        generated = len(btw.blocks)
        await wait_until(lambda: len(btw.blocks) > generated, within=1.0, what="generation continuing")
        await wait_until(lambda: btw.finished, within=3.0, what="abandoned after the grace period")
        assert not btw.blocks[-1].endswith(b"btw.completed") and btw.state == "failed"
        async with session.get(
            f"{btw_url(gw, cid)}/{btw.id}", headers={"Last-Event-ID": str(generated)}
        ) as r:
            tail = await SSEReader(r).rest()
        assert tail[-1].event == "error" and data(tail[-1])["type"] == "abandoned"
        await wait_until(lambda: len(gw.gateway.btws) == 0, within=3.0, what="freed after grace")


async def test_btw_delete_cancels_at_once(session: aiohttp.ClientSession) -> None:
    async with running_gateway(echo_pace=10) as gw:
        cid = await create_conversation(session, gw.url)
        fds_before, tasks_before = open_fds(), other_tasks()
        async with aiohttp.ClientSession() as client:
            async with client.post(btw_url(gw, cid), json={"question": "cancel me"}) as resp:
                btw_id = resp.headers["X-Btw-Id"]
                reader = SSEReader(resp)
                await reader.until("btw.delta")
                async with session.delete(f"{btw_url(gw, cid)}/{btw_id}") as d:
                    assert d.status == 202
                    assert await d.json() == {"btw_id": btw_id, "state": "failed"}
                rest = await reader.rest(within=2)
            assert rest[-1].event == "error"
            assert data(rest[-1])["type"] == "cancelled" and data(rest[-1])["message"]
            async with session.delete(f"{btw_url(gw, cid)}/{btw_id}") as d:  # idempotent while retained
                assert d.status == 202
        assert gw.gateway.metrics.btws_active == 0 and gw.gateway.metrics.btw_streams_open == 0
        await wait_until(lambda: other_tasks() <= tasks_before, within=2.0, what="btw tasks to end")
        await wait_until(lambda: open_fds() <= fds_before, within=2.0, what="sockets to close")


async def test_too_many_btws_is_429(session: aiohttp.ClientSession) -> None:
    async with running_gateway(echo_pace=10, max_active_btws=1) as gw:
        cid = await create_conversation(session, gw.url)
        async with session.post(btw_url(gw, cid), json={"question": "one"}) as first:
            assert first.status == 200
            async with session.post(btw_url(gw, cid), json={"question": "two"}) as second:
                assert second.status == 429
                assert error_of(await second.json())[0] == "too_many_btws"
            async with session.delete(f"{btw_url(gw, cid)}/{first.headers['X-Btw-Id']}") as d:
                assert d.status == 202
            await SSEReader(first).rest()


async def test_shutdown_ends_btw_streams(session: aiohttp.ClientSession) -> None:
    async with running_gateway(echo_pace=10) as gw:
        cid = await create_conversation(session, gw.url)
        resp = await session.post(btw_url(gw, cid), json={"question": "still there?"})
        try:
            reader = SSEReader(resp)
            await reader.until("btw.started")
            gw.server.should_exit = True
            rest = await reader.rest()
        finally:
            resp.release()
    assert rest[-1].event == "error" and data(rest[-1])["type"] == "gateway_shutdown"
