"""Errors the gateway answers with. Each maps to one HTTP status and a JSON body.

The body is always ``{"error": {"type": ..., "message": ...}}``; ``type`` is a stable machine-readable
name (documented in ``docs/protocol.md``), ``message`` is for humans.
"""

from __future__ import annotations

__all__ = [
    "BadRequest",
    "Conflict",
    "GatewayError",
    "NotFound",
    "PayloadTooLarge",
    "ServiceUnavailable",
    "TooManyRequests",
    "Unauthorized",
]


class GatewayError(Exception):
    """Base of the errors answered to HTTP clients. ``status`` is the HTTP status."""

    status: int = 500

    def __init__(self, type: str, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.type = type
        self.message = message
        self.headers: dict[str, str] = dict(headers or {})


class BadRequest(GatewayError):
    """400: malformed JSON, a missing or mistyped field, a text over its limit, a bad Last-Event-ID."""

    status = 400


class Unauthorized(GatewayError):
    """401: missing or wrong bearer token."""

    status = 401


class NotFound(GatewayError):
    """404: unknown conversation, turn, btw or thread (or one no longer retained)."""

    status = 404


class Conflict(GatewayError):
    """409: a turn is running (and queueing was not asked), a finished turn, a reused idempotency key."""

    status = 409


class PayloadTooLarge(GatewayError):
    """413: the request body exceeds ``max_body_bytes``."""

    status = 413


class TooManyRequests(GatewayError):
    """429: too many queued turns or unfinished btws on one conversation."""

    status = 429


class ServiceUnavailable(GatewayError):
    """503: the gateway is shutting down, or its store cannot confirm writes right now."""

    status = 503
