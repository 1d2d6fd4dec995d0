"""``ChatApp``: the Textual chat client. The main turn streams in the conversation pane; ``/btw`` answers
stream in a side panel at the same time.

Ownership: every background job is a Textual worker of the app (the session with its event stream,
each btw, each message sent, each cancel), and every timer belongs to a widget or the app. Quitting
cancels the workers and waits for them: the event stream closes its connection, a btw that did not
complete tells the gateway to stop it (``DELETE``), and no task or socket is left behind.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, ClassVar

from rich.text import Text
from textual import on
from textual.app import App, ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, VerticalScroll
from textual.widget import Widget
from textual.widgets import Footer, Input
from textual.worker import Worker

from ..client import BtwAnswer, Conversation, EventStreamClient, Fault, StreamEnded, StreamObservation
from ..client.btw import decode_payload, format_btw_note
from ..errors import HTTPStatusError, RemoteError, SidechainError
from ..sse import Event
from .status import stream_state
from .widgets import (
    BtwExchange,
    BtwPanel,
    InfoLine,
    NoteMessage,
    StatusBar,
    StreamingMarkdown,
    UserMessage,
)

__all__ = ["ChatApp", "format_note", "run_tui"]

HELP = """\
TEXT sends a message (a main turn)
/btw QUESTION asks a side question (ctrl+b); follow-ups continue the thread
/inject adds the last btw exchange to the conversation as a note
esc closes the btw panel and cancels its answer
ctrl+c cancels the running main turn, ctrl+q quits"""


format_note = format_btw_note  # the note ``/inject`` adds for a btw exchange


def _short(conversation_id: str) -> str:
    return conversation_id[:8]


class ChatApp(App[None]):
    """A chat with one conversation of the gateway at ``url``.

    Creates a conversation, or attaches to ``conversation_id`` and shows its history (an unknown id
    exits with return code 1 and the error as message). ``initial_reconnect_delay`` and
    ``max_reconnect_delay`` tune the event stream's reconnects (the gateway's ``retry:`` hint wins for
    the first one).
    """

    TITLE = "sidechain"

    CSS = """
    Screen { layout: vertical; }
    #body { height: 1fr; }
    #conversation { width: 1fr; padding: 0 1; scrollbar-size-vertical: 1; }
    #conversation > * { margin: 1 0 0 0; }
    UserMessage { padding: 0 1; border-left: outer $accent; color: $text; background: $boost; }
    StreamingMarkdown { padding: 0 1 0 2; margin: 0; }
    StreamingMarkdown > MarkdownBlock:last-child { margin-bottom: 0; }
    StreamingMarkdown.streaming { border-left: outer $success 60%; padding-left: 1; }
    NoteMessage { padding: 0 1; border: round $warning; border-title-color: $warning; }
    InfoLine { padding: 0 2; color: $text-muted; text-style: italic; }
    InfoLine.error { color: $error; }
    InfoLine.warning { color: $warning; }
    BtwPanel { display: none; width: 45%; border: round $secondary; border-title-color: $text-secondary;
               border-subtitle-color: $text-muted; padding: 0 1; }
    BtwPanel.open { display: block; }
    #btw-log { scrollbar-size-vertical: 1; }
    BtwExchange { height: auto; margin: 0 0 1 0; }
    .btw-question { color: $text-secondary; padding: 0 1; background: $boost; }
    .btw-answer { padding: 0 0 0 1; }
    #prompt { margin: 0 0; }
    StatusBar { height: 1; background: $panel; }
    """

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("ctrl+b", "btw_prompt", "btw"),
        Binding("escape", "dismiss_btw", "close btw"),
        Binding("ctrl+c", "cancel_turn", "cancel turn", priority=True),
        Binding("ctrl+q", "quit", "quit", priority=True),
    ]

    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        conversation_id: str | None = None,
        initial_reconnect_delay: float = 0.5,
        max_reconnect_delay: float = 10.0,
    ) -> None:
        super().__init__()
        self.url = url.rstrip("/")
        self.token = token
        self.conversation_id = conversation_id
        self.initial_reconnect_delay = initial_reconnect_delay
        self.max_reconnect_delay = max_reconnect_delay
        #: The conversation, once created or attached.
        self.conversation: Conversation | None = None
        #: The event stream client while the session runs.
        self.events: EventStreamClient | None = None
        #: The running main turn, as the event stream reported it.
        self.turn_id: str | None = None
        #: Answers of main turns by turn id, while they stream.
        self.answers: dict[str, StreamingMarkdown] = {}
        #: The btw being answered, while it streams (``btw_id`` / ``thread_id`` known once it started).
        self.btw_answer: BtwAnswer | None = None
        #: The last completed btw exchange, as ``(question, answer)``: what ``/inject`` adds.
        self.last_exchange: tuple[str, str] | None = None
        self._btw_worker: Worker[None] | None = None
        self._stream_error: str | None = None
        self.conversation_pane = VerticalScroll(id="conversation")
        self.btw_panel = BtwPanel(id="btw")
        self.prompt = Input(placeholder="Message  ·  /btw QUESTION asks aside  ·  /help", id="prompt")
        self.status_bar = StatusBar(id="status")

    # -- layout --------------------------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        with Horizontal(id="body"):
            yield self.conversation_pane
            yield self.btw_panel
        yield self.prompt
        yield self.status_bar
        yield Footer()

    def on_mount(self) -> None:
        self.status_bar.url = self.url
        self.conversation_pane.anchor()
        self.prompt.focus()
        self.set_interval(0.25, self.refresh_status)
        self.start_session()

    def start_session(self) -> None:
        """Open the conversation and follow its event stream, in the session worker."""
        self.run_worker(self._session(), name="session", group="session", exclusive=True)

    # -- status --------------------------------------------------------------------------------------

    def refresh_status(self) -> None:
        """Show the event stream's state (and what is running) in the status bar."""
        bar = self.status_bar
        if not bar.is_attached:
            return  # shutting down
        if self.events is not None or self._stream_error is not None:
            bar.stream = stream_state(self.events, asyncio.get_running_loop().time(), self._stream_error)
        activity = []
        if self.turn_id is not None:
            activity.append("answering")
        if self._btw_worker is not None and self._btw_worker.is_running:
            activity.append("btw answering")
        bar.activity = " · ".join(activity)

    def _observe(self, observation: StreamObservation) -> None:
        if observation.kind in ("connect", "first_byte", "close"):
            self.refresh_status()

    # -- the session: conversation and event stream ---------------------------------------------------

    async def _session(self) -> None:
        try:
            conversation, after = await self._open_conversation()
        except SidechainError as exc:
            self._stream_error = str(exc)
            self.refresh_status()
            self.exit(return_code=1, message=Text(f"sidechain: cannot open the conversation: {exc}"))
            return
        self.conversation = conversation
        self.status_bar.conversation = _short(conversation.id)
        self.status_bar.model = await self._model_name(conversation)
        events = conversation.events(
            last_event_id=after, initial_reconnect_delay=self.initial_reconnect_delay,
            max_reconnect_delay=self.max_reconnect_delay, observer=self._observe,
        )
        async with events:
            self.events = events
            self.refresh_status()
            try:
                async for item in events.items():
                    if isinstance(item, Event):
                        self.handle_event(item)
                    elif isinstance(item, Fault):
                        self._on_fault(item)
            except SidechainError as exc:
                self._stream_error = str(exc)
                self.notify(f"the event stream stopped: {exc}", severity="error", timeout=10)
            finally:
                self.refresh_status()

    async def _open_conversation(self) -> tuple[Conversation, str | None]:
        """Create the conversation, or attach and show its history; returns it and where to follow."""
        if self.conversation_id is None:
            return await Conversation.create(self.url, token=self.token), None
        conversation = Conversation.attach(self.url, self.conversation_id, token=self.token)
        history = await conversation.history()
        self.show_history(history)
        last = history.get("last_event_id")
        return conversation, str(last) if last else None

    async def _model_name(self, conversation: Conversation) -> str:
        """What the gateway says its model is (``/healthz`` does not say yet: then ``echo``)."""
        with contextlib.suppress(SidechainError, TimeoutError):
            health = await conversation.http.request_json("GET", "/healthz", timeout=5.0)
            if isinstance(health, dict) and isinstance(health.get("model"), str):
                return str(health["model"])
        return "echo"

    def show_history(self, history: dict[str, Any]) -> None:
        """Show the messages of ``GET /v1/conversations/{id}``, and the answer in progress if any."""
        for message in history.get("messages", []):
            text = str(message.get("text", ""))
            role = message.get("role")
            if role == "user":
                self._mount(UserMessage(text))
            elif role == "note":
                self._mount(NoteMessage(text))
            else:
                self._mount(StreamingMarkdown(text))
        active = history.get("active_turn")
        if isinstance(active, dict) and isinstance(active.get("turn_id"), str):
            self._answer_widget(active["turn_id"]).feed(str(active.get("partial_text") or ""))
            self.turn_id = active["turn_id"]

    def _on_fault(self, fault: Fault) -> None:
        self.refresh_status()
        if fault.will_retry and not isinstance(fault.error, StreamEnded):
            self.log.warning(f"event stream dropped: {fault.error!r}; retry in {fault.delay:.1f}s")

    def handle_event(self, event: Event) -> None:
        """Apply one event of the conversation's event stream to the conversation pane."""
        try:
            data = decode_payload(event)
        except SidechainError:
            return
        kind = event.event
        turn = data.get("turn_id")
        turn_id = turn if isinstance(turn, str) else ""
        if kind == "message.created":
            self._mount(UserMessage(str(data.get("text", ""))))
        elif kind == "note.created":
            self._mount(NoteMessage(str(data.get("text", ""))))
        elif kind == "turn.started":
            self._answer_widget(turn_id)
            self.turn_id = turn_id
        elif kind == "message.delta":
            self._answer_widget(turn_id).feed(str(data.get("delta", "")))
        elif kind == "message.completed":
            text = data.get("text")
            self._answer_widget(turn_id).finish(text if isinstance(text, str) else None)
        elif kind in ("turn.completed", "turn.failed"):
            answer = self.answers.pop(turn_id, None)
            if answer is not None:
                answer.finish()
            if kind == "turn.failed":
                error = data.get("error") or {}
                kind_of = str(error.get("type", "error"))
                if kind_of == "cancelled":
                    self._mount(InfoLine("turn cancelled", kind="warning"))
                else:
                    self._mount(InfoLine(f"turn failed: {kind_of}: {error.get('message', '')}", kind="error"))
            if self.turn_id == turn_id:
                self.turn_id = None
        elif kind == "gateway.shutdown":
            self.notify("the gateway is restarting; reconnecting", severity="warning")
        elif kind == "error":
            self.notify(f"event stream: {data.get('type')}: {data.get('message')}", severity="warning")
        self.refresh_status()

    def _answer_widget(self, turn_id: str) -> StreamingMarkdown:
        answer = self.answers.get(turn_id)
        if answer is None:
            answer = self.answers[turn_id] = StreamingMarkdown(streaming=True)
            self._mount(answer)
        return answer

    def _mount(self, widget: Widget) -> None:
        if self.conversation_pane.is_attached:
            self.conversation_pane.mount(widget)

    # -- input and commands --------------------------------------------------------------------------

    @on(Input.Submitted, "#prompt")
    def _submitted(self, event: Input.Submitted) -> None:
        line = event.value.strip()
        event.input.clear()
        if line:
            self.run_command(line)

    def run_command(self, line: str) -> None:
        """What the input box does with a line: a command, or a message for the main conversation."""
        command, _, rest = line.partition(" ")
        if command == "/btw":
            if rest.strip():
                self.ask_btw(rest.strip())
            else:
                self.notify("usage: /btw QUESTION", severity="warning")
        elif command == "/inject":
            self.inject()
        elif command == "/cancel":
            self.action_cancel_turn()
        elif command == "/help":
            self.notify(HELP, title="sidechain chat", timeout=15, markup=False)
        elif command in ("/quit", "/exit"):
            self.call_later(self.action_quit)
        elif command.startswith("/"):
            self.notify(f"unknown command {command}; /help lists them", severity="warning")
        else:
            self.send(line)

    def send(self, text: str, *, queue: bool = False) -> None:
        """Post ``text`` as a user message (it shows when the event stream reports it)."""
        if self.conversation is None:
            self.notify("not connected yet", severity="warning")
            return
        self.run_worker(self._send(self.conversation, text, queue), group="send")

    async def _send(self, conversation: Conversation, text: str, queue: bool) -> None:
        try:
            await conversation.send(text, queue=queue)
        except HTTPStatusError as exc:
            if exc.status == 409:
                self.notify("a turn is still running: wait for it, or ctrl+c cancels it", severity="warning")
            else:
                self.notify(f"message refused: HTTP {exc.status} {exc.body[:200]}", severity="error")
        except SidechainError as exc:
            self.notify(f"message not sent: {exc}", severity="error")

    def inject(self) -> None:
        """``/inject``: add the last completed btw exchange to the main conversation as a note.

        The note joins the history (it shows when the event stream reports it); no turn runs for it,
        and later turns see it in their context. A running turn is not disturbed.
        """
        if self.last_exchange is None:
            self.notify("no btw answer to inject yet", severity="warning")
            return
        if self.conversation is None:
            self.notify("not connected yet", severity="warning")
            return
        self.run_worker(self._add_note(self.conversation, format_note(*self.last_exchange)), group="send")

    async def _add_note(self, conversation: Conversation, text: str) -> None:
        try:
            await conversation.add_note(text)
        except HTTPStatusError as exc:
            self.notify(f"note refused: HTTP {exc.status} {exc.body[:200]}", severity="error")
        except SidechainError as exc:
            self.notify(f"note not added: {exc}", severity="error")

    # -- btw -----------------------------------------------------------------------------------------

    @property
    def btw_running(self) -> bool:
        return self._btw_worker is not None and self._btw_worker.is_running

    def ask_btw(self, question: str) -> None:
        """Open the side panel and stream the answer to ``question`` there (a follow-up when the panel
        already shows a thread)."""
        if self.conversation is None:
            self.notify("not connected yet", severity="warning")
            return
        if self.btw_running:
            self.notify("a side answer is still streaming (esc cancels it)", severity="warning")
            return
        panel = self.btw_panel
        follow_up = panel.is_open and bool(panel.exchanges)
        exchange = panel.add_exchange(question)
        self._btw_worker = self.run_worker(
            self._btw(self.conversation, exchange, follow_up), name="btw", group="btw",
        )
        self.refresh_status()

    async def _btw(self, conversation: Conversation, exchange: BtwExchange, follow_up: bool) -> None:
        try:
            async with conversation.btw(exchange.question, follow_up=follow_up) as answer:
                self.btw_answer = answer
                async for delta in answer:
                    exchange.answer.feed(delta)
            exchange.answer.finish(answer.text)
            self.last_exchange = (exchange.question, answer.text)
            exchange.end()
        except RemoteError as exc:
            exchange.end(f"btw failed: {exc.type}: {exc.message}", kind="error")
        except HTTPStatusError as exc:
            exchange.end(f"btw refused: HTTP {exc.status} {exc.body[:200]}", kind="error")
        except SidechainError as exc:
            exchange.end(f"btw failed: {exc}", kind="error")
        finally:
            self.call_later(self.refresh_status)

    def action_btw_prompt(self) -> None:
        """ctrl+b: put ``/btw `` in the input box, ready for the question."""
        prompt = self.prompt
        if not prompt.value.startswith("/btw"):
            prompt.value = "/btw " + prompt.value
        prompt.cursor_position = len(prompt.value)
        prompt.focus()

    def action_dismiss_btw(self) -> None:
        """esc: close the side panel; a btw still streaming is cancelled (the gateway is told), and
        the main turn goes on."""
        panel = self.btw_panel
        if not panel.is_open:
            return
        worker, self._btw_worker = self._btw_worker, None
        if worker is not None and worker.is_running:
            worker.cancel()
        panel.close()
        self.prompt.focus()
        self.refresh_status()

    # -- the main turn -------------------------------------------------------------------------------

    def action_cancel_turn(self) -> None:
        """ctrl+c: cancel the running main turn."""
        conversation, turn_id = self.conversation, self.turn_id
        if conversation is None or turn_id is None:
            self.notify("no turn is running (ctrl+q quits)")
            return
        self.notify("cancelling the turn")
        self.run_worker(self._cancel_turn(conversation, turn_id), group="cancel")

    async def _cancel_turn(self, conversation: Conversation, turn_id: str) -> None:
        try:
            await conversation.cancel_turn(turn_id)
        except HTTPStatusError as exc:
            if exc.status != 409:  # 409: it ended meanwhile
                self.notify(f"cancel refused: HTTP {exc.status}", severity="error")
        except SidechainError as exc:
            self.notify(f"cancel failed: {exc}", severity="error")

    # -- shutting down -------------------------------------------------------------------------------

    async def action_quit(self) -> None:
        """ctrl+q: stop every worker (connections released, an unfinished btw cancelled), then exit."""
        await self.release()
        self.exit()

    async def release(self) -> None:
        """Cancel every worker of the app and wait for each to finish. Idempotent."""
        workers = [w for w in self.workers if w.node is self]
        for worker in workers:
            worker.cancel()
        for worker in workers:
            with contextlib.suppress(Exception):
                await worker.wait()

    async def on_unmount(self) -> None:
        await self.release()


async def run_tui(url: str, *, token: str | None, conversation_id: str | None) -> int:
    """Run the chat app on this terminal until the user quits; returns the exit status."""
    app = ChatApp(url, token=token, conversation_id=conversation_id)
    await app.run_async()
    return app.return_code or 0
