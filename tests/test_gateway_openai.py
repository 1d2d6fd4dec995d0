"""The OpenAI-compatible upstream, against a loopback aiohttp.web server speaking the streaming format."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from gateway_helpers import (
    SSEReader,
    create_conversation,
    data,
    get_json,
    open_fds,
    other_tasks,
    post_message,
    wait_until,
)
from sidechain.gateway.models import parse_model_spec
from sidechain.gateway.models.openai import chat_completions_url, split_base_url_and_model
from sidechain.gateway.testing import RunningGateway, running_gateway


@dataclass
class Upstream:
    url: str = ""
    mode: str = "ok"
    deltas: list[str] = field(default_factory=lambda: ["Hel", "lo", " from", " upstream"])
    requests: list[dict[str, Any]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)


def chunk(delta: str) -> bytes:
    body = {
        "id": "c1",
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": {"content": delta}}],
    }
    return f"data: {json.dumps(body)}\n\n".encode()


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    state = Upstream()

    async def completions(request: web.Request) -> web.StreamResponse:
        state.requests.append(await request.json())
        state.headers.append(dict(request.headers))
        if state.mode == "429":
            return web.json_response(
                {"error": {"message": "slow down"}}, status=429, headers={"Retry-After": "7"}
            )
        if state.mode == "503_once" and len(state.requests) == 1:
            return web.Response(status=503, text="warming up", headers={"Retry-After": "0.05"})
        if state.mode == "500":
            return web.Response(status=500, text="upstream exploded")
        if state.mode == "json":
            return web.json_response({"choices": []})
        if state.mode == "silent":  # takes the request, never answers
            await state.release.wait()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b'data: {"choices":[{"index":0,"delta":{"role":"assistant"}}]}\n\n')
        once = state.mode == "role_then_drop_once" and len(state.requests) == 1
        if state.mode == "role_then_drop" or once:
            assert request.transport is not None
            request.transport.abort()  # broken before any content
            return resp
        for i, delta in enumerate(state.deltas):
            await resp.write(chunk(delta))
            if state.mode == "drop" and i == 1:
                assert request.transport is not None
                request.transport.abort()  # mid-stream connection loss
                return resp
            if state.mode == "error" and i == 1:
                await resp.write(b'data: {"error": {"message": "model overloaded"}}\n\n')
                return resp
            if state.mode == "stall" and i == 1:
                await state.release.wait()
                return resp
        if state.mode == "usage_null":  # some servers' final usage chunk
            await resp.write(b'data: {"choices":null,"usage":{"prompt_tokens":3,"completion_tokens":4}}\n\n')
        if state.mode != "no_done":
            await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_post("/v1/chat/completions", completions)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port = runner.addresses[0][1]
        state.url = f"http://127.0.0.1:{port}"
        yield state
    finally:
        state.release.set()
        await runner.cleanup()


async def run_turn(gw: RunningGateway, session: aiohttp.ClientSession, text: str = "hi") -> list[Any]:
    cid = await create_conversation(session, gw.url)
    async with session.get(f"{gw.url}/v1/conversations/{cid}/events") as resp:
        reader = SSEReader(resp)
        await post_message(session, gw.url, cid, text)
        return await reader.until("turn.completed", "turn.failed")


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


def test_model_spec_parsing() -> None:
    assert parse_model_spec("echo") == ("echo", "", "")
    assert split_base_url_and_model("http://127.0.0.1:8080:llama3:8b") == (
        "http://127.0.0.1:8080",
        "llama3:8b",
    )
    assert split_base_url_and_model("https://api.example.com/v1:gpt-4o-mini") == (
        "https://api.example.com/v1",
        "gpt-4o-mini",
    )
    assert chat_completions_url("https://api.example.com/v1") == "https://api.example.com/v1/chat/completions"
    assert chat_completions_url("http://h:1/") == "http://h:1/v1/chat/completions"
    for bad in ("gpt", "openai:nourl", "openai:ftp://h:m", "openai:http://h"):
        with pytest.raises(ValueError):
            parse_model_spec(bad)


async def test_turn_streams_upstream_deltas(
    upstream: Upstream, session: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SIDECHAIN_UPSTREAM_API_KEY", "up-key")
    async with running_gateway(model=f"openai:{upstream.url}:test-model") as gw:
        events = await run_turn(gw, session, "say hello")
        deltas = [data(e)["delta"] for e in events if e.event == "message.delta"]
        assert deltas == upstream.deltas
        completed = next(e for e in events if e.event == "message.completed")
        assert data(completed)["text"] == "Hello from upstream"
        assert events[-1].event == "turn.completed"
    (request,) = upstream.requests
    assert request["model"] == "test-model" and request["stream"] is True
    assert request["messages"] == [{"role": "user", "content": "say hello"}]
    assert upstream.headers[0]["Authorization"] == "Bearer up-key"


@pytest.mark.parametrize(
    ("mode", "error_type", "needle"),
    [
        ("429", "upstream_rate_limited", "429"),
        ("500", "upstream_http_error", "upstream exploded"),
        ("drop", "upstream_disconnected", "broke"),
        ("no_done", "upstream_truncated", "[DONE]"),
        ("error", "upstream_error", "model overloaded"),
        ("json", "upstream_protocol_error", "application/json"),
    ],
)
async def test_upstream_failures_become_turn_failed(
    upstream: Upstream, session: aiohttp.ClientSession, mode: str, error_type: str, needle: str
) -> None:
    upstream.mode = mode
    async with running_gateway(model=f"openai:{upstream.url}:m") as gw:
        events = await run_turn(gw, session)
        assert events[-1].event == "turn.failed"
        error = data(events[-1])["error"]
        assert error["type"] == error_type and needle in error["message"]
        assert not any(e.event == "message.completed" for e in events)
        assert gw.gateway.metrics.upstream_errors_total == 1
        if mode in ("drop", "error"):
            assert [data(e)["delta"] for e in events if e.event == "message.delta"] == upstream.deltas[:2]


async def test_upstream_failure_before_first_delta_is_retried_through_sidechain_client(
    upstream: Upstream, session: aiohttp.ClientSession
) -> None:
    upstream.mode = "503_once"
    async with running_gateway(model=f"openai:{upstream.url}:m") as gw:
        events = await run_turn(gw, session)
        assert events[-1].event == "turn.completed"
        assert [data(e)["delta"] for e in events if e.event == "message.delta"] == upstream.deltas
        assert len(upstream.requests) == 2
        assert upstream.headers[0]["Idempotency-Key"] == upstream.headers[1]["Idempotency-Key"]
        assert gw.gateway.metrics.upstream_errors_total == 0


@pytest.mark.parametrize("mode", ["role_then_drop_once", "usage_null"])
async def test_upstream_quirks_still_complete(
    upstream: Upstream, session: aiohttp.ClientSession, mode: str
) -> None:
    """A stream broken after the role-only first chunk, before any content, is retried (it was not: the
    role chunk counted as delivered); a usage chunk with ``"choices": null`` is ignored."""
    upstream.mode = mode
    async with running_gateway(model=f"openai:{upstream.url}:m") as gw:
        events = await run_turn(gw, session)
        assert events[-1].event == "turn.completed", events[-1]
        assert [data(e)["delta"] for e in events if e.event == "message.delta"] == upstream.deltas
        assert len(upstream.requests) == (2 if mode == "role_then_drop_once" else 1)


async def test_upstream_retries_before_content_are_bounded(
    upstream: Upstream, session: aiohttp.ClientSession
) -> None:
    """Broken before content every time: ``upstream_max_attempts`` requests in all, then turn.failed;
    an upstream that never answers is ``upstream_timeout`` after its idle timeout, retried the same way."""
    upstream.mode = "role_then_drop"
    async with running_gateway(model=f"openai:{upstream.url}:m", upstream_max_attempts=3) as gw:
        events = await run_turn(gw, session)
        assert data(events[-1])["error"]["type"] == "upstream_disconnected"
    assert len(upstream.requests) == 3
    upstream.mode, upstream.requests = "silent", []
    async with running_gateway(model=f"openai:{upstream.url}:m", upstream_idle_timeout=0.2,
                               upstream_max_attempts=2) as gw:
        events = await run_turn(gw, session)
        assert data(events[-1])["error"]["type"] == "upstream_timeout"
    assert len(upstream.requests) == 2


async def test_upstream_unreachable_and_idle_timeout(
    upstream: Upstream, session: aiohttp.ClientSession
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]
    async with running_gateway(model=f"openai:http://127.0.0.1:{dead_port}:m") as gw:
        events = await run_turn(gw, session)
        assert data(events[-1])["error"]["type"] == "upstream_unreachable"
    upstream.mode = "stall"
    async with running_gateway(model=f"openai:{upstream.url}:m", upstream_idle_timeout=0.3) as gw:
        events = await run_turn(gw, session)
        assert data(events[-1])["error"]["type"] == "upstream_timeout"


async def test_cancel_during_upstream_stream_releases_it(
    upstream: Upstream, session: aiohttp.ClientSession
) -> None:
    async with running_gateway(model=f"openai:{upstream.url}:m") as gw:
        cid = await create_conversation(session, gw.url)
        await run_turn_on(gw, session, cid, "warm up")  # lazily created tasks and sockets exist now
        fds_before, tasks_before = open_fds(), other_tasks()
        upstream.mode = "stall"
        async with (
            aiohttp.ClientSession() as client,
            client.get(f"{gw.url}/v1/conversations/{cid}/events") as resp,
        ):
            reader = SSEReader(resp)
            turn = await post_message(client, gw.url, cid, "stall please")
            await reader.until("message.delta")
            await reader.until("message.delta")
            cancel = f"{gw.url}/v1/conversations/{cid}/turns/{turn['turn_id']}/cancel"
            async with client.post(cancel) as r:
                assert r.status == 202
            events = await reader.until("turn.failed")
        assert data(events[-1])["error"]["type"] == "cancelled"
        assert gw.gateway.metrics.upstream_errors_total == 0
        upstream.release.set()  # let the stand-in server's stalled handler finish too
        await wait_until(lambda: other_tasks() <= tasks_before, within=2.0, what="tasks to end")
        await wait_until(lambda: open_fds() <= fds_before, within=2.0, what="sockets to close")


async def test_btw_through_upstream(upstream: Upstream, session: aiohttp.ClientSession) -> None:
    async with running_gateway(model=f"openai:{upstream.url}:m") as gw:
        cid = await create_conversation(session, gw.url)
        await run_turn_on(gw, session, cid, "main question")
        async with session.post(f"{gw.url}/v1/conversations/{cid}/btw", json={"question": "side?"}) as resp:
            events = await SSEReader(resp).rest()
        assert [e.event for e in events][-1] == "btw.completed"
        assert data(events[-1])["text"] == "Hello from upstream"
        messages = upstream.requests[-1]["messages"]
        assert messages[0]["role"] == "system"
        assert [m["content"] for m in messages[1:]] == ["main question", "Hello from upstream", "side?"]
        conv = await get_json(session, f"{gw.url}/v1/conversations/{cid}")
        assert len(conv["messages"]) == 2
        upstream.mode = "429"
        async with session.post(f"{gw.url}/v1/conversations/{cid}/btw", json={"question": "again?"}) as resp:
            events = await SSEReader(resp).rest()
        assert events[-1].event == "error"
        assert data(events[-1])["type"] == "upstream_rate_limited" and "429" in data(events[-1])["message"]


async def run_turn_on(gw: RunningGateway, session: aiohttp.ClientSession, cid: str, text: str) -> None:
    async with session.get(f"{gw.url}/v1/conversations/{cid}/events") as resp:
        reader = SSEReader(resp)
        await post_message(session, gw.url, cid, text)
        await reader.until("turn.completed")


async def test_echo_model_is_deterministic_and_paced() -> None:
    from sidechain.gateway.models import ChatMessage, EchoModel, ModelRequest, Snapshot

    request = ModelRequest(kind="turn", messages=(ChatMessage("user", "ping pong"),))
    fast = EchoModel(pace=0)
    first = [d async for d in fast.stream(request)]
    assert first == [d async for d in fast.stream(request)]
    assert "".join(first) == fast.answer(request) and fast.answer(request).startswith("[offline echo model")
    snap = Snapshot(turn_count=3, last_user_message="latest", partial_answer=None)
    btw = ModelRequest(kind="btw", messages=(), question="why?", snapshot=snap)
    assert '"latest"' in fast.answer(btw) and "3 turns" in fast.answer(btw)
    paced = EchoModel(pace=100)
    loop = asyncio.get_running_loop()
    start = loop.time()
    tokens = [d async for d in paced.stream(request)]
    assert loop.time() - start >= (len(tokens) - 1) / 100 * 0.9


async def test_note_reaches_the_model_as_context(upstream: Upstream, session: aiohttp.ClientSession) -> None:
    async with running_gateway(model=f"openai:{upstream.url}:m") as gw:
        cid = await create_conversation(session, gw.url)
        async with session.get(f"{gw.url}/v1/conversations/{cid}/events") as resp:
            reader = SSEReader(resp)
            await post_message(session, gw.url, cid, "main question")
            await reader.until("turn.completed")
            note = {"text": "Q: a\nA: b"}
            async with session.post(f"{gw.url}/v1/conversations/{cid}/notes", json=note) as r:
                assert r.status == 201
            await reader.until("note.created")
            assert len(upstream.requests) == 1, "a note runs no generation"
            await post_message(session, gw.url, cid, "next question")
            await reader.until("turn.completed")
        messages = upstream.requests[-1]["messages"]
        assert [m["role"] for m in messages] == ["user", "assistant", "user", "user"]
        content = messages[2]["content"]
        assert content.startswith("[A note added to this conversation") and content.endswith("Q: a\nA: b")
        assert messages[3]["content"] == "next question"
