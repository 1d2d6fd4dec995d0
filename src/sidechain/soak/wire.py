"""Small gateway helpers for the soak: conversations, turns, metrics, uninterrupted references, and the
comparisons that count lost and repeated events.

Each helper owns what it opens (dedicated sessions) and releases it before returning.
"""

from __future__ import annotations

import asyncio
import dataclasses
import difflib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import msgspec

from ..client import GatewayHTTPClient, Session
from ..client.btw import BTW_TERMINAL
from ..errors import HTTPStatusError, ProtocolError, SidechainError
from ..sse import Event

__all__ = [
    "QUESTION",
    "BtwReference",
    "btw_path",
    "compare_deltas",
    "compare_id_list",
    "compare_ids",
    "create_conversations",
    "events_path",
    "fetch_metrics",
    "post_message",
]

#: The side question every btw of the soak asks: long enough (quoted in full by the echo model) that an
#: answer takes ~40 tokens, so cancels and faults land in the middle of it.
QUESTION = (
    "what did we talk about so far, and which parts of the streaming protocol, the resume rules and "
    "the cancellation guarantees matter most for a client that drops its connections often?"
)

EventTuple = tuple[str, str, str]


def btw_path(cid: str) -> str:
    return f"/v1/conversations/{quote(cid, safe='')}/btw"


def events_path(cid: str) -> str:
    return f"/v1/conversations/{quote(cid, safe='')}/events"


async def create_conversations(http: GatewayHTTPClient, count: int, *, concurrency: int = 16) -> list[str]:
    """Create ``count`` conversations; their ids in order."""
    ids: list[str] = [""] * count
    gate = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        async with gate:
            created = await http.request_json("POST", "/v1/conversations", {})
        if not isinstance(created, dict) or not isinstance(created.get("id"), str):
            raise ProtocolError(f"unexpected answer to conversation creation: {created!r}", rule="json")
        ids[i] = created["id"]

    async with asyncio.TaskGroup() as tg:
        for i in range(count):
            tg.create_task(one(i))
    return ids


async def post_message(http: GatewayHTTPClient, cid: str, text: str, *, queue: bool = True,
                       patience: float = 60.0) -> str:
    """Send a message (queued behind a running turn); waits and retries while the queue is full (429).
    Returns the turn id."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + patience
    while True:
        try:
            result = await http.request_json("POST", f"/v1/conversations/{quote(cid, safe='')}/messages",
                                             {"text": text, "queue": queue})
        except HTTPStatusError as exc:
            if exc.status not in (409, 429) or loop.time() > deadline:
                raise
            await asyncio.sleep(0.05)
            continue
        turn = result.get("turn_id") if isinstance(result, dict) else None
        if not isinstance(turn, str):
            raise ProtocolError(f"unexpected answer to a message: {result!r}", rule="json")
        return turn


async def last_event_id(http: GatewayHTTPClient, cid: str) -> int:
    """The newest event id of a conversation, as the gateway reports it."""
    conv = await http.request_json("GET", f"/v1/conversations/{quote(cid, safe='')}")
    return int(conv["last_event_id"]) if isinstance(conv, dict) else 0


async def fetch_metrics(base_url: str) -> dict[str, float]:
    """The gateway's ``/metrics`` as ``{name: value}`` (empty when unreachable)."""
    session = Session(dedicated=True)
    try:
        response = await session.request("GET", base_url.rstrip("/") + "/metrics", data=None, headers={},
                                         connect_timeout=5.0, read_timeout=5.0)
        try:
            text = (await response.read()).decode("utf-8", "replace")
        finally:
            response.release()
    except (SidechainError, OSError):
        return {}
    finally:
        await session.aclose()
    values: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, raw = line.rpartition(" ")
        try:
            values[name] = float(raw)
        except ValueError:
            continue
    return values


def decode(data: str) -> dict[str, Any]:
    try:
        value = msgspec.json.decode(data)
    except msgspec.DecodeError:
        return {}
    return value if isinstance(value, dict) else {}


# -- references and comparisons ----------------------------------------------------------------------


@dataclass(frozen=True)
class BtwReference:
    """An uninterrupted btw answer to :data:`QUESTION` on a conversation with no messages.

    ``events`` are ``(id, event, data)`` with the btw and thread ids replaced by ``{btw}`` / ``{thr}``,
    so an answer from another btw compares byte for byte once normalized the same way.
    """

    events: tuple[EventTuple, ...]
    deltas: tuple[str, ...]
    text: str

    @classmethod
    async def fetch(cls, http: GatewayHTTPClient, cid: str) -> BtwReference:
        got: list[EventTuple] = []
        async with http.stream_post(btw_path(cid), {"question": QUESTION}, expect_terminal=BTW_TERMINAL) as s:
            async for event in s:
                got.append((event.id, event.event, event.data))
        events = normalize(got)
        if not events or events[-1][1] != "btw.completed":
            raise ProtocolError(f"the reference btw did not complete: {events[-1:]!r}", rule="terminal")
        deltas = tuple(str(decode(d).get("delta", "")) for _, kind, d in events if kind == "btw.delta")
        text = str(decode(events[-1][2]).get("text", ""))
        return cls(tuple(events), deltas, text)


def normalize(events: Sequence[EventTuple]) -> list[EventTuple]:
    """Replace this btw's own ids (from its ``btw.started`` event) by placeholders."""
    btw_id = thread_id = None
    for _, kind, data in events:
        if kind == "btw.started":
            payload = decode(data)
            btw_id, thread_id = payload.get("btw_id"), payload.get("thread_id")
            break
    out: list[EventTuple] = []
    for eid, kind, data in events:
        if isinstance(btw_id, str) and btw_id:
            data = data.replace(btw_id, "{btw}")
        if isinstance(thread_id, str) and thread_id:
            data = data.replace(thread_id, "{thr}")
        out.append((eid, kind, data))
    return out


def event_tuple(event: Event) -> EventTuple:
    return (event.id, event.event, event.data)


@dataclass(frozen=True)
class Comparison:
    lost: int
    repeated: int
    differing: int
    #: ids delivered for the first time after a higher id (strictly increasing ids expected); a repeat
    #: is counted as repeated only, not here
    out_of_order: int = 0


def compare_ids(reference: Sequence[EventTuple], got: Sequence[EventTuple], *, complete: bool) -> Comparison:
    """Compare delivered ``(id, event, data)`` to the reference stream (ids ``"1"``, ``"2"``, ...).

    Lost: ids missing below the highest delivered one (every reference id when ``complete``);
    repeated: ids delivered more than once; differing: delivered events whose bytes differ;
    out of order: ids delivered for the first time after a higher one.
    """
    by_id = {int(eid): (kind, data) for eid, kind, data in reference if eid.isdigit()}
    ids: list[int] = []
    checked: set[int] = set()
    differing = 0
    for eid, kind, data in got:
        if not eid.isdigit():
            differing += 1
            continue
        n = int(eid)
        ids.append(n)
        if n not in checked:  # the first delivery of an id is compared; a repeat counts as repeated
            checked.add(n)
            differing += by_id.get(n) != (kind, data)
    top = max(by_id) if complete and by_id else max(ids, default=0)
    return dataclasses.replace(compare_id_list(ids, top), differing=differing)


def compare_id_list(ids: Sequence[int], last: int) -> Comparison:
    """Delivered event ids against ``1..last`` (no bytes to compare): lost ids (missing up to
    ``last``), repeated ids and out-of-order ids, as :func:`compare_ids` counts them."""
    seen: dict[int, int] = {}
    out_of_order = highest = 0
    for n in ids:
        seen[n] = seen.get(n, 0) + 1
        if seen[n] == 1 and n < highest:
            out_of_order += 1
        highest = max(highest, n)
    lost = sum(1 for n in range(1, last + 1) if n not in seen)
    repeated = sum(c - 1 for c in seen.values())
    return Comparison(lost, repeated, 0, out_of_order)


def compare_deltas(reference: Sequence[str], got: Sequence[str], *, complete: bool) -> Comparison:
    """Compare delivered text deltas to the reference deltas (no ids to go by): aligned as sequences,
    a reference delta missing (or replaced by other text) before the last delivered one is lost, an
    extra delivered one is repeated.
    Without ``complete`` the reference's tail that was not delivered yet is not lost."""
    if list(got) == list(reference[: len(got)]) and (not complete or len(got) == len(reference)):
        return Comparison(0, 0, 0)
    matcher = difflib.SequenceMatcher(None, list(reference), list(got), autojunk=False)
    lost = repeated = 0
    opcodes = matcher.get_opcodes()
    for index, (tag, i1, i2, j1, j2) in enumerate(opcodes):
        tail = index == len(opcodes) - 1
        if tag == "delete":
            if not (tail and not complete):
                lost += i2 - i1
        elif tag == "insert":
            repeated += j2 - j1
        elif tag == "replace":  # other text where the reference has these deltas: they were lost
            lost += i2 - i1
    return Comparison(lost, repeated, 0)
