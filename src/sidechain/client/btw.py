"""BtwClient: side questions whose answers stream back in the response of their own POST.

Each call owns a dedicated session, released on completion, error or cancellation (the original
system's fix). A dropped connection resumes with the call's ``Idempotency-Key`` and ``Last-Event-ID``,
so the text the caller sees equals an uninterrupted answer. A consumer that stops early (cancelled,
``break``, an exception) also asks the gateway to stop that btw, best effort and bounded in time; the
main turn is never touched.
"""

from __future__ import annotations

import asyncio
import uuid
from types import TracebackType
from typing import Any
from urllib.parse import quote

import msgspec

from ..errors import ProtocolError, RemoteError, SidechainError
from ..sse import Event
from .http import EventStream, GatewayHTTPClient, StreamContext
from .retry import RetryPolicy

__all__ = ["BtwAnswer", "BtwClient", "decode_payload", "format_btw_note"]

BTW_TERMINAL = frozenset({"btw.completed", "error"})


def format_btw_note(question: str, answer: str) -> str:
    """A btw exchange as a note for the main conversation (what ``/inject`` adds; Markdown)."""
    return f"**Q:** {question.strip()}\n\n**A:** {answer.strip()}"


def decode_payload(event: Event) -> dict[str, Any]:
    """The JSON object carried by a gateway event, or :class:`ProtocolError`."""
    try:
        value = msgspec.json.decode(event.data)
    except msgspec.DecodeError as exc:
        raise ProtocolError(f"event {event.event!r} (id {event.id}) carries invalid JSON: {exc}",
                            rule="json") from exc
    if not isinstance(value, dict):
        raise ProtocolError(f"event {event.event!r} (id {event.id}) is not a JSON object", rule="json")
    return value


class BtwAnswer:
    """One btw answer: ``async with`` it, then ``async for delta in answer`` yields text deltas.

    When iteration ends, ``text`` is the whole answer, ``btw_id`` / ``thread_id`` identify it (pass
    ``thread_id`` to the next question to continue the thread) and ``completed`` is true. An ``error``
    event from the gateway raises :class:`RemoteError`. On exit, everything is released; if the answer
    did not complete, the gateway is told to stop it (``DELETE``), bounded by ``cancel_timeout``.
    """

    def __init__(self, client: BtwClient, conversation_id: str, question: str, *,
                 thread_id: str | None, idempotency_key: str) -> None:
        self._client = client
        self.conversation_id = conversation_id
        self.question = question
        self.thread_id = thread_id
        self.idempotency_key = idempotency_key
        self.btw_id: str | None = None
        self.completed = False
        self.failed: RemoteError | None = None
        self._parts: list[str] = []
        self._final_text: str | None = None
        self._ctx: StreamContext | None = None
        self._events: EventStream | None = None
        self._used = False  # entered once: an answer is one request

    @property
    def text(self) -> str:
        """The answer so far (the gateway's full text once completed)."""
        return self._final_text if self._final_text is not None else "".join(self._parts)

    @property
    def attempts(self) -> int:
        """Requests sent for this answer (more than 1 after a resume)."""
        return self._events.attempts if self._events is not None else 0

    async def __aenter__(self) -> BtwAnswer:
        if self._used:
            raise RuntimeError("a BtwAnswer is used once: ask again with send_message()")
        self._used = True
        body: dict[str, Any] = {"question": self.question}
        if self.thread_id:
            body["thread_id"] = self.thread_id
        path = f"/v1/conversations/{quote(self.conversation_id, safe='')}/btw"
        self._ctx = self._client.http.stream_post_with_retry(
            path, body, idempotency_key=self.idempotency_key, expect_terminal=BTW_TERMINAL,
            retry=self._client.retry,
        )
        self._events = await self._ctx.__aenter__()
        self.btw_id = self._events.headers.get("X-Btw-Id") or self.btw_id
        self.thread_id = self._events.headers.get("X-Thread-Id") or self.thread_id
        return self

    def __aiter__(self) -> BtwAnswer:
        return self

    async def __anext__(self) -> str:
        events = self._events
        if events is None:
            raise RuntimeError("use `async with` before iterating a BtwAnswer")
        if self.completed:
            raise StopAsyncIteration
        if self._ctx is None:  # its `async with` ended before the answer did: what is left is gone
            raise RuntimeError("this BtwAnswer was closed before it completed (text holds what came)")
        async for event in events:
            kind = event.event
            if kind == "btw.delta":
                delta = decode_payload(event).get("delta", "")
                if not isinstance(delta, str):
                    raise ProtocolError("btw.delta without a text delta", rule="json")
                self._parts.append(delta)
                return delta
            if kind == "btw.started":
                data = decode_payload(event)
                self.btw_id = data.get("btw_id", self.btw_id)
                self.thread_id = data.get("thread_id", self.thread_id)
            elif kind == "btw.completed":
                data = decode_payload(event)
                text = data.get("text")
                if isinstance(text, str):
                    self._final_text = text
                self.btw_id = data.get("btw_id", self.btw_id)
                self.thread_id = data.get("thread_id", self.thread_id)
                self.completed = True
                raise StopAsyncIteration
            elif kind == "error":
                data = decode_payload(event)
                self.failed = RemoteError(str(data.get("type", "error")), str(data.get("message", "")),
                                          data=data)
                raise self.failed
        raise StopAsyncIteration  # pragma: no cover - expect_terminal turns a bare end into an error

    async def read(self) -> str:
        """Consume the whole answer and return its text."""
        async for _ in self:
            pass
        return self.text

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        ctx, self._ctx = self._ctx, None
        if ctx is not None:
            await ctx.__aexit__(exc_type, exc, tb)
        if not self.completed and self.failed is None and self.btw_id:
            await self._client.cancel(self.conversation_id, self.btw_id)


class BtwClient:
    """Asks btw side questions of a gateway.

    ``BtwClient(base_url | GatewayHTTPClient, token=..., retry=...)``; then
    ``async with btw.send_message(conversation_id, question, thread_id=None) as answer:``.
    """

    def __init__(
        self,
        gateway: str | GatewayHTTPClient,
        *,
        token: str | None = None,
        retry: RetryPolicy | None = None,
        cancel_timeout: float = 2.0,
        **client_options: Any,
    ) -> None:
        if isinstance(gateway, GatewayHTTPClient):
            self.http = gateway
        else:
            self.http = GatewayHTTPClient(gateway, token=token, **client_options)
        self.retry = retry
        self.cancel_timeout = cancel_timeout

    def send_message(
        self,
        conversation_id: str,
        question: str,
        *,
        thread_id: str | None = None,
        idempotency_key: str | None = None,
    ) -> BtwAnswer:
        """Ask ``question`` about the conversation; see :class:`BtwAnswer`."""
        return BtwAnswer(self, conversation_id, question, thread_id=thread_id,
                         idempotency_key=idempotency_key or uuid.uuid4().hex)

    async def cancel(self, conversation_id: str, btw_id: str) -> bool:
        """Ask the gateway to stop a btw. Best effort: returns False instead of raising, within
        ``cancel_timeout`` seconds."""
        path = f"/v1/conversations/{quote(conversation_id, safe='')}/btw/{quote(btw_id, safe='')}"
        try:
            async with asyncio.timeout(self.cancel_timeout):
                await self.http.request_json("DELETE", path, timeout=self.cancel_timeout)
            return True
        except (SidechainError, TimeoutError):
            return False
