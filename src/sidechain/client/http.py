"""GatewayHTTPClient: streaming POSTs whose resources are released on every path.

``stream_post`` and ``stream_post_with_retry`` are async context managers. Without ``session=`` the call
creates a **dedicated** session, owned by the call and closed when the context exits, whatever the
path: the end of the stream, an error, ``break``, or the consuming task being cancelled. With a
:class:`Session`, the call uses it and releases only its own connection.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Collection, Mapping
from types import TracebackType
from typing import Any

import aiohttp
import msgspec

from ..errors import (
    DeadlineExceeded,
    HTTPStatusError,
    IdleTimeout,
    ProtocolError,
    SidechainError,
    StreamTruncated,
    TotalTimeout,
)
from ..sse import DEFAULT_MAX_EVENT_BYTES, DEFAULT_MAX_LINE_BYTES, Decoder, Event
from .deadlines import Watchdog
from .observe import Observer, StreamObservation
from .retry import DEFAULT_RETRY_STATUSES, RetryPolicy
from .safe_stream import SafeByteStream, StreamState
from .sessions import Session

__all__ = ["EventStream", "GatewayHTTPClient", "StreamContext"]

_json_encode = msgspec.json.Encoder().encode
_BODY_EXCERPT = 2048


async def read_error_body(response: aiohttp.ClientResponse, limit: int = _BODY_EXCERPT) -> str:
    """The first ``limit`` bytes of an error response, decoded leniently; never raises."""
    try:
        async with asyncio.timeout(2.0):
            chunks: list[bytes] = []
            size = 0
            while size < limit:
                chunk = await response.content.read(limit - size)
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
    except (aiohttp.ClientError, OSError, TimeoutError):
        pass
    return b"".join(chunks).decode("utf-8", "replace") if chunks else ""


class EventStream:
    """The object a streaming call yields: an async iterator of :class:`~sidechain.sse.Event`.

    ``status`` and ``headers`` are those of the latest response, ``last_event_id`` the id in force
    (what a resume would send). Iteration ends at the clean end of the body (or raises
    :class:`StreamTruncated` if ``expect_terminal`` was given and none of those events arrived), or
    raises a typed error. With a retry policy it reconnects transparently as the policy decides.
    Cancelling the iterating task propagates ``CancelledError``; the owning context still releases
    everything on exit.
    """

    def __init__(
        self,
        client: GatewayHTTPClient,
        session: Session,
        method: str,
        path: str,
        body: bytes | None,
        headers: dict[str, str],
        *,
        retry: RetryPolicy | None,
        expect_terminal: Collection[str] | None,
        last_event_id: str = "",
    ) -> None:
        self._client = client
        self._session = session
        self._method = method
        self._url = client.url(path)
        self._body = body
        self._headers = headers
        self._retry = retry
        self._terminal = frozenset(expect_terminal) if expect_terminal else None
        self._terminal_seen = False
        self._decoder = Decoder(
            max_line_bytes=client.max_line_bytes,
            max_event_bytes=client.max_event_bytes,
            last_event_id=last_event_id,
        )
        self._pending: list[Event] = []
        self._pos = 0
        self._bytes: SafeByteStream | None = None
        self._done = False
        self._attempt = 0
        self._delivered = 0
        self._delivered_events: list[Event] = []
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._started = loop.time()
        self._deadline = None if client.total_timeout is None else self._started + client.total_timeout
        self._watchdog = Watchdog(loop, idle=client.idle_timeout, deadline=self._deadline,
                                  total=client.total_timeout, on_stall=self._on_stall)
        self._first_event_seen = False
        self._deferred_error: SidechainError | None = None
        self.status = 0
        self.headers: Mapping[str, str] = {}

    # -- public ------------------------------------------------------------------------------------

    @property
    def last_event_id(self) -> str:
        return self._decoder.last_event_id

    @property
    def attempts(self) -> int:
        """How many requests this stream has sent (1 plus retries and resumes)."""
        return self._attempt

    @property
    def retry_hint(self) -> int | None:
        """The ``retry:`` value the server sent, in milliseconds, if any."""
        return self._decoder.retry

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> Event:
        pending = self._pending
        pos = self._pos
        if pos < len(pending):
            event = pending[pos]
            self._pos = pos + 1
            return event
        return await self._next_slow()

    async def aclose(self) -> None:
        """Release this stream's connection and timers. Idempotent; safe from any task."""
        self._done = True
        self._watchdog.stop()
        stream, self._bytes = self._bytes, None  # the stream keeps its error, which may lead back here
        if stream is not None:
            stream.close_nowait()
            self._emit("close", state=stream.state.value)

    # -- internals ---------------------------------------------------------------------------------

    async def _open_with_retry(self) -> None:
        """Open the first response, retrying before the first event as the policy says."""
        while True:
            try:
                await self._open()
                return
            except SidechainError as exc:
                await self._after_failure(exc)

    async def _open(self) -> None:
        self._attempt += 1
        headers = self._headers
        last_id = self._decoder.last_event_id
        if last_id:
            headers = {**headers, "Last-Event-ID": last_id}
        self._emit("connect", attempt=self._attempt)
        deadline = self._deadline
        deadline_error: DeadlineExceeded | None = None
        if deadline is not None:
            deadline_error = TotalTimeout(f"call exceeded total_timeout={self._client.total_timeout}s",
                                          timeout=self._client.total_timeout)
        idle = self._client.idle_timeout
        if idle is not None and (deadline is None or self._loop.time() + idle < deadline):
            # no event can come before the headers: a server that never answers is idle too
            deadline = self._loop.time() + idle
            deadline_error = IdleTimeout(f"no response headers within idle_timeout={idle}s", timeout=idle)
        try:
            response = await self._session.request(
                self._method,
                self._url,
                data=self._body,
                headers=headers,
                connect_timeout=self._client.connect_timeout,
                read_timeout=self._client.read_timeout,
                deadline=deadline,
                deadline_error=deadline_error,
            )
        finally:
            deadline_error = None  # raised, it keeps this frame: holding it here would be a cycle
        try:
            self.status = response.status
            self.headers = response.headers
            if not 200 <= response.status < 300:
                body = await read_error_body(response)
                raise HTTPStatusError(
                    response.status,
                    headers=dict(response.headers),
                    body=body,
                    url=str(response.url),
                    retryable=response.status in (self._retry.retry_statuses if self._retry
                                                  else DEFAULT_RETRY_STATUSES),
                )
            ctype = response.headers.get("Content-Type", "")
            if not ctype.startswith("text/event-stream"):
                body = await read_error_body(response, 256)
                raise ProtocolError(
                    f"expected Content-Type text/event-stream, got {ctype or 'none'!r}: {body[:200]}",
                    rule="content_type",
                )
        except BaseException:
            response.close()
            raise
        self._bytes = SafeByteStream(response, session=self._session, read_timeout=self._client.read_timeout)
        self._emit("first_byte", attempt=self._attempt, status=response.status)
        self._watchdog.watch(self._bytes)

    async def _after_failure(self, exc: SidechainError) -> None:
        """Ask the policy; sleep and return to retry, or raise what it says."""
        retrying = False
        try:
            if self._bytes is not None:
                self._bytes.close_nowait()
                self._bytes = None
            self._watchdog.stop()
            self._decoder.close()
            self._pending = []
            self._pos = 0
            if self._retry is None:
                raise exc
            decision = self._retry.decide(
                self._attempt,
                exc,
                delivered=self._delivered,
                last_event_id=self._decoder.last_event_id,
                delivered_events=self._delivered_events,
            )
            if decision.action == "give_up":
                assert decision.error is not None
                if decision.error is exc:
                    raise exc
                raise decision.error from exc
            delay = decision.delay
            if self._deadline is not None and self._loop.time() + delay >= self._deadline:
                raise TotalTimeout(
                    f"call would exceed total_timeout={self._client.total_timeout}s while waiting to retry",
                    timeout=self._client.total_timeout,
                ) from exc
            retrying = True
            self._emit("retry", attempt=self._attempt, delay=delay, action=decision.action, error=repr(exc))
            if delay > 0:
                await asyncio.sleep(delay)
        finally:
            if not retrying:
                self._done = True  # the error raised from here is final: no request after it
            # raised from here, the error would reach itself through this frame (directly, or through
            # the decision that carries it): a reference cycle
            exc = decision = None  # type: ignore[assignment]

    async def _next_slow(self) -> Event:
        self._watchdog.waiting()  # the idle clock counts from when the consumer asks, not before
        while True:
            if self._deferred_error is not None:
                err, self._deferred_error = self._deferred_error, None
                raise err
            if self._done:
                raise StopAsyncIteration
            stream = self._bytes
            if stream is None:
                await self._open_with_retry()
                continue
            try:
                chunk = await stream.read()
                if chunk:
                    items: list[Any] = self._decoder.feed(chunk)
                    if not items:
                        continue
                    self._watchdog.event()
                    self._delivered += len(items)
                    if not self._first_event_seen:
                        self._first_event_seen = True
                        self._emit("first_event", attempt=self._attempt)
                    if self._retry is not None and not self._decoder.last_event_id:
                        self._delivered_events.extend(items)  # kept only while there is no id to resume
                    if self._terminal is not None and not self._terminal_seen:
                        terminal = self._terminal
                        for item in items:
                            if item.event in terminal:
                                self._terminal_seen = True
                                break
                    self._pending = items
                    self._pos = 1
                    self._watchdog.hold()
                    event: Event = items[0]
                    return event
                # clean end of body
                if self._terminal is not None and not self._terminal_seen:
                    raise StreamTruncated(
                        f"stream ended before any of {sorted(self._terminal)}",
                        expected=self._terminal,
                        last_event_id=self._decoder.last_event_id,
                    )
                self._done = True
                self._watchdog.stop()
                stream.close_nowait()
                self._emit("close", state="ended")
                raise StopAsyncIteration
            except ProtocolError as exc:
                stream.fail(exc)
                self._done = True
                if exc.events:
                    # events decoded before the broken line are still delivered, then the error
                    self._pending = list(exc.events)
                    self._pos = 1
                    self._deferred_error = exc
                    first: Event = exc.events[0]
                    return first
                raise
            except SidechainError as exc:
                invalidated = stream.state is StreamState.INVALIDATED
                # an error raised from here keeps this frame: without the local, the frame does not
                # lead back to the failed stream, which keeps the error (a reference cycle)
                del stream
                if invalidated:
                    self._done = True
                    raise
                await self._after_failure(exc)

    def _on_stall(self, deadline: str) -> None:
        self._emit("stall", deadline=deadline)

    def _emit(self, kind: str, **info: Any) -> None:
        observer = self._client.observer
        if observer is None:
            return
        try:
            observer(StreamObservation(kind=kind, url=self._url, elapsed=self._loop.time() - self._started,
                                       info=info))
        except Exception:  # an observer must not break the stream
            pass


class StreamContext:
    """``async with`` wrapper of one streaming call: owns the dedicated session, if any, and the stream.

    On exit, whatever the path, the stream's connection is released and a dedicated session is closed.
    Exit after cancellation still releases synchronously first, so nothing leaks even if the exit's
    own await is cancelled again.
    """

    def __init__(
        self,
        client: GatewayHTTPClient,
        method: str,
        path: str,
        body: bytes | None,
        headers: dict[str, str],
        *,
        session: Session | None,
        retry: RetryPolicy | None,
        expect_terminal: Collection[str] | None,
        last_event_id: str = "",
    ) -> None:
        self._client = client
        self._method = method
        self._path = path
        self._body = body
        self._headers = headers
        self._given_session = session
        self._retry = retry
        self._expect = expect_terminal
        self._last_event_id = last_event_id
        self._owned: Session | None = None
        self._stream: EventStream | None = None

    async def __aenter__(self) -> EventStream:
        session = self._given_session
        if session is None:
            session = self._owned = Session(dedicated=True)
        stream = EventStream(
            self._client, session, self._method, self._path, self._body, self._headers,
            retry=self._retry, expect_terminal=self._expect, last_event_id=self._last_event_id,
        )
        self._stream = stream
        try:
            await stream._open_with_retry()
        except BaseException:
            await self._release()
            raise
        return stream

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._release()

    async def _release(self) -> None:
        if self._stream is not None:
            await self._stream.aclose()
        owned, self._owned = self._owned, None
        if owned is not None:
            await owned.aclose()


class GatewayHTTPClient:
    """HTTP client for a sidechain gateway (or any SSE-over-POST server).

    Holds settings only, no connections: every call without ``session=`` owns a dedicated session, so
    the client needs no closing and can be shared freely between tasks.

    Deadlines (seconds, ``None`` = none): ``connect_timeout``; ``read_timeout`` between bytes (raises
    :class:`ReadTimeout`); ``idle_timeout`` between events, and from sending the request to its
    headers (comments and keepalives do not reset it; only time the consumer spends waiting for the
    next event counts, not time it spends on one; :class:`IdleTimeout`); ``total_timeout`` for the
    whole call including retries (:class:`TotalTimeout`).
    """

    def __init__(
        self,
        base_url: str,
        *,
        token: str | None = None,
        connect_timeout: float | None = 10.0,
        read_timeout: float | None = None,
        idle_timeout: float | None = None,
        total_timeout: float | None = None,
        retry: RetryPolicy | None = None,
        headers: Mapping[str, str] | None = None,
        observer: Observer | None = None,
        max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
        max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES,
    ) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must be an http(s) URL, got {base_url!r}")
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.idle_timeout = idle_timeout
        self.total_timeout = total_timeout
        self.retry = retry if retry is not None else RetryPolicy()
        self.observer = observer
        self.max_line_bytes = max_line_bytes
        self.max_event_bytes = max_event_bytes
        self._headers = dict(headers or {})

    @property
    def headers(self) -> dict[str, str]:
        """The extra headers every request of this client sends (a copy)."""
        return dict(self._headers)

    def url(self, path: str) -> str:
        if path.startswith(("http://", "https://")):
            return path
        return self.base_url + (path if path.startswith("/") else "/" + path)

    def _base_headers(self, extra: Mapping[str, str] | None, *, json_body: bool) -> dict[str, str]:
        headers = {"Accept": "text/event-stream", "Cache-Control": "no-cache"}
        if json_body:
            headers["Content-Type"] = "application/json"
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        headers.update(self._headers)
        if extra:
            headers.update(extra)
        return headers

    def stream_post(
        self,
        path: str,
        json: Any = None,
        *,
        headers: Mapping[str, str] | None = None,
        session: Session | None = None,
        expect_terminal: Collection[str] | None = None,
    ) -> StreamContext:
        """POST ``json`` and stream the SSE response, without retries.

        ``async with client.stream_post(path, body) as events: async for event in events: ...``.
        Errors: :class:`HTTPStatusError` (non-2xx, with status, headers and the start of the body),
        :class:`ProtocolError` (not an event stream, malformed), transport errors and deadlines,
        :class:`SessionInvalidated`, :class:`StreamTruncated` (``expect_terminal`` not met).
        """
        body = None if json is None else _json_encode(json)
        return StreamContext(
            self, "POST", path, body, self._base_headers(headers, json_body=body is not None),
            session=session, retry=None, expect_terminal=expect_terminal,
        )

    def stream_post_with_retry(
        self,
        path: str,
        json: Any = None,
        *,
        retry: RetryPolicy | None = None,
        idempotency_key: str | None = None,
        headers: Mapping[str, str] | None = None,
        session: Session | None = None,
        expect_terminal: Collection[str] | None = None,
        last_event_id: str = "",
    ) -> StreamContext:
        """Like :meth:`stream_post`, with retries and resume decided by ``retry`` (or the client's).

        All attempts share the call's one dedicated session (or ``session``). An ``Idempotency-Key``
        header is sent (generated when not given). Before the first event, retryable failures are
        retried with backoff and ``Retry-After``; after it, the call resumes with ``Last-Event-ID``
        if the server gave ids, else raises :class:`StreamInterrupted` carrying the delivered events.
        A delivered event is never yielded twice.
        """
        body = None if json is None else _json_encode(json)
        extra = dict(headers or {})
        extra.setdefault("Idempotency-Key", idempotency_key or uuid.uuid4().hex)
        return StreamContext(
            self, "POST", path, body, self._base_headers(extra, json_body=body is not None),
            session=session, retry=retry or self.retry, expect_terminal=expect_terminal,
            last_event_id=last_event_id,
        )

    async def request_json(
        self,
        method: str,
        path: str,
        json: Any = None,
        *,
        headers: Mapping[str, str] | None = None,
        session: Session | None = None,
        timeout: float | None = 30.0,  # noqa: ASYNC109 - a deadline passed down, not a wrapper
    ) -> Any:
        """A plain JSON request (no streaming): returns the decoded body (``None`` when empty).

        Uses a dedicated session unless ``session`` is given; raises :class:`HTTPStatusError` for a
        non-2xx answer and typed transport errors otherwise.
        """
        owned = None
        if session is None:
            session = owned = Session(dedicated=True)
        h = self._base_headers(headers, json_body=json is not None)
        h["Accept"] = "application/json"
        del h["Cache-Control"]
        loop = asyncio.get_running_loop()
        try:
            response = await session.request(
                method, self.url(path),
                data=None if json is None else _json_encode(json),
                headers=h,
                connect_timeout=self.connect_timeout,
                read_timeout=self.read_timeout,
                deadline=None if timeout is None else loop.time() + timeout,
                deadline_error=TotalTimeout(f"request exceeded {timeout}s", timeout=timeout),
            )
            try:
                if not 200 <= response.status < 300:
                    raise HTTPStatusError(
                        response.status, headers=dict(response.headers),
                        body=await read_error_body(response), url=str(response.url),
                        retryable=response.status in DEFAULT_RETRY_STATUSES,
                    )
                try:
                    raw = await response.read()
                except (aiohttp.ClientError, OSError) as exc:
                    from .sessions import map_request_error

                    raise map_request_error(exc, connect_timeout=self.connect_timeout,
                                            read_timeout=self.read_timeout) from exc
            finally:
                response.release()
            if not raw:
                return None
            try:
                return msgspec.json.decode(raw)
            except msgspec.DecodeError as exc:
                raise ProtocolError(f"invalid JSON in response: {exc}", rule="json") from exc
        finally:
            if owned is not None:
                await owned.aclose()

