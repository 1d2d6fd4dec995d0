"""The command line against a real gateway: chat (line mode, --json), btw, events, decode."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
from pathlib import Path

from sidechain import Conversation
from sidechain.gateway.testing import running_gateway


async def run_cli(*args: str, stdin: bytes = b"", env: dict[str, str] | None = None,
                  seconds: float = 30) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sidechain", *args,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )
    try:
        async with asyncio.timeout(seconds):
            out, err = await proc.communicate(stdin)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_chat_line_mode_json_streams_turn_and_btw() -> None:
    # the main answer (~20 words) must outlast the btw's first delta even on a busy machine
    async with running_gateway(echo_pace=20) as gw:
        code, out, err = await run_cli(
            "chat", "--line", "--json", "--url", gw.url,
            stdin=b"tell me something long enough to ask a side question\n/btw what did I ask?\n",
        )
        assert code == 0, err
        records = [json.loads(line) for line in out.splitlines()]
        kinds = [(r["stream"], r["event"]) for r in records]
        assert kinds[0] == ("main", "conversation")
        assert ("main", "turn.completed") in kinds
        assert ("btw", "btw.completed") in kinds
        btw_done = next(r for r in records if r["event"] == "btw.completed")
        assert "tell me something long" in btw_done["data"]["text"]
        # the btw streamed while the main turn was still streaming
        first_btw = kinds.index(("btw", "btw.delta"))
        assert kinds.index(("main", "turn.completed")) > first_btw
        conv_id = records[0]["data"]["id"]
        history = await Conversation.attach(gw.url, conv_id).history()
        assert [m["role"] for m in history["messages"]] == ["user", "assistant"]


async def test_chat_line_mode_inject_and_note_add_notes_without_turns() -> None:
    async with running_gateway(echo_pace=0) as gw:
        code, out, err = await run_cli(
            "chat", "--line", "--url", gw.url,
            stdin=b"/inject\n/btw what is this?\n/inject\n/note remember this\n",
        )
        assert code == 0, err
        assert "no btw answer to inject yet" in out
        conv_id = out.split("conversation ", 1)[1].split()[0]
        history = await Conversation.attach(gw.url, conv_id).history()
        notes = [m["text"] for m in history["messages"]]
        assert [m["role"] for m in history["messages"]] == ["note", "note"], "no turn ran"
        assert notes[0].startswith("**Q:** what is this?") and "**A:** [offline echo model" in notes[0]
        assert notes[1] == "remember this"


async def test_btw_and_events_commands_with_env_url() -> None:
    async with running_gateway(echo_pace=0) as gw:
        conv = await Conversation.create(gw.url)
        await conv.ask("first message")
        env = {"SIDECHAIN_URL": gw.url}
        code, out, err = await run_cli("btw", "--conversation", conv.id, "--json", "what", "was", "said?",
                                       env=env)
        assert code == 0, err
        last = json.loads(out.splitlines()[-1])
        assert last["event"] == "btw.completed" and "first message" in last["text"]
        code, out, err = await run_cli("events", "--conversation", conv.id, "--json", "--count", "3",
                                       "--last-event-id", "1", env=env)
        assert code == 0, err
        ids = [json.loads(line)["id"] for line in out.splitlines()]
        assert ids == ["2", "3", "4"]


async def test_unknown_conversation_is_a_clear_error() -> None:
    async with running_gateway() as gw:
        code, _, err = await run_cli("btw", "--conversation", "nope", "--url", gw.url, "hello")
        assert code == 1
        assert "HTTP 404" in err


async def test_decode_command() -> None:
    stream = b"\xef\xbb\xbfid: 7\nevent: x\ndata: a\ndata: b\n\nretry: 5\n\n"
    code, out, _ = await run_cli("decode", stdin=stream)
    assert code == 0
    lines = [json.loads(line) for line in out.splitlines()]
    assert lines == [{"event": "x", "id": "7", "data": "a\nb"}, {"retry": 5}]


async def test_an_unusable_url_is_a_one_line_usage_error() -> None:
    for args in (("btw", "--url", "notaurl", "--conversation", "c", "hi"),
                 ("btw", "--url", "ftp://example.org", "--conversation", "c", "hi"),
                 ("events", "--url", "http://", "--conversation", "c"),
                 ("chat", "--line", "--url", "notaurl")):
        code, out, err = await run_cli(*args)
        assert code == 2, (args, err)
        assert out == "" and err.count("\n") == 1 and err.startswith("sidechain: --url must be"), (args, err)


async def test_an_argument_that_is_not_utf8_is_a_one_line_usage_error() -> None:
    async with running_gateway(echo_pace=0) as gw:
        conv = await Conversation.create(gw.url)
        code, out, err = await run_cli("btw", "--url", gw.url, "--conversation", conv.id, "caf\udce9")
        assert code == 2, err
        assert out == "" and err == "sidechain: argument 'caf\\udce9' is not valid UTF-8\n"


async def test_a_closed_stdout_pipe_ends_the_command_quietly() -> None:
    # `head -n1` leaves after the first delta; the paced answer still has many deltas to write
    async with running_gateway(echo_pace=5) as gw:
        conv = await Conversation.create(gw.url)
        script = '"$0" -m sidechain btw --json --url "$1" --conversation "$2" a question | head -n1; ' \
                 'echo "rc=${PIPESTATUS[0]}" >&2'
        proc = await asyncio.create_subprocess_exec(
            "bash", "-c", script, sys.executable, gw.url, conv.id,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        async with asyncio.timeout(30):
            out, err = await proc.communicate()
        assert json.loads(out.decode())["event"] == "btw.delta"
        assert err.decode() == "rc=141\n"


def test_serve_options_map_onto_the_gateway_config() -> None:
    from sidechain.cli import build_parser
    from sidechain.gateway.server import config_from_args

    args = build_parser().parse_args(["serve", "--store", "memory", "--store-timeout", "3",
                                      "--retention", "50", "--btw-grace", "1.5",
                                      "--conversation-idle-evict", "0"])
    config = config_from_args(args)
    assert (config.store, config.store_timeout, config.retention) == ("memory", 3.0, 50)
    assert (config.btw_grace, config.conversation_idle_evict) == (1.5, 0.0)
    default = config_from_args(build_parser().parse_args(["serve", "--store", "memory"]))
    assert default.store_timeout == 10.0


async def test_serve_that_cannot_start_says_why_in_one_line(tmp_path: Path) -> None:
    """A store that cannot open: exit 1, the cause on the last line, no traceback unless asked for."""
    blocker = tmp_path / "not-a-directory"
    blocker.write_bytes(b"x")
    store = f"sqlite:{blocker}/events.db"
    code, _out, err = await run_cli("serve", "--port", "0", "--store", store)
    assert code == 1, err
    last = err.splitlines()[-1]
    assert last.startswith("sidechain serve: the gateway failed to start: FileExistsError:"), err
    assert "Traceback" not in err
    assert "ERROR uvicorn.error: FileExistsError: [Errno 17]" in err  # the server's own log line, one line
    code, _out, err = await run_cli("serve", "--port", "0", "--store", store, "--log-level", "debug")
    assert code == 1, err
    assert "Traceback (most recent call last)" in err and "os.makedirs" in err


async def test_serve_on_a_taken_port_says_so() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, _out, err = await run_cli("serve", "--port", str(port), "--store", "memory")
    assert code == 1, err
    last = err.splitlines()[-1]
    assert last.startswith("sidechain serve: the gateway failed to start: [Errno 98] "), err
    assert last.endswith(f"('127.0.0.1', {port}): address already in use"), err
    assert "Traceback" not in err
