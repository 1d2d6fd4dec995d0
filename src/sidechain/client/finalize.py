"""A lighter ``weakref.finalize`` for the objects every call creates (a stream, a dedicated session).

``weakref.finalize`` gives the garbage collector four objects to track per registration (the finalizer,
its info record, the argument tuple and a weak reference); :func:`on_drop` gives it two (a weak
reference and one flat tuple), and a call makes two such registrations. What the collector tracks per
call in flight is what its pauses scale with (docs/soak.md, cancel-to-release latency).

Differences from ``weakref.finalize``: nothing runs at interpreter exit (a stream still open then is
not "dropped"), and there is no ``peek``/``alive``, only :func:`detach`.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

__all__ = ["DropHandle", "detach", "on_drop"]

DropHandle = weakref.ref  # what on_drop returns: keep it, give it to detach()

#: Live registrations: the weak reference to the watched object -> (function, *arguments).
_PENDING: dict[weakref.ref[Any], tuple[Any, ...]] = {}


def _dropped(ref: weakref.ref[Any]) -> None:
    entry = _PENDING.pop(ref, None)  # atomic: the collector may run this on any thread
    if entry is not None:
        entry[0](*entry[1:])


def on_drop(obj: object, func: Callable[..., None], *args: Any) -> weakref.ref[Any]:
    """Call ``func(*args)`` when ``obj`` is garbage collected, unless :func:`detach` came first.

    ``args`` must not refer to ``obj`` (they are held strongly until then), as with ``weakref.finalize``.
    """
    ref = weakref.ref(obj, _dropped)
    _PENDING[ref] = (func, *args)
    return ref


def detach(handle: weakref.ref[Any]) -> bool:
    """Cancel the registration; True if it was still pending (so this call is the one that ended it)."""
    return _PENDING.pop(handle, None) is not None
