"""Conversation: the small high-level helper over the gateway's wire contract.

```python
conv = await Conversation.create("http://127.0.0.1:8765")
async with conv.btw("what is this conversation about?") as answer:
    async for delta in answer:
        print(delta, end="")
print(await conv.ask("Tell me about streaming"))
```

It holds no connections: every call owns what it opens (dedicated sessions), so there is nothing to
close.
"""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import quote

from ..errors import ProtocolError, RemoteError, SidechainError
from .btw import BtwAnswer, BtwClient, decode_payload
from .events import EventStreamClient
from .http import GatewayHTTPClient
from .retry import RetryPolicy

__all__ = ["Conversation"]


class Conversation:
    """One conversation on a gateway: send messages, follow events, ask btw questions."""

    def __init__(self, gateway: str | GatewayHTTPClient, conversation_id: str, *, token: str | None = None,
                 cancel_timeout: float = 2.0) -> None:
        if not isinstance(gateway, GatewayHTTPClient):
            gateway = GatewayHTTPClient(gateway, token=token)
        self.http = gateway
        self.id = conversation_id
        #: Seconds a best-effort cancel (of a turn :meth:`ask` stopped waiting for, of a btw) may take.
        self.cancel_timeout = cancel_timeout
        self._btw = BtwClient(self.http, cancel_timeout=cancel_timeout)
        self._path = f"/v1/conversations/{quote(conversation_id, safe='')}"
        self._last_answer: BtwAnswer | None = None
        self.last_turn_id: str | None = None

    @classmethod
    async def create(cls, gateway: str | GatewayHTTPClient, *, token: str | None = None) -> Conversation:
        """Create a new conversation on the gateway."""
        http = gateway if isinstance(gateway, GatewayHTTPClient) else GatewayHTTPClient(gateway, token=token)
        created = await http.request_json("POST", "/v1/conversations", {})
        if not isinstance(created, dict) or not isinstance(created.get("id"), str):
            raise ProtocolError(f"unexpected answer to conversation creation: {created!r}", rule="json")
        return cls(http, created["id"])

    @classmethod
    def attach(cls, gateway: str | GatewayHTTPClient, conversation_id: str, *, token: str | None = None
               ) -> Conversation:
        """Use an existing conversation (nothing is sent until the first call)."""
        return cls(gateway, conversation_id, token=token)

    async def history(self) -> dict[str, Any]:
        """The conversation as the gateway has it: messages and the active turn."""
        result: dict[str, Any] = await self.http.request_json("GET", self._path)
        return result

    async def send(self, text: str, *, queue: bool = False) -> str:
        """Start a main turn; returns its turn id. Its answer streams on :meth:`events`.

        Raises :class:`HTTPStatusError` 409 while another turn runs, unless ``queue`` is true.
        """
        body: dict[str, Any] = {"text": text}
        if queue:
            body["queue"] = True
        result = await self.http.request_json("POST", f"{self._path}/messages", body)
        turn_id = result.get("turn_id") if isinstance(result, dict) else None
        if not isinstance(turn_id, str):
            raise ProtocolError(f"unexpected answer to a message: {result!r}", rule="json")
        self.last_turn_id = turn_id
        return turn_id

    async def add_note(self, text: str) -> str:
        """Add a note to the conversation's history (no turn runs for it; later turns and btws see it);
        returns its id. Everyone following the event stream gets ``note.created``."""
        result = await self.http.request_json("POST", f"{self._path}/notes", {"text": text})
        note_id = result.get("note_id") if isinstance(result, dict) else None
        if not isinstance(note_id, str):
            raise ProtocolError(f"unexpected answer to a note: {result!r}", rule="json")
        return note_id

    def events(self, *, last_event_id: str | None = None, **options: Any) -> EventStreamClient:
        """The conversation's event stream (``async with conv.events() as events: ...``), with the
        client's token, headers, connect and read timeouts unless ``options`` say otherwise."""
        options.setdefault("headers", self.http.headers)
        options.setdefault("connect_timeout", self.http.connect_timeout)
        options.setdefault("read_timeout", self.http.read_timeout)
        return EventStreamClient(
            self.http.url(f"{self._path}/events"), last_event_id=last_event_id, token=self.http.token,
            **options,
        )

    def btw(self, question: str, *, thread_id: str | None = None, follow_up: bool = False) -> BtwAnswer:
        """Ask a side question; ``follow_up=True`` continues the thread of the previous btw."""
        if follow_up and thread_id is None:
            thread_id = self.btw_thread_id
        answer = self._btw.send_message(self.id, question, thread_id=thread_id)
        self._last_answer = answer
        return answer

    @property
    def btw_thread_id(self) -> str | None:
        """The btw thread of the last :meth:`btw` answer (what ``follow_up=True`` continues)."""
        return self._last_answer.thread_id if self._last_answer is not None else None

    async def cancel_turn(self, turn_id: str | None = None) -> None:
        """Stop a running main turn (the last one sent, by default); it ends with ``turn.failed``."""
        turn = turn_id or self.last_turn_id
        if turn is None:
            raise ValueError("no turn to cancel")
        await self.http.request_json("POST", f"{self._path}/turns/{quote(turn, safe='')}/cancel", {})

    async def ask(self, text: str, *, max_reconnects: int = 8) -> str:
        """Send ``text`` and wait for the main turn's whole answer.

        Raises :class:`RemoteError` if the turn fails, and the connection's error once the event stream
        failed ``max_reconnects`` times in a row: a gateway that restarts is waited for, one that stays
        down is not waited for forever. Bound the whole wait with ``asyncio.timeout(...)``: if the wait
        ends before the turn does (cancelled, timed out, the stream failed), the turn is cancelled on
        the gateway (best effort, within ``cancel_timeout`` seconds), so the conversation is free for
        the next message.
        """
        retry = RetryPolicy(max_attempts=max_reconnects, base_delay=0.2, max_delay=5.0)
        async with self.events(initial_reconnect_delay=0.2, max_reconnect_delay=5.0, retry=retry) as events:
            turn_id = await self.send(text)
            try:
                return await self._answer(events, turn_id)
            except RemoteError:
                raise  # the turn ended (failed): nothing to stop
            except BaseException:
                await self._stop_turn(turn_id)
                raise

    async def _stop_turn(self, turn_id: str) -> None:
        """Best-effort cancel of a turn whose answer is no longer awaited; never raises."""
        try:
            async with asyncio.timeout(self.cancel_timeout):
                await self.cancel_turn(turn_id)
        except (SidechainError, TimeoutError):
            pass  # finished meanwhile (409), or the gateway is unreachable: nothing more to do

    async def _answer(self, events: EventStreamClient, turn_id: str) -> str:
        parts: list[str] = []
        async for event in events:
            if not event.event.startswith(("message.", "turn.")):
                continue
            data = decode_payload(event)
            if data.get("turn_id") != turn_id:
                continue
            if event.event == "message.delta":
                parts.append(str(data.get("delta", "")))
            elif event.event == "message.completed" and isinstance(data.get("text"), str):
                parts = [data["text"]]
            elif event.event == "turn.completed":
                return "".join(parts)
            elif event.event == "turn.failed":
                err = data.get("error") or {}
                raise RemoteError(str(err.get("type", "turn_failed")), str(err.get("message", "")), data=data)
        raise ProtocolError("the event stream ended before the turn did", rule="terminal")
