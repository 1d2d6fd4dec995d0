"""Shared helpers for the gateway tests: plain aiohttp + sidechain.sse.Decoder, nothing else."""

from __future__ import annotations

import asyncio
import json
import os
from collections import deque
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from sidechain.sse import Comment, Decoder, Event

TIMEOUT = 10.0


class SSEReader:
    """Reads an open aiohttp response as SSE, one event (or comment) at a time, with deadlines."""

    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self.resp = resp
        self.decoder = Decoder(comments=True)
        self._ready: deque[Event | Comment] = deque()
        self.eof = False
        self.raw = bytearray()

    async def next(self, within: float = TIMEOUT) -> Event | Comment | None:
        """The next event or comment; None at the end of the body."""
        async with asyncio.timeout(within):
            while not self._ready:
                if self.eof:
                    return None
                chunk = await self.resp.content.readany()
                if not chunk:
                    self.eof = True
                    self.decoder.close()
                    continue
                self.raw += chunk
                self._ready.extend(self.decoder.feed(chunk))
            return self._ready.popleft()

    async def event(self, within: float = TIMEOUT) -> Event | None:
        """The next event (comments skipped); None at the end of the body."""
        while True:
            item = await self.next(within)
            if item is None or isinstance(item, Event):
                return item

    async def until(self, *types: str, within: float = TIMEOUT) -> list[Event]:
        """Events up to and including the first whose type is in ``types``; AssertionError at EOF."""
        out: list[Event] = []
        async with asyncio.timeout(within):
            while True:
                ev = await self.event(within)
                assert ev is not None, f"stream ended before {types}; got {[e.event for e in out]}"
                out.append(ev)
                if ev.event in types:
                    return out

    async def rest(self, within: float = TIMEOUT) -> list[Event]:
        """Every remaining event until the end of the body."""
        out: list[Event] = []
        async with asyncio.timeout(within):
            while (ev := await self.event(within)) is not None:
                out.append(ev)
        return out


def data(ev: Event) -> Any:
    return json.loads(ev.data)


def ids(events: list[Event]) -> list[int]:
    return [int(e.id) for e in events]


async def create_conversation(
    session: aiohttp.ClientSession, url: str, headers: dict[str, str] | None = None
) -> str:
    async with session.post(f"{url}/v1/conversations", headers=headers) as resp:
        assert resp.status == 201, await resp.text()
        body = await resp.json()
        return str(body["id"])


async def post_message(
    session: aiohttp.ClientSession,
    url: str,
    cid: str,
    text: str,
    *,
    queue: bool | None = None,
    headers: dict[str, str] | None = None,
    expect: int = 202,
) -> dict[str, Any]:
    payload: dict[str, Any] = {"text": text}
    if queue is not None:
        payload["queue"] = queue
    async with session.post(f"{url}/v1/conversations/{cid}/messages", json=payload, headers=headers) as resp:
        body: dict[str, Any] = await resp.json()
        assert resp.status == expect, (resp.status, body)
        return body


async def get_json(session: aiohttp.ClientSession, url: str, headers: dict[str, str] | None = None) -> Any:
    async with session.get(url, headers=headers) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json()


async def wait_until(predicate: Callable[[], bool], within: float = TIMEOUT, what: str = "condition") -> None:
    """Poll a real condition every 10 ms until it holds; AssertionError after ``within`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {within} s waiting for {what}")
        await asyncio.sleep(0.01)


async def wait_for_async(
    predicate: Callable[[], Awaitable[bool]], within: float = TIMEOUT, what: str = ""
) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not await predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {within} s waiting for {what}")
        await asyncio.sleep(0.01)


def open_fds() -> set[str]:
    """This process's open file descriptors (their targets), from /proc/self/fd."""
    out = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            out.add(f"{fd}->{os.readlink(f'/proc/self/fd/{fd}')}")
        except OSError:
            pass
    return out


def other_tasks() -> set[asyncio.Task[Any]]:
    current = asyncio.current_task()
    return {t for t in asyncio.all_tasks() if t is not current}


def error_of(body: Any) -> tuple[str, str]:
    """(type, message) of a JSON error body, asserting its shape."""
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"type", "message"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]["type"], body["error"]["message"]


def store_spec(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    """The ``--store`` spec of a store kind: ``memory``, ``sqlite`` (a file in ``tmp_path``) or ``redis``
    (the session's redis-server, under a key prefix of this test's own)."""
    if kind == "sqlite":
        return f"sqlite:{tmp_path / 'gw.sqlite3'}"
    if kind == "redis":
        return str(request.getfixturevalue("redis_store"))
    return kind
