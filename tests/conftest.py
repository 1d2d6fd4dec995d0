"""Shared fixtures: a fault-injecting SSE server in its own process, and resource counters."""

from __future__ import annotations

import asyncio
import gc
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

HERE = Path(__file__).parent


@dataclass(frozen=True)
class Resources:
    fds: int
    tasks: int

    @classmethod
    def now(cls) -> Resources:
        return cls(fds=len(os.listdir("/proc/self/fd")), tasks=len(asyncio.all_tasks()))


async def settle_resources(before: Resources, *, within: float = 1.0) -> Resources:
    """Wait (bounded) until fds and tasks are back to ``before``; return what was last seen.

    Closing a socket completes on the loop iteration after ``transport.close()``, so a few iterations
    are allowed; the test still fails if anything is left once the deadline passes.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        now = Resources.now()
        if (now.fds <= before.fds and now.tasks <= before.tasks) or loop.time() > deadline:
            return now
        await asyncio.sleep(0.005)


def library_garbage() -> dict[str, int]:
    """Types from sidechain, aiohttp and their helpers among the objects the collector found in cycles
    (``gc.garbage`` under ``gc.DEBUG_SAVEALL``), counted by name."""
    found: dict[str, int] = {}
    for obj in gc.garbage:
        module = type(obj).__module__ or ""
        if module.split(".")[0] in ("sidechain", "aiohttp", "multidict", "yarl"):
            name = f"{module}.{type(obj).__qualname__}"
            found[name] = found.get(name, 0) + 1
    return found


@pytest.fixture(scope="session")
def fault_server() -> Iterator[str]:
    """Base URL of tests/faultserver.py, running in a child process for the whole session."""
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "faultserver.py")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("PORT "), f"fault server did not start: {line!r}"
        yield f"http://127.0.0.1:{int(line.split()[1])}"
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def redis_binary() -> str:
    """The ``redis-server`` binary. Without one the Redis tests are skipped, except under CI (``CI``
    set), where ``.ci/run`` installs it: there a missing server fails them instead of hiding them."""
    binary = shutil.which("redis-server")
    if binary is None:
        message = "redis-server not installed (.ci/run installs Debian's redis-server)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return binary


def start_redis(port: int | None = None) -> tuple[subprocess.Popen[bytes], int]:
    """A redis-server child process on 127.0.0.1 (no persistence), answering PING; and its port."""
    binary = redis_binary()
    for _ in range(3):  # a free port may be taken between the probe and the server's bind
        chosen = port if port is not None else _free_port()
        proc = subprocess.Popen(
            [binary, "--port", str(chosen), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", chosen), timeout=0.5) as c:
                    c.sendall(b"PING\r\n")
                    if c.recv(16).startswith(b"+PONG"):
                        return proc, chosen
            except OSError:
                time.sleep(0.02)
        stop_redis(proc)
    pytest.fail("redis-server did not start")


def stop_redis(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[str]:
    """``redis://127.0.0.1:PORT/0`` of a redis-server shared by the session (see :func:`redis_binary`)."""
    proc, port = start_redis()
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        stop_redis(proc)


@pytest.fixture
def redis_store(redis_server: str) -> str:
    """A Redis store spec with a key prefix of its own: tests sharing the server never see each other."""
    return f"{redis_server}?prefix=t{uuid.uuid4().hex[:12]}"
