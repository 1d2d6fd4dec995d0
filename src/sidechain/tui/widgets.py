"""The widgets of the chat app: messages, the streaming Markdown view, the btw panel, the status bar."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical, VerticalScroll
from textual.reactive import reactive
from textual.timer import Timer
from textual.widget import Widget
from textual.widgets import Markdown, Static

from .status import StreamState

__all__ = [
    "BtwExchange",
    "BtwPanel",
    "InfoLine",
    "NoteMessage",
    "StatusBar",
    "StreamingMarkdown",
    "UserMessage",
]


class StreamingMarkdown(Markdown):
    """Markdown fed with text deltas while an answer streams.

    :meth:`feed` only buffers; a timer owned by this widget appends what arrived to the document at
    most every ``FLUSH_INTERVAL`` seconds, so a fast stream costs a bounded number of re-renders
    instead of one per delta. The timer stops once :meth:`finish` was called and everything is
    rendered, and with the widget when it is removed. ``text`` is everything received; ``source`` (the
    Markdown widget's) is what is rendered so far.
    """

    FLUSH_INTERVAL = 1 / 15

    def __init__(self, markdown: str = "", *, streaming: bool = False, id: str | None = None,
                 classes: str | None = None) -> None:
        super().__init__(markdown, id=id, classes=classes)
        self._received: list[str] = [markdown] if markdown else []
        self._pending: list[str] = []
        self._replacement: str | None = None
        self._timer: Timer | None = None
        self.streaming = streaming
        #: True when :meth:`finish` got a text that differs from the deltas received (some were missed).
        self.replaced = False
        self.set_class(streaming, "streaming")

    @property
    def text(self) -> str:
        """The whole text received (rendered or still buffered)."""
        return "".join(self._received)

    @property
    def settled(self) -> bool:
        """True once the stream finished and everything received is rendered."""
        return not self.streaming and not self._pending and self._replacement is None

    def on_mount(self) -> None:
        if not self.settled and self._timer is None:
            self._timer = self.set_interval(self.FLUSH_INTERVAL, self._flush)

    def feed(self, delta: str) -> None:
        """Add a text delta (rendered with the next flush)."""
        if not delta:
            return
        self._received.append(delta)
        self._pending.append(delta)
        self._start_timer()

    def finish(self, text: str | None = None) -> None:
        """The stream ended; ``text``, when given and different, replaces what was received."""
        if text is not None and text != self.text:
            self.replaced = True
            self._received = [text]
            self._pending.clear()
            self._replacement = text
        self.streaming = False
        self.remove_class("streaming")
        self._start_timer()

    def _start_timer(self) -> None:
        if self._timer is None and self.is_mounted and self.is_attached:
            self._timer = self.set_interval(self.FLUSH_INTERVAL, self._flush)

    async def _flush(self) -> None:
        replacement, self._replacement = self._replacement, None
        if replacement is not None:
            await self.update(replacement)
        elif self._pending:
            chunk = "".join(self._pending)
            self._pending.clear()
            await self.append(chunk)
        if self.settled and self._timer is not None:
            timer, self._timer = self._timer, None
            timer.stop()


class UserMessage(Static):
    """A message the user sent (shown as typed: no markup)."""

    def __init__(self, text: str) -> None:
        super().__init__(text, markup=False)
        self.text = text


class NoteMessage(Markdown):
    """A btw exchange added to the main conversation with ``/inject``."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text
        self.border_title = "note from a side question"


class InfoLine(Static):
    """A one-line remark in a conversation (a cancelled turn, an error). ``kind`` is a CSS class."""

    def __init__(self, text: str, *, kind: str = "info") -> None:
        super().__init__(text, markup=False, classes=kind)
        self.text = text


class BtwExchange(Vertical):
    """One btw question and its streaming answer."""

    def __init__(self, question: str) -> None:
        super().__init__()
        self.question = question
        self.answer = StreamingMarkdown(streaming=True, classes="btw-answer")

    def compose(self) -> ComposeResult:
        yield Static(Text.assemble(("btw ", "bold"), self.question), classes="btw-question")
        yield self.answer

    def end(self, remark: str | None = None, *, kind: str = "info") -> None:
        """The answer is over; ``remark`` (e.g. why it failed) is shown under it."""
        self.answer.finish()
        if remark and self.is_attached:
            self.mount(InfoLine(remark, kind=kind))


class BtwPanel(Vertical):
    """The side panel: the exchanges of the current btw thread, newest last. Hidden until opened."""

    def compose(self) -> ComposeResult:
        yield VerticalScroll(id="btw-log")

    def on_mount(self) -> None:
        self.border_title = "btw · side question"
        self.border_subtitle = "esc closes · /inject keeps it"
        self.query_one("#btw-log", VerticalScroll).anchor()

    @property
    def is_open(self) -> bool:
        return self.has_class("open")

    @property
    def exchanges(self) -> list[BtwExchange]:
        return list(self.query(BtwExchange))

    def add_exchange(self, question: str) -> BtwExchange:
        """Open the panel and append a new exchange for ``question``."""
        self.add_class("open")
        exchange = BtwExchange(question)
        self.query_one("#btw-log", VerticalScroll).mount(exchange)
        return exchange

    def close(self) -> None:
        """Hide the panel and forget its exchanges (the next btw starts a new thread)."""
        self.remove_class("open")
        self.query_one("#btw-log", VerticalScroll).remove_children()


_LEVEL_STYLES = {"ok": "bold green", "warning": "bold yellow", "error": "bold red"}


class StatusBar(Widget):
    """One line: event stream state, gateway URL, model, conversation, what is running."""

    stream: reactive[StreamState] = reactive(StreamState("warning", "connecting…"))
    url: reactive[str] = reactive("")
    model: reactive[str] = reactive("…")
    conversation: reactive[str] = reactive("")
    activity: reactive[str] = reactive("")

    def render(self) -> Text:
        style = _LEVEL_STYLES.get(self.stream.level, "bold")
        parts: list[str | tuple[str, str] | Text] = [
            (" ● ", style), (self.stream.text, style),
            (" │ ", "dim"), self.url,
            (" │ ", "dim"), ("model ", "dim"), self.model,
        ]
        if self.conversation:
            parts += [(" │ ", "dim"), ("conversation ", "dim"), self.conversation]
        if self.activity:
            parts += [(" │ ", "dim"), (self.activity, "italic")]
        return Text.assemble(*parts, no_wrap=True, overflow="ellipsis")
