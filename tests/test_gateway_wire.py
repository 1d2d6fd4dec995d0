"""Wire checks against the real app on a loopback port: headers, framing, statuses and error bodies."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from gateway_helpers import (
    SSEReader,
    create_conversation,
    data,
    error_of,
    get_json,
    ids,
    post_message,
    wait_until,
)
from sidechain.gateway import GatewayConfig
from sidechain.gateway import app as gateway_app
from sidechain.gateway.testing import RunningGateway, running_gateway
from sidechain.sse import Comment


@pytest.fixture
async def gw() -> AsyncIterator[RunningGateway]:
    async with running_gateway(
        echo_pace=0, max_message_chars=100, max_question_chars=50, max_body_bytes=4096
    ) as g:
        yield g


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


async def expect_error(resp: aiohttp.ClientResponse, status: int, type_: str) -> str:
    assert resp.status == status, (resp.status, await resp.text())
    assert resp.headers["Content-Type"].startswith("application/json")
    kind, message = error_of(await resp.json())
    assert kind == type_, (kind, message)
    return message


async def test_healthz_and_conversation_basics(gw: RunningGateway, session: aiohttp.ClientSession) -> None:
    health = await get_json(session, f"{gw.url}/healthz")
    assert health["status"] == "ok" and health["model"] == "echo" and health["version"]
    async with session.post(f"{gw.url}/v1/conversations") as resp:
        assert resp.status == 201
        body = await resp.json()
        assert resp.headers["Location"] == f"/v1/conversations/{body['id']}"
    cid = body["id"]
    assert len(cid) == 32 and int(cid, 16) >= 0  # 128 random bits as hex
    assert await create_conversation(session, gw.url) != cid
    conv = await get_json(session, f"{gw.url}/v1/conversations/{cid}")
    assert conv["id"] == cid
    assert conv["messages"] == [] and conv["active_turn"] is None and conv["queued_turns"] == []
    assert conv["last_event_id"] == "0"


async def test_event_stream_headers_framing_and_turn_sequence(
    gw: RunningGateway, session: aiohttp.ClientSession
) -> None:
    cid = await create_conversation(session, gw.url)
    async with session.get(f"{gw.url}/v1/conversations/{cid}/events") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "text/event-stream; charset=utf-8"
        assert resp.headers["Cache-Control"] == "no-cache"
        reader = SSEReader(resp)
        turn = await post_message(session, gw.url, cid, "hello wire")
        assert turn["queued"] is False
        events = await reader.until("turn.completed", "turn.failed")
        # retry hint first, exactly once, before any event
        assert reader.raw.startswith(b"retry: 2000\n\n")
        assert reader.raw.count(b"retry:") == 1
        assert reader.decoder.retry == 2000
    types = [e.event for e in events]
    assert types[:2] == ["message.created", "turn.started"]
    assert types[-2:] == ["message.completed", "turn.completed"]
    assert set(types[2:-2]) == {"message.delta"}
    assert ids(events) == list(range(1, len(events) + 1))
    assert all(e.id.isdigit() for e in events)
    created = data(events[0])
    assert created == {"turn_id": turn["turn_id"], "role": "user", "text": "hello wire", "queued": False}
    assert data(events[1]) == {"turn_id": turn["turn_id"]}
    deltas = "".join(data(e)["delta"] for e in events if e.event == "message.delta")
    completed = data(events[-2])
    assert completed == {"turn_id": turn["turn_id"], "text": deltas}
    assert "offline echo model" in deltas and "hello wire" in deltas
    assert data(events[-1]) == {"turn_id": turn["turn_id"]}
    # every block is "id: N\nevent: T\ndata: {...}\n\n"
    for block in bytes(reader.raw).split(b"\n\n")[1:-1]:
        lines = block.split(b"\n")
        assert (
            lines[0].startswith(b"id: ")
            and lines[1].startswith(b"event: ")
            and lines[2].startswith(b"data: ")
        )
        json.loads(lines[2][6:])
    conv = await get_json(session, f"{gw.url}/v1/conversations/{cid}")
    assert conv["messages"] == [
        {"role": "user", "text": "hello wire", "turn_id": turn["turn_id"]},
        {"role": "assistant", "text": deltas, "turn_id": turn["turn_id"]},
    ]
    assert conv["last_event_id"] == events[-1].id


async def test_second_message_conflicts_unless_queued(session: aiohttp.ClientSession) -> None:
    async with running_gateway(echo_pace=200) as slow:
        cid = await create_conversation(session, slow.url)
        async with session.get(f"{slow.url}/v1/conversations/{cid}/events") as resp:
            reader = SSEReader(resp)
            first = await post_message(session, slow.url, cid, "first message")
            await reader.until("turn.started")
            async with session.post(
                f"{slow.url}/v1/conversations/{cid}/messages", json={"text": "x"}
            ) as r409:
                message = await expect_error(r409, 409, "turn_active")
                assert first["turn_id"] in message
            second = await post_message(session, slow.url, cid, "second message", queue=True)
            assert second["queued"] is True
            conv = await get_json(session, f"{slow.url}/v1/conversations/{cid}")
            assert conv["active_turn"]["turn_id"] == first["turn_id"]
            assert conv["queued_turns"] == [second["turn_id"]]
            events = await reader.until("turn.completed")
            events += await reader.until("turn.completed")
        order = [(e.event, data(e)["turn_id"]) for e in events if e.event.startswith("turn.")]
        assert order == [
            ("turn.completed", first["turn_id"]),
            ("turn.started", second["turn_id"]),
            ("turn.completed", second["turn_id"]),
        ]
        conv = await get_json(session, f"{slow.url}/v1/conversations/{cid}")
        assert [m["role"] for m in conv["messages"]] == ["user", "assistant", "user", "assistant"]
        assert conv["messages"][3]["text"].endswith("You said: second message")


async def test_queue_limit_is_429(session: aiohttp.ClientSession) -> None:
    async with running_gateway(echo_pace=50, max_queued_turns=1) as gw:
        cid = await create_conversation(session, gw.url)
        first = await post_message(session, gw.url, cid, "one two three four five six")
        await post_message(session, gw.url, cid, "queued", queue=True)
        async with session.post(
            f"{gw.url}/v1/conversations/{cid}/messages", json={"text": "more", "queue": True}
        ) as resp:
            await expect_error(resp, 429, "too_many_queued_turns")
        async with session.post(f"{gw.url}/v1/conversations/{cid}/turns/{first['turn_id']}/cancel") as resp:
            assert resp.status == 202


async def test_cancel_running_and_queued_turns(session: aiohttp.ClientSession) -> None:
    async with running_gateway(echo_pace=20) as gw:
        cid = await create_conversation(session, gw.url)
        async with session.get(f"{gw.url}/v1/conversations/{cid}/events") as resp:
            reader = SSEReader(resp)
            first = await post_message(session, gw.url, cid, "a b c d e f g h i j k l m n o p")
            second = await post_message(session, gw.url, cid, "queued one", queue=True)
            await reader.until("message.delta")
            base = f"{gw.url}/v1/conversations/{cid}/turns"
            async with session.post(f"{base}/{second['turn_id']}/cancel") as r:
                assert r.status == 202
                assert await r.json() == {"turn_id": second["turn_id"], "state": "failed"}
            async with session.post(f"{base}/{first['turn_id']}/cancel") as r:
                assert r.status == 202
                assert await r.json() == {"turn_id": first["turn_id"], "state": "failed"}
            events = await reader.until("turn.failed")
            events += await reader.until("turn.failed")
            failed = [data(e) for e in events if e.event == "turn.failed"]
            assert {f["turn_id"] for f in failed} == {first["turn_id"], second["turn_id"]}
            assert all(f["error"]["type"] == "cancelled" and f["error"]["message"] for f in failed)
            assert not any(
                e.event == "turn.started" and data(e)["turn_id"] == second["turn_id"] for e in events
            )
            async with session.post(f"{base}/{first['turn_id']}/cancel") as r:
                await expect_error(r, 409, "turn_finished")
            async with session.post(f"{base}/turn_nope/cancel") as r:
                await expect_error(r, 404, "turn_not_found")
            # the conversation is free again
            third = await post_message(session, gw.url, cid, "after cancel")
            events = await reader.until("turn.completed")
            assert data(events[-1])["turn_id"] == third["turn_id"]
        conv = await get_json(session, f"{gw.url}/v1/conversations/{cid}")
        assert [m["role"] for m in conv["messages"]] == ["user", "user", "user", "assistant"]


@pytest.mark.parametrize(
    ("path_tail", "method", "body", "status", "type_"),
    [
        ("/messages", "POST", b"{not json", 400, "invalid_json"),
        ("/messages", "POST", b"", 400, "invalid_json"),
        pytest.param("/messages", "POST", b'{"text": "a", "x": ' + b"[" * 4000, 400, "invalid_json",
                     id="nested-too-deep"),
        ("/messages", "POST", b"[1, 2]", 400, "invalid_request"),
        ("/messages", "POST", b"{}", 400, "invalid_request"),
        ("/messages", "POST", b'{"text": 5}', 400, "invalid_request"),
        ("/messages", "POST", b'{"text": "hi", "queue": "yes"}', 400, "invalid_request"),
        ("/messages", "POST", b'{"text": "   "}', 400, "invalid_request"),
        ("/messages", "POST", json.dumps({"text": "x" * 101}).encode(), 400, "message_too_long"),
        ("/btw", "POST", b"{oops", 400, "invalid_json"),
        ("/btw", "POST", b"{}", 400, "invalid_request"),
        ("/btw", "POST", json.dumps({"question": "q" * 51}).encode(), 400, "question_too_long"),
        ("/btw", "POST", b'{"question": "q", "thread_id": "thr_nope"}', 404, "thread_not_found"),
        ("/btw/btw_nope", "DELETE", b"", 404, "btw_not_found"),
        ("/btw/btw_nope", "GET", b"", 404, "btw_not_found"),
        ("/turns/turn_nope/cancel", "POST", b"", 404, "turn_not_found"),
        ("/nope", "GET", b"", 404, "not_found"),
        ("/messages", "GET", b"", 405, "method_not_allowed"),
    ],
)
async def test_error_bodies(
    gw: RunningGateway,
    session: aiohttp.ClientSession,
    path_tail: str,
    method: str,
    body: bytes,
    status: int,
    type_: str,
) -> None:
    cid = await create_conversation(session, gw.url)
    headers = {"Content-Type": "application/json"}
    async with session.request(
        method, f"{gw.url}/v1/conversations/{cid}{path_tail}", data=body, headers=headers
    ) as r:
        await expect_error(r, status, type_)


@pytest.mark.parametrize(
    ("method", "path_tail"),
    [
        ("GET", ""),
        ("GET", "/events"),
        ("POST", "/messages"),
        ("POST", "/btw"),
        ("POST", "/turns/turn_x/cancel"),
        ("DELETE", "/btw/btw_x"),
    ],
)
async def test_unknown_conversation_is_404(
    gw: RunningGateway, session: aiohttp.ClientSession, method: str, path_tail: str
) -> None:
    for cid in ("0" * 32, "not-even-hex"):
        body = (
            {"text": "hi"} if path_tail == "/messages" else {"question": "q"} if path_tail == "/btw" else None
        )
        async with session.request(method, f"{gw.url}/v1/conversations/{cid}{path_tail}", json=body) as r:
            await expect_error(r, 404, "conversation_not_found")


async def test_bad_last_event_id(gw: RunningGateway, session: aiohttp.ClientSession) -> None:
    cid = await create_conversation(session, gw.url)
    url = f"{gw.url}/v1/conversations/{cid}/events"
    for value in ("abc", "-1", "1.5", "9" * 30):
        async with session.get(url, headers={"Last-Event-ID": value}) as r:
            await expect_error(r, 400, "invalid_last_event_id")
    async with session.get(url, headers={"Last-Event-ID": "7"}) as r:  # ahead of the log
        await expect_error(r, 400, "invalid_last_event_id")
    async with session.get(url + "?last_event_id=x") as r:
        await expect_error(r, 400, "invalid_last_event_id")
    async with session.post(
        f"{gw.url}/v1/conversations/{cid}/btw", json={"question": "q"}, headers={"Last-Event-ID": "3"}
    ) as r:
        await expect_error(r, 400, "invalid_last_event_id")


async def test_body_too_large_413(gw: RunningGateway, session: aiohttp.ClientSession) -> None:
    cid = await create_conversation(session, gw.url)
    url = f"{gw.url}/v1/conversations/{cid}/messages"
    big = json.dumps({"text": "x" * 5000}).encode()
    async with session.post(url, data=big, headers={"Content-Type": "application/json"}) as r:
        message = await expect_error(r, 413, "body_too_large")
        assert "4096" in message

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted while reading
        yield b'{"text": "'
        for _ in range(10):
            yield b"y" * 1000
        yield b'"}'

    async with aiohttp.ClientSession() as fresh, fresh.post(url, data=chunks()) as r:
        assert "Content-Length" not in r.request_info.headers
        await expect_error(r, 413, "body_too_large")
    # a lying Content-Length header does not help either
    async with session.post(f"{gw.url}/v1/conversations", data=b"z" * 10_000) as r:
        await expect_error(r, 413, "body_too_large")


async def test_metrics_text(gw: RunningGateway, session: aiohttp.ClientSession) -> None:
    cid = await create_conversation(session, gw.url)
    async with session.get(f"{gw.url}/v1/conversations/{cid}/events") as resp:
        reader = SSEReader(resp)
        await post_message(session, gw.url, cid, "count me")
        await reader.until("turn.completed")
        async with session.get(f"{gw.url}/metrics") as r:
            assert r.status == 200
            assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            text = await r.text()
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("# TYPE"):
            _, _, name, kind = line.split()
            assert kind in {"gauge", "counter"}
        elif line and not line.startswith("#"):
            name, value = line.split()
            values[name] = float(value)
    assert values["sidechain_event_streams_open"] == 1
    assert values["sidechain_events_written_total"] >= 5
    for name in (
        "sidechain_turns_active",
        "sidechain_btws_active",
        "sidechain_resumes_total",
        "sidechain_client_disconnects_total",
        "sidechain_upstream_errors_total",
        "sidechain_slow_consumers_total",
    ):
        assert name in values


async def test_token_auth(session: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[bytes, bytes]] = []
    real = gateway_app.compare_digest

    def spy(a: Any, b: Any) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(gateway_app, "compare_digest", spy)
    async with running_gateway(token="s3cret-token") as gw:
        assert (await get_json(session, f"{gw.url}/healthz"))["status"] == "ok"  # open
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret-token"}):
            for method, path in (("POST", "/v1/conversations"), ("GET", "/metrics")):
                async with session.request(method, gw.url + path, headers=headers) as r:
                    await expect_error(r, 401, "unauthorized")
                    assert r.headers["WWW-Authenticate"].startswith("Bearer")
        assert calls and all(b == b"s3cret-token" for _, b in calls)
        cid = await create_conversation(session, gw.url, headers=gw.headers())
        assert (await get_json(session, f"{gw.url}/v1/conversations/{cid}", headers=gw.headers()))[
            "id"
        ] == cid
        async with session.get(f"{gw.url}/v1/conversations/{cid}") as r:
            await expect_error(r, 401, "unauthorized")
        assert (b"s3cret-token", b"s3cret-token") in calls


def test_token_required_off_loopback() -> None:
    with pytest.raises(ValueError, match="token"):
        GatewayConfig(host="0.0.0.0").validate()
    GatewayConfig(host="0.0.0.0", token="t").validate()
    GatewayConfig(host="::1").validate()
    from sidechain.gateway.server import resolve_token

    cfg, generated = resolve_token(GatewayConfig(host="0.0.0.0"))
    assert generated and cfg.token and len(cfg.token) >= 32
    assert resolve_token(GatewayConfig()) == (GatewayConfig(), False)


def test_serve_prints_a_generated_token_once(monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    from sidechain.gateway import server

    ran: list[str | None] = []
    monkeypatch.setattr(server.GatewayServer, "run", lambda self: ran.append(self.gateway.config.token))
    out = io.StringIO()
    assert server.run(GatewayConfig(host="0.0.0.0", store="memory"), out=out) == 0  # never binds here
    (token,) = ran
    assert token and out.getvalue() == f"sidechain gateway token (generated, shown once): {token}\n"
    out = io.StringIO()
    assert server.run(GatewayConfig(host="0.0.0.0", store="memory", token="given"), out=out) == 0
    assert ran[-1] == "given" and out.getvalue() == ""


async def test_cors_off_unless_configured(session: aiohttp.ClientSession) -> None:
    headers = {"Origin": "http://example.test", "Access-Control-Request-Method": "POST"}
    async with running_gateway() as gw, session.options(f"{gw.url}/v1/conversations", headers=headers) as r:
        assert "Access-Control-Allow-Origin" not in r.headers
    async with (
        running_gateway(cors_origins=("http://example.test",)) as gw,
        session.options(f"{gw.url}/v1/conversations", headers=headers) as r,
    ):
        assert r.status == 200
        assert r.headers["Access-Control-Allow-Origin"] == "http://example.test"


async def test_keepalive_comments_while_idle(session: aiohttp.ClientSession) -> None:
    async with running_gateway(keepalive_interval=0.05) as gw:
        cid = await create_conversation(session, gw.url)
        async with session.get(f"{gw.url}/v1/conversations/{cid}/events") as resp:
            reader = SSEReader(resp)
            comments = []
            while len(comments) < 3:
                item = await reader.next(within=2)
                assert isinstance(item, Comment), item
                comments.append(item)
            assert all(c.text == "keepalive" for c in comments)
            assert b": keepalive\n\n" in reader.raw


async def test_shutdown_sends_gateway_shutdown_and_fails_running_turn(session: aiohttp.ClientSession) -> None:
    async with running_gateway(echo_pace=20) as gw:
        cid = await create_conversation(session, gw.url)
        resp = await session.get(f"{gw.url}/v1/conversations/{cid}/events")
        try:
            reader = SSEReader(resp)
            turn = await post_message(session, gw.url, cid, "one two three four five six seven eight")
            await reader.until("message.delta")
            gw.server.should_exit = True  # what SIGTERM does
            events = await reader.rest()
        finally:
            resp.release()
    failed = [e for e in events if e.event == "turn.failed"]
    assert len(failed) == 1 and data(failed[0])["turn_id"] == turn["turn_id"]
    assert data(failed[0])["error"]["type"] == "gateway_shutdown"
    assert events[-1].event == "gateway.shutdown" and data(events[-1]) == {"reconnect": True}
    assert (
        events[-1].id == failed[0].id
    )  # no id line of its own: Last-Event-ID stays on the last logged event
    assert reader.raw.endswith(b'event: gateway.shutdown\ndata: {"reconnect":true}\n\n')


async def test_requests_during_shutdown_get_503(session: aiohttp.ClientSession) -> None:
    async with running_gateway() as gw:
        cid = await create_conversation(session, gw.url)
        gw.gateway.shutting_down = True
        try:
            async with session.get(f"{gw.url}/healthz") as r:
                assert r.status == 503
            async with session.post(f"{gw.url}/v1/conversations") as r:
                await expect_error(r, 503, "shutting_down")
            async with session.get(f"{gw.url}/v1/conversations/{cid}/events") as r:
                await expect_error(r, 503, "shutting_down")
        finally:
            gw.gateway.shutting_down = False
        await wait_until(lambda: gw.gateway.open_streams == 0)


async def test_note_joins_history_without_a_turn(gw: RunningGateway, session: aiohttp.ClientSession) -> None:
    cid = await create_conversation(session, gw.url)
    async with session.get(f"{gw.url}/v1/conversations/{cid}/events") as resp:
        reader = SSEReader(resp)
        turn = await post_message(session, gw.url, cid, "first")
        await reader.until("turn.completed")
        note_url = f"{gw.url}/v1/conversations/{cid}/notes"
        async with session.post(note_url, json={"text": "keep **this**"}) as r:
            assert r.status == 201, await r.text()
            note_id = (await r.json())["note_id"]
        (created,) = await reader.until("note.created")
        assert data(created) == {"note_id": note_id, "text": "keep **this**"}
        second = await post_message(session, gw.url, cid, "second")
        events = await reader.until("turn.completed")
    assert [e.event for e in events][:2] == ["message.created", "turn.started"], "the note started no turn"
    conv = await get_json(session, f"{gw.url}/v1/conversations/{cid}")
    assert [(m["role"], m["text"]) for m in conv["messages"]][:3] == [
        ("user", "first"), ("assistant", conv["messages"][1]["text"]), ("note", "keep **this**")]
    assert conv["messages"][2]["note_id"] == note_id
    assert [m["role"] for m in conv["messages"][3:]] == ["user", "assistant"]
    assert conv["messages"][3]["turn_id"] == second["turn_id"] != turn["turn_id"]
    # bad input: typed errors, nothing added
    bad = (({"text": "  "}, 400, "invalid_request"), ({"txt": "x"}, 400, "invalid_request"),
           ({"text": "x" * 101}, 400, "message_too_long"))
    for body, status, kind in bad:
        async with session.post(f"{gw.url}/v1/conversations/{cid}/notes", json=body) as r:
            await expect_error(r, status, kind)
    async with session.post(f"{gw.url}/v1/conversations/{'0' * 32}/notes", json={"text": "x"}) as r:
        await expect_error(r, 404, "conversation_not_found")
    assert len((await get_json(session, f"{gw.url}/v1/conversations/{cid}"))["messages"]) == 5


async def test_note_survives_a_restart_with_sqlite(session: aiohttp.ClientSession, tmp_path: Any) -> None:
    store = f"sqlite:{tmp_path / 'gw.sqlite3'}"
    async with running_gateway(store=store, echo_pace=0) as first:
        cid = await create_conversation(session, first.url)
        async with session.post(f"{first.url}/v1/conversations/{cid}/notes", json={"text": "kept"}) as r:
            assert r.status == 201
    async with running_gateway(store=store, echo_pace=0) as second:
        conv = await get_json(session, f"{second.url}/v1/conversations/{cid}")
        assert [(m["role"], m["text"]) for m in conv["messages"]] == [("note", "kept")]
        assert conv["active_turn"] is None, "a stored note is not an interrupted turn"
        async with session.get(f"{second.url}/v1/conversations/{cid}/events",
                               headers={"Last-Event-ID": "0"}) as resp:
            (created,) = await SSEReader(resp).until("note.created")
        assert data(created)["text"] == "kept"


async def test_healthz_names_the_upstream_model_whole(session: aiohttp.ClientSession) -> None:
    """A model name with colons (llama3:8b) is reported whole, without the upstream's URL."""
    async with running_gateway(model="openai:http://127.0.0.1:9:llama3:8b") as g:
        health = await get_json(session, f"{g.url}/healthz")
    assert health["model"] == "openai:llama3:8b"


async def test_head_on_a_stream_is_405_and_the_connection_stays_usable(
    gw: RunningGateway, session: aiohttp.ClientSession
) -> None:
    cid = await create_conversation(session, gw.url)
    url = f"{gw.url}/v1/conversations/{cid}"
    for path in ("/events", "/btw/btw_nope"):
        async with session.head(url + path) as resp:
            assert resp.status == 405 and resp.headers["Allow"] == "GET"
    conv = gw.gateway._convs[cid]
    assert not conv.subscribers
    async with session.get(url) as resp:  # the same keep-alive connection answers the next request
        assert resp.status == 200


async def test_hostile_and_broken_requests_get_typed_answers(
    session: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    """Review findings, each a 500, a traceback or a forged log line before: invalid UTF-8 inside a JSON
    string is 400 invalid_json; a client that leaves mid-body is counted, not logged as an error; a
    percent-encoded newline in the path stays encoded in the access log; a 405 on a btw lists both of
    its methods; a refused CORS preflight has the JSON error body."""
    import asyncio
    import logging

    caplog.set_level(logging.INFO)
    async with running_gateway(echo_pace=0, access_log=True, cors_origins=("http://ok.test",)) as gw:
        cid = await create_conversation(session, gw.url)
        url = f"{gw.url}/v1/conversations/{cid}"
        for tail in ("/messages", "/notes", "/btw"):
            body = b'{"text": "\xff\xfe", "question": "\xed\xa0\x80"}'
            async with session.post(url + tail, data=body, headers={"Content-Type": "application/json"}) as r:
                assert r.status == 400 and (await r.json())["error"]["type"] == "invalid_json", tail
        host, port = gw.url.removeprefix("http://").split(":")
        _, writer = await asyncio.open_connection(host, int(port))
        writer.write(f"POST /v1/conversations/{cid}/notes HTTP/1.1\r\nHost: x\r\nContent-Type: "
                     "application/json\r\nContent-Length: 100\r\n\r\n{\"text\": \"part".encode())
        await writer.drain()
        writer.close()
        await writer.wait_closed()
        await wait_until(lambda: gw.gateway.metrics.client_disconnects_total >= 1, what="the disconnect")
        async with session.get(f"{gw.url}/v1/conversations/abc%0Aforged%20line") as r:
            assert r.status == 404
        async with session.post(f"{url}/btw/btw_0123") as r:
            assert r.status == 405 and set(r.headers["Allow"].split(", ")) >= {"GET", "DELETE"}
        refused = {"Origin": "http://evil.test", "Access-Control-Request-Method": "POST"}
        async with session.options(f"{gw.url}/v1/conversations", headers=refused) as r:
            assert r.status == 400 and (await r.json())["error"]["type"] == "cors_preflight_refused"
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]
    paths = [r.getMessage() for r in caplog.records if r.name == "sidechain.gateway.access"]
    assert any("abc%0Aforged%20line" in p for p in paths) and not any("\n" in p for p in paths)


def test_settings_must_be_finite() -> None:
    for field in ("keepalive_interval", "btw_grace", "store_timeout", "echo_pace", "shutdown_grace"):
        for bad in (float("nan"), float("inf")):
            with pytest.raises(ValueError, match=f"{field} must be a finite number"):
                GatewayConfig(**{field: bad}).validate()


@pytest.mark.parametrize(("error", "one_line"), [
    (PermissionError(13, "Permission denied"), True),  # outside the program: said in one line
    (KeyError("turn_id"), False),  # a bug: keeps its traceback
])
async def test_a_failed_start_is_one_line_unless_it_is_a_bug(
    error: BaseException, one_line: bool, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from sidechain.gateway.server import GatewayServer, GatewayStartupError, uvicorn_config
    from sidechain.gateway.service import Gateway

    async def failing_start(self: Gateway) -> None:
        raise error

    monkeypatch.setattr(Gateway, "start", failing_start)  # the fault: the store, or a bug, at start
    config = GatewayConfig(port=0, store="memory")
    app = gateway_app.create_app(config)
    server = GatewayServer(uvicorn_config(app, config), app.state.gateway)
    with caplog.at_level(logging.INFO), pytest.raises(GatewayStartupError) as failed:
        await server.serve()
    expected = f"{type(error).__name__}: {error}"
    assert str(failed.value) == f"the gateway failed to start: {expected}"
    logged = [r.getMessage() for r in caplog.records
              if r.name == "uvicorn.error" and r.levelno == logging.ERROR]
    if one_line:
        assert logged[0] == expected, logged
    else:
        assert logged[0].startswith("Traceback (most recent call last)"), logged
        assert "failing_start" in logged[0], logged
    assert not server.listening.is_set()
