"""The soak's scenarios. Each one drives real traffic against a real gateway and fills a
:class:`~sidechain.soak.model.ScenarioResult`; the runner measures fds, tasks, warnings and RSS around it.

Every task a scenario starts is awaited before it returns (a task that survives even a forced cancel
is handed to the runner in ``ctx.stuck``); every client object is closed on every path.
"""

from __future__ import annotations

from .cancel_storm import scenario_cancel_storm
from .dropped import scenario_dropped_streams
from .faults import scenario_faults
from .mixed import scenario_mixed_soak
from .restart import scenario_restart
from .session_close import scenario_session_close
from .slow_consumers import scenario_slow_consumers
from .stalls import scenario_stalls

__all__ = [
    "scenario_cancel_storm",
    "scenario_dropped_streams",
    "scenario_faults",
    "scenario_mixed_soak",
    "scenario_restart",
    "scenario_session_close",
    "scenario_slow_consumers",
    "scenario_stalls",
]
