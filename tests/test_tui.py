"""The Textual chat client, driven by Textual's pilot against a real gateway."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable

import pytest
from textual.pilot import Pilot

from conftest import Resources, settle_resources
from sidechain import Conversation
from sidechain.gateway.testing import GatewayProcess, RunningGateway, running_gateway
from sidechain.sse import Event
from sidechain.tui import ChatApp, run_tui
from sidechain.tui.status import StreamState, describe_stream
from sidechain.tui.widgets import InfoLine, NoteMessage, StreamingMarkdown, UserMessage

SIZE = (110, 32)

LONG = ("Tell me a long story about server-sent events, resumable streams, reconnects with Last-Event-ID, "
        "keepalive comments, idle timeouts, backpressure, bounded buffers, cancellation, structured "
        "concurrency, side questions that never block the main answer, and what a **gateway** does when "
        "it restarts in the middle of a turn while a client keeps reading.")


async def wait_for(pilot: Pilot[None], condition: Callable[[], object], what: str, within: float = 10.0
                   ) -> None:
    """Let the app run until ``condition()`` holds; fail after ``within`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        await pilot.pause(0.02)


async def connected(app: ChatApp, pilot: Pilot[None]) -> None:
    await wait_for(pilot, lambda: app.status_bar.stream.text == "connected", "the event stream")


async def submit(pilot: Pilot[None], app: ChatApp, line: str) -> None:
    """Type ``line`` into the input box (set at once: typing it key by key is slow) and press enter."""
    app.prompt.focus()
    app.prompt.value = line
    await pilot.press("enter")


def main_answer(app: ChatApp) -> StreamingMarkdown:
    answers = list(app.conversation_pane.query(StreamingMarkdown))
    assert answers, "no answer in the conversation pane"
    return answers[-1]


def first_btw_text(app: ChatApp) -> str:
    exchanges = app.btw_panel.exchanges
    return exchanges[0].answer.source if exchanges else ""


def has_answer(app: ChatApp) -> bool:
    return bool(app.conversation_pane.query(StreamingMarkdown))


# -- pure parts --------------------------------------------------------------------------------------


def test_stream_state_texts() -> None:
    assert describe_stream("open") == StreamState("ok", "connected")
    assert describe_stream("connecting").text == "connecting…"
    assert describe_stream("reconnecting", failures=2, reconnect_at=11.5, now=10.0).text == (
        "reconnecting in 1.5 s (attempt 2)")
    assert describe_stream("reconnecting", failures=3, reconnect_at=42.0, now=10.0).text == (
        "reconnecting in 32 s (attempt 3)")
    assert describe_stream("reconnecting", failures=1).text == "reconnecting… (attempt 1)"
    assert describe_stream("closed", error="HTTP 404") == StreamState("error", "closed: HTTP 404")


async def test_run_tui_is_the_entry_point_commands_call() -> None:
    import inspect

    params = inspect.signature(run_tui).parameters
    assert list(params) == ["url", "token", "conversation_id"]
    assert params["token"].kind is params["conversation_id"].kind is inspect.Parameter.KEYWORD_ONLY
    assert inspect.iscoroutinefunction(run_tui)


# -- against a gateway -------------------------------------------------------------------------------


async def test_main_turn_renders_progressively() -> None:
    async with running_gateway(echo_pace=40) as gw:
        app = ChatApp(gw.url)
        async with app.run_test(size=SIZE) as pilot:
            await connected(app, pilot)
            assert app.status_bar.url == gw.url and app.status_bar.model == "echo"
            await submit(pilot, app, LONG)
            await wait_for(pilot, lambda: has_answer(app), "the answer to start")
            answer = main_answer(app)
            user = app.conversation_pane.query(UserMessage)
            assert [m.text for m in user] == [LONG]
            sizes = [len(answer.source)]
            while not answer.settled or len(answer.source) != len(answer.text):
                await pilot.pause(0.02)
                if len(answer.source) != sizes[-1]:
                    sizes.append(len(answer.source))
            await wait_for(pilot, lambda: app.turn_id is None, "the turn to end")
            assert answer.source.startswith("[offline echo model, no AI connected] You said: Tell me")
            assert answer.source.endswith("while a client keeps reading.")
            # rendered as it arrived: many partial renders, each longer than the one before
            assert len(sizes) >= 5, sizes
            assert sizes == sorted(sizes) and sizes[-1] == len(answer.text)
            assert answer.query("MarkdownParagraph"), "the answer is rendered as Markdown"
            assert not answer.has_class("streaming") and not answer.replaced


async def test_btw_streams_while_main_turn_continues_and_follow_up_continues_thread() -> None:
    # the main answer (~70 words) must outlast the btw's first 40 characters even on a busy machine
    async with running_gateway(echo_pace=15) as gw:
        app = ChatApp(gw.url)
        async with app.run_test(size=SIZE) as pilot:
            await connected(app, pilot)
            await submit(pilot, app, LONG)
            await wait_for(pilot, lambda: has_answer(app) and main_answer(app).source, "the main answer")
            answer = main_answer(app)
            await submit(pilot, app, "/btw what did I ask for?")
            assert app.btw_panel.is_open
            await wait_for(pilot, lambda: first_btw_text(app), "the btw answer")
            side = app.btw_panel.exchanges[0].answer
            main_at_start, side_at_start = len(answer.source), len(side.source)
            # both grow at the same time: the main turn keeps streaming in its pane while the btw does
            await wait_for(pilot, lambda: len(answer.source) > main_at_start, "the main answer to grow")
            assert not side.settled, "the btw finished before the main answer grew at all"
            await wait_for(pilot, lambda: len(side.source) > side_at_start + 40, "more of the btw answer")
            assert app.turn_id is not None and answer.streaming
            await wait_for(pilot, lambda: side.settled and side.source == side.text, "the btw to complete")
            assert 'Side question: "what did I ask for?"' in side.text
            assert "Tell me a long story" in side.text  # answered from the conversation's snapshot
            assert app.last_exchange == ("what did I ask for?", side.text)
            assert app.btw_answer is not None
            thread = app.btw_answer.thread_id
            assert thread

            await submit(pilot, app, "/btw and a follow-up?")
            await wait_for(pilot, lambda: len(app.btw_panel.exchanges) == 2
                           and app.btw_panel.exchanges[1].answer.settled
                           and app.btw_panel.exchanges[1].answer.source, "the follow-up answer")
            follow = app.btw_panel.exchanges[1].answer.text
            assert app.btw_answer.thread_id == thread
            assert ('Earlier in this side thread you asked 1 question, the last was "what did I ask for?"'
                    in follow)
            await wait_for(pilot, lambda: app.turn_id is None, "the main turn to end", within=15)
            assert answer.text.endswith("while a client keeps reading.")
            history = await app.conversation.history()  # type: ignore[union-attr]
            assert [m["role"] for m in history["messages"]] == ["user", "assistant"]


async def test_escape_cancels_the_btw_only_and_the_gateway_sees_it() -> None:
    async with running_gateway(echo_pace=20) as gw:
        app = ChatApp(gw.url)
        async with app.run_test(size=SIZE) as pilot:
            await connected(app, pilot)
            await submit(pilot, app, LONG)
            await wait_for(pilot, lambda: has_answer(app) and main_answer(app).source, "the main answer")
            await submit(pilot, app, "/btw a question to cancel")
            await wait_for(pilot, lambda: app.btw_answer is not None and app.btw_answer.btw_id
                           and app.btw_panel.exchanges[0].answer.source, "the btw answer")
            answer = app.btw_answer
            assert answer is not None and answer.btw_id is not None
            conversation = app.conversation
            assert conversation is not None
            await pilot.press("escape")
            assert not app.btw_panel.is_open

            def cancelled() -> bool:
                return gw.gateway.btws.get(conversation.id, answer.btw_id or "").cancel_reason == "cancelled"

            await wait_for(pilot, cancelled, "the gateway to cancel the btw")
            btw = gw.gateway.btws.get(conversation.id, answer.btw_id)
            assert btw.state == "failed" and not answer.completed
            assert not app.btw_running
            main = main_answer(app)
            assert app.turn_id is not None and main.streaming, "the main turn goes on"
            before = len(main.source)
            await wait_for(pilot, lambda: len(main.source) > before, "more of the main answer")
            # a new btw after dismissing starts a new thread
            await submit(pilot, app, "/btw a fresh one")
            await wait_for(pilot, lambda: app.btw_answer is not answer and app.btw_answer is not None
                           and app.btw_answer.thread_id, "the new btw")
            fresh = app.btw_answer
            assert fresh is not None and fresh.thread_id != answer.thread_id
            assert len(app.btw_panel.exchanges) == 1


async def test_ctrl_c_cancels_the_main_turn() -> None:
    async with running_gateway(echo_pace=20) as gw:
        app = ChatApp(gw.url)
        async with app.run_test(size=SIZE) as pilot:
            await connected(app, pilot)
            await pilot.press("ctrl+c")  # nothing running: only a notice
            assert app.return_code is None
            await submit(pilot, app, LONG)
            await wait_for(pilot, lambda: app.turn_id is not None and main_answer(app).source, "the turn")
            turn = app.turn_id
            await pilot.press("ctrl+c")
            await wait_for(pilot, lambda: app.conversation_pane.query(InfoLine), "the cancel notice")
            assert [w.text for w in app.conversation_pane.query(InfoLine)] == ["turn cancelled"]
            assert app.turn_id is None and not main_answer(app).streaming
            assert "while a client keeps reading" not in main_answer(app).text
            conv = await gw.gateway.conversation(app.conversation.id)  # type: ignore[union-attr]
            assert not conv.busy
            history = await app.conversation.history()  # type: ignore[union-attr]
            assert history["active_turn"] is None and turn not in [
                m["turn_id"] for m in history["messages"] if m["role"] == "assistant"]


async def test_attach_loads_history_then_follows_live() -> None:
    async with running_gateway(echo_pace=0) as gw:
        conv = await Conversation.create(gw.url)
        first = await conv.ask("the first message")
        app = ChatApp(gw.url, conversation_id=conv.id)
        async with app.run_test(size=SIZE) as pilot:
            await connected(app, pilot)
            pane = app.conversation_pane
            assert [m.text for m in pane.query(UserMessage)] == ["the first message"]
            await wait_for(pilot, lambda: main_answer(app).source == first, "the history answer")
            assert app.status_bar.conversation == conv.id[:8]
            await submit(pilot, app, "a second one")
            await wait_for(pilot, lambda: len(pane.query(StreamingMarkdown)) == 2
                           and main_answer(app).settled and main_answer(app).source, "the new answer")
            assert main_answer(app).text.endswith("You said: a second one")
            # history was not replayed by the event stream: each message shows once
            assert [m.text for m in pane.query(UserMessage)] == ["the first message", "a second one"]


async def test_attach_mid_turn_shows_the_partial_answer_and_continues_it() -> None:
    async with running_gateway(echo_pace=40) as gw:
        conv = await Conversation.create(gw.url)
        await conv.send(LONG)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while not ((await conv.history()).get("active_turn") or {}).get("partial_text"):
            assert loop.time() < deadline, "the turn did not start"
            await asyncio.sleep(0.02)
        app = ChatApp(gw.url, conversation_id=conv.id)
        async with app.run_test(size=SIZE) as pilot:
            await wait_for(pilot, lambda: app.turn_id is not None and has_answer(app), "the partial answer")
            answer = main_answer(app)
            await wait_for(pilot, lambda: app.turn_id is None and answer.settled, "the turn to end")
            # the partial text from the history plus the live deltas make the answer exactly once
            assert answer.text == "[offline echo model, no AI connected] You said: " + LONG
            assert not answer.replaced
            assert [m.text for m in app.conversation_pane.query(UserMessage)] == [LONG]


async def test_attach_to_unknown_conversation_exits_with_an_error() -> None:
    async with running_gateway(echo_pace=0) as gw:
        app = ChatApp(gw.url, conversation_id="0" * 32)
        async with app.run_test(size=SIZE) as pilot:
            await wait_for(pilot, lambda: app.return_code is not None, "the app to exit")
        assert app.return_code == 1


async def test_inject_adds_the_btw_exchange_as_a_visible_note() -> None:
    async with running_gateway(echo_pace=0) as gw:
        app = ChatApp(gw.url)
        async with app.run_test(size=SIZE) as pilot:
            await connected(app, pilot)
            await submit(pilot, app, "/inject")  # nothing yet: a notice, nothing sent
            await submit(pilot, app, "/btw what is 2 + 2?")
            await wait_for(pilot, lambda: app.last_exchange is not None, "the btw to complete")
            question, answer = app.last_exchange or ("", "")
            await submit(pilot, app, "/inject")
            await wait_for(pilot, lambda: app.conversation_pane.query(NoteMessage), "the note")
            note = app.conversation_pane.query_one(NoteMessage)
            assert "what is 2 + 2?" in note.text and answer.strip() in note.text
            assert app.conversation is not None
            cid = app.conversation.id
            history = await app.conversation.history()
            assert [m["role"] for m in history["messages"]] == ["note"], "a note, and no turn ran for it"
            assert question in history["messages"][0]["text"]
            assert history["active_turn"] is None and history["queued_turns"] == []

        # attached again, the note is in the history that is shown
        again = ChatApp(gw.url, conversation_id=cid)
        async with again.run_test(size=SIZE) as pilot:
            await wait_for(pilot, lambda: again.conversation_pane.query(NoteMessage), "the note, shown again")
            assert question in again.conversation_pane.query_one(NoteMessage).text


async def test_status_bar_shows_reconnecting_while_the_gateway_restarts() -> None:
    async with GatewayProcess() as gp:
        app = ChatApp(gp.url, max_reconnect_delay=1.0)
        async with app.run_test(size=SIZE) as pilot:
            await connected(app, pilot)
            seen: list[str] = []

            def status(pattern: str) -> bool:
                text = app.status_bar.stream.text
                if not seen or seen[-1] != text:
                    seen.append(text)
                return re.fullmatch(pattern, text) is not None

            await gp.kill()
            reconnecting = r"reconnecting in \d+\.\d s \(attempt \d+\)"
            await wait_for(pilot, lambda: status(reconnecting), "reconnecting")
            assert app.status_bar.stream.level == "warning"
            await gp.start()
            await wait_for(pilot, lambda: status("connected"), "connected again", within=20)
            assert any(s.startswith("reconnecting in") for s in seen), seen
            # the stream works after the restart (resumed with Last-Event-ID on the same store)
            await submit(pilot, app, "after the restart")
            await wait_for(pilot, lambda: has_answer(app) and main_answer(app).settled
                           and main_answer(app).source, "an answer after the restart", within=15)
            assert main_answer(app).text.endswith("You said: after the restart")


async def _chat_and_quit_mid_stream(gw: RunningGateway) -> tuple[str, str]:
    """Run the app with a main turn and a btw both streaming, then ctrl+q; returns (conv id, btw id)."""
    app = ChatApp(gw.url)
    async with app.run_test(size=SIZE) as pilot:
        await connected(app, pilot)
        await submit(pilot, app, LONG)
        await wait_for(pilot, lambda: has_answer(app) and main_answer(app).source, "the main answer")
        await submit(pilot, app, "/btw still there?")
        await wait_for(pilot, lambda: app.btw_answer is not None and app.btw_answer.btw_id
                       and app.btw_panel.exchanges[0].answer.source, "the btw answer")
        assert app.turn_id is not None and app.btw_running
        workers = list(app.workers)
        assert {w.name for w in workers} >= {"session", "btw"}
        await pilot.press("ctrl+q")
    # quitting waited for every worker: the event stream is closed and the btw's DELETE was answered
    assert all(w.is_finished for w in workers), [w for w in workers if not w.is_finished]
    assert app.conversation is not None and app.btw_answer is not None and app.btw_answer.btw_id
    return app.conversation.id, app.btw_answer.btw_id


async def test_quitting_mid_stream_releases_every_connection_and_task() -> None:
    # paced so that the main answer (~70 words) still streams when the btw's first delta arrives on a
    # busy machine (at 30 words/s it once ended first)
    async with running_gateway(echo_pace=12) as gw:

        async def quiet(conversation_id: str) -> None:
            conv = await gw.gateway.conversation(conversation_id)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 20
            while conv.busy or gw.gateway.metrics.event_streams_open or gw.gateway.metrics.btw_streams_open:
                assert loop.time() < deadline, "the gateway did not settle"
                await asyncio.sleep(0.02)

        await quiet((await _chat_and_quit_mid_stream(gw))[0])  # warm-up: first-use allocations
        before = Resources.now()
        conversation_id, btw_id = await _chat_and_quit_mid_stream(gw)
        # the unfinished btw was cancelled by the client (DELETE), not abandoned
        assert gw.gateway.btws.get(conversation_id, btw_id).cancel_reason == "cancelled"
        await quiet(conversation_id)  # the main turn ends on its own in the gateway
        after = await settle_resources(before, within=3)
        assert after.fds <= before.fds, (before, after)
        assert after.tasks <= before.tasks, (before, after)


# -- layout snapshot ---------------------------------------------------------------------------------


SCRIPT: list[tuple[str, dict[str, object]]] = [
    ("message.created", {"turn_id": "t1", "role": "user", "text": "What is a btw?"}),
    ("turn.started", {"turn_id": "t1"}),
    ("message.delta", {"turn_id": "t1", "delta": "A **btw** is a side question: it is answered "}),
    ("message.delta", {"turn_id": "t1", "delta": "from a snapshot of the conversation and never "
                                                 "written to its history.\n\n"
                                                 "- it streams beside the main turn\n- `esc` cancels it"}),
    ("message.completed", {"turn_id": "t1", "text": None}),
    ("turn.completed", {"turn_id": "t1"}),
    ("message.created", {"turn_id": "t2", "role": "user", "text": "And how do reconnects work?"}),
    ("turn.started", {"turn_id": "t2"}),
    ("message.delta", {"turn_id": "t2", "delta": "The client resumes with `Last-Event-ID`, so"}),
]


class ScriptedChatApp(ChatApp):
    """The chat app showing a fixed conversation (no gateway): a deterministic layout."""

    def start_session(self) -> None:
        bar = self.status_bar
        bar.model, bar.conversation, bar.stream = "echo", "3f2a9c1e", StreamState("ok", "connected")
        for seq, (kind, data) in enumerate(SCRIPT, 1):
            self.handle_event(Event(json.dumps({k: v for k, v in data.items() if v is not None}), kind,
                                    str(seq)))
        exchange = self.btw_panel.add_exchange("what did I ask first?")
        exchange.answer.feed("You first asked *what a btw is*.")
        exchange.answer.finish()
        self.prompt.cursor_blink = False
        self.prompt.value = "/btw and then?"


def test_layout_snapshot(snap_compare: Callable[..., bool]) -> None:
    async def settle(pilot: Pilot[None]) -> None:
        app = pilot.app
        await wait_for(pilot, lambda: all(md.source == md.text for md in app.query(StreamingMarkdown)),
                       "the Markdown to render")
        await pilot.pause()

    assert snap_compare(ScriptedChatApp("http://gateway.example:8765"), terminal_size=SIZE, run_before=settle)


@pytest.mark.parametrize("line", ["/btw", "/nope"])
async def test_bad_commands_only_notify(line: str) -> None:
    app = ScriptedChatApp("http://gateway.example:8765")
    async with app.run_test(size=SIZE) as pilot:
        await submit(pilot, app, line)
        await pilot.pause()
        assert app.return_code is None and len(app.btw_panel.exchanges) == 1
