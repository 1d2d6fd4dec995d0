"""``sidechain chat`` in line mode, run as a process against a real gateway, fed line by line.

Some tests put a relay (plain HTTP forwarding, nothing of sidechain's) between the chat and the gateway,
to hold back the answer to ``POST .../messages`` or the event stream: what a slow network does.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

import aiohttp
import pytest
from aiohttp import web

from sidechain import Conversation
from sidechain.gateway.testing import GatewayProcess, running_gateway

WITHIN = 30.0


class Changes:
    """Something that changes; :meth:`until` waits (bounded) for a condition on it to hold."""

    def __init__(self) -> None:
        self._changed = asyncio.Event()

    def changed(self) -> None:
        self._changed.set()

    async def until(self, condition: Callable[[], bool], within: float = WITHIN) -> None:
        async with asyncio.timeout(within):
            while not condition():
                self._changed.clear()
                await self._changed.wait()


class ChatProcess(Changes):
    """``python -X dev -W error -m sidechain chat --line --url URL``; stdout and stderr are collected
    as they come. On exit the process is killed if it still runs, and always reaped."""

    def __init__(self, url: str, *args: str, loop: str = "asyncio") -> None:
        super().__init__()
        self.argv = [sys.executable, "-X", "dev", "-W", "error", "-m", "sidechain", "chat", "--line",
                     "--url", url, *args]
        self.env = {**os.environ, "SIDECHAIN_LOOP": loop}
        self.stdout = bytearray()
        self.stderr = bytearray()
        self.proc: asyncio.subprocess.Process | None = None
        self._readers: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> ChatProcess:
        self.proc = await asyncio.create_subprocess_exec(
            *self.argv, env=self.env, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE)
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self._readers = [asyncio.create_task(self._collect(self.proc.stdout, self.stdout)),
                         asyncio.create_task(self._collect(self.proc.stderr, self.stderr))]
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.kill()
        self.close_stdin()
        await self.proc.wait()
        await asyncio.wait(self._readers)

    async def _collect(self, stream: asyncio.StreamReader, into: bytearray) -> None:
        while chunk := await stream.read(65536):
            into.extend(chunk)
            self.changed()

    @property
    def out(self) -> str:
        return self.stdout.decode("utf-8", "replace")

    @property
    def err(self) -> str:
        return self.stderr.decode("utf-8", "replace")

    async def expect(self, text: str, within: float = WITHIN) -> None:
        """Wait until ``text`` was printed on stdout."""
        try:
            await self.until(lambda: text in self.out, within)
        except TimeoutError:
            raise AssertionError(f"{text!r} not printed; stdout:\n{self.out}\nstderr:\n{self.err}") from None

    def send(self, data: bytes) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(data)

    def close_stdin(self) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        if not self.proc.stdin.is_closing():
            self.proc.stdin.close()

    async def exit_status(self, within: float = WITHIN) -> int:
        """Close stdin and wait for the exit (and all output)."""
        assert self.proc is not None
        self.close_stdin()
        async with asyncio.timeout(within):
            code = await self.proc.wait()
            await asyncio.wait(self._readers)
        return code

    def assert_clean_stderr(self) -> None:
        assert "Traceback" not in self.err and "Warning" not in self.err, self.err


class Relay(Changes):
    """Forwards HTTP requests to ``upstream``. ``hold_answers``: the answer to the n-th
    ``POST .../messages`` is held back until n ``turn.completed`` went down an event stream to the
    client. ``events_flowing`` cleared: event stream bytes are kept back (still read from upstream)."""

    def __init__(self, upstream: str, *, hold_answers: bool = False) -> None:
        super().__init__()
        self.upstream = upstream
        self.hold_answers = hold_answers
        self.events_flowing = True
        #: Event stream bytes read from upstream, and those sent on to the client.
        self.received = bytearray()
        self.sent = bytearray()
        self.messages_posted = 0
        self.url = ""
        self._handlers: set[asyncio.Task[object]] = set()
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None

    def release_events(self) -> None:
        self.events_flowing = True
        self.changed()

    async def __aenter__(self) -> Relay:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._session = aiohttp.ClientSession(auto_decompress=False)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        for task in list(self._handlers):
            task.cancel()
        if self._handlers:
            await asyncio.wait(set(self._handlers))
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        task = asyncio.current_task()
        assert task is not None and self._session is not None
        self._handlers.add(task)
        try:
            headers = {k: v for k, v in request.headers.items()
                       if k.lower() not in ("host", "content-length", "transfer-encoding", "connection")}
            body = await request.read()
            async with self._session.request(request.method, self.upstream + request.path_qs,
                                             headers=headers, data=body or None) as upstream:
                answer_headers = {k: v for k, v in upstream.headers.items()
                                  if k.lower() in ("content-type", "cache-control", "retry-after")}
                if request.method == "GET" and request.path.endswith("/events") and upstream.status == 200:
                    return await self._relay_events(request, upstream, answer_headers)
                payload = await upstream.read()
                if request.method == "POST" and request.path.endswith("/messages"):
                    self.messages_posted += 1
                    if self.hold_answers:
                        n = self.messages_posted
                        await self.until(lambda: self.sent.count(b"event: turn.completed") >= n)
                return web.Response(status=upstream.status, body=payload, headers=answer_headers)
        finally:
            self._handlers.discard(task)

    async def _relay_events(self, request: web.Request, upstream: aiohttp.ClientResponse,
                            headers: dict[str, str]) -> web.StreamResponse:
        response = web.StreamResponse(status=200, headers=headers)
        await response.prepare(request)
        backlog = bytearray()

        async def read() -> None:
            async for chunk in upstream.content.iter_any():
                self.received.extend(chunk)
                backlog.extend(chunk)
                self.changed()

        reader = asyncio.create_task(read())
        try:
            while True:
                await self.until(lambda: reader.done() or (self.events_flowing and bool(backlog)),
                                 within=3600)
                if self.events_flowing and backlog:
                    chunk = bytes(backlog)
                    backlog.clear()
                    await response.write(chunk)
                    self.sent.extend(chunk)
                    self.changed()
                elif reader.done():
                    return response
        finally:
            reader.cancel()
            await asyncio.wait({reader})


async def test_the_answer_is_printed_when_its_events_come_before_the_message_is_acknowledged() -> None:
    async with running_gateway(echo_pace=0) as gw, Relay(gw.url, hold_answers=True) as relay, \
            ChatProcess(relay.url) as chat:
        await chat.expect("(/help for commands)")
        chat.send(b"hi\n")
        await chat.expect("You said: hi\n")
        chat.send(b"again\n")
        await chat.expect("You said: again\n")
        assert await chat.exit_status() == 0
        assert "still running" not in chat.out
        chat.assert_clean_stderr()


async def test_cancel_of_a_turn_that_ended_unseen_stops_following_it() -> None:
    async with running_gateway(echo_pace=0) as gw, Relay(gw.url) as relay, ChatProcess(relay.url) as chat:
        await chat.expect("(/help for commands)")
        relay.events_flowing = False
        chat.send(b"hi\n")
        await relay.until(lambda: b"event: turn.completed" in relay.received)
        chat.send(b"/cancel\n")
        await chat.expect("[the turn had already ended]")
        relay.release_events()
        chat.send(b"again\n")
        await chat.expect("You said: again\n")
        assert await chat.exit_status() == 0
        assert "still running" not in chat.out
        chat.assert_clean_stderr()


@pytest.mark.parametrize(("gateway", "says"), [
    # the memory store forgot the conversation on restart: its events are a 404
    ("restarted", "[event stream failed: HTTP 404"),
    ("down", "[event stream failed: gave up after 4 failed connections in a row: cannot connect"),
])
async def test_end_of_input_while_the_event_stream_fails_is_an_error(gateway: str, says: str) -> None:
    async with GatewayProcess("--echo-pace", "5", store="memory") as gp, ChatProcess(gp.url) as chat:
        await chat.expect("(/help for commands)")
        chat.send(b"tell me something long" * 8 + b"\n")  # about 9 s at 5 words a second
        await chat.expect("You said:")
        chat.close_stdin()  # the turn is waited for
        await (gp.restart(kill=True) if gateway == "restarted" else gp.kill())
        assert await chat.exit_status() == 1
        assert says in chat.out, chat.out
        chat.assert_clean_stderr()


async def test_commands_failing_on_the_network_are_reported_and_the_chat_goes_on() -> None:
    async with GatewayProcess("--echo-pace", "0", store="memory") as gp, ChatProcess(gp.url) as chat:
        await chat.expect("(/help for commands)")
        await gp.kill()
        chat.send(b"hello\n/note a note\n/history\n/help\n")
        await chat.expect("/quit             leave")
        assert await chat.exit_status() == 0
        for said in ("[message not sent: ", "[note not added: ", "[history unavailable: "):
            assert said in chat.out, chat.out
        chat.assert_clean_stderr()


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
async def test_stdin_is_released_at_end_of_input_and_on_ctrl_c(loop: str) -> None:
    async with running_gateway(echo_pace=0) as gw:
        async with ChatProcess(gw.url, loop=loop) as chat:
            await chat.expect("(/help for commands)")
            chat.send(b"/help\n")
            assert await chat.exit_status() == 0
            chat.assert_clean_stderr()
        async with ChatProcess(gw.url, loop=loop) as chat:
            await chat.expect("(/help for commands)")  # written once Ctrl-C is handled
            assert chat.proc is not None
            chat.proc.send_signal(signal.SIGINT)  # nothing runs: quits, with stdin still open
            async with asyncio.timeout(WITHIN):
                assert await chat.proc.wait() == 0
            chat.assert_clean_stderr()


async def test_concurrent_btws_are_printed_in_blocks_of_their_own() -> None:
    async with running_gateway(echo_pace=20) as gw, ChatProcess(gw.url) as chat:
        chat.send(b"/btw first question\n/btw second question\n")
        assert await chat.exit_status() == 0
        chat.assert_clean_stderr()
        for n, question in ((1, "first question"), (2, "second question")):
            label = f"│ btw {n} "
            blocks = [line.removeprefix(label) for line in chat.out.splitlines() if line.startswith(label)]
            assert blocks[0] == f"┌ btw: {question}" and blocks[-1] == "└ done", chat.out
            answer = "".join(blocks[1:-1])
            assert answer.startswith("[offline echo model"), answer
            assert f'Side question: "{question}"' in answer, answer


async def test_an_input_line_too_long_to_send_is_reported_and_skipped() -> None:
    async with running_gateway(echo_pace=0) as gw, ChatProcess(gw.url) as chat:
        long_note = "€" * 25_000  # 75 kB: over asyncio's default line limit, under the gateway's limits
        chat.send(b"x" * 300_000 + b"\n/note " + long_note.encode() + b"\n/note after\n")
        assert await chat.exit_status() == 0
        chat.assert_clean_stderr()
        assert "[input line longer than 256 KiB: not sent]" in chat.out
        conversation_id = chat.out.split("conversation ", 1)[1].split()[0]
        history = await Conversation.attach(gw.url, conversation_id).history()
        assert [m["text"] for m in history["messages"]] == [long_note, "after"]


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
async def test_input_from_a_file_is_read(loop: str, tmp_path: Path) -> None:
    script = tmp_path / "script.txt"
    script.write_bytes(b"/note from a file\n")
    async with running_gateway(echo_pace=0) as gw:
        with script.open("rb") as stdin:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-X", "dev", "-W", "error", "-m", "sidechain", "chat", "--url", gw.url,
                stdin=stdin, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                env={**os.environ, "SIDECHAIN_LOOP": loop})
            async with asyncio.timeout(WITHIN):
                out, err = await proc.communicate()
        assert proc.returncode == 0, err.decode()
        assert b"Traceback" not in err and b"Warning" not in err, err.decode()
        conversation_id = out.decode().split("conversation ", 1)[1].split()[0]
        history = await Conversation.attach(gw.url, conversation_id).history()
        assert [m["text"] for m in history["messages"]] == ["from a file"]
