"""EventStreamClient: a long-lived SSE connection that behaves like a browser's EventSource, and better.

One background task (owned by the client, cancelled and awaited on close) connects, decodes and
reconnects; iterators pull from a bounded buffer, so a slow consumer stops the reading (backpressure)
instead of growing memory. Each connection owns its session, fully released before the next one opens.
"""

from __future__ import annotations

import asyncio
import random
import sys
from collections import deque
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import msgspec

from ..errors import (
    HTTPStatusError,
    ProtocolError,
    SidechainError,
)
from ..sse import DEFAULT_MAX_EVENT_BYTES, DEFAULT_MAX_LINE_BYTES, Comment, Decoder, Event
from .deadlines import Watchdog
from .http import read_error_body
from .observe import Observer, StreamObservation
from .retry import RetryPolicy, parse_retry_after
from .safe_stream import SafeByteStream
from .sessions import Session

__all__ = ["EventStreamClient", "Fault", "StreamEnded", "StreamStatus"]

StreamStatus = Literal["idle", "connecting", "open", "reconnecting", "closed"]


@dataclass(frozen=True, slots=True)
class Fault:
    """A connection ended abnormally. ``will_retry`` says whether a reconnect follows after ``delay`` s."""

    error: BaseException
    will_retry: bool
    delay: float = 0.0


class _Restart(SidechainError):
    """Internal: restart() asked for a new connection."""


Item = Event | Comment | Fault


class EventStreamClient:
    """A reconnecting Server-Sent Events client.

    ``async with EventStreamClient(url) as events: async for event in events: ...`` yields
    :class:`~sidechain.sse.Event`; ``async for item in events.items()`` also yields :class:`Comment` and
    :class:`Fault` items, so a caller sees every drop and reconnect while the iteration goes on.

    Reconnects after network errors, read or idle timeouts and a clean end of stream: the first wait is
    the server's ``retry:`` value exactly (else ``initial_reconnect_delay``; a ``Retry-After`` or
    ``retry-after-ms`` of an error response wins; none longer than ``max_reconnect_delay``); repeated
    failures back off exponentially with jitter up to ``max_reconnect_delay``; the count resets after a
    connection stayed up ``healthy_after`` seconds. ``Last-Event-ID`` is sent on reconnect (and first,
    if given). A 204 ends the stream for good. Other statuses and a wrong content type are errors,
    retried only where ``retry`` (a :class:`RetryPolicy`) says so; a final error ends iteration by
    raising it.

    At most ``buffer_items`` items (events, comments, faults) wait for the iterators. When the buffer is
    full the connection is not read: aiohttp's own read buffer (bounded, it pauses the socket) fills,
    then TCP backpressure reaches the server, which may drop a subscriber that fell too far behind (the
    sidechain gateway does, past 1024 events, with an ``error`` event; the stream then resumes from
    the last id it delivered).

    ``aclose()`` is idempotent, callable from any task, and wakes every iterator (they end); iterating a
    closed client ends at once. A failure nothing here expected (a bug) ends the stream with a
    :class:`SidechainError` raised to the iterators (the original as its cause), never a silent end.
    ``restart()`` drops the connection and reconnects at once.
    """

    def __init__(
        self,
        url: str,
        *,
        method: str = "GET",
        body: Any = None,
        headers: Mapping[str, str] | None = None,
        last_event_id: str | None = None,
        initial_reconnect_delay: float = 1.0,
        max_reconnect_delay: float = 30.0,
        healthy_after: float = 5.0,
        connect_timeout: float | None = 10.0,
        read_timeout: float | None = None,
        idle_timeout: float | None = None,
        retry: RetryPolicy | None = None,
        session: Session | None = None,
        observer: Observer | None = None,
        buffer_items: int = 1024,
        token: str | None = None,
        max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
        max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES,
    ) -> None:
        self.url = url
        self.method = method.upper()
        self._body: bytes | None = None
        if body is not None:
            self._body = body if isinstance(body, bytes) else msgspec.json.encode(body)
        self._headers = dict(headers or {})
        if token:
            self._headers.setdefault("Authorization", f"Bearer {token}")
        self._decoder = Decoder(comments=True, last_event_id=last_event_id or "",
                                max_line_bytes=max_line_bytes, max_event_bytes=max_event_bytes)
        self.initial_reconnect_delay = initial_reconnect_delay
        self.max_reconnect_delay = max_reconnect_delay
        self.healthy_after = healthy_after
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.idle_timeout = idle_timeout
        self._retry = retry or RetryPolicy(max_attempts=sys.maxsize, base_delay=initial_reconnect_delay,
                                           max_delay=max_reconnect_delay)
        self._given_session = session
        self._observer = observer
        self._max_items = buffer_items
        self._buffer: deque[Item] = deque()
        self._readable = asyncio.Event()
        self._writable = asyncio.Event()
        self._writable.set()
        self._task: asyncio.Task[None] | None = None
        self._stream: SafeByteStream | None = None
        self._closed = False
        self._final_error: BaseException | None = None
        self._watchdog: Watchdog | None = None
        #: ``idle`` before opening, then ``connecting``, ``open``, ``reconnecting`` and ``closed``.
        self.status: StreamStatus = "idle"
        #: Consecutive failed connection attempts (0 while healthy).
        self.failures = 0
        #: Requests sent so far.
        self.connections = 0
        #: When the next reconnect is due (loop time), while ``reconnecting``.
        self.reconnect_at: float | None = None

    # -- lifecycle ---------------------------------------------------------------------------------

    async def __aenter__(self) -> EventStreamClient:
        self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def open(self) -> None:
        """Start the background connection (idempotent). ``async with`` calls it."""
        if self._closed:
            raise RuntimeError("EventStreamClient is closed")
        if self._task is None:
            loop = asyncio.get_running_loop()
            self._task = loop.create_task(self._run(), name=f"sidechain-events {self.url}")

    async def aclose(self) -> None:
        """Stop for good: the connection and its session are released, every iterator ends."""
        self._closed = True
        self._set_status("closed")
        self._readable.set()
        self._writable.set()
        if self._stream is not None:
            self._stream.fail(_Restart("closed"))
        task = self._task  # kept until it ended: a second, concurrent aclose() waits for it too
        if task is not None and task is not asyncio.current_task():
            task.cancel()
            await asyncio.wait({task})
        self._task = None  # a finished task keeps its frames' errors: not kept from here

    async def restart(self) -> None:
        """Drop the current connection and reconnect now (with ``Last-Event-ID``)."""
        stream = self._stream
        if stream is not None:
            stream.fail(_Restart("restart requested"))

    @property
    def last_event_id(self) -> str:
        return self._decoder.last_event_id

    @property
    def retry_hint(self) -> int | None:
        """The server's ``retry:`` value in milliseconds, if it sent one."""
        return self._decoder.retry

    @property
    def closed(self) -> bool:
        return self._closed

    def _on_stall(self, deadline: str) -> None:
        self._emit("stall", deadline=deadline)

    @property
    def buffered(self) -> int:
        """Items received and waiting for the iterators (never more than ``buffer_items``)."""
        return len(self._buffer)

    # -- consumption -------------------------------------------------------------------------------

    def __aiter__(self) -> AsyncIterator[Event]:
        return self._events()

    async def _events(self) -> AsyncIterator[Event]:
        async for item in self.items():
            if isinstance(item, Event):
                yield item

    async def items(self) -> AsyncIterator[Item]:
        """Every item: events, comments, and a :class:`Fault` for each drop. Raises the final error.

        On a closed client it yields what is still buffered, then ends."""
        if not self._closed:
            self.open()
        buffer = self._buffer
        while True:
            if buffer:
                item = buffer.popleft()
                if len(buffer) < self._max_items:
                    self._writable.set()
                yield item
                continue
            if self._closed or (self._task is not None and self._task.done()):
                if self._final_error is not None:
                    raise self._final_error
                return
            self._readable.clear()
            await self._readable.wait()

    async def _put(self, items: list[Item]) -> None:
        """Hand ``items`` to the iterators, never holding more than ``buffer_items``: one read can
        decode many events, so they go in as room frees up, and the socket is not read meanwhile."""
        buffer = self._buffer
        start = 0
        while start < len(items):
            room = self._max_items - len(buffer)
            if room <= 0:
                watchdog = self._watchdog
                if watchdog is not None:
                    watchdog.hold()  # a full buffer is the consumer's time, not the server's idling
                self._writable.clear()
                await self._writable.wait()
                if watchdog is not None:
                    watchdog.waiting()
                continue
            if start == 0 and len(items) <= room:
                buffer.extend(items)
            else:
                buffer.extend(items[start:start + room])
            start += room
            self._readable.set()

    # -- the connection loop ---------------------------------------------------------------------------

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while not self._closed:
                error: BaseException | None = None
                opened_at = None
                session = self._given_session or Session(dedicated=True)
                try:
                    self._set_status("connecting" if self.connections == 0 else "reconnecting")
                    stop = await self._connect_and_read(session)
                    opened_at = self._opened_at
                    if stop:
                        return
                except _Restart:
                    self.failures = 0
                    continue
                except SidechainError as exc:
                    error = exc
                    opened_at = self._opened_at
                finally:
                    if self._watchdog is not None:
                        self._watchdog.stop()
                    if self._stream is not None:
                        self._stream.close_nowait()
                        self._stream = None
                    self._decoder.close()  # a half-received event is discarded
                    if self._given_session is None:
                        await session.aclose()  # released before the next connection opens
                if self._closed:
                    return
                if opened_at is not None and loop.time() - opened_at >= self.healthy_after:
                    self.failures = 0
                self.failures += 1
                if error is None:
                    error = StreamEnded("the server ended the stream")
                elif not self._retry.is_retryable(error) or self.failures >= self._retry.max_attempts:
                    self._final_error = error
                    await self._put([Fault(error, will_retry=False)])
                    return
                delay = self._reconnect_delay(error)
                self._emit("retry", delay=delay, error=repr(error), failures=self.failures)
                self.reconnect_at = loop.time() + delay
                self._set_status("reconnecting")
                await self._put([Fault(error, will_retry=True, delay=delay)])
                if delay > 0:
                    await asyncio.sleep(delay)
                self.reconnect_at = None
        except Exception as exc:  # a bug, or input nothing above expected: typed, and the iterators see it
            error = exc if isinstance(exc, SidechainError) else SidechainError(
                f"event stream failed: {type(exc).__name__}: {exc}")
            if error is not exc:
                error.__cause__ = exc
            self._final_error = error
            del exc
            fault, error = Fault(error, will_retry=False), None  # no local left to lead back to it
            await self._put([fault])
        finally:
            self._set_status("closed")
            self._readable.set()

    _opened_at: float | None = None

    async def _connect_and_read(self, session: Session) -> bool:
        """One connection. Returns True when the stream ended for good (204)."""
        loop = asyncio.get_running_loop()
        self._opened_at = None
        headers = {"Accept": "text/event-stream", "Cache-Control": "no-cache", **self._headers}
        if self._body is not None:
            headers.setdefault("Content-Type", "application/json")
        last_id = self._decoder.last_event_id
        if last_id:
            headers["Last-Event-ID"] = last_id
        self.connections += 1
        self._emit("connect", attempt=self.connections)
        response = await session.request(
            self.method, self.url, data=self._body, headers=headers,
            connect_timeout=self.connect_timeout, read_timeout=self.read_timeout,
        )
        try:
            if response.status == 204:
                self._emit("close", status=204)
                return True
            if not 200 <= response.status < 300:
                raise HTTPStatusError(
                    response.status, headers=dict(response.headers), body=await read_error_body(response),
                    url=str(response.url), retryable=response.status in self._retry.retry_statuses,
                )
            ctype = response.headers.get("Content-Type", "")
            if not ctype.startswith("text/event-stream"):
                raise ProtocolError(f"expected Content-Type text/event-stream, got {ctype or 'none'!r}",
                                    rule="content_type")
        except BaseException:
            response.close()
            raise
        stream = self._stream = SafeByteStream(response, session=session, read_timeout=self.read_timeout)
        if self._closed:
            return True
        self._opened_at = loop.time()
        self._set_status("open")
        self._emit("first_byte", status=response.status)
        watchdog = self._watchdog = Watchdog(loop, idle=self.idle_timeout, deadline=None,
                                             on_stall=self._on_stall)
        watchdog.watch(stream)
        decoder = self._decoder
        try:
            while True:
                chunk = await stream.read()
                if not chunk:
                    return False  # clean end: EventSource reconnects
                try:
                    items: list[Any] = decoder.feed(chunk)
                except ProtocolError as exc:
                    if exc.events:  # decoded before the broken line (and counted in last_event_id)
                        watchdog.event()
                        await self._put(list(exc.events))
                    raise
                if items:
                    if any(isinstance(i, Event) for i in items):
                        watchdog.event()
                    await self._put(items)
        finally:
            # an error raised from here keeps this frame: without these locals the frame does not lead
            # back to the stream, which keeps the error (a reference cycle)
            stream = response = None  # type: ignore[assignment]

    def _reconnect_delay(self, error: BaseException) -> float:
        """The wait before the next connection, never more than ``max_reconnect_delay``."""
        if isinstance(error, HTTPStatusError):
            asked = parse_retry_after(error.headers)  # Retry-After or retry-after-ms
            if asked is not None:
                return min(asked, self.max_reconnect_delay)
        hint = self._decoder.retry
        base = self.initial_reconnect_delay if hint is None else min(hint / 1000.0, self.max_reconnect_delay)
        if self.failures <= 1:
            return base  # the server's retry value, exactly (up to max_reconnect_delay)
        # the exponent is capped: a server that ends every stream at once makes failures grow without
        # end, and 2.0 ** 1025 is past a float
        ceiling = min(self.max_reconnect_delay, max(base, 0.001) * 2.0 ** min(self.failures - 1, 64))
        return random.uniform(ceiling / 2, ceiling)

    def _set_status(self, status: StreamStatus) -> None:
        if self._closed and status != "closed":
            return
        self.status = status

    def _emit(self, kind: str, **info: Any) -> None:
        if self._observer is None:
            return
        try:
            self._observer(StreamObservation(kind=kind, url=self.url, elapsed=0.0, info=info))
        except Exception:
            pass


class StreamEnded(SidechainError):
    """The server ended the stream cleanly (reported in a :class:`Fault`); an EventSource reconnects."""

    retryable = True
