"""Save an SVG screenshot of the chat app: a main turn streaming with a btw panel open.

``python -m sidechain.tui.screenshot docs/tui.svg`` starts an in-process gateway (echo model), runs the
app headless, sends a message, asks a btw while the answer streams and saves the screen once both
panes show text.
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from ..gateway.testing import running_gateway
from .app import ChatApp

MESSAGE = (
    "Explain in a few words why an **event stream** should resume with `Last-Event-ID` after a dropped "
    "connection, and why a side question must never block the main answer: the user keeps reading one "
    "while asking the other, a reconnect must not replay a single delta twice, a slow reader must not "
    "grow the gateway's memory, and quitting in the middle of both streams must release every "
    "connection and task it opened."
)
QUESTION = "what did I ask about, in one line?"


async def save(path: Path, *, size: tuple[int, int] = (120, 34), within: float = 30.0) -> None:
    """Write the screenshot to ``path``."""
    async with running_gateway(echo_pace=10) as gw:
        app = ChatApp(gw.url)
        async with asyncio.timeout(within), app.run_test(size=size) as pilot:
            while app.events is None or app.events.status != "open":
                await pilot.pause(0.05)
            app.run_command(MESSAGE)
            while not any(len(a.source) > 150 for a in app.answers.values()):
                await pilot.pause(0.05)
            app.run_command(f"/btw {QUESTION}")
            while not app.btw_panel.exchanges or len(app.btw_panel.exchanges[-1].answer.source) < 170:
                await pilot.pause(0.05)
            app.status_bar.url = "http://127.0.0.1:8765"  # not the test gateway's random port
            app.prompt.value = "/btw and how does a follow-up continue the thread?"
            await pilot.pause(0.2)
            app.save_screenshot(filename=path.name, path=str(path.parent))
            await app.action_quit()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("path", type=Path, nargs="?", default=Path("docs/tui.svg"))
    args = parser.parse_args()
    asyncio.run(save(args.path))
    print(f"wrote {args.path}")


if __name__ == "__main__":
    main()
