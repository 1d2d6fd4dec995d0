"""The embedded offline model: deterministic, no network, streams word by word at a set pace."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncGenerator

from .base import ModelRequest

__all__ = ["EchoModel"]

_TOKEN = re.compile(r"\s*\S+")

PREFIX = "[offline echo model, no AI connected]"


def _quote(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


class EchoModel:
    """Answers without any AI: a main turn echoes the message, a btw describes the snapshot it got.

    Both answers start with ``[offline echo model, no AI connected]`` so nobody mistakes them for a
    real model.
    ``pace`` is tokens (words) per second; 0 yields as fast as the event loop allows (still yielding
    control between tokens). The answer for a given request is always the same.
    """

    name = "echo"

    def __init__(self, *, pace: float = 30.0) -> None:
        self.pace = pace

    def answer(self, request: ModelRequest) -> str:
        """The full text :meth:`stream` will produce for ``request``."""
        if request.kind == "btw":
            snap = request.snapshot
            question = request.question or ""
            if snap is None:
                return f"{PREFIX} Side question: {_quote(question)}. I have no conversation snapshot."
            turns = snap.turn_count
            if snap.last_user_message is None:
                about = "The conversation has no messages yet."
            else:
                about = (
                    f'The last user message is "{_quote(snap.last_user_message)}" and the conversation has'
                    f" {turns} turn{'s' if turns != 1 else ''}."
                )
            parts = [f'{PREFIX} Side question: "{_quote(question)}".', about]
            if snap.partial_answer is not None:
                parts.append(
                    f"A main answer is being written ({len(snap.partial_answer)} characters so far)."
                )
            if snap.thread_questions:
                n = len(snap.thread_questions)
                parts.append(
                    f"Earlier in this side thread you asked {n} question{'s' if n != 1 else ''}, the last was"
                    f' "{_quote(snap.thread_questions[-1])}".'
                )
            return " ".join(parts)
        last_user = next((m.content for m in reversed(request.messages) if m.role == "user"), "")
        return f"{PREFIX} You said: {last_user}"

    async def stream(self, request: ModelRequest) -> AsyncGenerator[str, None]:
        """Yield :meth:`answer` word by word (with the whitespace before each word), paced."""
        tokens = _TOKEN.findall(self.answer(request))
        loop = asyncio.get_running_loop()
        interval = 1.0 / self.pace if self.pace > 0 else 0.0
        start = loop.time()
        for i, token in enumerate(tokens):
            if interval and i:
                delay = start + i * interval - loop.time()
                await asyncio.sleep(max(0.0, delay))
            else:
                await asyncio.sleep(0)
            yield token

    async def aclose(self) -> None:
        return None
