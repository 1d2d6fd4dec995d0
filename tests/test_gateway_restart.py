"""The gateway as a real process: SIGKILL mid-stream and resume from the sqlite or Redis log; SIGTERM
shutdown."""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator

import aiohttp
import pytest

from gateway_helpers import SSEReader, create_conversation, data, get_json, ids, post_message
from sidechain.gateway.testing import GatewayProcess
from sidechain.sse import Event

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
async def test_sigkill_mid_stream_then_resume_from_the_store(
    session: aiohttp.ClientSession, kind: str, request: pytest.FixtureRequest
) -> None:
    store = request.getfixturevalue("redis_store") if kind == "redis" else None  # None: a sqlite file
    async with GatewayProcess("--echo-pace", "40", "--no-access-log", store=store) as gp:
        first_port = gp.port
        cid = await create_conversation(session, gp.url)
        done = await post_message(session, gp.url, cid, "a short first turn")
        async with session.get(f"{gp.url}/v1/conversations/{cid}/events") as resp:
            before = await SSEReader(resp).until("turn.completed")
        turn = await post_message(session, gp.url, cid, " ".join(f"w{i}" for i in range(60)))
        resp = await session.get(
            f"{gp.url}/v1/conversations/{cid}/events", headers={"Last-Event-ID": before[-1].id}
        )
        try:
            reader = SSEReader(resp)
            seen = await reader.until("message.delta")
            while sum(e.event == "message.delta" for e in seen) < 5:
                ev = await reader.event()
                assert ev is not None
                seen.append(ev)
            status = await gp.kill()
            assert status == -signal.SIGKILL
            tail: list[Event] = []
            try:  # whatever was already on the wire before the kill
                while (ev := await reader.event(within=5)) is not None:
                    tail.append(ev)
            except aiohttp.ClientPayloadError:
                pass
        finally:
            resp.close()
        got = before + seen + tail
        assert ids(got) == list(range(1, len(got) + 1))

        await gp.restart()
        assert gp.port == first_port
        async with session.get(
            f"{gp.url}/v1/conversations/{cid}/events", headers={"Last-Event-ID": got[-1].id}
        ) as resp:
            after = await SSEReader(resp).until("turn.failed", "turn.completed")
        everything = got + after
        # nothing lost, nothing repeated, and the interrupted turn ends with turn.failed
        assert ids(everything) == list(range(1, len(everything) + 1))
        assert after[-1].event == "turn.failed"
        assert data(after[-1])["turn_id"] == turn["turn_id"]
        assert data(after[-1])["error"]["type"] == "gateway_restarted"
        assert (
            sum(e.event == "turn.started" and data(e)["turn_id"] == turn["turn_id"] for e in everything) == 1
        )

        conv = await get_json(session, f"{gp.url}/v1/conversations/{cid}")
        assert conv["active_turn"] is None
        assert [m["turn_id"] for m in conv["messages"]] == [done["turn_id"], done["turn_id"], turn["turn_id"]]
        assert conv["last_event_id"] == after[-1].id
        # the conversation goes on, ids continue
        nxt = await post_message(session, gp.url, cid, "after the crash")
        async with session.get(
            f"{gp.url}/v1/conversations/{cid}/events", headers={"Last-Event-ID": after[-1].id}
        ) as resp:
            more = await SSEReader(resp).until("turn.completed")
        assert int(more[0].id) == int(after[-1].id) + 1 and data(more[-1])["turn_id"] == nxt["turn_id"]
        assert "gateway_restarted" in gp.output() or "interrupted by a restart" in gp.output()


async def test_sigterm_graceful_shutdown(session: aiohttp.ClientSession) -> None:
    async with GatewayProcess("--echo-pace", "20") as gp:
        cid = await create_conversation(session, gp.url)
        async with session.get(f"{gp.url}/v1/conversations/{cid}/events") as resp:
            reader = SSEReader(resp)
            turn = await post_message(session, gp.url, cid, "one two three four five six seven eight nine")
            await reader.until("message.delta")
            assert await gp.terminate() == 0
            rest = await reader.rest()
        assert rest[-1].event == "gateway.shutdown" and data(rest[-1]) == {"reconnect": True}
        failed = rest[-2]
        assert failed.event == "turn.failed" and data(failed)["turn_id"] == turn["turn_id"]
        assert data(failed)["error"]["type"] == "gateway_shutdown"
        out = gp.output()
        assert "sidechain gateway listening on http://127.0.0.1:" in out
        assert f'"GET /v1/conversations/{cid}/events" 200' in out  # one access line per request
        assert "Application shutdown complete" in out
        # restarted: the failure is durable and the turn is not failed a second time
        await gp.restart()
        async with session.get(f"{gp.url}/v1/conversations/{cid}/events") as resp:
            reader = SSEReader(resp)
            replay = await reader.until("turn.failed")
        assert ids(replay)[-1] == int(failed.id)
        conv = await get_json(session, f"{gp.url}/v1/conversations/{cid}")
        assert conv["last_event_id"] == failed.id


async def test_process_with_token(session: aiohttp.ClientSession) -> None:
    async with GatewayProcess("--no-access-log", token="tok-en") as gp:
        async with session.get(f"{gp.url}/healthz") as r:
            assert r.status == 200
        async with session.post(f"{gp.url}/v1/conversations") as r:
            assert r.status == 401
        await create_conversation(session, gp.url, headers=gp.headers())
        assert "tok-en" not in gp.output()  # a given token is never printed


async def test_a_second_gateway_on_the_same_store_does_not_start_nor_touch_it(
    session: aiohttp.ClientSession,
) -> None:
    """A second ``serve`` on a store in use exits with a clear error before it recovers anything: the
    first gateway's running turn is not failed under it and ends normally."""
    async with GatewayProcess("--echo-pace", "40", "--no-access-log") as first:
        cid = await create_conversation(session, first.url)
        async with session.get(f"{first.url}/v1/conversations/{cid}/events") as resp:
            reader = SSEReader(resp)
            turn = await post_message(session, first.url, cid, " ".join(f"w{i}" for i in range(20)))
            await reader.until("message.delta")
            with pytest.raises(RuntimeError) as refused:  # start() saw the process exit first
                async with GatewayProcess("--no-access-log", store=first.store):
                    pass
            assert "sidechain serve: the gateway failed to start: StoreInUse: the store" in str(refused.value)
            events = await reader.until("turn.completed", "turn.failed")
        assert events[-1].event == "turn.completed" and data(events[-1])["turn_id"] == turn["turn_id"]
