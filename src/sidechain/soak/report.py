"""The soak's table: rich for the terminal, Markdown for the docs, JSON for machines."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from .model import FAILURE_COUNTERS, ScenarioResult, SoakReport

__all__ = ["markdown_table", "print_report", "write_json"]

COLUMNS = (
    "#", "scenario", "ops", "leaked fds", "leaked tasks", "hung", "warnings", "lost", "repeated", "errors",
    "release p50 ms", "release p99 ms", "peak RSS MB",
)

#: Latency target of the issue, for the cancel-to-release p99 at full size.
P99_TARGET_MS = 5.0


def _num(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}" if value < 100 else f"{value:.0f}"


def _cells(r: ScenarioResult) -> list[str]:
    if r.skipped:
        return [str(r.number), r.name, "skipped", *[""] * (len(COLUMNS) - 3)]
    counters = [str(getattr(r, name)) for name in FAILURE_COUNTERS]
    return [str(r.number), r.name, f"{r.operations:,}", *counters, _num(r.p50), _num(r.p99),
            f"{r.peak_rss_mb:.0f}"]


def render_table(results: Sequence[ScenarioResult], title: str) -> Table:
    table = Table(title=title, title_justify="left", show_lines=False)
    for i, name in enumerate(COLUMNS):
        table.add_column(name, justify="left" if i == 1 else "right", no_wrap=i != 1)
    for r in results:
        cells = _cells(r)
        styled: list[Text] = []
        for i, cell in enumerate(cells):
            style = ""
            if 3 <= i < 3 + len(FAILURE_COUNTERS) and cell not in ("", "0"):
                style = "bold red"
            elif 3 <= i < 3 + len(FAILURE_COUNTERS):
                style = "green"
            styled.append(Text(cell, style=style))
        table.add_row(*styled)
    return table


def print_report(report: SoakReport, console: Console | None = None, *, title: str | None = None,
                 verdict: bool = True) -> None:
    """The table, then per scenario what it did (notes), its errors and warnings, then (``verdict``) the
    latency target and whether every failure counter is zero."""
    console = console or Console(width=max(170, Console().width))
    head = title or (f"sidechain soak ({report.mode}, {report.duration_s:.0f} s, client loop {report.loop}, "
                     f"{report.target})")
    console.print(render_table(report.results, head))
    for r in report.results:
        lines: list[str] = []
        if r.release_label and r.release_ms:
            lines.append(f"release = {r.release_label} ({len(r.release_ms):,} samples)")
        lines.extend(escape(n) for n in r.notes)
        if r.expected_warnings:
            lines.append(f"{r.expected_warnings} expected ResourceWarnings from sidechain's finalizers "
                         "(caught, not failures)")
        for kind, count in r.error_samples.items():
            lines.append(f"[red]error x{count}: {escape(kind)}[/red]")
        lines.extend(f"[red]warning: {escape(w)}[/red]" for w in r.warning_samples)
        lines.extend(f"[red]target missed: {escape(f)}[/red]" for f in r.failures)
        if lines:
            console.print(f"[bold]{r.number}. {r.name}[/bold]")
            for line in lines:
                console.print(f"   {line}", highlight=False, markup=True)
    for w in report.stray_warnings:
        console.print(f"[red]warning outside every scenario: {escape(w)}[/red]")
    slow = report.context.get("asyncio_slow_callbacks")
    if slow:
        console.print(f"(asyncio debug mode: {slow} slow-callback lines logged, not counted)")
    if not verdict:
        return
    p99s = [r.p99 for r in report.results if r.number in (1, 8) and r.p99 is not None]
    if p99s and report.mode == "full":
        worst = max(p99s)
        outcome = "met" if worst <= P99_TARGET_MS else "missed"
        console.print(f"cancel-to-release p99 target (≤ {P99_TARGET_MS:.0f} ms at full size): {outcome} "
                      f"({worst:.2f} ms)")
    console.print("[bold green]PASS[/bold green]: every failure counter is zero" if report.ok
                  else "[bold red]FAIL[/bold red]: a failure counter is not zero")


def markdown_table(results: Sequence[ScenarioResult]) -> str:
    """The same table as GitHub Markdown."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" if i == 1 else "--:"
                                                                 for i in range(len(COLUMNS))) + "|"]
    for r in results:
        lines.append("| " + " | ".join(_cells(r)) + " |")
    return "\n".join(lines)


def write_json(report: SoakReport, path: str | Path) -> None:
    Path(path).write_text(json.dumps(report.to_json(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
