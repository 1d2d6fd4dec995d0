"""One DNS cache for every session: dedicated sessions share what names resolve to, never a connection.

aiohttp keeps its DNS cache in the connector, and a dedicated session owns a new connector per call, so
every dedicated call to ``http://localhost:8765`` used to run ``getaddrinfo`` in a worker thread before
it could connect: on the standard loop that doubled its time to first event (bench/README.md). The
issue's rule for dedicated sessions is to share what is safe to share (SSL context, resolver,
settings) and never a connection; a resolution is plain data, so :data:`SHARED_RESOLVER` keeps it for
every session, every loop and every thread.

The rules are aiohttp's own cache's: an entry lives ``ttl`` seconds (10, aiohttp's default), its
addresses are handed out in turn (round robin), the lookup itself is aiohttp's default resolver, and
concurrent calls for a name not in the cache share one lookup, which a cancelled caller does not cancel
(it still fills the cache). Added: a connection that could not be made makes the name forgotten, so the
next call looks it up again, and the cache holds at most ``max_hosts`` names.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult

__all__ = ["SHARED_RESOLVER", "SharedResolver"]

_Key = tuple[str, int, int]  # (host, port, family)


@dataclass(slots=True)
class _Entry:
    expires: float
    addrs: list[ResolveResult]
    next: int = 0  # index of the address handed out first next time


class SharedResolver(AbstractResolver):
    """A DNS cache shared by sessions, in front of a fresh ``aiohttp.DefaultResolver`` per lookup.

    Safe to use from several event loops and threads at once. A failed lookup raises as aiohttp's
    resolver raised it (a lookup that found no address raises ``OSError``) and is not cached.
    ``lookups`` counts the lookups made (cache misses).
    """

    def __init__(
        self,
        *,
        ttl: float = 10.0,
        max_hosts: int = 256,
        clock: Callable[[], float] = time.monotonic,
        lookup: Callable[[], AbstractResolver] = aiohttp.DefaultResolver,
    ) -> None:
        if ttl < 0 or max_hosts < 1:
            raise ValueError("ttl must be >= 0 and max_hosts >= 1")
        self.ttl = ttl
        self.max_hosts = max_hosts
        self._clock = clock
        self._lookup = lookup  # makes the resolver a lookup runs on (closed after it)
        self._lock = threading.Lock()  # no await is ever made while holding it
        self._cache: dict[_Key, _Entry] = {}
        # lookups in flight, per loop; a loop closed in the middle of one is dropped at the next miss
        # (its task holds it, so the weak key alone would not let it go)
        self._inflight: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop,
                                                  dict[_Key, asyncio.Task[list[ResolveResult]]]]
        self._inflight = weakref.WeakKeyDictionary()
        self.lookups = 0

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
                      ) -> list[ResolveResult]:
        key = (host, port, int(family))
        loop = asyncio.get_running_loop()
        with self._lock:
            entry = self._cache.get(key)
            if entry is not None and entry.expires > self._clock():
                addrs, index = entry.addrs, entry.next
                entry.next = (index + 1) % len(addrs)
                return addrs[index:] + addrs[:index]
            for closed in [other for other in self._inflight if other.is_closed()]:
                del self._inflight[closed]
            pending = self._inflight.setdefault(loop, {})
            task = pending.get(key)
            if task is None:
                self.lookups += 1
                task = loop.create_task(self._look_up(key, family))
                pending[key] = task
                task.add_done_callback(lambda done: self._finished(loop, key, done))
        # shielded: one caller cancelled does not cancel the others' lookup (nor the cache's fill)
        return list(await asyncio.shield(task))

    async def _look_up(self, key: _Key, family: socket.AddressFamily) -> list[ResolveResult]:
        resolver = self._lookup()
        try:
            addrs = await resolver.resolve(key[0], key[1], family=family)
        finally:
            await resolver.close()
        if not addrs:
            raise OSError(f"no address found for {key[0]!r}")
        if self.ttl > 0:
            with self._lock:
                self._cache.pop(key, None)
                while len(self._cache) >= self.max_hosts:
                    self._cache.pop(next(iter(self._cache)), None)  # the oldest lookup
                self._cache[key] = _Entry(self._clock() + self.ttl, list(addrs), 1 % len(addrs))
        return list(addrs)

    def _finished(self, loop: asyncio.AbstractEventLoop, key: _Key,
                  task: asyncio.Task[list[ResolveResult]]) -> None:
        with self._lock:
            pending = self._inflight.get(loop)
            if pending is not None and pending.get(key) is task:
                del pending[key]
        if not task.cancelled():
            task.exception()  # retrieved here too, whatever the callers did

    def forget(self, host: str) -> None:
        """Drop what ``host`` resolved to, for every port and family, with or without trailing dots:
        the next call looks it up again."""
        bare = host.rstrip(".")
        with self._lock:
            for key in [k for k in self._cache if k[0].rstrip(".") == bare]:
                self._cache.pop(key, None)

    def clear(self) -> None:
        with self._lock:
            self._cache.clear()

    async def close(self) -> None:
        """Nothing to close: each lookup's resolver is closed after it (sessions share this one)."""


#: The resolver every :class:`~sidechain.Session` (pooled or dedicated) uses.
SHARED_RESOLVER = SharedResolver()
