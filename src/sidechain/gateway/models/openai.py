"""OpenAI-compatible upstream: ``POST {base}/v1/chat/completions`` with ``stream: true``.

Works with llama.cpp, vLLM, Ollama and OpenAI. The key comes from ``SIDECHAIN_UPSTREAM_API_KEY``
(sent as a bearer token when set). Every failure becomes a :class:`ModelError` whose ``type`` says
what happened (see docs/protocol.md): ``upstream_rate_limited`` (429), ``upstream_http_error`` (other
non-2xx), ``upstream_unreachable``, ``upstream_timeout``, ``upstream_disconnected`` (the body broke
mid-stream), ``upstream_truncated`` (ended without ``[DONE]``), ``upstream_protocol_error`` (not SSE,
bad JSON) and ``upstream_error`` (an error object inside the stream).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import re
from collections.abc import AsyncGenerator, Mapping
from contextlib import aclosing
from typing import Any

import msgspec

from ...client import GatewayHTTPClient, RetryPolicy, parse_retry_after
from ...client.observe import Observer, StreamObservation
from ...errors import (
    ConnectError,
    DeadlineExceeded,
    HTTPStatusError,
    ProtocolError,
    ReadError,
    RetryExhausted,
    SidechainError,
    StreamInterrupted,
)
from ...sse import Event
from .base import ModelError, ModelRequest

__all__ = ["API_KEY_ENV", "OpenAIModel", "chat_completions_url", "post_sse", "split_base_url_and_model"]

API_KEY_ENV = "SIDECHAIN_UPSTREAM_API_KEY"

_SPEC = re.compile(r"^(https?://[^/\s:]+(?::\d+)?(?:/[^:\s]*)?):(.+)$")

_BODY_EXCERPT = 512


def split_base_url_and_model(rest: str) -> tuple[str, str]:
    """Split ``BASE_URL:MODEL`` where the model name may contain colons. ``ValueError`` if malformed."""
    match = _SPEC.match(rest)
    if match is None:
        raise ValueError(f"expected openai:http(s)://HOST[:PORT][/PATH]:MODEL, got openai:{rest}")
    return match.group(1).rstrip("/"), match.group(2)


def chat_completions_url(base_url: str) -> str:
    """``{base}/v1/chat/completions``; a base that already ends with ``/v1`` is not doubled."""
    base = base_url.rstrip("/")
    return base + ("/chat/completions" if base.endswith("/v1") else "/v1/chat/completions")


def _model_error(exc: SidechainError) -> ModelError:
    """The :class:`ModelError` a client sees for a failure of sidechain's own client."""
    if isinstance(exc, RetryExhausted):
        inner = exc.last_error
        if isinstance(inner, SidechainError):
            err = _model_error(inner)
        else:
            err = ModelError("upstream_error", str(exc))
        if exc.retry_after is not None:
            err.retry_after = exc.retry_after
            err.message = err.message + f" (asked to retry after {exc.retry_after:g}s)"
        elif exc.attempts > 1:
            err.message = err.message + f" (after {exc.attempts} attempts)"
        return err
    if isinstance(exc, HTTPStatusError):
        excerpt = exc.body[:_BODY_EXCERPT]
        kind = "upstream_rate_limited" if exc.status == 429 else "upstream_http_error"
        return ModelError(kind, f"upstream answered HTTP {exc.status}" + (f": {excerpt}" if excerpt else ""),
                          retry_after=parse_retry_after(exc.headers))
    if isinstance(exc, StreamInterrupted):
        cause = exc.cause
        if isinstance(cause, DeadlineExceeded):
            return ModelError("upstream_timeout", f"upstream went silent mid-stream: {cause}")
        return ModelError("upstream_disconnected",
                          f"upstream connection broke after {len(exc.delivered)} event(s): {cause}")
    if isinstance(exc, DeadlineExceeded):
        return ModelError("upstream_timeout", f"upstream timed out: {exc}")
    if isinstance(exc, ConnectError):
        return ModelError("upstream_unreachable", f"cannot connect to upstream: {exc}")
    if isinstance(exc, ReadError):
        return ModelError("upstream_disconnected", f"upstream connection broke: {exc}")
    if isinstance(exc, ProtocolError):
        return ModelError("upstream_protocol_error", f"upstream sent no valid SSE: {exc}")
    return ModelError("upstream_error", f"upstream request failed: {type(exc).__name__}: {exc}")


async def post_sse(
    url: str,
    payload: Any,
    headers: Mapping[str, str],
    *,
    connect_timeout: float,
    idle_timeout: float,
    retry: RetryPolicy,
    observer: Observer | None = None,
) -> AsyncGenerator[Event, None]:
    """POST ``payload`` (JSON) and yield the SSE events of the response.

    Sent through sidechain's own :class:`GatewayHTTPClient`: a dedicated session per call, closed on
    every path (completion, error, the caller closing the generator early or being cancelled);
    failures before the first event retried as ``retry`` says. Raises :class:`ModelError`.
    """
    client = GatewayHTTPClient(url, connect_timeout=connect_timeout, idle_timeout=idle_timeout,
                               retry=retry, headers=headers, observer=observer)
    try:
        async with client.stream_post_with_retry(url, payload) as events:
            async for event in events:
                yield event
    except SidechainError as exc:
        raise _model_error(exc) from exc


class _Delta(msgspec.Struct):
    content: str | None = None


class _Choice(msgspec.Struct):
    delta: _Delta | None = None


class _Chunk(msgspec.Struct):
    choices: list[_Choice] | None = []  # null in some servers' usage chunk
    error: Any = None


_chunk_decoder = msgspec.json.Decoder(_Chunk)

#: Failures after the response began that are retried while no content was yielded (an upstream error
#: object, an HTTP status or a protocol error is an answer, not a broken connection).
_RETRY_MID_STREAM = frozenset({"upstream_disconnected", "upstream_timeout", "upstream_truncated"})


class OpenAIModel:
    """Streams chat completions from an OpenAI-compatible server (see the module docstring)."""

    name = "openai"

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key: str | None = None,
        connect_timeout: float = 10.0,
        idle_timeout: float = 60.0,
        max_attempts: int = 3,
        retry_after_cap: float = 5.0,
    ) -> None:
        self.url = chat_completions_url(base_url)
        self.model = model
        self._api_key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout
        self.retry = RetryPolicy(max_attempts=max_attempts, base_delay=0.25, max_delay=2.0,
                                 retry_after_cap=retry_after_cap, resume=False)

    async def stream(self, request: ModelRequest) -> AsyncGenerator[str, None]:
        """Yield content deltas; ``ModelError`` on any failure, including a missing ``[DONE]``.

        A failure before the first *content* delta is retried like one before the first event (every
        server sends a role-only chunk first, so counting events would retry almost nothing): a broken
        or silent stream, or one that ended without ``[DONE]``; up to ``max_attempts`` requests in all,
        with the same backoff. Once content was yielded, nothing is.
        """
        sent = 0  # requests so far, all attempts included

        def count(observation: StreamObservation) -> None:
            nonlocal sent
            sent += observation.kind == "connect"

        while True:
            produced = False
            retry = dataclasses.replace(self.retry, max_attempts=self.retry.max_attempts - sent)
            try:
                async with aclosing(self._once(request, retry, count)) as deltas:
                    async for delta in deltas:
                        produced = True
                        yield delta
                return
            except ModelError as exc:
                if produced or exc.type not in _RETRY_MID_STREAM or sent >= self.retry.max_attempts:
                    raise
                await asyncio.sleep(self.retry.backoff(sent))

    async def _once(self, request: ModelRequest, retry: RetryPolicy, observer: Observer
                    ) -> AsyncGenerator[str, None]:
        body = {
            "model": self.model,
            "stream": True,
            "messages": [{"role": m.role, "content": m.content} for m in request.messages],
        }
        headers: dict[str, str] = {}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        done = False
        async with aclosing(
            post_sse(
                self.url, body, headers, connect_timeout=self.connect_timeout, idle_timeout=self.idle_timeout,
                retry=retry, observer=observer,
            )
        ) as events:
            async for event in events:
                data = event.data.strip()
                if data == "[DONE]":
                    done = True
                    break
                try:
                    chunk = _chunk_decoder.decode(data)
                except msgspec.DecodeError as exc:
                    raise ModelError(
                        "upstream_protocol_error", f"upstream sent a chunk that is not JSON: {exc}"
                    )
                if chunk.error is not None:
                    message = chunk.error.get("message") if isinstance(chunk.error, dict) else chunk.error
                    raise ModelError("upstream_error", f"upstream error: {message}")
                for choice in chunk.choices or ():
                    if choice.delta is not None and choice.delta.content:
                        yield choice.delta.content
        if not done:
            raise ModelError("upstream_truncated", "the upstream stream ended without [DONE]")

    async def aclose(self) -> None:
        return None
