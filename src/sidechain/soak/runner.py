"""Run the soak: start the gateways, run each scenario between two resource snapshots, collect figures.

:func:`run_soak` is what ``sidechain soak`` calls; tests may call it directly. Everything it starts
(gateway processes, proxies, clients, tasks) is stopped before it returns, and every warning raised
meanwhile is caught and attributed to the scenario that caused it.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import random
import sys
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from ..client import EventStreamClient, GatewayHTTPClient
from ..gateway.testing import GatewayProcess
from .context import FULL, QUICK, SoakContext, Targets
from .model import ScenarioResult, SoakReport
from .probes import (
    GcPauses,
    Snapshot,
    WarningRecord,
    WarningSink,
    hung_stacks,
    peak_rss_mb,
    reset_peak_rss,
    rss_mb,
    settle,
)
from .scenarios import (
    scenario_cancel_storm,
    scenario_dropped_streams,
    scenario_faults,
    scenario_mixed_soak,
    scenario_restart,
    scenario_session_close,
    scenario_slow_consumers,
    scenario_stalls,
)
from .wire import btw_path, create_conversations, events_path

__all__ = [
    "DEFAULT_SCENARIOS",
    "GATEWAY_ARGS",
    "SCENARIOS",
    "ScenarioFn",
    "SoakOptions",
    "measure",
    "run_soak",
    "start_targets",
    "warm_up",
]

ScenarioFn = Callable[[SoakContext, ScenarioResult], Awaitable[None]]


@dataclass(frozen=True)
class ScenarioSpec:
    name: str
    run: ScenarioFn
    gateways: tuple[str, ...]
    #: ResourceWarnings from sidechain's finalizers are the point of the scenario, not failures.
    expects_finalizer_warnings: bool = False


SCENARIOS: dict[int, ScenarioSpec] = {
    1: ScenarioSpec("cancel at random moments", scenario_cancel_storm, ("paced",)),
    2: ScenarioSpec("pooled sessions closed under readers", scenario_session_close, ("slow",)),
    3: ScenarioSpec("FIN/RST drops, resume byte-exact", scenario_faults, ("paced",)),
    4: ScenarioSpec("stalls and trickles vs deadlines", scenario_stalls, ("fast",)),
    5: ScenarioSpec("streams dropped unclosed + gc", scenario_dropped_streams, ("slow",), True),
    6: ScenarioSpec("gateway SIGKILL + restart", scenario_restart, ()),
    7: ScenarioSpec("slow consumers, bounded buffers", scenario_slow_consumers, ("fast",)),
    8: ScenarioSpec("mixed soak, RSS/fd drift", scenario_mixed_soak, ("paced", "slow", "fast"), True),
}

DEFAULT_SCENARIOS = (1, 2, 3, 4, 5, 6, 7)

#: ``sidechain serve`` arguments of the gateways this run starts (all in-memory stores).
GATEWAY_ARGS: dict[str, tuple[str, ...]] = {
    "paced": ("--echo-pace", "100"),
    "slow": ("--echo-pace", "5", "--btw-grace", "1"),
    "fast": ("--echo-pace", "0"),
}


@dataclass(frozen=True)
class SoakOptions:
    """``quick``: the CI size; ``url``: target that gateway instead of starting ones (scenario 6 is
    skipped); ``duration``: seconds of scenario 8; ``seed``: the RNG seed (cancel moments, fault offsets)."""

    quick: bool = False
    url: str | None = None
    scenarios: tuple[int, ...] = DEFAULT_SCENARIOS
    duration: float | None = None
    seed: int = 6
    progress: bool = True


def _progress_printer(enabled: bool, started: float) -> Callable[[str], None]:
    def say(message: str) -> None:
        if enabled:
            print(f"[soak {time.perf_counter() - started:6.1f}s] {message}", file=sys.stderr, flush=True)

    return say


async def run_soak(options: SoakOptions) -> SoakReport:
    """Run the selected scenarios and return their figures (see :class:`SoakReport`)."""
    unknown = [n for n in options.scenarios if n not in SCENARIOS]
    if unknown:
        raise ValueError(f"unknown scenario(s) {unknown}; known: {sorted(SCENARIOS)}")
    sizes = QUICK if options.quick else FULL
    if options.duration is not None:
        sizes = sizes.replace(s8_duration=options.duration)
    started = time.perf_counter()
    say = _progress_printer(options.progress, started)
    report = SoakReport(mode="quick" if options.quick else "full",
                        target=options.url or "gateway subprocesses on 127.0.0.1", loop=_loop_name())
    gateway_problems: list[str] = []
    debug = _debug_mode()
    with WarningSink() as sink, GcPauses() as gc_pauses:
        async with contextlib.AsyncExitStack() as stack:
            needed = {g for n in options.scenarios for g in SCENARIOS[n].gateways}
            targets = await start_targets(stack, options.url, needed, say, gateway_problems)
            ctx = SoakContext(targets, sizes, random.Random(options.seed), say, quick=options.quick,
                              gc_pauses=gc_pauses, flush_warnings=sink.flush)
            await warm_up(ctx, needed)
            before = sink.end()  # the gateways' start and the warm-up: attributed to no scenario
            for number in options.scenarios:
                say(f"scenario {number}: {SCENARIOS[number].name}")
                result = await _measure(ctx, sink, number)
                report.results.append(result)
                say(f"scenario {number}: done in {result.duration_s:.1f}s"
                    + (" FAILED" if result.failed else "") + (f" (skipped: {result.skipped})"
                                                              if result.skipped else ""))
            sink.begin()
        gc.collect()
        after = sink.end()  # while the gateways stopped: attributed to no scenario
    report.duration_s = time.perf_counter() - started
    report.context = {
        "sizes": dict(vars(sizes)),
        "gateways": {name: " ".join(GATEWAY_ARGS[name]) for name in sorted(needed)} if not options.url
        else {"external": options.url},
        "seed": options.seed,
        "asyncio_debug": debug,
        "asyncio_slow_callbacks": sink.slow_callbacks,
    }
    # what the gateways logged as an error (read at the end, before they stop) fails the run as well
    report.stray_warnings.extend(gateway_problems)
    for tally in (before, sink.between, after):
        report.stray_warnings.extend(f"[{w.source}] {w.short()}" for w in tally.samples)
        if tally.unexpected > len(tally.samples):
            report.stray_warnings.append(f"... and {tally.unexpected - len(tally.samples)} more")
    return report


def _loop_name() -> str:
    return "uvloop" if type(asyncio.get_running_loop()).__module__.startswith("uvloop") else "asyncio"


def _debug_mode() -> bool:
    try:
        return asyncio.get_running_loop().get_debug()
    except RuntimeError:  # pragma: no cover - always called inside the loop
        return False


async def start_targets(stack: contextlib.AsyncExitStack, url: str | None, needed: set[str],
                         say: Callable[[str], None], problems: list[str] | None = None) -> Targets:
    """Start the gateway processes the scenarios need (or use ``url``). When they stop, the error lines
    of their logs (``ERROR``, ``Traceback``) are appended to ``problems``."""
    if url is not None:
        base = url.rstrip("/")
        return Targets(base, base, base, external=True)
    urls: dict[str, str] = {}
    pids: dict[str, int] = {}
    for name in ("paced", "slow", "fast"):
        if name not in needed:
            continue
        gp = GatewayProcess(*GATEWAY_ARGS[name], "--no-access-log", store="memory")
        stack.push_async_callback(gp.close)
        if problems is not None:  # runs before the close above (the stack unwinds last in, first out)
            stack.callback(_collect_errors, name, gp, problems)
        urls[name] = await gp.start()
        if gp.proc is not None:
            pids[name] = gp.proc.pid
        say(f"gateway '{name}' ({' '.join(GATEWAY_ARGS[name])}) on {urls[name]}")
    fallback = next(iter(urls.values()), "http://127.0.0.1:9")
    return Targets(urls.get("paced", fallback), urls.get("slow", fallback), urls.get("fast", fallback),
                   pids=pids)


def _collect_errors(name: str, gp: GatewayProcess, problems: list[str]) -> None:
    lines = [line for line in gp.output().splitlines() if " ERROR " in line or line.startswith("Traceback")]
    problems.extend(f"[gateway {name}] {line[:300]}" for line in lines[:5])
    if len(lines) > 5:
        problems.append(f"[gateway {name}] ... and {len(lines) - 5} more error lines")


async def warm_up(ctx: SoakContext, needed: set[str]) -> None:
    """First calls out of the counts: imports, the resolver's threads, first-use caches."""
    bases = {getattr(ctx.targets, name) for name in needed} or set()
    for base in bases:
        http = GatewayHTTPClient(base, connect_timeout=10.0)
        (cid,) = await create_conversations(http, 1)
        async with http.stream_post(btw_path(cid), {"question": "warm-up"}) as stream:
            await anext(stream)
        async with EventStreamClient(http.url(events_path(cid)), initial_reconnect_delay=0.05):
            await asyncio.sleep(0.05)
    gc.collect()


async def _measure(ctx: SoakContext, sink: WarningSink, number: int) -> ScenarioResult:
    spec = SCENARIOS[number]
    expected = WarningSink.is_finalizer_warning if spec.expects_finalizer_warnings else None
    return await measure(ctx, sink, number, spec.name, spec.run, expected_warning=expected)


async def measure(ctx: SoakContext, sink: WarningSink, number: int, name: str, run: ScenarioFn, *,
                  expected_warning: Callable[[WarningRecord], bool] | None = None) -> ScenarioResult:
    """Run one scenario between two resource snapshots and fill in what it left behind.

    Leaked fds and tasks are counted after a bounded settle (garbage collected, at most 3 s); every
    warning raised meanwhile is the scenario's, expected when ``expected_warning`` says so. Consumer
    tasks the scenario reported as stuck are cancelled again and reaped here. A scenario that raises is
    reported as an error; the run goes on.
    """
    res = ScenarioResult(number, name)
    ctx.stuck.clear()
    gc.collect()
    await asyncio.sleep(0.05)
    before = Snapshot.now()
    reset_peak_rss()
    res.figures["rss_start_mb"] = round(rss_mb(), 1)
    sink.begin(expected_warning)
    gc_mark = ctx.gc_pauses.mark()
    t0 = time.perf_counter()
    try:
        await run(ctx, res)
    except Exception as exc:  # a crashed scenario is reported as an error, the run goes on
        res.error(f"scenario crashed: {_describe(exc)}")
        res.notes.append("".join(traceback.format_exception(exc, limit=6))[-2000:])
    if ctx.stuck:
        for task in ctx.stuck:
            task.cancel()
        _, pending = await asyncio.wait(ctx.stuck, timeout=5.0)
        res.notes.append(f"{len(ctx.stuck)} consumer task(s) survived a forced cancel for 5 s; "
                         f"{len(pending)} still running at the end")
        ctx.stuck.clear()
    if hung_stacks:
        res.notes.extend(f"hung consumer was waiting in:\n{stack}" for stack in hung_stacks)
        hung_stacks.clear()
    after = await settle(before, within=3.0)
    res.duration_s = time.perf_counter() - t0
    res.leaked_fds += max(0, after.fds - before.fds)
    res.leaked_tasks += max(0, after.tasks - before.tasks)
    res.peak_rss_mb = peak_rss_mb()
    res.figures["gc"] = ctx.gc_pauses.summary(gc_mark)
    tally = sink.end()
    res.expected_warnings += tally.expected
    res.warnings += tally.unexpected
    res.warning_samples.extend(f"[{w.source}] {w.short()}" for w in tally.samples)
    declared = res.figures.get("expected_finalizer_warnings")
    if isinstance(declared, int) and declared != res.expected_warnings:
        res.error(f"expected {declared} finalizer ResourceWarnings, saw {res.expected_warnings}")
    if res.leaked_tasks:
        me = asyncio.current_task()
        names = sorted(t.get_name() for t in asyncio.all_tasks() if t is not me)
        res.notes.append(f"tasks alive after the scenario: {names[:10]}")
    return res


def _describe(exc: BaseException) -> str:
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(_describe(e) for e in exc.exceptions[:3])
    return f"{type(exc).__name__}: {exc}"
