"""Which event loop the ``sidechain`` commands run on.

The library itself runs on whatever loop its caller runs (both are tested: tests/test_event_loops.py).
The command line chooses like uvicorn, which serves the gateway: uvloop when it is installed (it comes
with ``uvicorn[standard]``, a dependency), the standard asyncio loop otherwise. ``SIDECHAIN_LOOP=asyncio``
(or ``uvloop``) overrides the choice; ``sidechain soak --loop`` too.

Why it matters for a streaming client: uvloop makes a TCP connection natively (a dedicated call's
time to first event is ~0.4 ms instead of ~0.55 ms, bench/README.md) and its loop machinery, written in
Cython, hands the garbage collector far fewer objects (soak scenario 1: ~160 collections instead of ~360,
which is most of the cancel-to-release tail under load, docs/soak.md).
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
from collections.abc import Coroutine
from typing import Any, Literal, TypeVar

__all__ = ["LOOP_CHOICES", "LoopName", "resolve_loop", "run"]

T = TypeVar("T")
LoopName = Literal["asyncio", "uvloop"]
LOOP_CHOICES = ("auto", "asyncio", "uvloop")


def resolve_loop(choice: str | None = None) -> LoopName:
    """``auto`` (the default; ``SIDECHAIN_LOOP`` when set) → uvloop if importable, else asyncio.

    Raises ``ValueError`` for an unknown name or for ``uvloop`` when it is not installed.
    """
    choice = choice or os.environ.get("SIDECHAIN_LOOP") or "auto"
    if choice not in LOOP_CHOICES:
        raise ValueError(f"unknown event loop {choice!r} (choose from {', '.join(LOOP_CHOICES)})")
    available = _uvloop_importable()
    if choice == "uvloop" and not available:
        raise ValueError("uvloop is not installed")
    if choice == "asyncio" or not available:
        return "asyncio"
    return "uvloop"


def _uvloop_importable() -> bool:
    if importlib.util.find_spec("uvloop") is None:
        return False
    try:
        import uvloop  # noqa: F401 - present but broken (a failed build) counts as absent
    except ImportError:
        return False
    return True


def run(coro: Coroutine[Any, Any, T], *, loop: str | None = None, debug: bool | None = None) -> T:
    """``asyncio.run(coro)`` on the loop :func:`resolve_loop` chooses."""
    try:
        name = resolve_loop(loop)
    except ValueError:
        coro.close()  # never started: closing it avoids a "never awaited" warning
        raise
    if name == "uvloop":
        import uvloop

        return uvloop.run(coro, debug=debug)
    return asyncio.run(coro, debug=debug)
