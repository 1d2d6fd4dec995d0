"""Model backends: ``echo`` (embedded, offline) and ``openai:BASE_URL:MODEL`` (any compatible server)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import ChatMessage, ModelBackend, ModelError, ModelRequest, Snapshot
from .echo import EchoModel

if TYPE_CHECKING:  # pragma: no cover
    from ..config import GatewayConfig

__all__ = [
    "ChatMessage",
    "EchoModel",
    "ModelBackend",
    "ModelError",
    "ModelRequest",
    "Snapshot",
    "build_model",
    "parse_model_spec",
]


def parse_model_spec(spec: str) -> tuple[str, str, str]:
    """``echo`` → ("echo", "", ""); ``openai:BASE_URL:MODEL`` → ("openai", base_url, model).

    The base URL ends at the first ``:`` after its host[:port][/path]; the model name may itself
    contain colons (``llama3:8b``). ``ValueError`` for anything else.
    """
    if spec == "echo":
        return "echo", "", ""
    if spec.startswith("openai:"):
        from .openai import split_base_url_and_model

        base, model = split_base_url_and_model(spec[len("openai:") :])
        return "openai", base, model
    raise ValueError(f"unknown model {spec!r}: use 'echo' or 'openai:BASE_URL:MODEL'")


def build_model(config: GatewayConfig) -> ModelBackend:
    """The backend named by ``config.model``."""
    kind, base, model = parse_model_spec(config.model)
    if kind == "echo":
        return EchoModel(pace=config.echo_pace)
    from .openai import OpenAIModel

    return OpenAIModel(
        base,
        model,
        connect_timeout=config.upstream_connect_timeout,
        idle_timeout=config.upstream_idle_timeout,
        max_attempts=config.upstream_max_attempts,
        retry_after_cap=config.upstream_retry_after_cap,
    )
