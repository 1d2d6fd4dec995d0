"""Conversations: their turns, the event stream subscriptions that follow them, and btw context.

A conversation runs at most one main turn at a time; further messages wait in a queue when the client
asked for it. Every event a turn produces is appended to the event log with the next id of the
conversation (contiguous integers from 1) and reaches subscribers only once the log has made it
durable. Subscribers read from a shared ring of recent encoded events (one encoding per event, however
many subscribers), or from the log when they are further behind than the ring reaches.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections import deque
from collections.abc import Sequence
from contextlib import aclosing
from typing import TYPE_CHECKING, Any

import msgspec

from .btw import BtwThread
from .errors import Conflict, NotFound, ServiceUnavailable, TooManyRequests
from .eventlog import ConversationRecord, StoredEvent, TurnRecord, TurnState
from .models.base import ChatMessage, ModelError, ModelRequest, Snapshot

if TYPE_CHECKING:  # pragma: no cover
    from .service import Gateway

__all__ = ["Conversation", "EventRing", "Subscription", "Turn"]

log = logging.getLogger("sidechain.gateway")

_json = msgspec.json.Encoder()

BTW_SYSTEM_PROMPT = (
    "You are answering a side question (a 'by the way') about the conversation below. Answer briefly from"
    " what the conversation says. You have no tools. Your answer is not added to the conversation."
)

_FAIL_MESSAGES = {
    "cancelled": "the turn was cancelled",
    "gateway_shutdown": "the gateway shut down while this turn was pending; send the message again",
    "gateway_restarted": "the gateway restarted while this turn was pending; send the message again",
}


def new_turn_id() -> str:
    """A fresh turn id (64 random bits; unique within a conversation)."""
    return "turn_" + secrets.token_hex(8)


def note_message(text: str) -> ChatMessage:
    """How a note reaches a model: a user message that says it is a note, not a request."""
    return ChatMessage("user", f"[A note added to this conversation, not a request to answer]\n{text}")


def new_note_id() -> str:
    """A fresh note id (64 random bits; unique within a conversation)."""
    return "note_" + secrets.token_hex(8)


class Turn:
    """One user message and the answer to it. Owned by its :class:`Conversation`."""

    __slots__ = (
        "assistant_text",
        "cancel_reason",
        "error_type",
        "id",
        "parts",
        "seq",
        "state",
        "task",
        "user_text",
    )

    def __init__(self, id: str, seq: int, user_text: str, state: str = TurnState.QUEUED) -> None:
        self.id = id
        self.seq = seq
        self.user_text = user_text
        self.state = state
        self.parts: list[str] = []
        self.assistant_text: str | None = None
        self.error_type: str | None = None
        self.cancel_reason: str | None = None
        self.task: asyncio.Task[None] | None = None

    @property
    def finished(self) -> bool:
        return self.state in (TurnState.COMPLETED, TurnState.FAILED, TurnState.NOTE)

    @property
    def is_note(self) -> bool:
        return self.state == TurnState.NOTE

    def record(self) -> TurnRecord:
        return TurnRecord(self.id, self.seq, self.user_text, self.state, self.assistant_text, self.error_type)

    @classmethod
    def from_record(cls, rec: TurnRecord) -> Turn:
        turn = cls(rec.turn_id, rec.seq, rec.user_text, rec.state)
        turn.assistant_text = rec.assistant_text
        turn.error_type = rec.error_type
        return turn


class EventRing:
    """The newest published events of a conversation as SSE bytes, indexed by event id.

    Ids are contiguous, so the block of id ``i`` sits ``newest - i`` places from the right end of a
    bounded deque (which grows as needed: an idle conversation costs almost nothing). Reads near the
    newest end, the common case for live readers, are O(1) per event.
    """

    __slots__ = ("_blocks", "newest")

    def __init__(self, capacity: int, newest: int = 0) -> None:
        self._blocks: deque[bytes] = deque(maxlen=capacity)
        self.newest = newest

    @property
    def oldest(self) -> int:
        """The oldest id held (``newest + 1`` when empty)."""
        return self.newest - len(self._blocks) + 1

    def reset(self, newest: int) -> None:
        """Drop every block (nobody reads them); the next append must be ``newest + 1``."""
        self._blocks.clear()
        self.newest = newest

    def append(self, event_id: int, block: bytes) -> None:
        if event_id != self.newest + 1:
            self._blocks.clear()  # not contiguous (cannot happen with one writer): start over
        self._blocks.append(block)
        self.newest = event_id

    def since(self, after_id: int, limit: int, max_bytes: int | None = None) -> tuple[bytes, int] | None:
        """Blocks for ids ``after_id+1 ..`` (at most ``limit``, and no more than ``max_bytes`` once the
        first is in) and the last id, or None if not held."""
        newest = self.newest
        if after_id >= newest:
            return b"", after_id
        if after_id + 1 < self.oldest:
            return None
        end = min(newest, after_id + limit)
        blocks = self._blocks
        if end == after_id + 1:
            return blocks[end - newest - 1], end
        if max_bytes is None:
            return b"".join([blocks[i - newest - 1] for i in range(after_id + 1, end + 1)]), end
        out: list[bytes] = []
        size = 0
        last = after_id
        for i in range(after_id + 1, end + 1):
            block = blocks[i - newest - 1]
            if out and size + len(block) > max_bytes:
                break
            out.append(block)
            size += len(block)
            last = i
        return b"".join(out), last


class Subscription:
    """One event-stream reader's position and flags. Its writer (in ``streaming``) owns the socket.

    ``cursor`` is the last id written to the socket. A subscription becomes ``live`` once it has caught
    up; a live one more than ``subscriber_queue`` events behind is ``dropped`` (slow consumer).
    ``keepalive_due`` is set by the gateway's keepalive ticker when nothing was written for the
    keepalive interval (one ticker for all streams: no timer per wait).
    """

    __slots__ = (
        "_waiter",
        "closed",
        "cursor",
        "dropped",
        "keepalive_due",
        "last_write",
        "live",
        "send_scope",
        "shutdown",
    )

    def __init__(self, cursor: int) -> None:
        self.cursor = cursor
        self.live = False
        self.dropped = False
        self.closed = False
        self.shutdown = False
        self.keepalive_due = False
        self.last_write = 0.0
        self.send_scope: asyncio.Timeout | None = None
        self._waiter: asyncio.Future[None] | None = None

    def wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait(self) -> None:
        """Wait for :meth:`wake` (new events, keepalive, disconnect, shutdown). Cancellation propagates."""
        waiter = self._waiter = asyncio.get_running_loop().create_future()
        try:
            await waiter
        finally:
            self._waiter = None


class Conversation:
    """State of one conversation. Every method runs on the event loop; none blocks.

    Owns its worker task (the one running turns); :meth:`close` fails queued turns, cancels the running
    one (it ends with ``turn.failed``) and awaits the worker.
    """

    def __init__(self, gateway: Gateway, record: ConversationRecord) -> None:
        self.gateway = gateway
        self.id = record.id
        self.created_at = record.created_at
        self.turns: list[Turn] = [Turn.from_record(r) for r in record.turns]
        self._by_id: dict[str, Turn] = {t.id: t for t in self.turns}
        self._queue: deque[Turn] = deque()
        self.active: Turn | None = None
        self._worker: asyncio.Task[None] | None = None
        self._closing = False
        #: Last id handed to the log / last id the log made durable and published.
        self._assigned_id = record.last_event_id
        self.last_event_id = record.last_event_id
        self.ring = EventRing(gateway.config.subscriber_queue + 64, record.last_event_id)
        self.subscribers: set[Subscription] = set()
        #: btw threads, least recently used first (dicts keep insertion order); they survive restarts
        #: and eviction in that order. A store written before thread uses were recorded has exchanges
        #: only: those threads count as the least recently used.
        self.threads: dict[str, BtwThread] = {}
        listed = set(record.threads)
        for x in record.exchanges:
            if x.thread_id not in listed and x.thread_id not in self.threads:
                self.threads[x.thread_id] = BtwThread(x.thread_id)
        for thread_id in record.threads:
            self.threads[thread_id] = BtwThread(thread_id)
        for x in record.exchanges:  # by thread, in order
            self.threads[x.thread_id].add(x.question, x.answer, seq=x.seq)
        #: Loop time of the last request that used this conversation (see :meth:`Gateway.evict_idle`).
        self.last_used = asyncio.get_running_loop().time()
        #: Set when the gateway dropped this object from memory: it must not take new work (a fresh
        #: object is loaded from the store instead; two live objects would assign the same event ids).
        self.evicted = False

    # -- reading -----------------------------------------------------------------------------------

    @property
    def oldest_retained_id(self) -> int:
        """The oldest event id the log still holds (ids before it were trimmed by retention)."""
        return max(1, self.last_event_id - self.gateway.log.retention + 1)

    def to_json(self) -> dict[str, Any]:
        """The ``GET /v1/conversations/{id}`` body."""
        messages: list[dict[str, Any]] = []
        for t in self.turns:
            if t.is_note:
                messages.append({"role": "note", "text": t.user_text, "note_id": t.id})
                continue
            messages.append({"role": "user", "text": t.user_text, "turn_id": t.id})
            if t.state == TurnState.COMPLETED and t.assistant_text is not None:
                messages.append({"role": "assistant", "text": t.assistant_text, "turn_id": t.id})
        active = self.active
        return {
            "id": self.id,
            "created_at": self.created_at,
            "messages": messages,
            "active_turn": None
            if active is None
            else {"turn_id": active.id, "partial_text": "".join(active.parts)},
            "queued_turns": [t.id for t in self._queue],
            # the newest event this state reflects (assigned; durable once the log flushes): resuming
            # from it gives exactly what came after, no delta twice
            "last_event_id": str(self._assigned_id),
        }

    @property
    def busy(self) -> bool:
        """Whether a turn is running or queued (a new message would have to queue)."""
        return self.active is not None or bool(self._queue)

    def use_thread(self, thread_id: str | None) -> BtwThread:
        """The btw thread ``thread_id`` (known: checked by the caller), or a new one when None; marked as
        the most recently used. Beyond ``max_btw_threads`` the least recently used thread is dropped,
        here and in the store."""
        if thread_id is not None:
            thread = self.threads.pop(thread_id)
        else:
            thread = BtwThread("thr_" + secrets.token_hex(8))
        self.threads[thread.id] = thread  # dicts keep insertion order: the newest use is last
        self.gateway.log.use_thread(self.id, thread.id)
        while len(self.threads) > self.gateway.config.max_btw_threads:
            oldest = next(iter(self.threads))
            self.threads.pop(oldest).dropped = True
            self.gateway.log.drop_thread(self.id, oldest)
        return thread

    def ensure_not_evicted(self) -> None:
        if self.evicted:
            raise ServiceUnavailable("conversation_reloading", "the conversation was just unloaded; retry")

    def idle_since(self, now: float) -> float | None:
        """Seconds this conversation has been unused at loop time ``now``, or None while anything
        holds it: an open event stream, a running or queued turn, its worker, events not yet durable."""
        if self.subscribers or self.busy or self._closing:
            return None
        if self._worker is not None and not self._worker.done():
            return None
        if self._assigned_id != self.last_event_id:
            return None
        return now - self.last_used

    def turn(self, turn_id: str) -> Turn:
        turn = self._by_id.get(turn_id)
        if turn is None or turn.is_note:
            raise NotFound("turn_not_found", f"no turn {turn_id!r} in conversation {self.id}")
        return turn

    # -- turns -------------------------------------------------------------------------------------

    def post_message(self, text: str, *, queue: bool) -> Turn:
        """Record the user's message and start (or queue) its turn.

        Raises ``Conflict`` (``turn_active``) when a turn runs and ``queue`` is false, ``TooManyRequests``
        when the queue is full, ``ServiceUnavailable`` while closing.
        """
        if self._closing:
            raise ServiceUnavailable("shutting_down", "the gateway is shutting down")
        self.ensure_not_evicted()
        busy = self.busy
        if busy and not queue:
            running = self.active.id if self.active is not None else self._queue[0].id
            raise Conflict(
                "turn_active",
                f'turn {running} is still running; cancel it, wait for it, or send with "queue": true',
            )
        if len(self._queue) >= self.gateway.config.max_queued_turns and busy:
            raise TooManyRequests(
                "too_many_queued_turns", f"{len(self._queue)} turns are already queued in this conversation"
            )
        turn = Turn(new_turn_id(), len(self.turns) + 1, text)
        self.turns.append(turn)
        self._by_id[turn.id] = turn
        self.gateway.log.save_turn(self.id, turn.record())
        self.emit("message.created", {"turn_id": turn.id, "role": "user", "text": text, "queued": busy})
        self._queue.append(turn)
        if self._worker is None or self._worker.done():
            self._worker = asyncio.get_running_loop().create_task(
                self._work(), name=f"sidechain-turns-{self.id}"
            )
        return turn

    def add_note(self, text: str) -> Turn:
        """Add a note to the history, after everything posted so far (a queued turn included): no turn
        runs for it; later turns and btws see it in their context. Emits ``note.created``.

        Raises ``ServiceUnavailable`` while closing.
        """
        if self._closing:
            raise ServiceUnavailable("shutting_down", "the gateway is shutting down")
        self.ensure_not_evicted()
        note = Turn(new_note_id(), len(self.turns) + 1, text, state=TurnState.NOTE)
        self.turns.append(note)
        self._by_id[note.id] = note
        self.gateway.log.save_turn(self.id, note.record())
        self.emit("note.created", {"note_id": note.id, "text": text})
        return note

    async def cancel_turn(self, turn_id: str) -> Turn:
        """Cancel a queued or running turn; returns once it ended with ``turn.failed`` (``cancelled``).

        Raises ``NotFound`` for an unknown turn and ``Conflict`` (``turn_finished``) for a finished one.
        Cancelling the caller does not cancel the turn's cancellation.
        """
        turn = self.turn(turn_id)
        if turn.finished:
            raise Conflict("turn_finished", f"turn {turn_id} already {turn.state}")
        if turn.task is None:
            if turn in self._queue:
                self._queue.remove(turn)
            self._fail(turn, "cancelled", "the turn was cancelled before it started")
            return turn
        turn.cancel_reason = "cancelled"
        task = turn.task
        task.cancel()
        await asyncio.wait([task])
        if not turn.finished:  # cancelled before its first step: the worker would fail it a moment later
            self._fail(turn, "cancelled", _FAIL_MESSAGES["cancelled"])
        return turn

    def restore_interrupted(self, turn_id: str) -> None:
        """Fail a turn a previous process left queued or running (``gateway_restarted``)."""
        turn = self._by_id.get(turn_id)
        if turn is not None and not turn.finished:
            self._fail(turn, "gateway_restarted", _FAIL_MESSAGES["gateway_restarted"])

    async def close(self, reason: str = "gateway_shutdown") -> None:
        """Stop taking messages, fail queued turns and cancel the running one with ``reason``.

        Returns once the worker task has ended; idempotent.
        """
        self._closing = True
        while self._queue:
            self._fail(self._queue.popleft(), reason, _FAIL_MESSAGES.get(reason, reason))
        if self.active is not None:
            self.active.cancel_reason = reason
        worker = self._worker
        if worker is not None and not worker.done():
            worker.cancel()
            await asyncio.gather(worker, return_exceptions=True)

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while self._queue and not self._closing:
            turn = self._queue.popleft()
            self.active = turn
            turn.state = TurnState.RUNNING
            self.gateway.log.save_turn(self.id, turn.record())
            self.emit("turn.started", {"turn_id": turn.id})
            turn.task = loop.create_task(self._generate(turn), name=f"sidechain-turn-{turn.id}")
            try:
                await turn.task
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    raise
            finally:
                if not turn.finished:
                    reason = turn.cancel_reason or "cancelled"
                    self._fail(turn, reason, _FAIL_MESSAGES.get(reason, reason))
                self.active = None

    async def _generate(self, turn: Turn) -> None:
        gw = self.gateway
        gw.metrics.turns_active += 1
        try:
            request = ModelRequest(kind="turn", messages=self._turn_context(turn))
            async with aclosing(gw.model.stream(request)) as deltas:
                async for delta in deltas:
                    if delta:
                        turn.parts.append(delta)
                        self.emit("message.delta", {"turn_id": turn.id, "delta": delta})
            text = "".join(turn.parts)
            turn.assistant_text = text
            turn.state = TurnState.COMPLETED
            gw.log.save_turn(self.id, turn.record())
            self.emit("message.completed", {"turn_id": turn.id, "text": text})
            self.emit("turn.completed", {"turn_id": turn.id})
        except asyncio.CancelledError:
            reason = turn.cancel_reason or "cancelled"
            self._fail(turn, reason, _FAIL_MESSAGES.get(reason, reason))
            raise
        except ModelError as exc:
            gw.metrics.upstream_errors_total += 1
            log.warning("turn %s of %s failed upstream: %s: %s", turn.id, self.id, exc.type, exc.message)
            self._fail(turn, exc.type, exc.message)
        except Exception as exc:
            log.exception("turn %s of %s failed", turn.id, self.id)
            self._fail(turn, "internal_error", f"{type(exc).__name__}: {exc}")
        finally:
            gw.metrics.turns_active -= 1

    def _fail(self, turn: Turn, error_type: str, message: str) -> None:
        if turn.finished:
            return
        turn.state = TurnState.FAILED
        turn.error_type = error_type
        self.gateway.log.save_turn(self.id, turn.record())
        self.emit("turn.failed", {"turn_id": turn.id, "error": {"type": error_type, "message": message}})

    def _turn_context(self, turn: Turn) -> tuple[ChatMessage, ...]:
        messages: list[ChatMessage] = []
        for t in self.turns:
            if t.seq >= turn.seq:
                break
            if t.is_note:
                messages.append(note_message(t.user_text))
                continue
            messages.append(ChatMessage("user", t.user_text))
            if t.state == TurnState.COMPLETED and t.assistant_text is not None:
                messages.append(ChatMessage("assistant", t.assistant_text))
        messages.append(ChatMessage("user", turn.user_text))
        return tuple(messages)

    # -- btw context -------------------------------------------------------------------------------

    def btw_request(self, question: str, thread: BtwThread) -> ModelRequest:
        """The request a btw is answered from: a snapshot of this conversation taken now.

        The snapshot holds every started turn (a running turn's answer so far included, marked as
        unfinished), not queued messages, then the thread's earlier completed exchanges, then the question.
        """
        messages = [ChatMessage("system", BTW_SYSTEM_PROMPT)]
        started = [t for t in self.turns if t.state != TurnState.QUEUED]
        partial: str | None = None
        for t in started:
            if t.is_note:
                messages.append(note_message(t.user_text))
                continue
            messages.append(ChatMessage("user", t.user_text))
            if t.state == TurnState.COMPLETED and t.assistant_text is not None:
                messages.append(ChatMessage("assistant", t.assistant_text))
            elif t.state == TurnState.RUNNING:
                partial = "".join(t.parts)
                if partial:
                    messages.append(ChatMessage("assistant", partial + " [answer still being written]"))
        for q, a in thread.exchanges:
            messages.append(ChatMessage("user", q))
            messages.append(ChatMessage("assistant", a))
        messages.append(ChatMessage("user", question))
        turns = [t for t in started if not t.is_note]
        snapshot = Snapshot(
            turn_count=len(turns),
            last_user_message=turns[-1].user_text if turns else None,
            partial_answer=partial,
            thread_questions=tuple(q for q, _ in thread.exchanges),
        )
        return ModelRequest(kind="btw", messages=tuple(messages), question=question, snapshot=snapshot)

    # -- events ------------------------------------------------------------------------------------

    def emit(self, type: str, payload: dict[str, Any]) -> None:
        """Append one event with the next id; subscribers get it once the log made it durable."""
        self._assigned_id += 1
        event = StoredEvent(self.id, self._assigned_id, type, _json.encode(payload).decode())
        self.gateway.metrics.events_written_total += 1
        self.gateway.log.append(event)

    def publish(self, event: StoredEvent) -> None:
        """Called with each durable event, in id order: cache its bytes and wake subscribers.

        The ring is kept only while someone subscribes: a conversation nobody follows holds no
        encoded events (a later reader catches up from the log).
        """
        self.last_event_id = event.id
        if not self.subscribers:
            self.ring.reset(event.id)
            return
        block = self.gateway.encoder.event(event.data, event=event.type, id=str(event.id))
        self.ring.append(event.id, block)
        bound = self.gateway.config.subscriber_queue
        for sub in self.subscribers:
            if sub.live and not sub.dropped and event.id - sub.cursor > bound:
                sub.dropped = True
                self.gateway.metrics.slow_consumers_total += 1
                scope = sub.send_scope
                if scope is not None:
                    scope.reschedule(
                        asyncio.get_running_loop().time() + self.gateway.config.slow_consumer_grace
                    )
            sub.wake()

    def subscribe(self, cursor: int) -> Subscription:
        """Register a reader positioned after ``cursor``; pair with :meth:`unsubscribe` in ``finally``."""
        sub = Subscription(cursor)
        sub.last_write = asyncio.get_running_loop().time()
        self.subscribers.add(sub)
        self.gateway.subscriptions.add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        self.subscribers.discard(sub)
        self.gateway.subscriptions.discard(sub)
        if not self.subscribers:
            self.ring.reset(self.last_event_id)

    async def read_stored(self, after_id: int, limit: int) -> Sequence[StoredEvent]:
        """Retained events after ``after_id`` from the log (for readers further behind than the ring)."""
        return await self.gateway.log.read(self.id, after_id, limit)
