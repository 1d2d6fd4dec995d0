"""``sidechain soak --quick``: the chaos and soak suite at CI size, with every failure counter zero.

The soak starts its own gateways as child processes and catches every warning it provokes (scenario 5
drops streams on purpose: their ``ResourceWarning`` is counted inside the soak as expected), so nothing
reaches pytest's ``-W error``.
"""

from __future__ import annotations

import asyncio
import json
import random
import socket
import warnings
from pathlib import Path
from typing import Any

import pytest

from sidechain.cli import main
from sidechain.soak import DEFAULT_SCENARIOS, FAILURE_COUNTERS, QUICK, ScenarioResult
from sidechain.soak.context import SoakContext, Targets
from sidechain.soak.probes import WarningSink, await_or_hang
from sidechain.soak.runner import measure


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
