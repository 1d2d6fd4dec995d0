"""``sidechain soak --quick``: the chaos and soak suite at CI size, with every failure counter zero.

The soak starts its own gateways as child processes and catches every warning it provokes (scenario 5
drops streams on purpose: their ``ResourceWarning`` is counted inside the soak as expected), so nothing
reaches pytest's ``-W error``.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import json
import random
import socket
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from sidechain.cli import main
from sidechain.client import btw as btwmod
from sidechain.client import http as httpmod
from sidechain.errors import ReadError
from sidechain.soak import DEFAULT_SCENARIOS, FAILURE_COUNTERS, QUICK, ScenarioResult, runner
from sidechain.soak.context import SoakContext, Targets
from sidechain.soak.probes import WarningSink, await_or_hang
from sidechain.soak.runner import SoakOptions, measure, run_soak
from sidechain.soak.scenarios._common import count_comparison
from sidechain.soak.scenarios.faults import check_stream_result
from sidechain.soak.scenarios.session_close import wrong_outcome
from sidechain.soak.scenarios.slow_consumers import check_bounds, read_buffer_bound
from sidechain.soak.scenarios.stalls import fired_in_time
from sidechain.soak.wire import BtwReference, Comparison, compare_id_list, compare_ids


@pytest.mark.timeout(240)
@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_soak_quick_has_every_failure_counter_at_zero(
    loop: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "soak.json"
    code = main(["soak", "--quick", "--loop", loop, "--json", str(out)])
    table = capsys.readouterr().out
    report = json.loads(out.read_text(encoding="utf-8"))
    assert report["loop"] == loop and f"client loop {loop}" in table
    scenarios = {s["scenario"]: s for s in report["scenarios"]}
    failing = {
        n: {c: s[c] for c in FAILURE_COUNTERS if s[c]}
        | {"notes": s["notes"], "errors": s["error_samples"], "warnings": s["warning_samples"]}
        for n, s in scenarios.items()
        if s["failed"]
    }
    assert code == 0 and report["ok"], f"{failing}\n{report['stray_warnings']}\n{table}"
    assert sorted(scenarios) == list(DEFAULT_SCENARIOS)
    for n, s in scenarios.items():
        assert s["skipped"] is None, (n, s["skipped"])
        assert s["operations"] > 0, n
        for counter in FAILURE_COUNTERS:
            assert s[counter] == 0, (n, counter, s)
    # the cancel-to-release latency is measured and reported (its 5 ms target applies at full size)
    storm = scenarios[1]
    assert storm["release_samples"] >= 100
    assert storm["release_p50_ms"] is not None and storm["release_p99_ms"] is not None
    assert scenarios[2]["release_p99_ms"] is not None
    # scenario 5's dropped streams warned, and those warnings stayed inside the soak
    assert scenarios[5]["expected_warnings"] >= scenarios[5]["operations"]
    assert "release p99 ms" in table


async def test_measure_counts_leaks_hangs_and_warnings() -> None:
    """The counters see what a scenario leaves behind (without any gateway)."""
    kept: list[Any] = []

    async def leaky(ctx: SoakContext, res: ScenarioResult) -> None:
        loop = asyncio.get_running_loop()
        kept.append(socket.socket())  # an fd
        kept.append(loop.create_task(asyncio.Event().wait()))  # a task nobody ends
        warnings.warn("left open on purpose", ResourceWarning, stacklevel=1)

        async def fail() -> None:
            raise ValueError("nobody retrieves this")

        failing = loop.create_task(fail())
        await asyncio.sleep(0)
        del failing  # "Task exception was never retrieved" when collected

        async def stubborn() -> None:
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                await asyncio.sleep(0.3)  # does not end within the grace after its cancel

        task = loop.create_task(stubborn())
        await asyncio.sleep(0)
        task.cancel()
        if not await await_or_hang(task, ctx.stuck, grace=0.1, force_wait=1.0):
            res.hung_consumers += 1

    ctx = SoakContext(Targets("http://127.0.0.1:9", "http://127.0.0.1:9", "http://127.0.0.1:9"), QUICK,
                      random.Random(0), lambda message: None)
    try:
        with WarningSink() as sink:
            res = await measure(ctx, sink, 0, "leaky", leaky)
    finally:
        kept[0].close()
        kept[1].cancel()
        await asyncio.gather(kept[1], return_exceptions=True)
    assert res.leaked_fds == 1 and res.leaked_tasks == 1, res
    assert res.hung_consumers == 1
    assert res.warnings == 2, res.warning_samples  # the ResourceWarning and the unretrieved exception
    assert res.failed


# -- the harness counts the faults it is there to find (each injected in-process) -----------------------


def _result() -> ScenarioResult:
    return ScenarioResult(0, "unit")


def _events(*ids: int) -> list[tuple[str, str, str]]:
    return [(str(n), "btw.delta", f'{{"delta": "d{n}"}}') for n in ids]


def test_events_out_of_order_are_counted() -> None:
    """Two events swapped (each once, right bytes): an error, in every comparison of ids."""
    ref = _events(1, 2, 3, 4, 5)
    cmp = compare_ids(ref, _events(1, 2, 4, 3, 5), complete=True)
    assert (cmp.lost, cmp.repeated, cmp.differing, cmp.out_of_order) == (0, 0, 0, 1)
    assert compare_ids(ref, _events(1, 2, 3, 3, 4), complete=False).out_of_order == 0  # a repeat only
    assert compare_id_list([1, 2, 4, 3, 5], 5).out_of_order == 1
    assert compare_id_list([1, 2, 3, 3, 5], 5) == Comparison(1, 1, 0, 0)
    res = _result()
    count_comparison(res, cmp)
    assert res.failed and res.error_samples == {"events delivered out of order": 1}
    # scenario 3: the normalized list must equal the reference exactly
    reference = BtwReference(tuple(ref), ("d1",), "x")
    res = _result()
    check_stream_result(reference, _events(1, 2, 4, 3, 5), res)
    assert res.errors == 2 and "stream_post result differs from the uninterrupted one" in res.error_samples
    res = _result()
    check_stream_result(reference, _events(1, 2, 3, 4, 5), res)
    assert not res.failed


def test_scenario_2_outcome_other_than_invalidated_is_an_error_whenever_it_came() -> None:
    assert wrong_outcome("invalidated", before_close=False, can_end=False) is None
    assert wrong_outcome("ended", before_close=True, can_end=True) is None  # a whole btw answer
    assert wrong_outcome("ReadError", before_close=True, can_end=True) is not None
    assert wrong_outcome("ended", before_close=True, can_end=False) is not None  # an event stream
    assert wrong_outcome("ended", before_close=False, can_end=True) is not None


def test_scenario_4_deadline_firing_early_is_an_error() -> None:
    assert fired_in_time(0.5, 0.5) and fired_in_time(0.5, 0.4985) and fired_in_time(0.5, 1.5)
    assert not fired_in_time(0.5, 0.48)  # 4 % early: passed the old 0.95 x deadline bound
    assert not fired_in_time(0.5, 0.4975) and not fired_in_time(0.5, 1.51)


def test_scenario_7_bounds_and_slow_consumer_event_are_checked() -> None:
    ok = {"items_peak": 64, "items_bound": 64, "bytes_peak": 533 * 1024,
          "bytes_bound": read_buffer_bound(512 * 1024), "dropped": True, "past_grace": False,
          "slow_consumer_events": 1}
    res = _result()
    check_bounds(res, **ok)  # type: ignore[arg-type]
    assert not res.failed
    for change in ({"items_peak": 300}, {"bytes_peak": 4 << 20}, {"slow_consumer_events": 0}):
        res = _result()
        check_bounds(res, **(ok | change))  # type: ignore[arg-type]
        assert res.errors == 1, change
    res = _result()
    check_bounds(res, **(ok | {"slow_consumer_events": 0, "past_grace": True}))  # type: ignore[arg-type]
    assert not res.failed


async def test_warnings_between_two_scenario_windows_are_stray(monkeypatch: pytest.MonkeyPatch) -> None:
    """A warning raised after one scenario's window closed and before the next one opens (here: during
    the garbage collection ``measure`` runs before opening its window) fails the run as stray."""
    real_collect = gc.collect

    def collect(*args: Any) -> int:
        if sys._getframe(1).f_code.co_name == "measure":
            warnings.warn("raised between two windows", ResourceWarning, stacklevel=1)
        return real_collect(*args)

    monkeypatch.setattr(runner, "gc", SimpleNamespace(collect=collect))

    async def idle(ctx: SoakContext, res: ScenarioResult) -> None:
        res.operations += 1

    monkeypatch.setattr(runner, "SCENARIOS", {1: runner.ScenarioSpec("idle", idle, ())})
    report = await run_soak(SoakOptions(quick=True, scenarios=(1,), progress=False))
    assert [r.failed for r in report.results] == [False]
    assert not report.ok
    assert any("raised between two windows" in w for w in report.stray_warnings), report.stray_warnings


@pytest.mark.timeout(180)
async def test_soak_counts_truncated_answers_and_readers_failing_before_the_close(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Scenario 1: btw answers that stop early without an error (after the calibration calls) are
    counted. Scenario 2: a pooled-session reader failing with ReadError before the close is an error."""
    conc = 10
    monkeypatch.setattr(runner, "QUICK", QUICK.replace(s1_calls=80, s1_concurrency=conc, s2_sessions=6,
                                                       s2_parallel=3))
    made = itertools.count()
    real_anext = btwmod.BtwAnswer.__anext__

    async def truncating_anext(self: Any) -> str:
        if not hasattr(self, "soak_test_n"):
            self.soak_test_n, self.soak_test_index = 0, next(made)
        if self.soak_test_index >= conc // 2 and self.soak_test_n >= 10:  # calibration answers pass
            raise StopAsyncIteration
        delta: str = await real_anext(self)
        self.soak_test_n += 1
        return delta

    monkeypatch.setattr(btwmod.BtwAnswer, "__anext__", truncating_anext)
    real_stream_post = httpmod.GatewayHTTPClient.stream_post
    n = itertools.count()

    class Failing:
        async def __aenter__(self) -> None:
            raise ReadError("injected: reset before the session was closed")

        async def __aexit__(self, *exc: object) -> bool:
            return False

    def stream_post(self: Any, path: str, json: Any = None, **kw: Any) -> Any:
        if kw.get("session") is not None and next(n) % 2 == 0:
            return Failing()
        return real_stream_post(self, path, json, **kw)

    monkeypatch.setattr(httpmod.GatewayHTTPClient, "stream_post", stream_post)
    report = await run_soak(SoakOptions(quick=True, scenarios=(1, 2), progress=False))
    storm, close = report.results
    assert storm.lost_events > 0, storm
    assert storm.error_samples.get("call returned without completing", 0) > 0, storm.error_samples
    assert close.error_samples.get(
        "reader ended with ReadError before the close instead of SessionInvalidated", 0) > 0, close


async def test_error_lines_in_a_gateways_log_are_collected(tmp_path: Path) -> None:
    """What a gateway process logs as an error reaches the soak report (as stray warnings, which fail the
    run): here a gateway that cannot start because its store is in use."""
    from sidechain.gateway.eventlog import SqliteEventLog
    from sidechain.gateway.testing import GatewayProcess
    from sidechain.soak.runner import _collect_errors

    store = tmp_path / "gw.sqlite3"
    holder = SqliteEventLog(str(store), retention=10)
    await holder.open(lambda events: None)
    gp = GatewayProcess("--no-access-log", store=f"sqlite:{store}")
    try:
        with pytest.raises(RuntimeError):
            await gp.start()
        problems: list[str] = []
        _collect_errors("paced", gp, problems)
        assert problems and all(p.startswith("[gateway paced] ") for p in problems), problems
        assert any("Application startup failed" in p for p in problems), problems
    finally:
        await gp.close()
        await holder.close()
