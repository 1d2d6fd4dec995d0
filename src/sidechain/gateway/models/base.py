"""The model protocol: given the chat messages of a request, an async generator of text deltas."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Literal, Protocol

import msgspec

__all__ = ["ChatMessage", "ModelBackend", "ModelError", "ModelRequest", "Snapshot"]


class ChatMessage(msgspec.Struct, frozen=True):
    """One chat message as an OpenAI-compatible model sees it."""

    role: str
    content: str


class Snapshot(msgspec.Struct, frozen=True):
    """What a btw knows about the conversation at the moment it was asked (for models that want facts)."""

    #: Turns (user messages) in the conversation, the running one included.
    turn_count: int
    #: The newest user message of the conversation, if any.
    last_user_message: str | None
    #: The running main turn's answer so far, if a turn was streaming when the btw was asked.
    partial_answer: str | None
    #: Earlier completed questions of the same btw thread.
    thread_questions: tuple[str, ...] = ()


class ModelRequest(msgspec.Struct, frozen=True):
    """One generation: ``messages`` is the full context (system prompt first, the question last)."""

    kind: Literal["turn", "btw"]
    messages: tuple[ChatMessage, ...]
    #: For a btw: the question and the snapshot it is answered from.
    question: str | None = None
    snapshot: Snapshot | None = None


class ModelError(Exception):
    """A generation failed for a reason the client should see (``type`` names it; see docs/protocol.md).

    ``retry_after`` is set when the upstream said when to try again (429).
    """

    def __init__(self, type: str, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.type = type
        self.message = message
        self.retry_after = retry_after


class ModelBackend(Protocol):
    """A source of generated text.

    ``stream`` returns an async generator of non-empty text deltas. It raises :class:`ModelError` for
    failures the client should see. Closing the generator early (``aclose``, cancellation) releases
    everything it holds (connections, sessions) before ``aclose`` returns.
    """

    #: A short name for logs and metrics (``echo``, ``openai``).
    name: str

    def stream(self, request: ModelRequest) -> AsyncGenerator[str, None]:
        """Generate the answer to ``request`` as deltas."""
        ...

    async def aclose(self) -> None:
        """Release shared resources (none for the built-in backends)."""
        ...
