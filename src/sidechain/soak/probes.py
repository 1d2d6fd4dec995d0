"""What the soak measures: file descriptors, tasks, RSS, warnings, hangs and release latencies.

Every probe reads this process only (the gateway runs in a child process), so the counts are the
client's own. None of them starts a task.
"""

from __future__ import annotations

import asyncio
import bisect
import ctypes
import gc
import io
import logging
import math
import os
import re
import resource
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "GcPauses",
    "Snapshot",
    "WarningRecord",
    "WarningSink",
    "WarningTally",
    "await_or_hang",
    "fd_count",
    "peak_rss_mb",
    "percentile",
    "reset_peak_rss",
    "rss_mb",
    "settle",
    "trimmed_rss_mb",
]


def fd_count() -> int:
    """Open file descriptors of this process."""
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:  # pragma: no cover - not Linux
        return -1


def task_count() -> int:
    """Tasks not yet finished on the running loop."""
    return len(asyncio.all_tasks())


def _status_kb(field_name: str) -> float | None:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return float(line.split()[1])
    except OSError:  # pragma: no cover - not Linux
        return None
    return None


def rss_mb(pid: int | None = None) -> float:
    """Resident set size now, in MB (of ``pid``, default this process)."""
    path = f"/proc/{pid}/status" if pid else "/proc/self/status"
    try:
        with open(path, encoding="ascii") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return float(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 if pid is None else 0.0


def _load_malloc_trim() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL(None)
        trim: Callable[[int], int] = libc.malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None
    return trim


_malloc_trim = _load_malloc_trim()


def trimmed_rss_mb() -> float | None:
    """RSS in MB after giving the C heap's free pages back to the OS (glibc ``malloc_trim(0)``): the
    memory the process holds, without what the allocator keeps cached. None where not glibc."""
    if _malloc_trim is None:
        return None
    _malloc_trim(0)
    return rss_mb()


_peak_resettable = True


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (``VmHWM``) of this process; False where not supported."""
    global _peak_resettable
    if not _peak_resettable:
        return False
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        _peak_resettable = False
        return False


def peak_rss_mb() -> float:
    """Peak RSS in MB since the last :func:`reset_peak_rss` (since start where it cannot be reset)."""
    hwm = _status_kb("VmHWM") if _peak_resettable else None
    if hwm is not None:
        return hwm / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Open fds and unfinished tasks at one moment."""

    fds: int
    tasks: int

    @classmethod
    def now(cls) -> Snapshot:
        return cls(fd_count(), task_count())


async def settle(before: Snapshot, *, within: float = 3.0) -> Snapshot:
    """Collect garbage and wait, bounded by ``within`` seconds, until fds and tasks are back to
    ``before``; returns the last snapshot. A socket closes on the loop iteration after its
    ``transport.close()``, and a finalizer schedules its close with ``call_soon``: a few iterations
    are allowed, nothing more."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    last_gc = 0.0
    while True:
        now_t = loop.time()
        if now_t - last_gc > 0.1:
            gc.collect()
            last_gc = now_t
        snap = Snapshot.now()
        if (snap.fds <= before.fds and snap.tasks <= before.tasks) or now_t > deadline:
            return snap
        await asyncio.sleep(0.01)


def percentile(values: list[float], q: float) -> float | None:
    """The ``q`` quantile (0..1) by the nearest-rank method; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, min(len(ordered), math.ceil(q * len(ordered) - 1e-9)))
    return ordered[rank - 1]


# -- warnings --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WarningRecord:
    """One warning-like event: a ``warnings`` warning, an asyncio error log line or an unraisable."""

    source: str  # "warning" | "asyncio" | "unraisable"
    category: str
    message: str

    def short(self) -> str:
        text = " ".join(self.message.split())
        return f"{self.category}: {text[:160]}"


_SIDECHAIN_FINALIZER = re.compile(r"sidechain .* garbage collected without")


@dataclass
class WarningTally:
    """The warnings of one window (a scenario): expected ones counted, others counted and sampled."""

    expected: int = 0
    unexpected: int = 0
    samples: list[WarningRecord] = field(default_factory=list)


class WarningSink:
    """Catches, for as long as it is entered, every warning the process emits:

    * ``warnings`` warnings, recorded with ``catch_warnings(record=True)`` whatever the filters say (so
      ``-W error`` turns none of them into an exception inside the soak);
    * ``asyncio`` log records at ERROR and above ("Task exception was never retrieved", "Unclosed
      client session", "Task was destroyed but it is pending!");
    * exceptions ignored in finalizers and ``__del__`` (``sys.unraisablehook``).

    Warnings are tallied per window: :meth:`begin` opens one (with what is expected in it), :meth:`end`
    closes it and returns its :class:`WarningTally`. Only counts and a few samples are kept, so memory
    stays flat however long the soak runs, provided :meth:`flush` is called now and then (``end`` does).
    """

    MAX_SAMPLES = 8

    def __init__(self) -> None:
        self._catch: warnings.catch_warnings[list[warnings.WarningMessage]] | None = None
        self._caught: list[warnings.WarningMessage] = []
        self._handler: logging.Handler | None = None
        self._old_hook: Callable[[Any], Any] | None = None
        self._slow_callbacks = 0
        self._expected: Callable[[WarningRecord], bool] | None = None
        self._tally = WarningTally()
        self._open = False
        self._between = WarningTally()

    def __enter__(self) -> WarningSink:
        self._catch = warnings.catch_warnings(record=True)
        self._caught = self._catch.__enter__()
        warnings.simplefilter("always")
        sink = self

        class _AsyncioHandler(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                try:
                    text = record.getMessage()
                except Exception:  # pragma: no cover - a broken log call
                    text = str(record.msg)
                if record.levelno >= logging.ERROR:
                    sink.add(WarningRecord("asyncio", record.levelname, text))
                elif text.startswith("Executing "):
                    sink._slow_callbacks += 1  # asyncio debug mode: a slow step, not a failure

        self._handler = _AsyncioHandler(level=logging.WARNING)
        logging.getLogger("asyncio").addHandler(self._handler)
        self._old_hook = sys.unraisablehook

        def hook(unraisable: Any) -> None:
            exc = unraisable.exc_value
            what = f"{unraisable.err_msg or 'Exception ignored'}: {unraisable.object!r}: {exc!r}"
            sink.add(WarningRecord("unraisable", type(exc).__name__, what))

        sys.unraisablehook = hook
        return self

    def __exit__(self, *exc: object) -> None:
        self.flush()
        if self._handler is not None:
            logging.getLogger("asyncio").removeHandler(self._handler)
            self._handler = None
        if self._old_hook is not None:
            sys.unraisablehook = self._old_hook
            self._old_hook = None
        if self._catch is not None:
            self._catch.__exit__(None, None, None)
            self._catch = None

    def add(self, record: WarningRecord) -> None:
        """Count one warning in the current window."""
        tally = self._tally
        if self._expected is not None and self._expected(record):
            tally.expected += 1
            return
        tally.unexpected += 1
        if len(tally.samples) < self.MAX_SAMPLES:
            tally.samples.append(record)

    def flush(self) -> None:
        """Tally the warnings ``catch_warnings`` recorded so far (in order of arrival) and drop them."""
        caught, self._caught[:] = list(self._caught), []
        for w in caught:
            self.add(WarningRecord("warning", w.category.__name__, str(w.message)))

    def begin(self, expected: Callable[[WarningRecord], bool] | None = None) -> None:
        """Open a window. Warnings since the last :meth:`end` (between two windows) are kept in
        :attr:`between`; those of a window still open are left in it (and dropped with it)."""
        self.flush()
        if not self._open:
            gap, between = self._tally, self._between
            between.expected += gap.expected
            between.unexpected += gap.unexpected
            between.samples.extend(gap.samples[: self.MAX_SAMPLES - len(between.samples)])
        self._expected = expected
        self._tally = WarningTally()
        self._open = True

    def end(self) -> WarningTally:
        """Close the window and return its tally (later warnings go to a fresh, unexpected window)."""
        self.flush()
        tally = self._tally
        self._expected = None
        self._tally = WarningTally()
        self._open = False
        return tally

    @property
    def between(self) -> WarningTally:
        """Warnings raised between two windows (after an :meth:`end`, before the next :meth:`begin`):
        no scenario's, so the soak reports them as stray."""
        return self._between

    @property
    def slow_callbacks(self) -> int:
        """asyncio debug-mode "Executing ... took N s" lines seen (reported, not counted as failures)."""
        return self._slow_callbacks

    @staticmethod
    def is_finalizer_warning(record: WarningRecord) -> bool:
        """A sidechain finalizer's ResourceWarning: what a stream or Session dropped unclosed gives."""
        return record.category == "ResourceWarning" and bool(_SIDECHAIN_FINALIZER.search(record.message))


# -- garbage collection pauses ---------------------------------------------------------------------


class GcPauses:
    """Times every garbage collection while entered, so a latency sample can be told apart from a
    collection that stopped the whole process. Keeps running totals and the last
    :attr:`KEEP` collections' intervals (``perf_counter`` seconds), so its memory stays bounded."""

    KEEP = 1_000

    def __init__(self) -> None:
        self.intervals: list[tuple[float, float, int]] = []
        self._ends: list[float] = []
        self._started = 0.0
        self._count = 0
        self._gen2 = 0
        self._total = 0.0
        self._longest = 0.0

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        now = time.perf_counter()
        if phase == "start":
            self._started = now
            return
        took = now - self._started
        self._count += 1
        self._gen2 += info.get("generation", -1) == 2
        self._total += took
        self._longest = max(self._longest, took)
        self.intervals.append((self._started, now, info.get("generation", -1)))
        self._ends.append(now)
        if len(self.intervals) > 2 * self.KEEP:
            del self.intervals[: self.KEEP]
            del self._ends[: self.KEEP]

    def __enter__(self) -> GcPauses:
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._callback in gc.callbacks:
            gc.callbacks.remove(self._callback)

    def mark(self) -> tuple[int, int, float]:
        """Start a window for :meth:`summary` (one at a time: it also resets the longest pause)."""
        self._longest = 0.0
        return (self._count, self._gen2, self._total)

    def summary(self, since: tuple[int, int, float]) -> dict[str, float]:
        """Collections since ``mark()``: how many, how many of generation 2, longest and total (ms)."""
        count, gen2, total = since
        return {
            "collections": self._count - count,
            "gen2_collections": self._gen2 - gen2,
            "longest_ms": round(self._longest * 1000, 2),
            "total_ms": round((self._total - total) * 1000, 1),
        }

    def overlaps(self, start: float, end: float) -> bool:
        """Whether a collection ran between ``start`` and ``end`` (perf_counter seconds)."""
        i = bisect.bisect_left(self._ends, start)  # collections do not overlap: ends are sorted
        return i < len(self.intervals) and self.intervals[i][0] <= end


# -- hangs and release latency -----------------------------------------------------------------------

#: Where the first hung consumers were waiting when their grace ran out (for the report).
hung_stacks: list[str] = []


async def await_or_hang(task: asyncio.Future[Any], stuck: list[asyncio.Future[Any]], *, grace: float = 1.0,
                        force_wait: float = 5.0) -> bool:
    """Wait up to ``grace`` seconds for ``task`` to finish after it was cancelled or its source closed.

    Returns True when it did. Otherwise it is a hung consumer: it is cancelled (again) and waited for
    ``force_wait`` more seconds; one still running then is appended to ``stuck`` for the runner to
    reap (and report) at the end of the scenario. Returns False.
    """
    done, _ = await asyncio.wait({task}, timeout=grace)
    if done:
        return True
    if isinstance(task, asyncio.Task) and len(hung_stacks) < 2:
        out = io.StringIO()
        task.print_stack(limit=12, file=out)
        hung_stacks.append(out.getvalue()[-3000:])
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=force_wait)
    if not done:
        stuck.append(task)
    return False


def retrieve(task: asyncio.Future[Any]) -> BaseException | None:
    """The exception a finished task ended with (None if it returned or was cancelled)."""
    if task.cancelled():
        return None
    return task.exception()
