"""Client-side commands of the ``sidechain`` CLI: chat, btw, events, demo.

Every command takes ``--url`` and ``--token`` (also from ``SIDECHAIN_URL`` / ``SIDECHAIN_TOKEN``) and
``--json`` for machine-readable output (one JSON object per line).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import importlib
import json
import os
import sys
import time
from typing import Any
from urllib.parse import urlsplit

from . import loops
from .client import Conversation, Fault
from .client.btw import decode_payload
from .errors import HTTPStatusError, SidechainError
from .sse import Comment, Event

DEFAULT_URL = "http://127.0.0.1:8765"


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default=os.environ.get("SIDECHAIN_URL", DEFAULT_URL),
                   help=f"gateway base URL (env SIDECHAIN_URL; default {DEFAULT_URL})")
    p.add_argument("--token", default=os.environ.get("SIDECHAIN_TOKEN"),
                   help="bearer token (env SIDECHAIN_TOKEN)")
    p.add_argument("--json", action="store_true", help="one JSON object per line")


def add_client_commands(sub: Any) -> None:
    """Register chat, btw, events and demo on the CLI's subparsers."""
    chat = sub.add_parser("chat", help="chat with the gateway; /btw QUESTION asks a side question")
    _add_common(chat)
    chat.add_argument("--conversation", help="attach to an existing conversation")
    chat.add_argument("--with-gateway", action="store_true",
                      help="start a local gateway (echo model) for this chat and stop it on exit")
    chat.add_argument("--line", action="store_true", help="line mode even on a terminal")
    chat.set_defaults(func=cmd_chat)

    btw = sub.add_parser("btw", help="ask a side question about a conversation and stream the answer")
    _add_common(btw)
    btw.add_argument("--conversation", required=True)
    btw.add_argument("--thread", help="continue this btw thread")
    btw.add_argument("question", nargs="+")
    btw.set_defaults(func=cmd_btw)

    events = sub.add_parser("events", help="follow a conversation's event stream")
    _add_common(events)
    events.add_argument("--conversation", required=True)
    events.add_argument("--last-event-id", help="resume after this id")
    events.add_argument("--count", type=int, help="stop after this many events")
    events.add_argument("--until-idle", type=float, help="stop after this many seconds without an event")
    events.add_argument("--comments", action="store_true", help="also show comments (keepalives)")
    events.set_defaults(func=cmd_events)

    demo = sub.add_parser("demo", help="start a gateway and run a scripted chat with a btw (make run)")
    demo.add_argument("--json", action="store_true")
    demo.set_defaults(func=cmd_demo)

    from .soak.cli import add_soak_command

    add_soak_command(sub)


def _usage_error(args: argparse.Namespace, *, url: bool = True) -> int | None:
    """2, after one line on stderr, when an argument cannot be used: text that is not UTF-8 (it could not
    be sent), or (with ``url``) a ``--url`` that is not an http(s) URL with a host; else None."""
    for value in vars(args).values():
        for text in value if isinstance(value, list) else [value]:
            if isinstance(text, str):
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError:
                    print(f"sidechain: argument {text!r} is not valid UTF-8", file=sys.stderr)
                    return 2
    if url:
        try:
            parts = urlsplit(args.url)
            valid = parts.scheme in ("http", "https") and bool(parts.hostname) and parts.port != 0
        except ValueError:  # a malformed IPv6 address or port
            valid = False
        if not valid:
            print(f"sidechain: --url must be an http(s) URL such as {DEFAULT_URL}, got {args.url!r}",
                  file=sys.stderr)
            return 2
    return None


def _run(coro: Any) -> int:
    try:
        loop = loops.resolve_loop()
    except ValueError as exc:
        coro.close()
        print(f"sidechain: SIDECHAIN_LOOP: {exc}", file=sys.stderr)
        return 2
    try:
        result: int = loops.run(coro, loop=loop)
        return result
    except HTTPStatusError as exc:
        print(f"sidechain: HTTP {exc.status}: {exc.body[:300]}", file=sys.stderr)
        return 1
    except SidechainError as exc:
        print(f"sidechain: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # the reader of stdout went away (``| head``): what is still buffered goes nowhere, so that
        # flushing it at exit does not fail again; 141 is what a shell reports for a SIGPIPE death
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 141


# -- chat ------------------------------------------------------------------------------------------


def cmd_chat(args: argparse.Namespace) -> int:
    if (code := _usage_error(args, url=not args.with_gateway)) is not None:
        return code

    async def main() -> int:
        from .chat import run_chat

        if args.with_gateway:
            from .launcher import local_gateway

            async with local_gateway(["--store", "memory"]) as url:
                return await _chat_ui(url, args, run_chat)
        return await _chat_ui(args.url, args, run_chat)

    return _run(main())


async def _chat_ui(url: str, args: argparse.Namespace, run_line: Any) -> int:
    if not args.line and not args.json and sys.stdin.isatty() and sys.stdout.isatty():
        try:
            tui = importlib.import_module("sidechain.tui")
        except ImportError:  # Textual missing: line mode
            pass
        else:
            result: int = await tui.run_tui(url, token=args.token, conversation_id=args.conversation)
            return result
    line_result: int = await run_line(url, token=args.token, conversation_id=args.conversation,
                                      json_mode=args.json)
    return line_result


# -- btw -------------------------------------------------------------------------------------------


def cmd_btw(args: argparse.Namespace) -> int:
    if (code := _usage_error(args)) is not None:
        return code

    async def main() -> int:
        conv = Conversation.attach(args.url, args.conversation, token=args.token)
        question = " ".join(args.question)
        async with conv.btw(question, thread_id=args.thread) as answer:
            async for delta in answer:
                if args.json:
                    print(json.dumps({"event": "btw.delta", "delta": delta}, ensure_ascii=False), flush=True)
                else:
                    sys.stdout.write(delta)
                    sys.stdout.flush()
        if args.json:
            done = {"event": "btw.completed", "btw_id": answer.btw_id, "thread_id": answer.thread_id,
                    "text": answer.text}
            print(json.dumps(done, ensure_ascii=False))
        else:
            sys.stdout.write("\n")
            print(f"(btw {answer.btw_id}, thread {answer.thread_id})", file=sys.stderr)
        return 0

    return _run(main())


# -- events ----------------------------------------------------------------------------------------


def cmd_events(args: argparse.Namespace) -> int:
    if (code := _usage_error(args)) is not None:
        return code

    async def main() -> int:
        conv = Conversation.attach(args.url, args.conversation, token=args.token)
        count = 0
        async with conv.events(last_event_id=args.last_event_id) as events:
            it = events.items()
            while True:
                try:
                    async with asyncio.timeout(args.until_idle):
                        item = await anext(it)
                except (TimeoutError, StopAsyncIteration):
                    break
                _print_item(item, json_mode=args.json, comments=args.comments)
                if isinstance(item, Event):
                    count += 1
                    if args.count and count >= args.count:
                        break
            await it.aclose()  # type: ignore[attr-defined]
        return 0

    return _run(main())


def _print_item(item: Event | Comment | Fault, *, json_mode: bool, comments: bool) -> None:
    if isinstance(item, Event):
        if json_mode:
            try:
                data: Any = decode_payload(item)
            except SidechainError:
                data = item.data
            record = {"id": item.id, "event": item.event, "data": data}
            print(json.dumps(record, ensure_ascii=False), flush=True)
        else:
            print(f"{item.id:>6}  {item.event:<18} {item.data}", flush=True)
    elif isinstance(item, Comment):
        if comments:
            print(json.dumps({"comment": item.text}) if json_mode else f"        : {item.text}", flush=True)
    elif json_mode:
        print(json.dumps({"fault": repr(item.error), "will_retry": item.will_retry, "delay": item.delay}),
              flush=True)
    else:
        what = f"reconnecting in {item.delay:.1f}s" if item.will_retry else "giving up"
        print(f"        ! {type(item.error).__name__}: {item.error} ({what})", file=sys.stderr, flush=True)


# -- demo ------------------------------------------------------------------------------------------


def _fds() -> int:
    return len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else -1


def cmd_demo(args: argparse.Namespace) -> int:
    """A scripted session: a main turn streams, a btw is answered meanwhile, another is cancelled."""

    async def main() -> int:
        from .launcher import local_gateway

        out = sys.stdout

        def say(text: str) -> None:
            out.write(text)
            out.flush()

        async with local_gateway(["--store", "memory", "--echo-pace", "40"]) as url:
            say(f"gateway (embedded echo model) on {url}\n")
            conv = await Conversation.create(url)
            fds_before, tasks_before = _fds(), len(asyncio.all_tasks())
            say(f"conversation {conv.id}\n\nyou: Tell me how sidechain streams a main turn\nagent: ")
            async with conv.events() as events:
                turn = await conv.send("Tell me how sidechain streams a main turn")
                main_done = asyncio.Event()
                main_text: list[str] = []

                async def follow() -> None:
                    async for event in events:
                        data = decode_payload(event)
                        if data.get("turn_id") != turn:
                            continue
                        if event.event == "message.delta":
                            main_text.append(data["delta"])
                        if event.event in ("turn.completed", "turn.failed"):
                            main_done.set()
                            return

                follower = asyncio.create_task(follow())
                while len(main_text) < 3 and not main_done.is_set():
                    await asyncio.wait({follower}, timeout=0.02)
                say("".join(main_text) + " …\n")
                say("\n  ┌ /btw what did I just ask?   (asked while the main turn streams)\n  │ ")
                async with conv.btw("what did I just ask?") as answer:
                    async for delta in answer:
                        say(delta)
                say("\n  └ btw done (not added to the main history)\n")
                say("\n  ┌ /btw a question cancelled after three deltas\n  │ ")
                async with conv.btw("tell me everything about btw threads") as cancelled:
                    n = 0
                    async for delta in cancelled:
                        say(delta)
                        n += 1
                        if n == 3:
                            break  # leaving early: the client DELETEs the btw on the gateway
                say(" …\n  └ btw cancelled; the main turn keeps streaming\n\nagent (main turn, in full): ")
                await follower
            say("".join(main_text) + "\n")
            history = await conv.history()
            gc.collect()
            await asyncio.sleep(0)
            fds_after, tasks_after = _fds(), len(asyncio.all_tasks())
            say(f"\nhistory holds {len(history['messages'])} messages (no btw in it); "
                f"client fds {fds_before}→{fds_after}, tasks {tasks_before}→{tasks_after}\n\n")
            ok = (len(history["messages"]) == 2 and fds_after <= fds_before and tasks_after <= tasks_before)
            if args.json:
                summary = {"ok": ok, "fds": [fds_before, fds_after], "tasks": [tasks_before, tasks_after],
                           "btw": answer.text}
                print(json.dumps(summary))
            return 0 if ok else 1

    started = time.perf_counter()
    code = _run(main())
    with contextlib.suppress(Exception):
        print(f"(demo finished in {time.perf_counter() - started:.1f}s)", file=sys.stderr)
    return code
