"""The :class:`Gateway`: owner of the event log, the model, the conversations and the btws."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import secrets
import sqlite3
import time
from collections.abc import AsyncIterator, Sequence
from types import TracebackType

from ..sse import Encoder
from .btw import BtwRegistry
from .config import GatewayConfig
from .conversations import Conversation, Subscription
from .errors import NotFound, ServiceUnavailable
from .eventlog import ConversationRecord, EventLog, StoredEvent, open_event_log
from .eventlog.base import StoreClosed, StoreInUse
from .metrics import Metrics
from .models import ModelBackend, build_model

__all__ = ["Gateway", "new_conversation_id"]


#: What a start may fail with for a reason outside the program (a path, a port, a store in use, a
#: setting): said in one line. Anything else is a bug and keeps its traceback.
EXPECTED_STARTUP_ERRORS: tuple[type[BaseException], ...] = (
    OSError, ValueError, sqlite3.Error, StoreInUse, StoreClosed,
)


def describe_error(exc: BaseException) -> str:
    """``TypeName: message``, or only ``TypeName`` for an error without a message."""
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__

log = logging.getLogger("sidechain.gateway")

_CONVERSATION_ID = re.compile(r"^[0-9a-f]{32}$")


def new_conversation_id() -> str:
    """A fresh conversation id: 128 random bits as 32 lowercase hex digits."""
    return secrets.token_hex(16)


class Gateway:
    """Everything behind the HTTP routes. Use as ``async with Gateway(config):`` or start/close.

    Lifecycle: :meth:`start` opens the log and fails turns a killed process left unfinished
    (``gateway_restarted``). :meth:`shutdown` is the graceful part: new work is refused (503), running
    turns and btws end with ``gateway_shutdown``, those events are made durable, every open event
    stream gets a final ``gateway.shutdown`` event, and it waits (``shutdown_grace``) for the streams to
    end. :meth:`close` runs :meth:`shutdown` if needed, then stops every task and closes the model and
    the log. Both are idempotent; after :meth:`close` no task of the gateway is left.
    """

    def __init__(
        self, config: GatewayConfig, *, log: EventLog | None = None, model: ModelBackend | None = None
    ) -> None:
        self.config = config
        self.log: EventLog = (
            log if log is not None else open_event_log(config.store, retention=config.retention)
        )
        self.model: ModelBackend = model if model is not None else build_model(config)
        self.metrics = Metrics()
        self.encoder = Encoder()
        self.btws = BtwRegistry(self)
        #: Every open event-stream subscription (for the keepalive ticker and shutdown).
        self.subscriptions: set[Subscription] = set()
        self._keepalive: asyncio.Task[None] | None = None
        self._convs: dict[str, Conversation] = {}
        self._streams = 0
        self._no_streams = asyncio.Event()
        self._no_streams.set()
        self.shutting_down = False
        self._started = False
        self._closed = False
        self._shutdown_done: asyncio.Future[None] | None = None
        #: Why :meth:`start` failed, if it did (for a one-line message: the ASGI server prints a traceback).
        self.startup_error: BaseException | None = None

    async def __aenter__(self) -> Gateway:
        self.startup_error = None
        try:
            await self.start()
        except Exception as exc:
            self.startup_error = exc
            raise
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    # -- lifecycle ---------------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the store, recover interrupted turns, start the btw janitor.

        On failure, everything opened so far is closed again before the error propagates.
        """
        await self.log.open(self._on_durable)
        self._started = True
        try:
            await self.btws.start()
            self._keepalive = asyncio.get_running_loop().create_task(
                self._keepalive_loop(), name="sidechain-keepalive"
            )
            interrupted = await self.log.unfinished_turns()
            for conversation_id, turn in interrupted:
                conv = await self._load(conversation_id)
                if conv is not None:
                    log.warning("turn %s of %s was interrupted by a restart", turn.turn_id, conversation_id)
                    conv.restore_interrupted(turn.turn_id)
            try:  # a failing store is retried in the background; starting must not wait for it forever
                async with asyncio.timeout(self.config.store_timeout):
                    await self.log.flush()
            except TimeoutError:
                log.error("the store did not confirm the recovery of interrupted turns within %gs; "
                          "starting anyway (the writes are retried)", self.config.store_timeout)
        except BaseException:
            await self.close()
            raise

    async def shutdown(self) -> None:
        """Graceful shutdown (see the class docstring). Concurrent callers all wait for the first."""
        if self._shutdown_done is not None:
            await asyncio.shield(self._shutdown_done)
            return
        self._shutdown_done = asyncio.get_running_loop().create_future()
        self.shutting_down = True
        try:
            convs = list(self._convs.values())
            await asyncio.gather(*(c.close("gateway_shutdown") for c in convs))
            await self.btws.cancel_all("gateway_shutdown")
            if self._started and not self.log.failing:  # a failing store gets its own bounded wait in close
                try:
                    async with asyncio.timeout(self.config.store_timeout):
                        await self.log.flush()
                except TimeoutError:
                    log.error("shutdown: the store did not confirm the last writes in time")
            deadline = asyncio.get_running_loop().time() + self.config.slow_consumer_grace
            for conv in convs:
                for sub in conv.subscribers:
                    sub.shutdown = True
                    if sub.send_scope is not None:  # a reader stuck in a write gets a bounded time too
                        sub.send_scope.reschedule(deadline)
                    sub.wake()
            try:
                async with asyncio.timeout(self.config.shutdown_grace):
                    await self._no_streams.wait()
            except TimeoutError:
                log.warning(
                    "%d streams still open after %.1f s of shutdown grace",
                    self._streams,
                    self.config.shutdown_grace,
                )
        finally:
            self._shutdown_done.set_result(None)

    async def close(self) -> None:
        """Shut down if not done yet, then release every task, the model and the store."""
        if self._closed:
            return
        self._closed = True
        try:
            await self.shutdown()
        finally:
            keepalive, self._keepalive = self._keepalive, None
            if keepalive is not None:
                keepalive.cancel()
                await asyncio.gather(keepalive, return_exceptions=True)
            try:
                await self.btws.close()
            finally:
                try:
                    await self.model.aclose()
                finally:
                    if self._started:
                        await self.log.close()

    async def _keepalive_loop(self) -> None:
        """Flag and wake every subscription that wrote nothing for ``keepalive_interval`` seconds.

        Ticks four times per interval, so a keepalive goes out between 1 and 1.25 intervals of silence.
        Also drops idle conversations (:meth:`evict_idle`) every ``conversation_idle_evict / 4``
        seconds, at most every 60 s.
        """
        loop = asyncio.get_running_loop()
        interval = self.config.keepalive_interval
        evict_every = min(60.0, self.config.conversation_idle_evict / 4)
        next_eviction = loop.time() + evict_every
        while True:
            await asyncio.sleep(interval / 4)
            now = loop.time()
            if now >= next_eviction:
                self.evict_idle(now)
                next_eviction = now + evict_every
            for sub in self.subscriptions:
                if not sub.keepalive_due and now - sub.last_write >= interval:
                    sub.keepalive_due = True
                    sub.wake()

    # -- streams (for graceful shutdown) -----------------------------------------------------------

    def stream_opened(self) -> None:
        self._streams += 1
        self._no_streams.clear()

    def stream_closed(self) -> None:
        self._streams -= 1
        if self._streams == 0:
            self._no_streams.set()

    @property
    def open_streams(self) -> int:
        return self._streams

    # -- conversations -----------------------------------------------------------------------------

    async def create_conversation(self) -> Conversation:
        """Create a conversation; returns once it is durable."""
        if self.shutting_down:
            raise ServiceUnavailable("shutting_down", "the gateway is shutting down")
        self.refuse_if_store_failing()
        cid = new_conversation_id()
        now = time.time()
        self.log.create_conversation(cid, now)
        conv = Conversation(self, ConversationRecord(cid, now, [], 0))
        self._convs[cid] = conv
        self.metrics.conversations_loaded = len(self._convs)
        await self.durable()
        return conv

    def refuse_if_store_failing(self) -> None:
        """Raise ServiceUnavailable ``store_unavailable`` while the store's writes fail: new work is
        refused up front (nothing taken) rather than taken and left unconfirmed."""
        if self.log.failing:
            self.metrics.store_unavailable_total += 1
            raise ServiceUnavailable("store_unavailable", "the event store is failing; nothing was taken; "
                                     "retry later", headers={"Retry-After": "1"})

    async def durable(self) -> None:
        """Wait until everything written so far is durable (and delivered). Raises ServiceUnavailable
        ``store_unavailable`` once ``store_timeout`` passed (the store keeps retrying meanwhile)."""
        async with self._store_bound():
            await self.log.flush()

    @contextlib.asynccontextmanager
    async def _store_bound(self) -> AsyncIterator[None]:
        limit = self.config.store_timeout
        try:
            async with asyncio.timeout(limit):
                yield
        except TimeoutError:
            self.metrics.store_unavailable_total += 1
            raise ServiceUnavailable(
                "store_unavailable", f"the event store did not confirm writes within {limit:g}s (what this "
                "request did was taken and is written once the store works again)",
                headers={"Retry-After": "1"},
            ) from None

    async def conversation(self, conversation_id: str) -> Conversation:
        """The conversation, loaded from the store if needed; ``NotFound`` if unknown."""
        conv = self._convs.get(conversation_id)
        if conv is None:
            conv = await self._load(conversation_id)
            if conv is None:
                raise NotFound("conversation_not_found", f"no conversation {conversation_id!r}")
        conv.last_used = asyncio.get_running_loop().time()
        return conv

    def evict_idle(self, now: float | None = None) -> int:
        """Drop the conversations unused for ``conversation_idle_evict`` seconds (at loop time ``now``)
        from memory; returns how many. One is never dropped while it has an open event stream, a
        running or queued turn, or a btw (running, or kept for resumes); everything else is in the store
        and is loaded again on the next request. Run by the keepalive ticker."""
        limit = self.config.conversation_idle_evict
        if limit <= 0 or not self._convs:
            return 0
        now = asyncio.get_running_loop().time() if now is None else now
        in_use = self.btws.conversations_in_use()
        idle = [cid for cid, conv in self._convs.items()
                if cid not in in_use and (since := conv.idle_since(now)) is not None and since >= limit]
        for cid in idle:
            self._convs.pop(cid).evicted = True
        if idle:
            self.metrics.conversations_loaded = len(self._convs)
            self.metrics.conversations_evicted_total += len(idle)
        return len(idle)

    async def _load(self, conversation_id: str) -> Conversation | None:
        if not _CONVERSATION_ID.match(conversation_id):
            return None
        async with self._store_bound():
            try:
                record = await self.log.load_conversation(conversation_id)
            except Exception as exc:  # the store cannot be read right now (Redis away, a broken file)
                log.warning("could not load conversation %s from the store: %r", conversation_id, exc)
                self.metrics.store_unavailable_total += 1
                raise ServiceUnavailable("store_unavailable", "the event store cannot be read right now; "
                                         "retry later", headers={"Retry-After": "1"}) from exc
        existing = self._convs.get(conversation_id)
        if existing is not None:  # loaded concurrently
            return existing
        if record is None:
            return None
        conv = Conversation(self, record)
        self._convs[conversation_id] = conv
        self.metrics.conversations_loaded = len(self._convs)
        return conv

    def _on_durable(self, events: Sequence[StoredEvent]) -> None:
        convs = self._convs
        for event in events:
            conv = convs.get(event.conversation_id)
            if conv is not None:
                conv.publish(event)
