"""``sidechain soak``: the chaos and soak suite from the command line."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from .. import loops
from ..loops import LOOP_CHOICES

__all__ = ["add_soak_command", "cmd_soak", "parse_scenarios"]


def parse_scenarios(text: str) -> tuple[int, ...]:
    """``"1,2,5"`` or ``"1-4,7"`` → ``(1, 2, 5)`` / ``(1, 2, 3, 4, 7)``."""
    numbers: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        first, dash, last = part.partition("-")
        try:
            span = range(int(first), int(last) + 1) if dash else range(int(first), int(first) + 1)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a scenario list: {text!r}") from None
        numbers.extend(n for n in span if n not in numbers)
    if not numbers:
        raise argparse.ArgumentTypeError("no scenario given")
    return tuple(numbers)


def add_soak_command(sub: Any) -> None:
    """Register ``soak`` on the CLI's subparsers."""
    p = sub.add_parser(
        "soak",
        help="chaos and soak suite: leaks, hangs, lost or repeated events under load and faults",
        description="Start gateways on loopback (or target --url), run the bounded scenarios, print the "
        "table and exit 1 if any failure counter is not zero.",
    )
    p.add_argument("--quick", action="store_true", help="the reduced CI size (about a minute)")
    p.add_argument("--json", metavar="PATH", help="write the figures to PATH as JSON")
    p.add_argument("--markdown", action="store_true", help="also print the table as Markdown")
    p.add_argument("--url", help="target this gateway (no auth, loopback) instead of starting ones; "
                   "skips scenario 6 (it needs a restart)")
    p.add_argument("--scenarios", type=parse_scenarios, default=None,
                   help="comma-separated scenario numbers or ranges (default 1-7; 8 is the long soak)")
    p.add_argument("--duration", type=float, default=None,
                   help="seconds of scenario 8, the mixed soak (default 1800); giving it adds scenario 8")
    p.add_argument("--seed", type=int, default=6, help="random seed (cancel moments, fault offsets)")
    p.add_argument("--no-progress", action="store_true", help="no progress lines on stderr")
    p.add_argument("--loop", choices=LOOP_CHOICES, default=None,
                   help="the client's event loop (default auto: uvloop when installed, as uvicorn chooses; "
                   "env SIDECHAIN_LOOP)")
    p.set_defaults(func=cmd_soak)


def cmd_soak(args: argparse.Namespace) -> int:
    from .report import markdown_table, print_report, write_json
    from .runner import DEFAULT_SCENARIOS, SoakOptions, run_soak

    scenarios: tuple[int, ...] = args.scenarios or DEFAULT_SCENARIOS
    if args.duration is not None and 8 not in scenarios:
        scenarios = (*scenarios, 8)
    options = SoakOptions(quick=args.quick, url=args.url, scenarios=scenarios, duration=args.duration,
                          seed=args.seed, progress=not args.no_progress)
    try:
        report = loops.run(run_soak(options), loop=args.loop)
    except ValueError as exc:
        print(f"sidechain soak: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    print_report(report)
    if args.markdown:
        print(markdown_table(report.results))
    if args.json:
        write_json(report, args.json)
    return 0 if report.ok else 1
