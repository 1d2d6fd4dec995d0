"""btw side questions: answered from a snapshot, streamed in their own response, resumable for a while.

A btw never touches the main history, never marks its conversation busy and runs in its own task, so
the main turn is neither cancelled nor delayed by it. Its events (``btw.started``, ``btw.delta``*,
``btw.completed`` | ``error``) are kept in memory, numbered 1, 2, 3…, so a reader that lost its
connection can resume after any of them. The registry owns every btw task and one janitor task:

* a btw whose readers all left keeps generating for ``btw_grace`` seconds, then is cancelled
  (``error`` ``abandoned``);
* a finished btw is kept ``btw_grace`` seconds (for resumes and replays), then freed.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from contextlib import aclosing
from typing import TYPE_CHECKING, Any

import msgspec

from .errors import Conflict, NotFound, ServiceUnavailable, TooManyRequests
from .eventlog import MAX_THREAD_EXCHANGES, ThreadExchange
from .models.base import ModelError

if TYPE_CHECKING:  # pragma: no cover
    from .conversations import Conversation
    from .service import Gateway

__all__ = ["Btw", "BtwRegistry", "BtwThread"]

log = logging.getLogger("sidechain.gateway")

_json = msgspec.json.Encoder()

_ERROR_MESSAGES = {
    "cancelled": "the btw was cancelled",
    "abandoned": "no reader came back within the grace period",
    "gateway_shutdown": "the gateway is shutting down; ask again later",
}


class BtwThread:
    """A chain of btws: each completed question and answer is context for the next one."""

    __slots__ = ("count", "dropped", "exchanges", "id")

    #: Exchanges kept as context (the oldest are dropped beyond this).
    MAX_EXCHANGES = MAX_THREAD_EXCHANGES

    def __init__(self, id: str) -> None:
        self.id = id
        self.exchanges: list[tuple[str, str]] = []
        #: Exchanges ever added (the seq of the newest one).
        self.count = 0
        #: Dropped from its conversation (least recently used): a btw still running on it stores nothing.
        self.dropped = False

    def add(self, question: str, answer: str, *, seq: int | None = None) -> int:
        """Add a completed exchange; returns its seq (1, 2, ... within the thread)."""
        self.count = self.count + 1 if seq is None else seq
        self.exchanges.append((question, answer))
        del self.exchanges[: -self.MAX_EXCHANGES]
        return self.count


class Btw:
    """One side question and its answer's events (SSE bytes; event ``i`` has ``id: i``)."""

    def __init__(
        self,
        id: str,
        conversation_id: str,
        thread: BtwThread,
        question: str,
        requested_thread: str | None,
        key: str | None,
    ) -> None:
        self.id = id
        self.conversation_id = conversation_id
        self.thread = thread
        self.question = question
        self.requested_thread = requested_thread
        self.key = key
        self.blocks: list[bytes] = []
        self.parts: list[str] = []
        self.state = "running"
        self.task: asyncio.Task[None] | None = None
        self.readers = 0
        self.abandon_at: float | None = None
        self.expires_at: float | None = None
        self.cancel_reason: str | None = None
        self._waiters: set[asyncio.Future[None]] = set()

    @property
    def finished(self) -> bool:
        return self.state != "running"

    def append(self, encoder_event: bytes) -> None:
        self.blocks.append(encoder_event)
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def wait(self, seconds: float) -> bool:
        """Wait for a new event (or the end) up to ``seconds``; True if something happened."""
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.add(waiter)
        try:
            async with asyncio.timeout(seconds):
                await waiter
            return True
        except TimeoutError:
            return False
        finally:
            self._waiters.discard(waiter)

    def wake(self) -> None:
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)


class BtwRegistry:
    """Owns every btw of a gateway, their tasks and the janitor that frees them.

    :meth:`close` cancels every running btw (its readers get ``error`` ``gateway_shutdown``) and the
    janitor, and awaits them all.
    """

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self._btws: dict[str, Btw] = {}
        self._keys: dict[tuple[str, str], Btw] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._changed = asyncio.Event()
        self._janitor: asyncio.Task[None] | None = None
        self._closing = False

    def __len__(self) -> int:
        return len(self._btws)

    async def start(self) -> None:
        self._janitor = asyncio.get_running_loop().create_task(
            self._janitor_loop(), name="sidechain-btw-janitor"
        )

    async def close(self) -> None:
        """Cancel every btw and the janitor and wait for them; idempotent."""
        self._closing = True
        await self.cancel_all("gateway_shutdown")
        janitor, self._janitor = self._janitor, None
        if janitor is not None:
            janitor.cancel()
            await asyncio.gather(janitor, return_exceptions=True)
        self._btws.clear()
        self._keys.clear()

    # -- lookups -----------------------------------------------------------------------------------

    def get(self, conversation_id: str, btw_id: str) -> Btw:
        btw = self._btws.get(btw_id)
        if btw is None or btw.conversation_id != conversation_id:
            raise NotFound(
                "btw_not_found", f"no btw {btw_id!r} in conversation {conversation_id} (or it expired)"
            )
        return btw

    def by_key(self, conversation_id: str, key: str) -> Btw | None:
        return self._keys.get((conversation_id, key))

    def conversations_in_use(self) -> set[str]:
        """Conversations with a btw that is running or still kept (its thread must stay reachable)."""
        return {b.conversation_id for b in self._btws.values()}

    def active_count(self, conversation_id: str) -> int:
        return sum(1 for b in self._btws.values() if b.conversation_id == conversation_id and not b.finished)

    # -- lifecycle of one btw ----------------------------------------------------------------------

    def start_btw(self, conv: Conversation, question: str, thread_id: str | None, key: str | None) -> Btw:
        """Snapshot ``conv`` now and start answering ``question`` in a task owned by the registry.

        Raises ``NotFound`` (``thread_not_found``), ``TooManyRequests`` (``too_many_btws``) or
        ``ServiceUnavailable`` while closing.
        """
        if self._closing or self.gateway.shutting_down:
            raise ServiceUnavailable("shutting_down", "the gateway is shutting down")
        conv.ensure_not_evicted()
        if thread_id is not None and thread_id not in conv.threads:
            raise NotFound("thread_not_found", f"no btw thread {thread_id!r} in conversation {conv.id}")
        limit = self.gateway.config.max_active_btws
        if self.active_count(conv.id) >= limit:
            raise TooManyRequests("too_many_btws", f"{limit} btws are already running in this conversation")
        thread = conv.use_thread(thread_id)
        request = conv.btw_request(question, thread)
        btw = Btw("btw_" + secrets.token_hex(16), conv.id, thread, question, thread_id, key)
        self._btws[btw.id] = btw
        if key is not None:
            self._keys[(conv.id, key)] = btw
        self.gateway.metrics.btws_active += 1
        self._emit(btw, "btw.started", {"btw_id": btw.id, "thread_id": thread.id})
        task = asyncio.get_running_loop().create_task(self._run(btw, request), name=f"sidechain-{btw.id}")
        btw.task = task
        self._tasks.add(task)
        task.add_done_callback(lambda t: self._on_done(btw, t))
        return btw

    def check_same_request(self, btw: Btw, question: str, thread_id: str | None) -> None:
        """Raise ``Conflict`` (``idempotency_key_reused``) if a retry's body differs from the original."""
        if btw.question != question or btw.requested_thread != thread_id:
            raise Conflict(
                "idempotency_key_reused", "this Idempotency-Key was used for a different question or thread"
            )

    async def cancel(self, btw: Btw, reason: str = "cancelled") -> None:
        """Cancel a running btw now; returns once its ``error`` event is written. No-op when finished."""
        task = btw.task
        if btw.finished or task is None:
            return
        btw.cancel_reason = reason
        task.cancel()
        await asyncio.wait([task])

    async def cancel_all(self, reason: str) -> None:
        running = [b for b in self._btws.values() if not b.finished]
        for btw in running:
            btw.cancel_reason = reason
            if btw.task is not None:
                btw.task.cancel()
        tasks = list(self._tasks)
        if tasks:
            await asyncio.wait(tasks)

    def attach(self, btw: Btw) -> None:
        """A reader started streaming ``btw``; pair with :meth:`detach` in ``finally``."""
        btw.readers += 1
        btw.abandon_at = None
        self.gateway.metrics.btw_streams_open += 1

    def detach(self, btw: Btw) -> None:
        btw.readers -= 1
        self.gateway.metrics.btw_streams_open -= 1
        if btw.readers == 0 and not btw.finished:
            btw.abandon_at = asyncio.get_running_loop().time() + self.gateway.config.btw_grace
            self._changed.set()

    # -- internals ---------------------------------------------------------------------------------

    def _emit(self, btw: Btw, type: str, payload: dict[str, Any]) -> None:
        seq = str(len(btw.blocks) + 1)
        btw.append(self.gateway.encoder.event(_json.encode(payload).decode(), event=type, id=seq))

    async def _run(self, btw: Btw, request: Any) -> None:
        gw = self.gateway
        try:
            async with aclosing(gw.model.stream(request)) as deltas:
                async for delta in deltas:
                    if delta:
                        btw.parts.append(delta)
                        self._emit(btw, "btw.delta", {"delta": delta})
            text = "".join(btw.parts)
            btw.state = "completed"
            seq = btw.thread.add(btw.question, text)
            if not btw.thread.dropped:  # a dropped thread must not come back through the store
                exchange = ThreadExchange(btw.thread.id, seq, btw.question, text)
                gw.log.save_exchange(btw.conversation_id, exchange)
            self._emit(btw, "btw.completed", {"btw_id": btw.id, "thread_id": btw.thread.id, "text": text})
        except asyncio.CancelledError:
            reason = btw.cancel_reason or "cancelled"
            btw.state = "failed"
            self._emit(btw, "error", {"type": reason, "message": _ERROR_MESSAGES.get(reason, reason)})
            raise
        except ModelError as exc:
            gw.metrics.upstream_errors_total += 1
            log.warning("btw %s failed upstream: %s: %s", btw.id, exc.type, exc.message)
            btw.state = "failed"
            self._emit(btw, "error", {"type": exc.type, "message": exc.message})
        except Exception as exc:
            log.exception("btw %s failed", btw.id)
            btw.state = "failed"
            self._emit(btw, "error", {"type": "internal_error", "message": f"{type(exc).__name__}: {exc}"})

    def _on_done(self, btw: Btw, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not btw.finished:  # cancelled before its first step
            reason = btw.cancel_reason or "cancelled"
            btw.state = "failed"
            self._emit(btw, "error", {"type": reason, "message": _ERROR_MESSAGES.get(reason, reason)})
        self.gateway.metrics.btws_active -= 1
        btw.expires_at = asyncio.get_running_loop().time() + self.gateway.config.btw_grace
        btw.abandon_at = None
        btw.wake()
        self._changed.set()

    def _free(self, btw: Btw) -> None:
        self._btws.pop(btw.id, None)
        if btw.key is not None and self._keys.get((btw.conversation_id, btw.key)) is btw:
            del self._keys[(btw.conversation_id, btw.key)]

    async def _janitor_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._changed.clear()
            now = loop.time()
            next_due = float("inf")
            for btw in list(self._btws.values()):
                if not btw.finished:
                    if btw.readers == 0 and btw.abandon_at is not None:
                        if btw.abandon_at <= now:
                            btw.cancel_reason = "abandoned"
                            btw.abandon_at = None
                            if btw.task is not None:
                                btw.task.cancel()
                        else:
                            next_due = min(next_due, btw.abandon_at)
                elif btw.expires_at is not None:
                    if btw.expires_at <= now:
                        self._free(btw)
                    else:
                        next_due = min(next_due, btw.expires_at)
            try:
                async with asyncio.timeout(None if next_due == float("inf") else max(0.0, next_due - now)):
                    await self._changed.wait()
            except TimeoutError:
                pass
