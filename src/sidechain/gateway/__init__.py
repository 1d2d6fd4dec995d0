"""The sidechain gateway: conversations with resumable event streams, btw side questions, a durable log.

``create_app(config)`` builds the Starlette app; ``sidechain serve`` runs it under uvicorn;
:mod:`sidechain.gateway.testing` runs it in tests. The wire contract is in ``docs/protocol.md``.
"""

from __future__ import annotations

from .app import create_app
from .config import GatewayConfig
from .service import Gateway

__all__ = ["Gateway", "GatewayConfig", "create_app"]
