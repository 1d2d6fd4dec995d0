"""Decode benchmark: ``sidechain.sse.Decoder`` against the SSE parsers of its peers.

Every decoder gets the same in-memory bytes (no sockets, no HTTP), so what is measured is the cost of
turning bytes into event objects:

* ``sidechain``     -- ``sidechain.sse.Decoder().feed(chunk)`` for each chunk, then ``close()``;
* ``launchdarkly``  -- ``ld_eventsource.reader._SSEReader(_BufferedLineReader.lines_from(chunks))``,
  the pair ``SSEClient`` itself uses, consumed with ``events_and_comments()``;
* ``httpx-sse``     -- what ``EventSource.iter_sse`` does: a ``codecs`` incremental UTF-8 decoder with
  ``errors="replace"`` (as ``httpx.Response.iter_text``), ``SSELineDecoder`` and ``SSEDecoder``.
  The pipeline is inlined into one loop (no generator layers), which if anything flatters it;
* ``openai``        -- ``openai._streaming.SSEDecoder().iter_bytes(iter(chunks))``, as ``Stream`` uses.

Workload: N LLM-style delta events (``id`` / ``event: message.delta`` / one JSON ``data`` line with
tokens that include é, ü, 中文 and emoji), cut two ways: (a) 64 KiB slices that ignore event and
UTF-8 boundaries; (b) one chunk per event. Rounds are interleaved (each round runs every decoder once
per chunking, starting with a different decoder each round) and the median events/s is reported.
Each run's output is checked (outside the timed part): the number of events must be N, and the data,
type and id of the first, middle and last events -- and then of every event -- must equal what was
encoded.

The garbage collector is off inside the timed part (``gc.collect()`` before each run): the harness keeps
all N events alive, which would make the collector rescan the peers' gc-tracked event objects far more
than a consumer that handles each event and drops it. ``--gc`` leaves it on.

A small WHATWG conformance table follows: each vector is fed whole and one byte at a time.

Usage::

    python bench/decode.py                 # 100k events, 7 rounds
    python bench/decode.py --quick         # 20k events, 3 rounds
    python bench/decode.py --events 50000 --rounds 5 --json out.json
"""

from __future__ import annotations

import argparse
import codecs
import gc
import json
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sidechain.sse import Decoder
from sidechain.sse import Event as SidechainEvent

Triple = tuple[str, str, str]  # (data, event type, last event id)
DecodeFn = Callable[[Sequence[bytes]], tuple[list[Any], int | None]]

SLICE = 64 * 1024
TARGET_RATIO = 1.5


# -- contenders ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Contender:
    """One decoder under test.

    ``decode`` is the timed part: it turns the chunks into the library's own event objects (plus a
    retry value where the library keeps one per stream). ``view`` maps one of those objects to
    ``(data, type, last_event_id)`` or ``None`` if it is not an event (a comment); ``retry`` gives the
    reconnection time the stream set, for the conformance table.
    """

    name: str
    version: str
    decode: DecodeFn
    view: Callable[[Any], Triple | None]
    retry: Callable[[list[Any], int | None], int | None] = field(default=lambda _out, hint: hint)


def _sidechain() -> Contender:
    from importlib.metadata import version

    def decode(chunks: Sequence[bytes]) -> tuple[list[Any], int | None]:
        dec = Decoder()
        out: list[Any] = []
        extend = out.extend
        feed = dec.feed
        for chunk in chunks:
            extend(feed(chunk))
        extend(dec.close())
        return out, dec.retry

    def view(ev: Any) -> Triple | None:
        if isinstance(ev, SidechainEvent):
            return (ev.data, ev.event, ev.id)
        return None

    return Contender("sidechain", version("sidechain"), decode, view)


def _launchdarkly() -> Contender:
    from importlib.metadata import version

    from ld_eventsource.actions import Event as LDEvent
    from ld_eventsource.reader import _BufferedLineReader, _SSEReader

    def decode(chunks: Sequence[bytes]) -> tuple[list[Any], int | None]:
        retries: list[int] = []
        reader = _SSEReader(_BufferedLineReader.lines_from(chunks), None, retries.append)
        out = list(reader.events_and_comments())
        return out, (retries[-1] if retries else None)

    def view(ev: Any) -> Triple | None:
        if isinstance(ev, LDEvent):
            return (ev.data, ev.event, ev.last_event_id or "")
        return None

    return Contender("launchdarkly", version("launchdarkly-eventsource"), decode, view)


def _last_event_retry(out: list[Any], hint: int | None) -> int | None:
    # httpx-sse and openai attach ``retry`` to the event that follows it; take the last one given.
    for ev in reversed(out):
        if ev.retry is not None:
            return int(ev.retry)
    return hint


def _httpx_sse() -> Contender:
    from importlib.metadata import version

    from httpx_sse._decoders import SSEDecoder, SSELineDecoder

    def decode(chunks: Sequence[bytes]) -> tuple[list[Any], int | None]:
        text_decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")  # httpx TextDecoder
        line_decoder = SSELineDecoder()
        sse_decoder = SSEDecoder()
        out: list[Any] = []
        append = out.append
        split = line_decoder.decode
        parse = sse_decoder.decode
        for chunk in chunks:
            text = text_decoder.decode(chunk)
            if text:  # httpx's TextChunker drops empty strings
                for line in split(text):
                    sse = parse(line.rstrip("\n"))
                    if sse is not None:
                        append(sse)
        tail = text_decoder.decode(b"", True)
        lines = split(tail) if tail else []
        lines.extend(line_decoder.flush())
        for line in lines:
            sse = parse(line.rstrip("\n"))
            if sse is not None:
                append(sse)
        return out, None

    def view(ev: Any) -> Triple | None:
        return (ev.data, ev.event, ev.id)

    return Contender("httpx-sse", version("httpx-sse"), decode, view, _last_event_retry)


def _openai() -> Contender:
    from importlib.metadata import version

    from openai._streaming import SSEDecoder

    def decode(chunks: Sequence[bytes]) -> tuple[list[Any], int | None]:
        return list(SSEDecoder().iter_bytes(iter(chunks))), None

    def view(ev: Any) -> Triple | None:
        return (ev.data, ev.event or "message", ev.id or "")

    return Contender("openai", version("openai"), decode, view, _last_event_retry)


def contenders() -> list[Contender]:
    return [_sidechain(), _launchdarkly(), _httpx_sse(), _openai()]


# -- workload -----------------------------------------------------------------------------------------

# fmt: off
TOKENS = [
    "Hello", " world", ",", ".", " the", " a", " of", " and", " to", " streaming", " tokens",
    " café", " é", "té", " naïve", " über", "ü", " Grüße", " Ωmega", " 中文", "中", "文字", " 你好",
    " 🙂", "🚀", " 👩‍💻", " emoji", ' "quoted"', "\\", "\n", "\t", " 1234", " -", " résumé",
]
# fmt: on


@dataclass(frozen=True)
class Workload:
    events: list[bytes]  # one encoded event each
    blob: bytes
    expected: list[Triple]  # what must come out, event by event

    @property
    def n(self) -> int:
        return len(self.events)


def make_workload(n: int, seed: int = 1) -> Workload:
    rng = random.Random(seed)
    events: list[bytes] = []
    expected: list[Triple] = []
    turn = ""
    for i in range(n):
        if i % 400 == 0:
            turn = f"t_{rng.getrandbits(64):016x}"
        delta = "".join(rng.choice(TOKENS) for _ in range(rng.randint(1, 3)))
        data = json.dumps(
            {"type": "message.delta", "turn_id": turn, "delta": delta},
            ensure_ascii=False,
            separators=(",", ":"),
        )
        events.append(f"id: {i + 1}\nevent: message.delta\ndata: {data}\n\n".encode())
        expected.append((data, "message.delta", str(i + 1)))
    return Workload(events, b"".join(events), expected)


def check(c: Contender, out: list[Any], w: Workload) -> str | None:
    """``None`` if ``out`` is what was encoded, else what is wrong."""
    try:
        evs = [t for t in map(c.view, out) if t is not None]
    except Exception as exc:
        return f"view failed: {exc!r}"
    if len(evs) != w.n:
        return f"{len(evs)} events, expected {w.n}"
    for i in (0, w.n // 2, w.n - 1):  # the samples, named in the report if wrong
        if evs[i] != w.expected[i]:
            return f"event #{i}: got {evs[i]!r}, expected {w.expected[i]!r}"
    if evs != w.expected:  # and then every other event
        i = next(i for i, (got, want) in enumerate(zip(evs, w.expected, strict=True)) if got != want)
        return f"event #{i}: got {evs[i]!r}, expected {w.expected[i]!r}"
    return None


# -- timing -------------------------------------------------------------------------------------------


@dataclass
class Series:
    times: list[float] = field(default_factory=list)
    failure: str | None = None


def time_once(c: Contender, chunks: Sequence[bytes], keep_gc: bool) -> tuple[float, list[Any] | str]:
    gc.collect()
    if not keep_gc:
        gc.disable()
    try:
        t0 = time.perf_counter()
        out, _ = c.decode(chunks)
        elapsed = time.perf_counter() - t0
    except Exception as exc:
        return 0.0, f"raised {exc!r}"
    finally:
        gc.enable()
    return elapsed, out


def run_bench(
    cs: list[Contender], chunkings: dict[str, list[bytes]], w: Workload, rounds: int, keep_gc: bool
) -> dict[str, dict[str, Series]]:
    results = {label: {c.name: Series() for c in cs} for label in chunkings}
    for r in range(rounds):
        order = cs[r % len(cs) :] + cs[: r % len(cs)]
        for label, chunks in chunkings.items():
            for c in order:
                s = results[label][c.name]
                if s.failure is not None:
                    continue
                elapsed, out = time_once(c, chunks, keep_gc)
                problem = out if isinstance(out, str) else check(c, out, w)
                del out
                if problem is not None:
                    s.failure = problem
                    continue
                s.times.append(elapsed)
        done = ", ".join(
            f"{label}/{name} {w.n / statistics.median(s.times) / 1e6:.2f}M"
            for label, per in results.items()
            for name, s in per.items()
            if s.times
        )
        print(f"  round {r + 1}/{rounds}: {done}", file=sys.stderr, flush=True)
    return results


# -- conformance --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Vector:
    name: str
    stream: bytes
    events: list[Triple]
    retry: int | None = None


VECTORS = [
    Vector("leading BOM stripped", b"\xef\xbb\xbfdata: a\n\n", [("a", "message", "")]),
    Vector(
        "`retry: 12x` ignored",
        b"retry: 1000\nretry: 12x\ndata: a\n\n",
        [("a", "message", "")],
        retry=1000,
    ),
    Vector(
        "id containing NUL ignored",
        b"id: 1\ndata: a\n\nid: x\x00y\ndata: b\n\n",
        [("a", "message", "1"), ("b", "message", "1")],
    ),
    Vector(
        "data-less block dispatches nothing",
        b"event: ping\n\nid: 7\n\ndata: a\n\n",
        [("a", "message", "7")],
    ),
    Vector(
        "CR-only line ends",
        b"data: a\rdata: b\r\rdata: c\r\r",
        [("a\nb", "message", ""), ("c", "message", "")],
    ),
    Vector("partial event at EOF dropped", b"data: a\n\ndata: b\n", [("a", "message", "")]),
    Vector(
        "(extra) `retry: 1_0` ignored",
        b"retry: 5\nretry: 1_0\ndata: a\n\n",
        [("a", "message", "")],
        retry=5,
    ),
]


def conform_one(c: Contender, v: Vector, chunks: Sequence[bytes]) -> str | None:
    try:
        out, hint = c.decode(chunks)
        got = [t for t in map(c.view, out) if t is not None]
        retry = c.retry(out, hint)
    except Exception as exc:
        return f"raised {exc!r}"
    if got != v.events:
        return f"events {got!r}, expected {v.events!r}"
    if retry != v.retry:
        return f"retry {retry!r}, expected {v.retry!r}"
    return None


def run_conformance(cs: list[Contender]) -> dict[str, dict[str, str | None]]:
    table: dict[str, dict[str, str | None]] = {}
    for v in VECTORS:
        row: dict[str, str | None] = {}
        for c in cs:
            whole = conform_one(c, v, [v.stream])
            split = conform_one(c, v, [v.stream[i : i + 1] for i in range(len(v.stream))])
            if whole is None and split is None:
                row[c.name] = None
            elif whole is not None and split is not None and whole == split:
                row[c.name] = whole
            else:
                row[c.name] = f"whole: {whole or 'ok'}; byte-by-byte: {split or 'ok'}"
        table[v.name] = row
    return table


# -- report -------------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.partition(":")[2].strip()
                    break
    except OSError:
        pass
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count() or 0
    return {
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "platform": platform.platform(),
        "cpu": cpu,
        "cores": cores,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    p.add_argument("--events", type=int, default=None, help="number of events (default 100000)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 7)")
    p.add_argument("--quick", action="store_true", help="smaller run: 20000 events, 3 rounds")
    p.add_argument("--gc", action="store_true", help="leave the garbage collector on while timing")
    p.add_argument("--json", metavar="PATH", help="write the results as JSON to PATH")
    args = p.parse_args(argv)
    n = args.events or (20_000 if args.quick else 100_000)
    rounds = args.rounds or (3 if args.quick else 7)
    if n < 3 or rounds < 1:
        p.error("need --events >= 3 and --rounds >= 1")

    cs = contenders()
    w = make_workload(n)
    slices = [w.blob[i : i + SLICE] for i in range(0, len(w.blob), SLICE)]
    chunkings = {"64 KiB slices": slices, "one chunk per event": w.events}
    info = machine()
    print(
        f"# decode benchmark: {n} events, {len(w.blob) / 1e6:.1f} MB, {rounds} rounds, "
        f"gc {'on' if args.gc else 'off'} while timing",
    )
    print(f"# {info['python']} on {info['platform']}, {info['cpu']}, {info['cores']} cores")
    print("# " + ", ".join(f"{c.name} {c.version}" for c in cs))

    t0 = time.perf_counter()
    results = run_bench(cs, chunkings, w, rounds, args.gc)
    bench_seconds = time.perf_counter() - t0

    print()
    print("| chunking | " + " | ".join(c.name for c in cs) + " | sidechain / fastest peer |")
    print("|---|" + "---:|" * len(cs) + "---:|")
    summary: dict[str, Any] = {}
    met = True
    for label, per in results.items():
        medians: dict[str, float | None] = {}
        cells = []
        for c in cs:
            s = per[c.name]
            if s.failure is not None or not s.times:
                medians[c.name] = None
                cells.append("FAILED CHECK")
            else:
                eps = n / statistics.median(s.times)
                medians[c.name] = eps
                cells.append(f"{eps / 1e6:.2f}M ev/s")
        peers = {k: v for k, v in medians.items() if k != "sidechain" and v is not None}
        ours = medians["sidechain"]
        fastest = max(peers, key=lambda k: peers[k]) if peers else None
        ratio = ours / peers[fastest] if ours is not None and fastest is not None else None
        met = met and ratio is not None and ratio >= TARGET_RATIO
        ratio_cell = f"{ratio:.2f}x vs {fastest}" if ratio is not None else "n/a"
        print(f"| {label} | " + " | ".join(cells) + f" | {ratio_cell} |")
        summary[label] = {
            "events_per_second_median": medians,
            "seconds": {name: s.times for name, s in per.items()},
            "check_failures": {name: s.failure for name, s in per.items() if s.failure is not None},
            "fastest_peer": fastest,
            "ratio_vs_fastest_peer": ratio,
        }
    for label, per in results.items():
        for name, s in per.items():
            if s.failure is not None:
                print(f"\n{name} failed the check on {label}: {s.failure}")
    print(
        f"\ntarget (sidechain >= {TARGET_RATIO}x the fastest peer in both chunkings): "
        f"{'MET' if met else 'NOT MET'}  [timing took {bench_seconds:.1f}s]"
    )

    conformance = run_conformance(cs)
    print("\n| vector (fed whole and byte-by-byte) | " + " | ".join(c.name for c in cs) + " |")
    print("|---|" + ":---:|" * len(cs))
    for vname, row in conformance.items():
        print(f"| {vname} | " + " | ".join("pass" if row[c.name] is None else "FAIL" for c in cs) + " |")
    print()
    for vname, row in conformance.items():
        for cname, why in row.items():
            if why is not None:
                print(f"- {cname} / {vname}: {why}")

    if args.json:
        doc = {
            "machine": info,
            "versions": {c.name: c.version for c in cs},
            "events": n,
            "bytes": len(w.blob),
            "rounds": rounds,
            "gc_during_timing": args.gc,
            "results": summary,
            "target_ratio": TARGET_RATIO,
            "target_met": met,
            "conformance": conformance,
        }
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=2, ensure_ascii=False)
            f.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
