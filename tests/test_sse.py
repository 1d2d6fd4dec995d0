"""The SSE codec against the WHATWG rules: spec vectors in every chunking, round trips, fuzzing."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidechain.errors import EncodeError, ProtocolError
from sidechain.sse import Comment, Decoder, Encoder, Event, encode

E = Event


@dataclass
class Vector:
    name: str
    stream: bytes
    events: list[Event]
    last_id: str = ""
    retry: int | None = None
    comments: list[str] = field(default_factory=list)


VECTORS: list[Vector] = [
    Vector("simple", b"data: hi\n\n", [E("hi")]),
    Vector("no space after colon", b"data:hi\n\n", [E("hi")]),
    Vector("only one space removed", b"data:  hi\n\n", [E(" hi")]),
    Vector("trailing space kept", b"data: hi \n\n", [E("hi ")]),
    Vector("multi data lines joined", b"data: a\ndata: b\ndata: c\n\n", [E("a\nb\nc")]),
    Vector("empty data line", b"data\n\n", [E("")]),
    Vector("data colon empty", b"data:\n\n", [E("")]),
    Vector("two empty data lines", b"data\ndata\n\n", [E("\n")]),
    Vector("data then empty data", b"data: a\ndata\n\n", [E("a\n")]),
    Vector("CRLF line ends", b"data: a\r\ndata: b\r\n\r\n", [E("a\nb")]),
    Vector("CR line ends", b"data: a\rdata: b\r\r", [E("a\nb")]),
    Vector("mixed line ends", b"data: a\r\ndata: b\rdata: c\n\r\n", [E("a\nb\nc")]),
    Vector("LF CR is two line ends", b"data: a\n\rdata: b\n\n", [E("a"), E("b")]),
    Vector("BOM stripped", b"\xef\xbb\xbfdata: a\n\n", [E("a")]),
    Vector("only one BOM stripped", b"\xef\xbb\xbf\xef\xbb\xbfdata: a\n\n", []),
    Vector("BOM not at start kept", b"data: a\n\n\xef\xbb\xbfdata: b\n\n", [E("a")]),
    Vector("BOM inside value kept", b"data: \xef\xbb\xbfx\n\n", [E("\ufeffx")]),
    Vector("event type", b"event: ping\ndata: x\n\n", [E("x", "ping")]),
    Vector("event type reset after dispatch", b"event: a\ndata: 1\n\ndata: 2\n\n", [E("1", "a"), E("2")]),
    Vector("empty event type is message", b"event\ndata: x\n\n", [E("x")]),
    Vector("event type without data dispatches nothing", b"event: a\n\ndata: x\n\n", [E("x")]),
    Vector("id set", b"id: 1\ndata: x\n\n", [E("x", id="1")], last_id="1"),
    Vector("id persists", b"id: 1\ndata: x\n\ndata: y\n\n", [E("x", id="1"), E("y", id="1")], last_id="1"),
    Vector("empty id resets", b"id: 1\ndata: x\n\nid\ndata: y\n\n", [E("x", id="1"), E("y")]),
    Vector("id colon empty resets", b"id: 1\ndata: x\n\nid:\ndata: y\n\n", [E("x", id="1"), E("y")]),
    Vector("id with NUL ignored", b"id: 1\ndata: x\n\nid: 2\x003\ndata: y\n\n",
           [E("x", id="1"), E("y", id="1")], last_id="1"),
    Vector("data-less block updates id", b"id: 5\n\ndata: x\n\n", [E("x", id="5")], last_id="5"),
    Vector("id only at EOF not applied", b"id: 1\ndata: x\n\nid: 2\n", [E("x", id="1")], last_id="1"),
    Vector("id after data in block", b"data: x\nid: 9\n\n", [E("x", id="9")], last_id="9"),
    Vector("id with spaces kept", b"id:  a b \ndata: x\n\n", [E("x", id=" a b ")], last_id=" a b "),
    Vector("retry digits", b"retry: 3000\n\n", [], retry=3000),
    Vector("retry non digit ignored", b"retry: 3000\n\nretry: 12x\n\n", [], retry=3000),
    Vector("retry negative ignored", b"retry: -1\n\n", []),
    Vector("retry float ignored", b"retry: 1.5\n\n", []),
    Vector("retry empty ignored", b"retry\n\n", []),
    Vector("retry unicode digits ignored", "retry: \u0663\n\n".encode(), []),
    Vector("retry leading space twice ignored", b"retry:  10\n\n", []),
    Vector("comment ignored", b": hello\ndata: x\n\n", [E("x")], comments=["hello"]),
    Vector("comment only block", b": keepalive\n\n", [], comments=["keepalive"]),
    Vector("bare colon comment", b":\n\n", [], comments=[""]),
    Vector("unknown field ignored", b"foo: bar\ndata: x\n\n", [E("x")]),
    Vector("field names case-sensitive", b"Data: x\nDATA: y\n\n", []),
    Vector("field without colon is empty", b"data\n\n", [E("")]),
    Vector("colon in value kept", b"data: a:b: c\n\n", [E("a:b: c")]),
    Vector("partial event at EOF dropped", b"data: x\n\ndata: y\n", [E("x")]),
    Vector("partial line at EOF dropped", b"data: x\n\ndata: y", [E("x")]),
    Vector("no final blank line", b"data: x\n", []),
    Vector("utf8 multi-byte", "data: héllo 中文 🎉\n\n".encode(), [E("héllo 中文 🎉")]),
    Vector("invalid utf8 replaced", b"data: a\xffb\n\n", [E("a\ufffdb")]),
    Vector("truncated utf8 replaced", b"data: \xe4\xb8\n\n", [E("\ufffd")]),
    Vector("invalid utf8 in event type", b"event: \xff\ndata: x\n\n", [E("x", "\ufffd")]),
    Vector("blank lines between events", b"\n\n\ndata: x\n\n\n\ndata: y\n\n", [E("x"), E("y")]),
    Vector("json payload", b'id: 3\nevent: message.delta\ndata: {"a": 1}\n\n',
           [E('{"a": 1}', "message.delta", "3")], last_id="3"),
    Vector("NUL in data kept", b"data: a\x00b\n\n", [E("a\x00b")]),
    Vector("space-only value", b"data: \n\n", [E("")]),
    Vector("tab not stripped", b"data:\tx\n\n", [E("\tx")]),
]


def _chunkings(stream: bytes, seed: int) -> list[list[bytes]]:
    rng = random.Random(seed)
    out = [[stream], [stream[i : i + 1] for i in range(len(stream))]]
    for _ in range(8):
        cuts = sorted(rng.sample(range(1, len(stream)), k=min(len(stream) - 1, rng.randint(1, 6))))
        if not cuts:
            continue
        pieces, prev = [], 0
        for c in [*cuts, len(stream)]:
            pieces.append(stream[prev:c])
            prev = c
        out.append(pieces)
    return out


def _decode(pieces: list[bytes], *, comments: bool = False) -> tuple[list[Event | Comment], Decoder]:
    d = Decoder(comments=comments)
    got: list[Event | Comment] = []
    for p in pieces:
        got.extend(d.feed(p))
    got.extend(d.close())
    return got, d


def test_there_are_at_least_40_vectors() -> None:
    assert len(VECTORS) >= 40


@pytest.mark.parametrize("vec", VECTORS, ids=[v.name for v in VECTORS])
def test_spec_vector_in_every_chunking(vec: Vector) -> None:
    for i, pieces in enumerate(_chunkings(vec.stream, seed=hash(vec.name) & 0xFFFF)):
        got, d = _decode(pieces)
        assert got == vec.events, f"chunking #{i}: {pieces!r}"
        assert d.last_event_id == vec.last_id
        assert d.retry == vec.retry
        got_c, _ = _decode(pieces, comments=True)
        assert [c.text for c in got_c if isinstance(c, Comment)] == vec.comments
        assert [e for e in got_c if isinstance(e, Event)] == vec.events


def test_cr_at_chunk_end_and_lf_at_next_start_are_one_line_end() -> None:
    d = Decoder()
    assert d.feed(b"data: a\r") == []
    assert d.feed(b"\n") == []
    assert d.feed(b"data: b\r") == []
    assert d.feed(b"\ndata: c\r\n\r") == [E("a\nb\nc")]
    assert d.feed(b"\n") == []  # LF after the CR of the blank line: no extra blank line
    assert d.feed(b"data: d\n\n") == [E("d")]


def test_utf8_split_in_every_position() -> None:
    stream = "data: 中文🎉é\n\n".encode()
    for cut in range(1, len(stream)):
        d = Decoder()
        assert d.feed(stream[:cut]) + d.feed(stream[cut:]) == [E("中文🎉é")]


def test_bom_split_across_chunks() -> None:
    d = Decoder()
    assert d.feed(b"\xef") == []
    assert d.feed(b"\xbb") == []
    assert d.feed(b"\xbfdata: a\n\n") == [E("a")]


def test_partial_bom_prefix_then_other_bytes_is_not_a_bom() -> None:
    d = Decoder()
    assert d.feed(b"\xef\xbb") == []
    assert d.feed(b"data: x\n\n") == []  # the field name is "\ufffd\ufffddata": unknown, ignored
    assert d.feed(b"data: y\n\n") == [E("y")]


def test_close_drops_partial_event_and_keeps_last_id_for_reconnect() -> None:
    d = Decoder()
    assert d.feed(b"id: 1\ndata: a\n\nid: 2\ndata: b\n") == [E("a", id="1")]
    assert d.close() == []
    assert d.last_event_id == "1"
    # a new connection: BOM allowed again, last id carried
    assert d.feed(b"\xef\xbb\xbfdata: c\n\n") == [E("c", id="1")]


def test_initial_last_event_id() -> None:
    d = Decoder(last_event_id="41")
    assert d.last_event_id == "41"
    assert d.feed(b"data: x\n\n") == [E("x", id="41")]


def test_line_over_limit_raises_with_limit_and_size() -> None:
    d = Decoder(max_line_bytes=16)
    with pytest.raises(ProtocolError) as info:
        d.feed(b"data: " + b"x" * 20 + b"\n\n")
    assert info.value.rule == "max_line_bytes"
    assert info.value.limit == 16
    assert info.value.size == 26
    with pytest.raises(ProtocolError):  # stays failed
        d.feed(b"data: ok\n\n")


def test_unterminated_line_over_limit_raises_without_waiting_for_line_end() -> None:
    d = Decoder(max_line_bytes=100)
    for _ in range(10):
        d.feed(b"x" * 10)
    with pytest.raises(ProtocolError) as info:
        d.feed(b"x")
    assert info.value.size == 101


def test_line_limit_error_keeps_events_decoded_before_it() -> None:
    d = Decoder(max_line_bytes=32)
    with pytest.raises(ProtocolError) as info:
        d.feed(b"data: a\n\ndata: b\n\n" + b"data: " + b"y" * 40 + b"\n\n")
    assert info.value.events == [E("a"), E("b")]


def test_event_over_limit_raises() -> None:
    d = Decoder(max_event_bytes=10)
    assert d.feed(b"data: 12345\n\n") == [E("12345")]
    with pytest.raises(ProtocolError) as info:
        d.feed(b"data: 12345\ndata: 67890\n\n")
    assert info.value.rule == "max_event_bytes"
    assert info.value.limit == 10
    assert info.value.size is not None and info.value.size > 10


def test_line_exactly_at_limit_is_fine() -> None:
    d = Decoder(max_line_bytes=8)
    assert d.feed(b"data: ab\n\n") == [E("ab")]


def test_defaults_are_generous() -> None:
    d = Decoder()
    big = b"x" * (900 * 1024)
    assert d.feed(b"data: " + big + b"\n\n") == [E(big.decode())]


def test_many_small_chunks_of_one_long_line_are_linear() -> None:
    d = Decoder()
    piece = b"y" * 1000
    for _ in range(1000):  # 1 MB in 1000 pieces: would be ~0.5 GB of copying if quadratic
        assert d.feed(piece) == []
    assert d.feed(b"\n") == []


# -- encoder ---------------------------------------------------------------------------------------


def test_encode_fields() -> None:
    assert encode("a\nb", event="t", id="1") == b"id: 1\nevent: t\ndata: a\ndata: b\n\n"
    assert encode(retry=1500) == b"retry: 1500\n\n"
    assert encode(comment="keepalive") == b": keepalive\n\n"
    assert encode("") == b"data\n\n"
    assert encode(id="") == b"id\n\n"


@pytest.mark.parametrize("bad", ["a\nb", "a\rb", "a\x00b"])
def test_encode_refuses_control_characters_in_id_and_event(bad: str) -> None:
    with pytest.raises(EncodeError, match="CR, LF or NUL"):
        encode("x", id=bad)
    with pytest.raises(EncodeError, match="CR, LF or NUL"):
        encode("x", event=bad)
    with pytest.raises(EncodeError):
        Encoder().event("x", event=bad)
    with pytest.raises(EncodeError):
        Encoder().event("x", id=bad)


@pytest.mark.parametrize("bad", [-1, True, 1.5])
def test_encode_refuses_bad_retry(bad: object) -> None:
    with pytest.raises(EncodeError):
        encode(retry=bad)  # type: ignore[arg-type]


def test_encode_nothing_is_an_error() -> None:
    with pytest.raises(EncodeError):
        encode()


def test_encoder_data_line_ends_normalised() -> None:
    enc = Encoder()
    d = Decoder()
    assert d.feed(enc.event("a\r\nb\rc\nd", event="x", id="7")) == [E("a\nb\nc\nd", "x", "7")]
    assert d.feed(Encoder.comment("ka") + Encoder.retry(10)) == []
    assert d.retry == 10


# -- properties ------------------------------------------------------------------------------------

_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)
_token = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n\x00"), max_size=12)
_event = st.builds(
    Event,
    data=_text.map(lambda s: s.replace("\r\n", "\n").replace("\r", "\n")),
    event=_token.filter(bool) | st.just("message"),
    id=_token,
)


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, prev = [], 0
    for p in [*points, len(data)]:
        pieces.append(data[prev:p])
        prev = p
    return pieces


@settings(max_examples=300, deadline=None)
@given(events=st.lists(_event, max_size=12), cuts=st.lists(st.integers(0, 10_000), max_size=20),
       bom=st.booleans())
def test_encode_chunk_decode_round_trip(events: list[Event], cuts: list[int], bom: bool) -> None:
    stream = b"\xef\xbb\xbf" if bom else b""
    for ev in events:
        # the id always written, so an empty id resets the one before it
        stream += encode(ev.data, event=ev.event, id=ev.id)
    d = Decoder()
    got: list[Event | Comment] = []
    for piece in _split(stream, cuts):
        got.extend(d.feed(piece))
    got.extend(d.close())
    assert got == events


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=300), cuts=st.lists(st.integers(0, 400), max_size=10))
def test_random_bytes_only_ever_raise_protocol_error(data: bytes, cuts: list[int]) -> None:
    d = Decoder(max_line_bytes=64, max_event_bytes=128, comments=True)
    try:
        for piece in _split(data, cuts):
            for item in d.feed(piece):
                assert isinstance(item, Event | Comment)
        d.close()
    except ProtocolError:
        pass


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=300), cuts=st.lists(st.integers(0, 400), max_size=10))
def test_any_chunking_gives_the_same_events(data: bytes, cuts: list[int]) -> None:
    whole, d1 = _decode([data], comments=True)
    split, d2 = _decode(_split(data, cuts), comments=True)
    assert whole == split
    assert d1.last_event_id == d2.last_event_id
    assert d1.retry == d2.retry


def test_retry_with_too_many_digits_is_the_ceiling_not_an_error() -> None:
    from sidechain.sse import RETRY_CEILING

    for digits in (16, 400, 5000):  # int() of 5000 digits raises ValueError in Python 3.11+
        for line_end in (b"\n", b"\r\n"):  # the fast path and the general one
            decoder = Decoder()
            block = b"retry: " + b"9" * digits + line_end * 2 + b"data: x" + line_end * 2
            events = decoder.feed(block)
            assert [e.data for e in events] == ["x"]
            assert decoder.retry == RETRY_CEILING
    decoder = Decoder()
    decoder.feed(b"retry: " + b"9" * 15 + b"\n\n")
    assert decoder.retry == 10**15 - 1


def test_retry_with_leading_zeros_is_its_value() -> None:
    for line_end in (b"\n", b"\r\n"):  # the fast path and the general one
        decoder = Decoder()
        decoder.feed(b"retry: " + b"0" * 30 + b"5" + line_end * 2)
        assert decoder.retry == 5
        decoder.feed(b"retry: " + b"0" * 30 + line_end * 2)
        assert decoder.retry == 0


def test_event_limit_counts_the_data_as_dispatched() -> None:
    """``max_event_bytes`` bounds the joined data (the LF after the last line is not part of it)."""
    assert Decoder(max_event_bytes=10).feed(b"data: 0123456789\n\n") == [E("0123456789")]
    assert Decoder(max_event_bytes=10).feed(b"data: 0123\ndata: 45678\n\n") == [E("0123\n45678")]
    with pytest.raises(ProtocolError) as info:
        Decoder(max_event_bytes=10).feed(b"data: 0123456789a\n\n")
    assert info.value.size == 11 and "11 bytes" in str(info.value)


def test_a_failed_decoder_raises_a_new_error_without_old_events() -> None:
    d = Decoder(max_line_bytes=16)
    with pytest.raises(ProtocolError) as first:
        d.feed(b"data: a\n\ndata: " + b"y" * 20 + b"\n\n")
    assert first.value.events == [E("a")]
    for _ in range(3):
        with pytest.raises(ProtocolError) as later:
            d.feed(b"data: b\n\n")
        assert later.value is not first.value and later.value.events == []
        assert later.value.rule == "max_line_bytes" and later.value.__cause__ is first.value
    d.close()
    assert d.feed(b"data: c\n\n") == [E("c")]


def test_a_long_line_trickling_in_holds_about_its_own_size() -> None:
    """A line arriving one byte at a time is kept in one buffer (a list of one-byte chunks held ~80
    bytes per byte, and joining it as much again)."""
    import tracemalloc

    d = Decoder()
    size = 100_000
    tracemalloc.start()
    try:
        d.feed(b"data: ")
        for _ in range(size):
            d.feed(b"x")
        held, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        events = d.feed(b"\n\n")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert events == [E("x" * size)]
    assert held < 4 * size and peak < 8 * size, (held, peak)


def test_encode_round_trips_an_id_reset() -> None:
    events = Decoder().feed(b"id: 1\ndata: a\n\nid\ndata: b\n\ndata: c\n\n")
    assert events == [E("a", id="1"), E("b"), E("c")]
    encoder = Encoder()
    assert Decoder().feed(b"".join(encoder.encode(e) for e in events)) == events


def test_text_that_is_not_utf8_is_an_encode_error() -> None:
    encoder = Encoder()
    for call in (lambda: encoder.event("\ud800"), lambda: encoder.event("x", id="\ud800"),
                 lambda: encoder.event("x", event="\ud800"), lambda: encode("\ud800")):
        with pytest.raises(EncodeError, match="UTF-8"):
            call()


def test_encoder_name_cache_is_bounded() -> None:
    encoder = Encoder()
    for i in range(2 * Encoder.MAX_CACHED_NAMES):
        assert encoder.event("x", event=f"kind{i}") == f"event: kind{i}\ndata: x\n\n".encode()
    assert len(encoder._names) == Encoder.MAX_CACHED_NAMES
