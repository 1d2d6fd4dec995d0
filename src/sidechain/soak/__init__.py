"""The chaos and soak suite (``sidechain soak``): the client's guarantees under load and faults, in figures.

Each scenario runs real traffic against a real gateway (child processes, so the fds and tasks counted
here are the client's alone) and reports leaked fds and tasks, hung consumers, warnings, lost and
repeated events, unexpected errors, cancel-to-release latency and peak RSS. See ``docs/soak.md``.
"""

from __future__ import annotations

from .context import FULL, QUICK, Sizes
from .model import FAILURE_COUNTERS, ScenarioResult, SoakReport
from .runner import DEFAULT_SCENARIOS, SCENARIOS, SoakOptions, run_soak

__all__ = [
    "DEFAULT_SCENARIOS",
    "FAILURE_COUNTERS",
    "FULL",
    "QUICK",
    "SCENARIOS",
    "ScenarioResult",
    "Sizes",
    "SoakOptions",
    "SoakReport",
    "run_soak",
]
