"""The two streaming responses, as raw ASGI: the conversation event stream and a btw answer stream.

Each response owns two things for its lifetime: its registration (a subscription or a btw reader) and
one watcher task that notices the client going away (``http.disconnect``), so an idle stream is
released at once rather than at the next write. Both are released in ``finally`` on every path.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

import msgspec
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from ..sse import Encoder

if TYPE_CHECKING:  # pragma: no cover
    from .btw import Btw
    from .conversations import Conversation, Subscription
    from .service import Gateway

__all__ = ["SSE_HEADERS", "BtwStreamResponse", "EventStreamResponse"]

log = logging.getLogger("sidechain.gateway")

SSE_HEADERS: list[tuple[bytes, bytes]] = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]

#: Events written per ``send`` when catching up (one HTTP chunk each).
_BATCH = 512
#: At most this many bytes per catch-up write (at least one event): what a reader that stops reading
#: while it catches up can leave in the server's write buffer.
_BATCH_BYTES = 256 * 1024

_KEEPALIVE = Encoder.comment("keepalive")
_json = msgspec.json.Encoder()


class _Aborted(Exception):
    """A dropped subscriber did not take its final event within the grace period."""


class _StreamResponse(Response):
    """Base: headers, the disconnect watcher and the gateway's open-stream count."""

    media_type = "text/event-stream"

    def __init__(self, gateway: Gateway, headers: dict[str, str] | None = None) -> None:
        self.gateway = gateway
        self.status_code = 200
        self.background = None
        self._extra = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]
        self.disconnected = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Stream until the end, a disconnect, or shutdown. Registration and watcher are released always."""
        gw = self.gateway
        gw.stream_opened()
        self._open()
        watcher = asyncio.get_running_loop().create_task(self._watch(receive))
        try:
            await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS + self._extra})
            await self._run(send)
        except _Aborted:
            log.info("dropped a subscriber that did not read its final event in time")
            abort = scope.get("extensions", {}).get("sidechain.abort")
            if abort is not None:  # reset the connection now (see server.abortable_http)
                abort()
        finally:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)
            self._close()
            gw.stream_closed()

    async def _watch(self, receive: Receive) -> None:
        while True:
            message: Message = await receive()
            if message["type"] == "http.disconnect":
                self.disconnected = True
                self._on_disconnect()
                return

    async def _finish(self, send: Send) -> None:
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    def _open(self) -> None:
        raise NotImplementedError

    def _close(self) -> None:
        raise NotImplementedError

    def _on_disconnect(self) -> None:
        raise NotImplementedError

    async def _run(self, send: Send) -> None:
        raise NotImplementedError


class EventStreamResponse(_StreamResponse):
    """``GET /v1/conversations/{id}/events``: every event after ``after_id``, then live ones.

    ``after_id`` None starts at the oldest retained event. A requested id older than retention gets an
    ``error`` ``resume_gap`` event (with the id just before the oldest retained) first.
    """

    def __init__(self, gateway: Gateway, conv: Conversation, after_id: int | None) -> None:
        super().__init__(gateway)
        self.conv = conv
        oldest = conv.oldest_retained_id
        self._gap: tuple[int, int] | None = None
        if after_id is None:
            self._start = oldest - 1
        elif after_id < oldest - 1:
            self._gap = (after_id, oldest)
            self._start = oldest - 1
        else:
            self._start = after_id
        self.sub: Subscription | None = None

    def _open(self) -> None:
        self.sub = self.conv.subscribe(self._start)
        self.gateway.metrics.event_streams_open += 1

    def _close(self) -> None:
        if self.sub is not None:
            self.conv.unsubscribe(self.sub)
        self.gateway.metrics.event_streams_open -= 1

    def _on_disconnect(self) -> None:
        if self.sub is not None:
            self.sub.closed = True
            self.sub.wake()

    def _gap_event(self, requested: int, oldest: int) -> bytes:
        data = _json.encode(
            {
                "type": "resume_gap",
                "message": f"events after {requested} up to {oldest - 1} are no longer retained;"
                f" continuing from {oldest}",
                "requested_after": str(requested),
                "oldest_available": str(oldest),
            }
        ).decode()
        return self.gateway.encoder.event(data, event="error", id=str(oldest - 1))

    def _control_event(self, type: str, payload: dict[str, Any]) -> bytes:
        # Not in the log: no id line, so the client's Last-Event-ID stays on the last logged event.
        return self.gateway.encoder.event(_json.encode(payload).decode(), event=type)

    async def _send(self, send: Send, sub: Subscription, data: bytes, *, bounded: bool = False) -> None:
        """Write ``data``; once ``sub`` is dropped, or when ``bounded`` (a catch-up write), the write may
        take at most ``slow_consumer_grace``."""
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(None) as scope:
                sub.send_scope = scope
                if sub.dropped or bounded:
                    scope.reschedule(loop.time() + self.gateway.config.slow_consumer_grace)
                try:
                    await send({"type": "http.response.body", "body": data, "more_body": True})
                finally:
                    sub.send_scope = None
        except TimeoutError:
            raise _Aborted from None
        sub.last_write = loop.time()
        sub.keepalive_due = False

    async def _run(self, send: Send) -> None:
        gw = self.gateway
        cfg = gw.config
        conv = self.conv
        sub = self.sub
        assert sub is not None
        head = gw.encoder.retry(cfg.retry_ms)
        if self._gap is not None:
            head += self._gap_event(*self._gap)
        await self._send(send, sub, head)
        while True:
            if sub.closed:
                gw.metrics.client_disconnects_total += 1
                return
            if sub.dropped:
                await self._send_final(
                    send,
                    sub,
                    "error",
                    {
                        "type": "slow_consumer",
                        "message": f"this stream fell more than {cfg.subscriber_queue} events behind;"
                        " reconnect with Last-Event-ID to catch up from the log",
                    },
                )
                return
            if sub.cursor < conv.last_event_id and not (sub.shutdown and not sub.live):
                got = conv.ring.since(sub.cursor, _BATCH, _BATCH_BYTES)
                if got is not None:
                    data, last = got
                else:
                    try:
                        stored = await conv.read_stored(sub.cursor, _BATCH)
                    except Exception as exc:  # the store cannot be read right now (Redis away, say)
                        log.warning("catch-up read of %s failed: %r", conv.id, exc)
                        await self._send_final(send, sub, "error", {
                            "type": "store_unavailable",
                            "message": "the event store cannot be read right now; reconnect with "
                                       "Last-Event-ID to catch up",
                        })
                        return
                    if not stored:  # nothing retained past the cursor (cannot happen while running)
                        sub.cursor = conv.last_event_id
                        continue
                    data = b""
                    if stored[0].id != sub.cursor + 1:  # trimmed while this reader was catching up
                        data = self._gap_event(sub.cursor, stored[0].id)
                    enc = gw.encoder
                    parts: list[bytes] = []
                    size = 0
                    for e in stored:
                        block = enc.event(e.data, event=e.type, id=str(e.id))
                        if parts and size + len(block) > _BATCH_BYTES:
                            break
                        parts.append(block)
                        size += len(block)
                        last = e.id
                    data += b"".join(parts)
                # a reader that stops reading while it catches up is not "live", so the lag rule does not
                # reach it: each catch-up write is bounded in size and in time instead
                try:
                    await self._send(send, sub, data, bounded=True)
                except _Aborted:
                    gw.metrics.slow_consumers_total += 1
                    raise
                sub.cursor = last
                if last >= conv.last_event_id:
                    sub.live = True
                continue
            if sub.shutdown:
                await self._send_final(send, sub, "gateway.shutdown", {"reconnect": True})
                return
            sub.live = True
            if sub.keepalive_due:
                await self._send(send, sub, _KEEPALIVE)
                continue
            await sub.wait()

    async def _send_final(self, send: Send, sub: Subscription, type: str, payload: dict[str, Any]) -> None:
        sub.dropped = True  # bound the final write by slow_consumer_grace
        await self._send(send, sub, self._control_event(type, payload))
        await self._finish(send)


class BtwStreamResponse(_StreamResponse):
    """A btw answer: its events after ``after_seq`` (0 = from the start), until its terminal event."""

    def __init__(self, gateway: Gateway, btw: Btw, after_seq: int, *, resumed: bool) -> None:
        super().__init__(gateway, {"X-Btw-Id": btw.id, "X-Thread-Id": btw.thread.id})
        self.btw = btw
        self.after = after_seq
        if resumed:
            gateway.metrics.resumes_total += 1

    def _open(self) -> None:
        self.gateway.btws.attach(self.btw)

    def _close(self) -> None:
        self.gateway.btws.detach(self.btw)

    def _on_disconnect(self) -> None:
        self.btw.wake()

    async def _run(self, send: Send) -> None:
        btw = self.btw
        cursor = self.after
        keepalive = self.gateway.config.keepalive_interval
        while True:
            if self.disconnected:
                self.gateway.metrics.client_disconnects_total += 1
                return
            if cursor < len(btw.blocks):
                end = len(btw.blocks)
                data = b"".join(btw.blocks[cursor:end])
                cursor = end
                await send({"type": "http.response.body", "body": data, "more_body": True})
                continue
            if btw.finished:
                await self._finish(send)
                return
            if not await btw.wait(keepalive):
                await send({"type": "http.response.body", "body": _KEEPALIVE, "more_body": True})
