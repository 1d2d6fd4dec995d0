"""Shared fixtures: a fault-injecting SSE server in its own process, and resource counters."""

from __future__ import annotations

import asyncio
import gc
import os
import subprocess
import sys
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
