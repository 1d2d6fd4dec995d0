"""Helpers to run a real gateway in tests: in-process (:func:`running_gateway`) or as a subprocess
(:class:`GatewayProcess`). Both bind 127.0.0.1 only and clean up fully on every path.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from starlette.applications import Starlette

from .app import create_app
from .config import GatewayConfig
from .server import GatewayServer, uvicorn_config
from .service import Gateway

__all__ = ["GatewayProcess", "RunningGateway", "running_gateway"]

_LISTENING = re.compile(r"sidechain gateway listening on (http://\S+)")


@dataclass(frozen=True)
class RunningGateway:
    """A gateway serving on 127.0.0.1. ``url`` has no trailing slash (``http://127.0.0.1:PORT``)."""

    url: str
    port: int
    app: Starlette
    gateway: Gateway
    config: GatewayConfig
    server: GatewayServer

    def headers(self) -> dict[str, str]:
        """``Authorization`` for the configured token (empty when there is none)."""
        return {"Authorization": f"Bearer {self.config.token}"} if self.config.token else {}


@asynccontextmanager
async def running_gateway(
    config: GatewayConfig | None = None, /, *, startup_timeout: float = 10.0, **overrides: Any
) -> AsyncIterator[RunningGateway]:
    """Serve the gateway in this event loop on 127.0.0.1 with an ephemeral port.

    ``config`` (default: memory store, no access log) is updated with ``overrides`` (any
    :class:`GatewayConfig` field); host and port are always 127.0.0.1:0. On exit, on every path
    (error, cancellation), the server shuts down gracefully (streams get ``gateway.shutdown``), the
    gateway closes (store flushed and closed) and the server task is awaited; if that takes longer
    than ``shutdown_grace + 10`` s, the server is forced down and cancelled.
    """
    base = config if config is not None else GatewayConfig(access_log=False)
    cfg = base.replace(**overrides).replace(host="127.0.0.1", port=0)
    app = create_app(cfg)
    gateway: Gateway = app.state.gateway
    server = GatewayServer(uvicorn_config(app, cfg), gateway)
    task = asyncio.get_running_loop().create_task(server.serve(), name="sidechain-test-gateway")
    try:
        listening = asyncio.get_running_loop().create_task(server.listening.wait())
        try:
            await asyncio.wait(
                {task, listening}, timeout=startup_timeout, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            listening.cancel()
            await asyncio.gather(listening, return_exceptions=True)
        if not server.listening.is_set():
            if task.done():
                task.result()  # raises the startup error
            raise TimeoutError(f"the gateway did not start within {startup_timeout} s")
        yield RunningGateway(server.url, server.port, app, gateway, cfg, server)
    finally:
        server.should_exit = True
        try:
            async with asyncio.timeout(cfg.shutdown_grace + 10):
                await asyncio.shield(task)
        except TimeoutError:
            server.force_exit = True
            task.cancel()
        finally:
            # the server task is always finished here; re-raise its error only if nothing else is raised
            await asyncio.gather(task, return_exceptions=True)
        if not task.cancelled() and task.exception() is not None and sys.exc_info()[0] is None:
            raise task.exception()  # type: ignore[misc]


class GatewayProcess:
    """``python -m sidechain serve`` in a subprocess on 127.0.0.1, for restart and signal tests.

    ``store`` defaults to a sqlite file in a private temporary directory, kept across :meth:`restart`
    (which reuses the same port) and removed on :meth:`close`. Output (stdout and stderr) goes to a
    log file, readable with :meth:`output`. Use as ``async with GatewayProcess(...) as gp:``; on exit
    the process is killed if still running and always reaped, and the temporary directory removed.
    """

    def __init__(
        self,
        *args: str,
        store: str | None = None,
        port: int = 0,
        token: str | None = None,
        env: dict[str, str] | None = None,
        startup_timeout: float = 30.0,
    ) -> None:
        self.args: tuple[str, ...] = args
        self._tmp = tempfile.TemporaryDirectory(prefix="sidechain-gw-")
        self.store = (
            store if store is not None else "sqlite:" + os.path.join(self._tmp.name, "gateway.sqlite3")
        )
        self.port = port
        self.token = token
        self.env = env
        self.startup_timeout = startup_timeout
        self.url = ""
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_path = os.path.join(self._tmp.name, "gateway.log")
        self._log_offset = 0

    async def __aenter__(self) -> GatewayProcess:
        try:
            await self.start()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.returncode

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def command(self) -> list[str]:
        cmd = [
            sys.executable,
            "-m",
            "sidechain",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--store",
            self.store,
        ]
        if self.token:
            cmd += ["--token", self.token]
        return cmd + list(self.args)

    def output(self) -> str:
        """Everything the process (and earlier runs of it) wrote so far."""
        try:
            with open(self._log_path, encoding="utf-8", errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def _spawn(self) -> None:
        self._log_offset = len(self.output().encode())
        with open(self._log_path, "ab") as log_file:
            self.proc = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,
            )

    def _fresh_output(self) -> str:
        with open(self._log_path, "rb") as f:
            f.seek(self._log_offset)
            return f.read().decode("utf-8", "replace")

    async def start(self) -> str:
        """Start the process and wait for its listening line; returns the URL.

        Raises ``RuntimeError`` (with the output) if it exits first, ``TimeoutError`` after
        ``startup_timeout`` (the process is killed and reaped in both cases).
        """
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError("the gateway process is already running")
        self._spawn()
        assert self.proc is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.startup_timeout
        try:
            while True:
                fresh = self._fresh_output()
                match = _LISTENING.search(fresh)
                if match:
                    self.url = match.group(1)
                    self.port = int(self.url.rsplit(":", 1)[1])
                    return self.url
                if self.proc.poll() is not None:
                    raise RuntimeError(
                        f"the gateway exited with {self.proc.returncode} before listening:\n{fresh}"
                    )
                if loop.time() > deadline:
                    raise TimeoutError(
                        f"the gateway did not listen within {self.startup_timeout} s:\n{fresh}"
                    )
                await asyncio.sleep(0.02)
        except BaseException:
            await self.kill()
            raise

    async def wait(self, seconds: float = 30.0) -> int:
        """Wait up to ``seconds`` for the process to exit; returns its status.

        Raises ``subprocess.TimeoutExpired`` if it does not exit in time.
        """
        proc = self.proc
        if proc is None:
            raise RuntimeError("the gateway process was never started")
        return await asyncio.to_thread(proc.wait, seconds)

    async def send_signal(self, sig: int, seconds: float = 30.0) -> int:
        """Send ``sig`` and wait for the exit; returns the exit status (negative: killed by a signal)."""
        proc = self.proc
        if proc is None:
            raise RuntimeError("the gateway process was never started")
        if proc.poll() is None:
            proc.send_signal(sig)
        try:
            return await self.wait(seconds)
        except subprocess.TimeoutExpired:
            proc.kill()
            await self.wait(seconds)
            raise

    async def kill(self) -> int:
        """SIGKILL: no cleanup at all in the gateway (what a crash looks like). Returns the status."""
        return await self.send_signal(signal.SIGKILL)

    async def terminate(self, seconds: float = 30.0) -> int:
        """SIGTERM: a graceful shutdown. Returns the exit status (0 when it shut down cleanly)."""
        return await self.send_signal(signal.SIGTERM, seconds)

    async def restart(self, *, kill: bool = False) -> str:
        """Stop (SIGTERM, or SIGKILL with ``kill=True``) if running, then start on the same port and store."""
        if self.proc is not None and self.proc.poll() is None:
            await (self.kill() if kill else self.terminate())
        return await self.start()

    async def close(self) -> None:
        """Kill the process if it still runs, reap it, remove the temporary directory. Idempotent."""
        try:
            if self.proc is not None and self.proc.poll() is None:
                await self.kill()
        finally:
            self._tmp.cleanup()
