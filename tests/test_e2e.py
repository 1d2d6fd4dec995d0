"""The whole system end to end: real gateway on 127.0.0.1, sidechain's own clients."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from conftest import Resources, settle_resources
from sidechain import BtwClient, ConnectError, Conversation, EventStreamClient, Fault, RetryPolicy
from sidechain.chaos import ChaosProxy, FaultPlan
from sidechain.client.btw import decode_payload
from sidechain.gateway.testing import GatewayProcess, running_gateway
from sidechain.sse import Event


def turn_events(events: list[Event], turn_id: str) -> list[Event]:
    return [e for e in events if e.data.startswith("{") and decode_payload(e).get("turn_id") == turn_id]


async def follow_turn(events: EventStreamClient, turn_id: str, seen: list[Event]) -> str:
    """Consume the event stream until the turn ends; returns the assistant text."""
    parts: list[str] = []
    async for event in events:
        seen.append(event)
        if not event.data.startswith("{"):
            continue
        data = decode_payload(event)
        if data.get("turn_id") != turn_id:
            continue
        if event.event == "message.delta":
            parts.append(data["delta"])
        if event.event in ("turn.completed", "turn.failed"):
            assert event.event == "turn.completed", data
            return "".join(parts)
    raise AssertionError("event stream ended before the turn")


async def test_btw_while_main_turn_streams_both_complete_and_btw_not_in_history() -> None:
    async with running_gateway(echo_pace=150) as gw:
        conv = await Conversation.create(gw.url)
        seen: list[Event] = []
        async with conv.events() as events:
            turn_id = await conv.send("Tell me a long story about server-sent events and resumable streams")
            main = asyncio.create_task(follow_turn(events, turn_id, seen))
            # ask while the main turn is streaming: wait until it produced at least one delta
            while not any(e.event == "message.delta" for e in seen):
                await asyncio.wait({main}, timeout=0.01)
            assert not main.done()
            async with conv.btw("what did I ask for?") as answer:
                deltas = [d async for d in answer]
            main_text = await main
        assert answer.completed and answer.btw_id and answer.thread_id
        assert "".join(deltas) == answer.text
        assert "Tell me a long story" in answer.text  # answered from the snapshot
        assert "long story" in main_text
        history = await conv.history()
        texts = [m["text"] for m in history["messages"]]
        assert len(texts) == 2 and main_text in texts[1]
        assert not any("what did I ask for" in t or answer.text in t for t in texts)
        # main-turn events are contiguous ids with no btw events among them
        ids = [int(e.id) for e in turn_events(seen, turn_id)]
        assert ids == list(range(ids[0], ids[0] + len(ids)))
        assert not any(e.event.startswith("btw.") for e in seen)


async def test_btw_thread_follow_up_remembers_earlier_question() -> None:
    async with running_gateway(echo_pace=0) as gw:
        conv = await Conversation.create(gw.url)
        await conv.ask("hello there")
        async with conv.btw("first side question") as first:
            await first.read()
        async with conv.btw("second one", follow_up=True) as second:
            await second.read()
        assert second.thread_id == first.thread_id
        assert "first side question" in second.text or "1 earlier" in second.text


async def test_btw_cancelled_mid_stream_main_turn_continues_and_nothing_leaks() -> None:
    # the main answer (~25 words) must outlast the btw's start and cancel even on a busy machine
    async with running_gateway(echo_pace=25) as gw:
        conv = await Conversation.create(gw.url)
        await conv.ask("warm up")  # first request paths (imports, pools) out of the counts
        before = Resources.now()
        seen: list[Event] = []
        async with conv.events() as events:
            turn_id = await conv.send("a long answer please, with many many words in it to stream slowly")
            main = asyncio.create_task(follow_turn(events, turn_id, seen))
            got_delta = asyncio.Event()
            btw_ids: list[str] = []

            async def ask() -> None:
                async with conv.btw("a side question that will be cancelled") as answer:
                    async for _ in answer:
                        if answer.btw_id:
                            btw_ids[:] = [answer.btw_id]
                        got_delta.set()

            btw_task = asyncio.create_task(ask())
            await asyncio.wait_for(got_delta.wait(), 10)
            btw_task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await btw_task
            assert not main.done(), "the main turn goes on"
            main_text = await main
        assert "many many words" in main_text
        # the gateway saw the cancel (the client's DELETE), not just a disconnect
        btw = gw.gateway.btws.get(conv.id, btw_ids[0])
        assert btw.state != "running"
        assert btw.cancel_reason == "cancelled"
        after = await settle_resources(before, within=3)
        assert after.fds <= before.fds, (before, after)
        assert after.tasks <= before.tasks, (before, after)


async def test_btw_connection_dropped_mid_answer_resumes_to_same_text() -> None:
    async with running_gateway(echo_pace=0) as gw:
        conv = await Conversation.create(gw.url)
        await conv.ask("what is a btw?")
        async with conv.btw("explain the last message") as reference:
            expected = await reference.read()
        port = urlsplit(gw.url).port
        assert port is not None
        for offset in (200, 500, 900):

            def plan(n: int, o: int = offset) -> FaultPlan:
                return FaultPlan("rst", after_bytes=o) if n == 1 else FaultPlan()

            async with ChaosProxy("127.0.0.1", port, plan=plan) as proxy:
                client = BtwClient(proxy.url, retry=RetryPolicy(base_delay=0.01, max_delay=0.05))
                async with client.send_message(conv.id, "explain the last message") as answer:
                    deltas = [d async for d in answer]
                assert proxy.faults_injected == 1
            assert answer.attempts == 2
            # same text (the echo model is deterministic); nothing repeated, nothing lost
            assert "".join(deltas) == answer.text
            assert answer.text == expected


async def test_gateway_restart_under_open_event_stream_resumes_exactly() -> None:
    async with GatewayProcess("--echo-pace", "400") as gp:
        conv = await Conversation.create(gp.url)
        seen: list[Event] = []
        faults: list[Fault] = []
        async with EventStreamClient(f"{gp.url}/v1/conversations/{conv.id}/events",
                                     initial_reconnect_delay=0.1, max_reconnect_delay=0.5) as events:
            first = await conv.send("one two three four five six seven eight nine ten")
            it = events.items()
            async for item in it:
                if isinstance(item, Event):
                    seen.append(item)
                    if item.event == "message.delta":
                        break
            await gp.kill()  # SIGKILL mid-turn
            await gp.restart()
            completed: set[str] = set()
            second: str | None = None
            async for item in it:
                if isinstance(item, Fault):
                    faults.append(item)
                    continue
                if not isinstance(item, Event):
                    continue
                seen.append(item)
                data = decode_payload(item) if item.data.startswith("{") else {}
                if item.event in ("turn.failed", "turn.completed"):
                    completed.add(data["turn_id"])
                    if data["turn_id"] == first and second is None:
                        second = await conv.send("after the restart")
                    if second in completed:
                        break
        ids = [int(e.id) for e in seen]
        assert ids == sorted(set(ids)), "no event lost order or repeated"
        assert ids == list(range(ids[0], ids[0] + len(ids))), "no gap: nothing lost"
        assert faults, "the client saw the drop"
        failed = [e for e in seen if e.event == "turn.failed"]
        assert failed and decode_payload(failed[0])["error"]["type"] == "gateway_restarted"


async def test_readme_example_runs() -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    match = re.search(r"```python\n(.*?)```", readme, re.S)
    assert match, "README has a python example"
    code = match.group(1)
    async with running_gateway(echo_pace=0) as gw:
        code = code.replace("http://127.0.0.1:8765", gw.url)
        namespace: dict[str, object] = {}
        exec(compile("async def __example():\n" + "\n".join("    " + ln for ln in code.splitlines()),
                     "README.md", "exec"), namespace)
        await namespace["__example"]()  # type: ignore[operator]



async def test_ask_gives_up_when_the_gateway_stays_down() -> None:
    """ask() waits through reconnects, but not forever: with the gateway killed mid-turn and not
    restarted, it raises the connection's error after max_reconnects failed attempts in a row."""
    async with GatewayProcess("--echo-pace", "20") as gp:
        conv = await Conversation.create(gp.url)
        asking = asyncio.create_task(conv.ask("one two three four five six seven eight nine ten",
                                              max_reconnects=3))
        for _ in range(500):  # until the turn streams (so ask() is reading its event stream), at most 5 s
            active = (await conv.history())["active_turn"]
            if active and active["partial_text"]:
                break
            await asyncio.sleep(0.01)
        else:
            pytest.fail("the turn never started streaming")
        await gp.kill()
        done, _ = await asyncio.wait({asking}, timeout=20)
        assert done, "ask() still waiting 20 s after the gateway died"
        with pytest.raises(ConnectError):
            asking.result()


async def test_ask_cut_short_cancels_its_turn_and_a_closed_btw_answer_says_so() -> None:
    """ask() bounded with asyncio.timeout: the turn it stopped waiting for is cancelled on the gateway,
    so the next ask() is not 409 turn_active. A BtwAnswer left before it completed refuses to be read
    (it yielded nothing, silently) or entered again."""
    async with running_gateway(echo_pace=20) as gw:
        conv = await Conversation.create(gw.url)
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.3):
                await conv.ask("one two three four five six seven eight nine ten eleven twelve")
        history = await conv.history()
        assert history["active_turn"] is None
        assert "[offline" in await conv.ask("short")
        answer = conv.btw("one two three four five six seven eight nine")
        async with answer:
            first = await anext(answer)
        with pytest.raises(RuntimeError, match="closed before it completed"):
            await anext(answer)
        assert answer.text == first and not answer.completed
        with pytest.raises(RuntimeError, match="used once"):
            async with answer:
                pass
