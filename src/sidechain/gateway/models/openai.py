"""OpenAI-compatible upstream: ``POST {base}/v1/chat/completions`` with ``stream: true``.

Works with llama.cpp, vLLM, Ollama and OpenAI. The key comes from ``SIDECHAIN_UPSTREAM_API_KEY``
(sent as a bearer token when set). Every failure becomes a :class:`ModelError` whose ``type`` says
what happened (see docs/protocol.md): ``upstream_rate_limited`` (429), ``upstream_http_error`` (other
non-2xx), ``upstream_unreachable``, ``upstream_timeout``, ``upstream_disconnected`` (the body broke
mid-stream), ``upstream_truncated`` (ended without ``[DONE]``), ``upstream_protocol_error`` (not SSE,
bad JSON) and ``upstream_error`` (an error object inside the stream).
"""

from __future__ import annotations

import os
import re
from collections.abc import AsyncGenerator, Mapping
from contextlib import aclosing
from typing import Any

import aiohttp
import msgspec

from ...errors import ProtocolError
from ...sse import Decoder, Event
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


def _retry_after(headers: Mapping[str, str]) -> float | None:
    value = headers.get("Retry-After", "").strip()
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:
        return None


async def post_sse(
    url: str,
    body: bytes,
    headers: Mapping[str, str],
    *,
    connect_timeout: float,
    idle_timeout: float,
) -> AsyncGenerator[Event, None]:
    """POST ``body`` and yield the SSE events of the response.

    One dedicated ``aiohttp.ClientSession`` per call, closed on every path: completion, error, and the
    caller closing the generator early or being cancelled. Raises :class:`ModelError` for non-2xx
    answers and transport failures. Kept small so it can move onto ``GatewayHTTPClient`` later.
    """
    timeout = aiohttp.ClientTimeout(total=None, connect=connect_timeout, sock_read=idle_timeout)
    try:
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.post(url, data=body, headers=dict(headers)) as resp,
        ):
            if resp.status != 200:
                excerpt = (await resp.content.read(_BODY_EXCERPT)).decode("utf-8", "replace")
                kind = "upstream_rate_limited" if resp.status == 429 else "upstream_http_error"
                raise ModelError(
                    kind,
                    f"upstream answered HTTP {resp.status}" + (f": {excerpt}" if excerpt else ""),
                    retry_after=_retry_after(resp.headers),
                )
            ctype = resp.headers.get("Content-Type", "")
            if not ctype.startswith("text/event-stream"):
                raise ModelError(
                    "upstream_protocol_error", f"upstream answered {ctype or 'no content type'}, not SSE"
                )
            decoder = Decoder()
            async for chunk in resp.content.iter_any():
                for item in decoder.feed(chunk):
                    if isinstance(item, Event):
                        yield item
    except ModelError:
        raise
    except TimeoutError as exc:
        raise ModelError("upstream_timeout", f"upstream timed out: {type(exc).__name__}") from exc
    except aiohttp.ClientConnectorError as exc:
        raise ModelError("upstream_unreachable", f"cannot connect to upstream: {exc}") from exc
    except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
        raise ModelError(
            "upstream_disconnected", f"upstream connection broke: {type(exc).__name__}: {exc}"
        ) from exc
    except aiohttp.ClientError as exc:
        raise ModelError("upstream_error", f"upstream request failed: {type(exc).__name__}: {exc}") from exc
    except ProtocolError as exc:
        raise ModelError("upstream_protocol_error", f"upstream sent malformed SSE: {exc}") from exc


class _Delta(msgspec.Struct):
    content: str | None = None


class _Choice(msgspec.Struct):
    delta: _Delta | None = None


class _Chunk(msgspec.Struct):
    choices: list[_Choice] = []
    error: Any = None


_chunk_decoder = msgspec.json.Decoder(_Chunk)


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
    ) -> None:
        self.url = chat_completions_url(base_url)
        self.model = model
        self._api_key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout

    async def stream(self, request: ModelRequest) -> AsyncGenerator[str, None]:
        """Yield content deltas; ``ModelError`` on any failure, including a missing ``[DONE]``."""
        body = msgspec.json.encode(
            {
                "model": self.model,
                "stream": True,
                "messages": [{"role": m.role, "content": m.content} for m in request.messages],
            }
        )
        headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        done = False
        async with aclosing(
            post_sse(
                self.url, body, headers, connect_timeout=self.connect_timeout, idle_timeout=self.idle_timeout
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
                for choice in chunk.choices:
                    if choice.delta is not None and choice.delta.content:
                        yield choice.delta.content
        if not done:
            raise ModelError("upstream_truncated", "the upstream stream ended without [DONE]")

    async def aclose(self) -> None:
        return None
