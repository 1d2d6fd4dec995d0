"""Scenario 8: mixed traffic for a long time; RSS and fd drift."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Awaitable, Callable

from ..context import SoakContext
from ..model import ScenarioResult
from ..probes import fd_count, percentile, rss_mb, trimmed_rss_mb
from .cancel_storm import scenario_cancel_storm
from .dropped import scenario_dropped_streams
from .faults import scenario_faults
from .session_close import scenario_session_close
from .stalls import scenario_stalls

#: Release-latency samples kept (reservoir sampling), so the soak's own memory does not grow.
RESERVOIR = 4_000


async def scenario_mixed_soak(ctx: SoakContext, res: ScenarioResult) -> None:
    """8. Mixed traffic for ``--duration`` seconds: rounds of scenarios 1 to 5 at small sizes (cancel
    storms, sessions closed under readers, FIN/RST drops with resume, stalls and trickles, dropped
    streams), their counters summed. fds and RSS are sampled between rounds, when nothing is in
    flight; their drift from the baseline (median of the first 10% of samples after a warm-up of 10%)
    to the end (median of the last 10%) must stay within 5%. The RSS judged is the plain one; where the
    C library is glibc, the RSS after ``malloc_trim(0)`` (what the process holds, without the freed heap
    pages glibc keeps cached) is reported next to it, to tell a leak from allocator caching."""
    duration = ctx.sizes.s8_duration
    small = ctx.sizes.replace(
        s1_calls=200, s1_concurrency=50, s2_sessions=20, s2_parallel=10, s3_calls=40, s3_concurrency=20,
        s4_repeats=1, s5_streams=20, s5_batch=20,
    )
    round_ctx = SoakContext(ctx.targets, small, ctx.rng, lambda _m: None, ctx.stuck, ctx.quick,
                           ctx.gc_pauses, ctx.flush_warnings)
    steps: list[Callable[[SoakContext, ScenarioResult], Awaitable[None]]] = [
        scenario_cancel_storm, scenario_session_close, scenario_faults, scenario_stalls,
        scenario_dropped_streams,
    ]
    loop = asyncio.get_running_loop()
    start = loop.time()
    samples: list[tuple[float, int, float, float | None]] = []
    rounds = 0
    expected = 0
    seen = 0
    while loop.time() - start < duration:
        for step in steps:
            part = ScenarioResult(res.number, res.name)
            await step(round_ctx, part)
            res.operations += part.operations
            res.leaked_fds += part.leaked_fds  # scenario 5's fds still open after each batch's gc
            res.hung_consumers += part.hung_consumers
            res.lost_events += part.lost_events
            res.repeated_events += part.repeated_events
            if step is scenario_cancel_storm:
                for sample in part.release_ms:  # a uniform sample of at most RESERVOIR values
                    seen += 1
                    if len(res.release_ms) < RESERVOIR:
                        res.release_ms.append(sample)
                    elif (slot := ctx.rng.randrange(seen)) < RESERVOIR:
                        res.release_ms[slot] = sample
            for kind, count in part.error_samples.items():
                res.error(kind, count)
            expected += int(part.figures.get("expected_finalizer_warnings", 0))
        rounds += 1
        ctx.flush_warnings()  # the harness keeps counts, not records: its memory stays flat
        await asyncio.sleep(0.2)  # sockets closed in the last step finish closing
        gc.collect()
        raw = rss_mb()
        samples.append((loop.time() - start, fd_count(), raw, trimmed_rss_mb()))
        held = samples[-1][3]
        ctx.progress(f"scenario 8: round {rounds}, {loop.time() - start:.0f}/{duration:.0f} s, "
                     f"fds {samples[-1][1]}, RSS {raw:.1f} MB"
                     + (f" ({held:.1f} MB after malloc_trim)" if held is not None else ""))
    res.release_label = "task.cancel() → connection released"
    res.figures["expected_finalizer_warnings"] = expected
    res.figures["samples"] = [[round(t, 1), f, round(r, 1), None if h is None else round(h, 1)]
                              for t, f, r, h in samples]
    res.figures["rounds"] = rounds
    if len(samples) < 4:
        res.notes.append(f"only {len(samples)} rounds: too short to measure drift")
        return
    warm = max(1, len(samples) // 10)
    usable = samples[warm:]
    k = max(1, len(usable) // 10)

    def drift(values: list[float]) -> tuple[float, float, float]:
        first = percentile(values[:k], 0.5) or 0.0
        last = percentile(values[-k:], 0.5) or 0.0
        return first, last, ((last - first) / first * 100 if first else 0.0)

    fd0, fd1, fd_drift = drift([float(x[1]) for x in usable])
    rss0, rss1, rss_drift = drift([x[2] for x in usable])
    res.figures.update({"fd_drift_pct": round(fd_drift, 2), "rss_drift_pct": round(rss_drift, 2),
                        "fds": [fd0, fd1], "rss_mb": [round(rss0, 1), round(rss1, 1)]})
    note = (f"{rounds} rounds in {loop.time() - start:.0f} s; fds {fd0:.0f} → {fd1:.0f} ({fd_drift:+.1f}%), "
            f"RSS {rss0:.1f} → {rss1:.1f} MB ({rss_drift:+.1f}%)")
    held_values = [x[3] for x in usable if x[3] is not None]
    if len(held_values) == len(usable):
        held0, held1, held_drift = drift(held_values)
        res.figures.update({"held_rss_drift_pct": round(held_drift, 2),
                            "held_rss_mb": [round(held0, 1), round(held1, 1)]})
        note += f"; after malloc_trim {held0:.1f} → {held1:.1f} MB ({held_drift:+.1f}%)"
    res.notes.append(note)
    if abs(fd_drift) > 5:
        res.failures.append(f"fd drift {fd_drift:+.1f}% (limit 5%)")
    if abs(rss_drift) > 5:
        res.failures.append(f"RSS drift {rss_drift:+.1f}% (limit 5%)")
