"""Start a local gateway as a child process for the length of a command (``make run``, ``--with-gateway``).

The child is the real ``sidechain serve`` on 127.0.0.1 with an ephemeral port; it is stopped with
SIGTERM (then SIGKILL after a grace period) and reaped on every exit path, Ctrl-C included.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import sys
from collections.abc import AsyncIterator, Sequence

__all__ = ["local_gateway"]

_LISTENING = re.compile(rb"listening on (http://\S+)")


@contextlib.asynccontextmanager
async def local_gateway(
    extra_args: Sequence[str] = (), *, startup_timeout: float = 30.0, echo_output: bool = False
) -> AsyncIterator[str]:
    """Run ``sidechain serve --port 0`` and yield its base URL; stop and reap it on exit."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sidechain", "serve", "--host", "127.0.0.1", "--port", "0",
        "--no-access-log", *extra_args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        start_new_session=True,  # Ctrl-C in the terminal goes to us, and we stop the gateway cleanly
    )
    assert proc.stdout is not None
    drain: asyncio.Task[None] | None = None
    try:
        seen = b""
        async with asyncio.timeout(startup_timeout):
            while True:
                line = await proc.stdout.readline()
                if not line:
                    output = seen.decode(errors="replace")
                    raise RuntimeError("the gateway exited before listening:\n" + output)
                seen += line
                match = _LISTENING.search(line)
                if match:
                    url = match.group(1).decode().rstrip("/")
                    break

        async def pump() -> None:
            assert proc.stdout is not None
            while line := await proc.stdout.readline():
                if echo_output:
                    sys.stderr.write(line.decode(errors="replace"))

        drain = asyncio.get_running_loop().create_task(pump())
        yield url
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(10):
                    await proc.wait()
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        if drain is not None:
            await asyncio.wait({drain}, timeout=2)
            drain.cancel()
            await asyncio.wait({drain})
