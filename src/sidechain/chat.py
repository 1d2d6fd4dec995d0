"""``sidechain chat`` in line mode: the main turn streams, ``/btw`` answers stream beside it.

Output is one text stream shared by the main turn and any btw answers; each btw is printed in its own
clearly marked block (every line of it prefixed ``│ btw N``, N counting the btws of the session), and
switching between streams starts a new line, so interleaved deltas stay readable. Ctrl-C during a btw
cancels only the btw (the gateway is told with ``DELETE``); otherwise it cancels the running turn; a second
Ctrl-C with nothing running quits. ``/quit`` or end of input quits after what is running has finished; if
the event stream gives up meanwhile (or, while a turn is awaited, fails to reconnect
``DRAIN_MAX_FAILURES`` times in a row), the chat says so and exits with status 1.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import stat
import sys
from dataclasses import dataclass, field
from typing import IO, Any

from .client import BtwAnswer, Conversation, EventStreamClient
from .client.btw import decode_payload, format_btw_note
from .client.events import Fault, StreamEnded
from .errors import HTTPStatusError, RemoteError, RetryExhausted, SidechainError
from .sse import Event

HELP = """commands:
  TEXT              send a message (starts a main turn)
  /btw QUESTION     ask a side question while the main turn streams (follow-ups continue the thread)
  /inject           add the last btw exchange to the conversation as a note (no turn runs for it)
  /note TEXT        add a note to the conversation
  /cancel           cancel the running main turn
  /history          print the conversation as the gateway has it
  /quit             leave (Ctrl-D too)
Ctrl-C cancels the running btw if any, else the running turn."""

#: Longest input line: the gateway's default request body limit, so a longer one could not be sent anyway.
MAX_LINE_BYTES = 256 * 1024

#: After the input ended, connection failures in a row after which a turn is no longer waited for: with
#: the gateway's ``retry:`` of 2 s and reconnects at most ``MAX_RECONNECT_DELAY`` apart, about 9 s down.
DRAIN_MAX_FAILURES = 4
MAX_RECONNECT_DELAY = 5.0

_TURN_EVENTS = frozenset({"message.created", "turn.started", "message.delta", "message.completed",
                          "turn.completed", "turn.failed"})


class Printer:
    """Writes interleaved streams to one terminal, each block clearly marked."""

    def __init__(self, out: IO[str], *, color: bool) -> None:
        self.out = out
        self.color = color
        self.current: str | None = None
        self.at_line_start = True

    def _style(self, text: str, code: str) -> str:
        return f"\x1b[{code}m{text}\x1b[0m" if self.color else text

    def prefix(self, stream: str) -> str:
        """What starts each line of ``stream``: nothing for ``main``, ``│ NAME `` for the others."""
        if stream == "main":
            return ""
        return self._style(f"│ {stream}", "36") + " "

    def write(self, stream: str, text: str) -> None:
        if not text:
            return
        if stream != self.current:
            if not self.at_line_start:
                self.out.write("\n")
                self.at_line_start = True
            self.current = stream
        pre = self.prefix(stream)
        lines = text.split("\n")
        for i, line in enumerate(lines):
            if i > 0:
                self.out.write("\n")
                self.at_line_start = True
            if line:
                if self.at_line_start:
                    self.out.write(pre)
                self.out.write(line)
                self.at_line_start = False
        self.out.flush()

    def line(self, stream: str, text: str, *, style: str = "2") -> None:
        """A whole status line (dim by default) in ``stream``'s block."""
        if not self.at_line_start:
            self.out.write("\n")
        self.out.write(self.prefix(stream) + self._style(text, style) + "\n")
        self.at_line_start = True
        self.current = stream
        self.out.flush()


@dataclass
class ChatSession:
    conversation: Conversation
    printer: Printer
    json_mode: bool = False
    #: The main turn this chat started and is following, until its end is seen.
    turn_id: str | None = None
    #: Set whenever no turn is followed.
    turn_done: asyncio.Event = field(default_factory=asyncio.Event)
    btw_tasks: set[asyncio.Task[None]] = field(default_factory=set)
    quit_event: asyncio.Event = field(default_factory=asyncio.Event)
    #: The last completed btw (question, answer), for ``/inject``.
    last_exchange: tuple[str, str] | None = None
    #: Events with an id up to this one were in the history when the chat started (not printed again).
    live_after: int = 0
    #: Btws asked so far: each is printed in its own block, ``btw N``.
    btw_count: int = 0
    #: The input ended: a turn is waited for only while the event stream can still report its end.
    draining: bool = False
    #: While a message is being posted its turn id is unknown, yet its events may already arrive: turn
    #: events that arrive meanwhile are kept here, as ``(turn_id, kind, data)``.
    early_events: list[tuple[str, str, dict[str, Any]]] | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.turn_done.set()

    @property
    def quitting(self) -> bool:
        return self.quit_event.is_set()

    def emit_json(self, stream: str, kind: str, data: Any) -> None:
        self.printer.out.write(json.dumps({"stream": stream, "event": kind, "data": data},
                                          ensure_ascii=False) + "\n")
        self.printer.out.flush()

    # -- main event stream -------------------------------------------------------------------------

    async def follow_events(self, events: EventStreamClient) -> None:
        """Apply the event stream until it ends; raises its final error, or :class:`RetryExhausted`
        once the input ended, a turn is awaited and the stream failed ``DRAIN_MAX_FAILURES`` times in a
        row."""
        items = events.items()
        try:
            async for item in items:
                if isinstance(item, Fault):
                    self.on_fault(item)
                    if (item.will_retry and self.draining and self.turn_id is not None
                            and events.failures >= DRAIN_MAX_FAILURES):
                        raise RetryExhausted(f"gave up after {events.failures} failed connections in a row: "
                                             f"{item.error}", attempts=events.failures, last_error=item.error)
                elif isinstance(item, Event):
                    self.on_event(item)
        finally:
            await items.aclose()  # type: ignore[attr-defined]

    def on_fault(self, fault: Fault) -> None:
        if self.json_mode:
            self.emit_json("main", "fault", {"error": repr(fault.error), "will_retry": fault.will_retry,
                                             "delay": fault.delay})
        elif fault.will_retry and not isinstance(fault.error, StreamEnded):
            self.printer.line("main", f"[event stream dropped ({fault.error}); reconnecting in "
                                      f"{fault.delay:.1f}s]", style="33")

    def on_event(self, event: Event) -> None:
        try:
            data = decode_payload(event)
        except SidechainError:
            data = {"raw": event.data}
        if self.json_mode:
            self.emit_json("main", event.event, data)
        kind = event.event
        live = event.id.isdigit() and int(event.id) > self.live_after
        if kind == "note.created":
            if not self.json_mode and live:
                self.printer.line("main", f"[note added] {data.get('text', '')}", style="35")
        elif kind == "gateway.shutdown":
            if not self.json_mode:
                self.printer.line("main", "[gateway is restarting; reconnecting]", style="33")
        elif kind in _TURN_EVENTS:
            turn = data.get("turn_id")
            if not isinstance(turn, str):
                return
            if turn == self.turn_id:
                self._follow_turn(kind, data)
            elif self.early_events is not None and live:
                self.early_events.append((turn, kind, data))
            # else: a turn of the history, or of another client

    def _follow_turn(self, kind: str, data: dict[str, Any]) -> None:
        if self.json_mode:
            pass
        elif kind == "message.delta":
            self.printer.write("main", str(data.get("delta", "")))
        elif kind == "turn.failed":
            err = data.get("error") or {}
            self.printer.line("main", f"[turn failed: {err.get('type')}: {err.get('message')}]", style="31")
        elif kind == "turn.completed":
            self.printer.write("main", "\n")
        if kind in ("turn.completed", "turn.failed"):
            self._end_turn()

    def _end_turn(self) -> None:
        self.turn_id = None
        self.turn_done.set()

    # -- commands ----------------------------------------------------------------------------------

    async def send(self, text: str) -> None:
        """Post a message and follow its turn: events that arrived before the gateway's answer are
        applied as soon as it gives the turn id."""
        if self.turn_id is not None:
            self.printer.line("main", "[a turn is still running: /cancel it or wait]", style="33")
            return
        early: list[tuple[str, str, dict[str, Any]]] = []
        self.early_events = early
        try:
            turn_id = await self.conversation.send(text)
        except HTTPStatusError as exc:
            self.printer.line("main", f"[message refused: HTTP {exc.status} {exc.body[:120]}]", style="31")
            return
        except SidechainError as exc:
            self.printer.line("main", f"[message not sent: {exc}]", style="31")
            return
        finally:
            self.early_events = None
        self.turn_id = turn_id
        self.turn_done.clear()
        for turn, kind, data in early:
            if turn == turn_id and self.turn_id == turn_id:
                self._follow_turn(kind, data)

    async def add_note(self, text: str) -> None:
        """Add a note to the conversation (it is printed when the event stream reports it)."""
        try:
            await self.conversation.add_note(text)
        except HTTPStatusError as exc:
            self.printer.line("main", f"[note refused: HTTP {exc.status} {exc.body[:120]}]", style="31")
        except SidechainError as exc:
            self.printer.line("main", f"[note not added: {exc}]", style="31")

    async def show_history(self) -> None:
        """Print the conversation's messages as the gateway has them, or why it could not say."""
        try:
            history = await self.conversation.history()
        except SidechainError as exc:
            self.printer.line("main", f"[history unavailable: {exc}]", style="31")
            return
        for message in history.get("messages", []):
            self.printer.line("main", f"{message.get('role')}: {message.get('text')}", style="0")

    async def cancel_turn(self) -> bool:
        """Ask the gateway to cancel the followed turn; False if there is none. A turn the gateway says
        already finished (its end was not seen on the event stream) is no longer followed."""
        turn_id = self.turn_id
        if turn_id is None:
            return False
        try:
            await self.conversation.cancel_turn(turn_id)
        except HTTPStatusError as exc:
            if exc.status == 409 and "turn_finished" in exc.body:
                if self.turn_id == turn_id:
                    self._end_turn()
                    self.printer.line("main", "[the turn had already ended]")
            else:
                self.printer.line("main", f"[cancel refused: HTTP {exc.status} {exc.body[:120]}]", style="31")
        except SidechainError as exc:
            self.printer.line("main", f"[cancel failed: {exc}]", style="31")
        return True

    async def _cancel_turn_quietly(self) -> None:
        await self.cancel_turn()

    def start_btw(self, question: str) -> None:
        self.btw_count += 1
        task = asyncio.get_running_loop().create_task(self.run_btw(question, f"btw {self.btw_count}"))
        self.btw_tasks.add(task)
        task.add_done_callback(self.btw_tasks.discard)

    async def run_btw(self, question: str, stream: str = "btw") -> None:
        """Stream one btw answer in its own block, named ``stream``."""
        printer = self.printer
        if not self.json_mode:
            printer.line(stream, f"┌ btw: {question}", style="36")
        answer: BtwAnswer | None = None
        try:
            async with self.conversation.btw(question, follow_up=True) as answer:
                async for delta in answer:
                    if self.json_mode:
                        self.emit_json("btw", "btw.delta", {"delta": delta, "btw_id": answer.btw_id})
                    else:
                        printer.write(stream, delta)
            self.last_exchange = (question, answer.text)
            if self.json_mode:
                self.emit_json("btw", "btw.completed",
                               {"btw_id": answer.btw_id, "thread_id": answer.thread_id, "text": answer.text})
            else:
                printer.line(stream, "└ done", style="36")
        except asyncio.CancelledError:
            if self.json_mode:
                self.emit_json("btw", "btw.cancelled", {"btw_id": answer.btw_id if answer else None})
            else:
                printer.line(stream, "└ cancelled (the main turn goes on)", style="33")
            raise
        except (RemoteError, SidechainError) as exc:
            if self.json_mode:
                self.emit_json("btw", "error", {"error": str(exc)})
            else:
                printer.line(stream, f"└ failed: {exc}", style="31")

    def on_interrupt(self) -> None:
        """Ctrl-C: cancel the btws if any run, else the turn, else quit."""
        if self.btw_tasks:
            for task in list(self.btw_tasks):
                task.cancel()
            return
        if self.turn_id is not None:
            self.printer.line("main", "[cancelling the turn]", style="33")
            task = asyncio.get_running_loop().create_task(self._cancel_turn_quietly())
            self.btw_tasks.add(task)  # owned like a btw: awaited before exit
            task.add_done_callback(self.btw_tasks.discard)
            return
        self.quit_event.set()

    async def handle(self, line: str) -> bool:
        """One input line; returns False to quit."""
        line = line.strip()
        if not line:
            return True
        if line in ("/quit", "/exit"):
            return False
        if line == "/help":
            self.printer.line("main", HELP, style="0")
        elif line.startswith("/btw"):
            question = line[4:].strip()
            if question:
                self.start_btw(question)
            else:
                self.printer.line("main", "usage: /btw QUESTION")
        elif line == "/inject":
            if self.btw_tasks:  # the btw still streaming is the one to keep
                await asyncio.wait(set(self.btw_tasks))
            if self.last_exchange is None:
                self.printer.line("main", "[no btw answer to inject yet]")
            else:
                await self.add_note(format_btw_note(*self.last_exchange))
        elif line.startswith("/note"):
            text = line[5:].strip()
            if text:
                await self.add_note(text)
            else:
                self.printer.line("main", "usage: /note TEXT")
        elif line == "/cancel":
            if not await self.cancel_turn():
                self.printer.line("main", "[no turn is running]")
        elif line == "/history":
            await self.show_history()
        elif line.startswith("/"):
            self.printer.line("main", f"unknown command {line.split()[0]}; /help lists them")
        else:
            await self.send(line)
        return True


async def _open_stdin() -> tuple[asyncio.StreamReader, asyncio.ReadTransport | None]:
    """A reader of standard input and its transport, if any (the caller closes it)."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=MAX_LINE_BYTES)
    if stat.S_ISREG(os.fstat(sys.stdin.fileno()).st_mode):
        # a file cannot be a pipe transport (uvloop aborts the process) and never blocks: read it whole
        reader.feed_data(await asyncio.to_thread(sys.stdin.buffer.read))
        reader.feed_eof()
        return reader, None
    transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    return reader, transport


async def read_line(reader: asyncio.StreamReader) -> bytes | None:
    """The next line (the last one may lack its newline), ``b""`` at end of input, or None for a line
    longer than the reader's limit: that line is read to its end and dropped."""
    try:
        return await reader.readuntil(b"\n")
    except asyncio.IncompleteReadError as exc:
        return exc.partial
    except asyncio.LimitOverrunError as exc:
        skip = exc.consumed
    while True:
        await reader.readexactly(skip)
        try:
            await reader.readuntil(b"\n")
            return None
        except asyncio.IncompleteReadError:
            return None
        except asyncio.LimitOverrunError as exc:
            skip = exc.consumed


async def run_chat(
    url: str,
    *,
    token: str | None,
    conversation_id: str | None,
    json_mode: bool = False,
    out: IO[str] | None = None,
) -> int:
    """The line-mode chat loop. Returns the process exit code: 1 when the event stream failed for good.

    The banner (or, with ``json_mode``, the ``conversation`` record) is written once Ctrl-C is handled
    and standard input is read; standard input's transport is closed on every path."""
    out = out or sys.stdout
    printer = Printer(out, color=out.isatty() and not json_mode)
    live_after = 0
    if conversation_id:
        conversation = Conversation.attach(url, conversation_id, token=token)
        history = await conversation.history()  # 404 early for an unknown id
        live_after = int(history.get("last_event_id") or 0)
    else:
        conversation = await Conversation.create(url, token=token)
    session = ChatSession(conversation, printer, json_mode=json_mode, live_after=live_after)
    loop = asyncio.get_running_loop()
    interrupt_installed = False
    with contextlib.suppress(NotImplementedError, RuntimeError):
        loop.add_signal_handler(signal.SIGINT, session.on_interrupt)
        interrupt_installed = True
    stdin: asyncio.ReadTransport | None = None
    try:
        reader, stdin = await _open_stdin()
        if json_mode:
            session.emit_json("main", "conversation", {"id": conversation.id, "url": url})
        else:
            printer.line("main",
                         f"sidechain chat — conversation {conversation.id} on {url} (/help for commands)")
        async with conversation.events(initial_reconnect_delay=0.5,
                                       max_reconnect_delay=MAX_RECONNECT_DELAY) as events:
            follower = loop.create_task(session.follow_events(events))
            try:
                while not session.quitting:
                    line_task = loop.create_task(read_line(reader))
                    quit_poll = loop.create_task(session.quit_event.wait())
                    done, _ = await asyncio.wait({line_task, quit_poll, follower},
                                                 return_when=asyncio.FIRST_COMPLETED)
                    quit_poll.cancel()
                    if line_task not in done:
                        line_task.cancel()
                        await asyncio.wait({line_task, quit_poll})
                        break
                    await asyncio.wait({quit_poll})
                    raw = line_task.result()
                    if raw is None:
                        printer.line("main", f"[input line longer than {MAX_LINE_BYTES // 1024} KiB: "
                                             "not sent]", style="31")
                        continue
                    if not raw:  # end of input: let what runs finish
                        break
                    if not await session.handle(raw.decode("utf-8", "replace")):
                        break
                if not session.quitting:
                    await _drain(session, follower)
            finally:
                for task in list(session.btw_tasks):
                    task.cancel()
                if session.btw_tasks:
                    await asyncio.wait(set(session.btw_tasks))
                follower.cancel()
                await asyncio.wait({follower})
    finally:
        if stdin is not None:
            stdin.close()
        if interrupt_installed:
            loop.remove_signal_handler(signal.SIGINT)
    if not follower.cancelled() and follower.exception() is not None:
        printer.line("main", f"[event stream failed: {follower.exception()}]", style="31")
        return 1
    return 0


async def _drain(session: ChatSession, follower: asyncio.Task[None]) -> None:
    """End of input: wait for the running btws, and for the running turn while the event stream can
    still report its end (Ctrl-C still cancels them)."""
    session.draining = True
    while not session.quitting:
        following = session.turn_id is not None and not follower.done()
        if not session.btw_tasks and not following:
            return
        turn_wait = asyncio.ensure_future(session.turn_done.wait())
        quit_wait = asyncio.ensure_future(session.quit_event.wait())
        waits: set[asyncio.Future[Any]] = {*session.btw_tasks, quit_wait}
        if following:
            waits |= {turn_wait, follower}
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        turn_wait.cancel()
        quit_wait.cancel()
        await asyncio.wait({turn_wait, quit_wait})
