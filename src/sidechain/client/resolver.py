"""One DNS cache for every session: dedicated sessions share what names resolve to, never a connection.

aiohttp keeps its DNS cache in the connector, and a dedicated session owns a new connector per call, so
every dedicated call to ``http://localhost:8765`` used to run ``getaddrinfo`` in a worker thread before
it could connect: on the standard loop that doubled its time to first event (bench/README.md). The
issue's rule for dedicated sessions is to share what is safe to share (SSL context, resolver,
settings) and never a connection; a resolution is plain data, so :data:`SHARED_RESOLVER` keeps it for
every session and every loop (no loop object is held, so nothing keeps a closed loop alive).

The rules are aiohttp's own cache's: an entry lives ``ttl`` seconds (10, aiohttp's default), its
addresses are handed out in turn (round robin), and the lookup itself is aiohttp's default resolver.
Added: a connection that could not be made to any of a name's addresses forgets that name, so the next
call looks it up again, and the cache holds at most ``max_hosts`` names.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult

__all__ = ["SHARED_RESOLVER", "SharedResolver"]


@dataclass(slots=True)
class _Entry:
    expires: float
    addrs: list[ResolveResult]
    next: int = 0  # index of the address handed out first next time


class SharedResolver(AbstractResolver):
    """A DNS cache shared by sessions, in front of a fresh ``aiohttp.DefaultResolver`` per lookup.

    A failed lookup raises as aiohttp's resolver raised it and is not cached. ``lookups`` counts the
    lookups made (cache misses).
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
        self._cache: dict[tuple[str, int, int], _Entry] = {}  # (host, port, family) -> entry
        self.lookups = 0  # lookups made (cache misses), for tests and metrics

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
                      ) -> list[ResolveResult]:
        key = (host, port, int(family))
        entry = self._cache.get(key)
        if entry is not None and entry.expires > self._clock():
            addrs, index = entry.addrs, entry.next
            entry.next = (index + 1) % len(addrs)
            return addrs[index:] + addrs[:index]
        self.lookups += 1
        resolver = self._lookup()
        try:
            addrs = await resolver.resolve(host, port, family=family)
        finally:
            await resolver.close()
        if addrs and self.ttl > 0:
            self._cache.pop(key, None)
            while len(self._cache) >= self.max_hosts:
                del self._cache[next(iter(self._cache))]  # the oldest lookup
            self._cache[key] = _Entry(self._clock() + self.ttl, list(addrs), 1 % len(addrs))
        return list(addrs)

    def forget(self, host: str) -> None:
        """Drop what ``host`` resolved to (every port and family): the next call looks it up again."""
        for key in [k for k in self._cache if k[0] == host]:
            self._cache.pop(key, None)

    def clear(self) -> None:
        self._cache.clear()

    async def close(self) -> None:
        """Nothing to close: each lookup's resolver is closed after it (sessions share this one)."""


#: The resolver every :class:`~sidechain.Session` (pooled or dedicated) uses.
SHARED_RESOLVER = SharedResolver()
