"""The figures a soak run produces: one :class:`ScenarioResult` per scenario, in a :class:`SoakReport`."""

from __future__ import annotations

import platform
import sys
from dataclasses import dataclass, field
from typing import Any

from .probes import percentile

__all__ = ["FAILURE_COUNTERS", "ScenarioResult", "SoakReport"]

#: The counters that must all be zero for a run to pass.
FAILURE_COUNTERS = (
    "leaked_fds",
    "leaked_tasks",
    "hung_consumers",
    "warnings",
    "lost_events",
    "repeated_events",
    "errors",
)


@dataclass
class ScenarioResult:
    """What one scenario did and what it left behind.

    ``release_ms`` holds the cancel-to-release (or close-to-release) latencies the scenario measured;
    ``expected_warnings`` counts warnings the scenario provokes on purpose (scenario 5's
    ``ResourceWarning``), which are not failures. ``failures`` lists broken targets that are not
    counters (scenario 8's drift); any entry fails the run like a counter would.
    """

    number: int
    name: str
    operations: int = 0
    leaked_fds: int = 0
    leaked_tasks: int = 0
    hung_consumers: int = 0
    warnings: int = 0
    lost_events: int = 0
    repeated_events: int = 0
    errors: int = 0
    release_ms: list[float] = field(default_factory=list)
    release_label: str = ""
    peak_rss_mb: float = 0.0
    expected_warnings: int = 0
    duration_s: float = 0.0
    skipped: str | None = None
    notes: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    warning_samples: list[str] = field(default_factory=list)
    error_samples: dict[str, int] = field(default_factory=dict)
    figures: dict[str, Any] = field(default_factory=dict)

    def error(self, kind: str, count: int = 1) -> None:
        """Count an unexpected outcome, by kind (shown in the notes)."""
        self.errors += count
        self.error_samples[kind] = self.error_samples.get(kind, 0) + count

    @property
    def failed(self) -> bool:
        if self.skipped:
            return False
        return any(getattr(self, name) for name in FAILURE_COUNTERS) or bool(self.failures)

    @property
    def p50(self) -> float | None:
        return percentile(self.release_ms, 0.50)

    @property
    def p99(self) -> float | None:
        return percentile(self.release_ms, 0.99)

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "scenario": self.number,
            "name": self.name,
            "operations": self.operations,
        }
        for name in FAILURE_COUNTERS:
            data[name] = getattr(self, name)
        data.update(
            {
                "release_p50_ms": _round(self.p50),
                "release_p99_ms": _round(self.p99),
                "release_samples": len(self.release_ms),
                "release_label": self.release_label,
                "peak_rss_mb": round(self.peak_rss_mb, 1),
                "expected_warnings": self.expected_warnings,
                "duration_s": round(self.duration_s, 2),
                "skipped": self.skipped,
                "failed": self.failed,
                "failures": self.failures,
                "notes": self.notes,
                "warning_samples": self.warning_samples,
                "error_samples": self.error_samples,
                "figures": self.figures,
            }
        )
        return data


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


@dataclass
class SoakReport:
    """Every scenario's result and the run's context."""

    mode: str
    target: str
    #: The client's event loop: ``asyncio`` or ``uvloop``.
    loop: str = "asyncio"
    results: list[ScenarioResult] = field(default_factory=list)
    duration_s: float = 0.0
    context: dict[str, Any] = field(default_factory=dict)
    #: Warnings raised outside every scenario (warm-up, gateway teardown): failures too.
    stray_warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not any(r.failed for r in self.results) and not self.stray_warnings

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "mode": self.mode,
            "target": self.target,
            "loop": self.loop,
            "duration_s": round(self.duration_s, 1),
            "python": sys.version.split()[0],
            "platform": platform.platform(),
            "context": self.context,
            "stray_warnings": self.stray_warnings,
            "failure_counters": list(FAILURE_COUNTERS),
            "scenarios": [r.to_json() for r in self.results],
        }
