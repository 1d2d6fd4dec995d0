"""``sidechain chat`` in line mode: the main turn streams, ``/btw`` answers stream beside it.

Output is one text stream shared by the main turn and any btw answers; each btw is printed in its own
clearly marked block (every line of it prefixed ``│ btw``), and switching between streams starts a new
line, so interleaved deltas stay readable. Ctrl-C during a btw cancels only the btw (the gateway is told
with ``DELETE``); otherwise it cancels the running turn; a second Ctrl-C with nothing running quits.
``/quit`` or end of input quits after what is running has finished.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
from dataclasses import dataclass, field
from typing import IO, Any

from .client import BtwAnswer, Conversation, EventStreamClient
from .client.btw import decode_payload, format_btw_note
from .client.events import Fault, StreamEnded
from .errors import HTTPStatusError, RemoteError, SidechainError
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
        if stream == "main":
            return ""
        return self._style("│ btw ", "36") + " "

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
    turn_id: str | None = None
    turn_done: asyncio.Event = field(default_factory=asyncio.Event)
    btw_tasks: set[asyncio.Task[None]] = field(default_factory=set)
    quit_event: asyncio.Event = field(default_factory=asyncio.Event)
    #: The last completed btw (question, answer), for ``/inject``.
    last_exchange: tuple[str, str] | None = None
    #: Events with an id up to this one were in the history when the chat started (not printed again).
    live_after: int = 0

    @property
    def quitting(self) -> bool:
        return self.quit_event.is_set()

    def emit_json(self, stream: str, kind: str, data: Any) -> None:
        self.printer.out.write(json.dumps({"stream": stream, "event": kind, "data": data},
                                          ensure_ascii=False) + "\n")
        self.printer.out.flush()

    # -- main event stream -------------------------------------------------------------------------

    async def follow_events(self, events: EventStreamClient) -> None:
        async for item in events.items():
            if isinstance(item, Fault):
                if self.json_mode:
                    self.emit_json("main", "fault", {"error": repr(item.error), "will_retry": item.will_retry,
                                                     "delay": item.delay})
                elif item.will_retry and not isinstance(item.error, StreamEnded):
                    self.printer.line("main", f"[event stream dropped ({item.error}); reconnecting in "
                                              f"{item.delay:.1f}s]", style="33")
                continue
            if isinstance(item, Event):
                self.on_event(item)

    def on_event(self, event: Event) -> None:
        try:
            data = decode_payload(event)
        except SidechainError:
            data = {"raw": event.data}
        if self.json_mode:
            self.emit_json("main", event.event, data)
        kind = event.event
        if kind == "note.created":
            if not self.json_mode and event.id.isdigit() and int(event.id) > self.live_after:
                self.printer.line("main", f"[note added] {data.get('text', '')}", style="35")
            return
        turn = data.get("turn_id")
        if turn is not None and turn != self.turn_id:
            return  # history replayed from earlier turns
        if self.json_mode:
            pass
        elif kind == "message.delta":
            self.printer.write("main", str(data.get("delta", "")))
        elif kind == "turn.failed":
            err = data.get("error") or {}
            self.printer.line("main", f"[turn failed: {err.get('type')}: {err.get('message')}]", style="31")
        elif kind == "turn.completed":
            self.printer.write("main", "\n")
        elif kind == "gateway.shutdown":
            self.printer.line("main", "[gateway is restarting; reconnecting]", style="33")
        if kind in ("turn.completed", "turn.failed"):
            self.turn_id = None
            self.turn_done.set()

    # -- commands ----------------------------------------------------------------------------------

    async def send(self, text: str) -> None:
        if self.turn_id is not None:
            self.printer.line("main", "[a turn is still running: /cancel it or wait]", style="33")
            return
        try:
            self.turn_done.clear()
            self.turn_id = await self.conversation.send(text)
        except HTTPStatusError as exc:
            self.turn_id = None
            self.turn_done.set()
            self.printer.line("main", f"[message refused: HTTP {exc.status} {exc.body[:120]}]", style="31")

    async def add_note(self, text: str) -> None:
        """Add a note to the conversation (it is printed when the event stream reports it)."""
        try:
            await self.conversation.add_note(text)
        except HTTPStatusError as exc:
            self.printer.line("main", f"[note refused: HTTP {exc.status} {exc.body[:120]}]", style="31")

    async def cancel_turn(self) -> bool:
        if self.turn_id is None:
            return False
        with contextlib.suppress(SidechainError):
            await self.conversation.cancel_turn(self.turn_id)
        return True

    async def _cancel_turn_quietly(self) -> None:
        await self.cancel_turn()

    def start_btw(self, question: str) -> None:
        task = asyncio.get_running_loop().create_task(self.run_btw(question))
        self.btw_tasks.add(task)
        task.add_done_callback(self.btw_tasks.discard)

    async def run_btw(self, question: str) -> None:
        printer = self.printer
        if not self.json_mode:
            printer.line("btw", f"┌ btw: {question}", style="36")
        answer: BtwAnswer | None = None
        try:
            async with self.conversation.btw(question, follow_up=True) as answer:
                async for delta in answer:
                    if self.json_mode:
                        self.emit_json("btw", "btw.delta", {"delta": delta, "btw_id": answer.btw_id})
                    else:
                        printer.write("btw", delta)
            self.last_exchange = (question, answer.text)
            if self.json_mode:
                self.emit_json("btw", "btw.completed",
                               {"btw_id": answer.btw_id, "thread_id": answer.thread_id, "text": answer.text})
            else:
                printer.line("btw", "└ done", style="36")
        except asyncio.CancelledError:
            if self.json_mode:
                self.emit_json("btw", "btw.cancelled", {"btw_id": answer.btw_id if answer else None})
            else:
                printer.line("btw", "└ cancelled (the main turn goes on)", style="33")
            raise
        except (RemoteError, SidechainError) as exc:
            if self.json_mode:
                self.emit_json("btw", "error", {"error": str(exc)})
            else:
                printer.line("btw", f"└ failed: {exc}", style="31")

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
            history = await self.conversation.history()
            for message in history.get("messages", []):
                self.printer.line("main", f"{message.get('role')}: {message.get('text')}", style="0")
        elif line.startswith("/"):
            self.printer.line("main", f"unknown command {line.split()[0]}; /help lists them")
        else:
            await self.send(line)
        return True


async def _stdin_lines() -> asyncio.StreamReader:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    return reader


async def run_chat(
    url: str,
    *,
    token: str | None,
    conversation_id: str | None,
    json_mode: bool = False,
    out: IO[str] | None = None,
) -> int:
    """The line-mode chat loop. Returns the process exit code."""
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
    if json_mode:
        session.emit_json("main", "conversation", {"id": conversation.id, "url": url})
    else:
        printer.line("main", f"sidechain chat — conversation {conversation.id} on {url} (/help for commands)")
    loop = asyncio.get_running_loop()
    interrupt_installed = False
    with contextlib.suppress(NotImplementedError, RuntimeError):
        loop.add_signal_handler(signal.SIGINT, session.on_interrupt)
        interrupt_installed = True
    reader = await _stdin_lines()
    try:
        async with conversation.events(initial_reconnect_delay=0.5) as events:
            follower = loop.create_task(session.follow_events(events))
            try:
                while not session.quitting:
                    line_task = loop.create_task(reader.readline())
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
                    if not raw:  # end of input: let what runs finish
                        break
                    if not await session.handle(raw.decode("utf-8", "replace")):
                        break
                if not session.quitting:
                    await _drain(session)
            finally:
                for task in list(session.btw_tasks):
                    task.cancel()
                if session.btw_tasks:
                    await asyncio.wait(set(session.btw_tasks))
                follower.cancel()
                await asyncio.wait({follower})
    finally:
        if interrupt_installed:
            loop.remove_signal_handler(signal.SIGINT)
    if follower.done() and not follower.cancelled() and follower.exception() is not None:
        printer.line("main", f"[event stream failed: {follower.exception()}]", style="31")
        return 1
    return 0


async def _drain(session: ChatSession) -> None:
    """End of input: wait for the running turn and btws (Ctrl-C still cancels them)."""
    while (session.btw_tasks or session.turn_id is not None) and not session.quitting:
        turn_wait = asyncio.ensure_future(session.turn_done.wait())
        quit_wait = asyncio.ensure_future(session.quit_event.wait())
        waits: set[asyncio.Future[Any]] = {*session.btw_tasks, quit_wait}
        if session.turn_id is not None:
            waits.add(turn_wait)
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        turn_wait.cancel()
        quit_wait.cancel()
        await asyncio.wait({turn_wait, quit_wait})
