"""Watchdog: the idle and total deadlines of one stream, on one lazily re-armed timer.

Marking an event is one attribute store (no timer churn per event); the timer, when it fires, checks
what really passed and either fails the stream with the named error or re-arms itself for the next
possible deadline.
"""

from __future__ import annotations

import asyncio
import types
import weakref
from collections.abc import Callable

from ..errors import IdleTimeout, TotalTimeout
from .safe_stream import SafeByteStream, StreamState

__all__ = ["Watchdog"]

#: How early a timer may fire: uvloop's timers tick in whole milliseconds, so one can run before
#: ``loop.time()`` reaches its deadline; that counts as reached (rather than re-arming for a sliver).
#: So the idle and total deadlines may end a stream up to 1 ms before they are due, never later.
TIMER_SLACK = 0.001


class Watchdog:
    """Fails ``stream`` with :class:`IdleTimeout` when no event came for ``idle`` seconds, or with
    :class:`TotalTimeout` at the loop time ``deadline``. ``on_stall(name)`` is told which one fired.

    A bound method given as ``on_stall`` is held weakly (its object): the stream that owns this watchdog
    and is told about its stalls would otherwise form a reference cycle with it, and every finished call
    would wait for the garbage collector instead of being freed when its last reference goes."""

    __slots__ = ("_loop", "_on_stall", "_stall_owner", "_stream", "_timer", "deadline", "held", "idle",
                 "last_event_at", "total")

    def __init__(self, loop: asyncio.AbstractEventLoop, *, idle: float | None, deadline: float | None,
                 total: float | None = None, on_stall: Callable[[str], None] | None = None) -> None:
        self._loop = loop
        self.idle = idle
        self.deadline = deadline
        self.total = total
        # a bound method is kept as its function and a plain weak reference to its object (one object for
        # the collector to track, where a WeakMethod makes three)
        self._on_stall: Callable[..., None] | None = on_stall
        self._stall_owner: weakref.ref[object] | None = None
        if isinstance(on_stall, types.MethodType):
            self._on_stall = on_stall.__func__
            self._stall_owner = weakref.ref(on_stall.__self__)
        self._stream: SafeByteStream | None = None
        self._timer: asyncio.TimerHandle | None = None
        self.last_event_at = loop.time()
        #: The consumer has the last event and has not asked for the next one yet: the server is not
        #: idle then, the consumer is busy, so that time does not count towards ``idle``.
        self.held = False

    def watch(self, stream: SafeByteStream) -> None:
        """Start watching a newly opened stream; the idle clock starts now."""
        self.stop()
        self._stream = stream
        self.held = False
        self.last_event_at = self._loop.time()
        self._arm()

    def event(self) -> None:
        """An event arrived (comments do not count): the idle clock restarts."""
        self.last_event_at = self._loop.time()

    def hold(self) -> None:
        """The consumer took an event (or its buffer is full): until :meth:`waiting`, no idle time counts."""
        self.held = True

    def waiting(self) -> None:
        """The consumer asks for the next event: the idle clock restarts now."""
        self.held = False
        self.last_event_at = self._loop.time()

    def stop(self) -> None:
        """Stop watching (the stream ended or is being replaced). Idempotent."""
        self._stream = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _arm(self) -> None:
        when = self.deadline
        if self.idle is not None:
            idle_at = (self._loop.time() if self.held else self.last_event_at) + self.idle
            when = idle_at if when is None else min(when, idle_at)
        if when is not None:
            self._timer = self._loop.call_at(when, self._fire)

    def _fire(self) -> None:
        self._timer = None
        stream = self._stream
        if stream is None or stream.state is not StreamState.OPEN:
            return
        now = self._loop.time() + TIMER_SLACK
        if self.deadline is not None and now >= self.deadline:
            self._stall("total_timeout")
            stream.fail(TotalTimeout(f"call exceeded total_timeout={self.total}s", timeout=self.total))
        elif self.idle is not None and not self.held and now >= self.last_event_at + self.idle:
            self._stall("idle_timeout")
            stream.fail(IdleTimeout(f"no event for idle_timeout={self.idle}s", timeout=self.idle))
        else:
            self._arm()  # an event arrived meanwhile, or the consumer holds one: re-arm

    def _stall(self, name: str) -> None:
        if self._on_stall is None:
            return
        if self._stall_owner is None:
            self._on_stall(name)
            return
        owner = self._stall_owner()
        if owner is not None:
            self._on_stall(owner, name)
