"""Sans-I/O Server-Sent Events codec, exact to the WHATWG HTML "event stream" rules.

No asyncio, no sockets: :class:`Decoder` turns bytes into :class:`Event` objects, :func:`encode`
and :class:`Encoder` turn events into bytes. Any split of the same bytes into chunks gives the same
events (a CR ending one chunk and an LF starting the next are one line end).

The rules implemented (https://html.spec.whatwg.org/multipage/server-sent-events.html#parsing-an-event-stream):

* one leading UTF-8 BOM is stripped, only at the very start of the stream;
* lines end with CRLF, LF or CR;
* a line starting with ``:`` is a comment (returned as :class:`Comment` only with ``comments=True``);
* ``field: value`` with exactly one space after the colon removed; a line without a colon is a field
  with an empty value; field names are case-sensitive and unknown ones are ignored;
* ``data`` lines are joined with ``\\n``; an empty line dispatches the event; a block without ``data``
  dispatches nothing but still sets the last event id;
* ``id`` containing NUL is ignored; an empty ``id`` resets the last event id;
* ``retry`` is used only when it is all ASCII digits (a value of more than 15 digits after its leading
  zeros, a wait of over 30,000 years, is read as :data:`RETRY_CEILING`: Python's ``int()`` refuses
  very long digit strings);
* an event not finished by an empty line before the end of the stream is dropped;
* invalid UTF-8 becomes U+FFFD, wherever the chunk boundaries fall.

Limits: a line longer than ``max_line_bytes`` (default 1 MiB) or an event whose data exceeds
``max_event_bytes`` (default 16 MiB; the joined data, as dispatched) raises
:class:`~sidechain.errors.ProtocolError`; the decoder then stays failed until ``close``, and every
later ``feed`` raises a new ``ProtocolError`` (same rule, no events) caused by the first.

Speed: whole events with LF line ends (the usual chunk) take a fast path that decodes the UTF-8 once per
chunk; everything else takes the general line-by-line path, with the same results. Wheels also carry
this module compiled with mypyc, used when it was built from this very file (see ``_use_compiled``).
"""

from __future__ import annotations

import hashlib
import importlib
import os
from collections.abc import Iterable

import msgspec

# Absolute, not relative: this file is also compiled as the top-level module ``_sidechain_sse``.
from sidechain.errors import EncodeError, ProtocolError

__all__ = [
    "DEFAULT_MAX_EVENT_BYTES",
    "DEFAULT_MAX_LINE_BYTES",
    "RETRY_CEILING",
    "Comment",
    "Decoder",
    "Encoder",
    "Event",
    "encode",
]

DEFAULT_MAX_LINE_BYTES = 1 << 20
DEFAULT_MAX_EVENT_BYTES = 16 << 20
#: ``retry:`` values with more digits than this are read as :data:`RETRY_CEILING` milliseconds.
RETRY_MAX_DIGITS = 15
RETRY_CEILING = 10**RETRY_MAX_DIGITS - 1

_BOM = b"\xef\xbb\xbf"


class Event(msgspec.Struct, frozen=True, gc=False):
    """One dispatched event.

    ``data`` is the joined data lines, ``event`` the type (``"message"`` when the stream gave none) and
    ``id`` the last event id in force when it was dispatched (``""`` if none).
    """

    data: str
    event: str = "message"
    id: str = ""


class Comment(msgspec.Struct, frozen=True, gc=False):
    """A comment line (``: text``), e.g. a keepalive. One leading space is removed from ``text``."""

    text: str


class Decoder:
    """Incremental SSE decoder. Feed it bytes; it returns what those bytes completed.

    ``feed`` never blocks and never raises anything but :class:`ProtocolError`. ``close`` marks the end
    of one connection's stream: a partial event is dropped and the decoder is ready for the next
    connection, keeping ``last_event_id`` and ``retry`` (as an ``EventSource`` does on reconnect).
    """

    __slots__ = (
        "_clean",
        "_comments",
        "_data",
        "_data_size",
        "_etype",
        "_failed",
        "_fast_max",
        "_id_buffer",
        "_last_id",
        "_max_event",
        "_max_line",
        "_partial",
        "_skip_lf",
        "_started",
        "_type_cache",
        "retry",
    )

    def __init__(
        self,
        *,
        max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
        max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES,
        comments: bool = False,
        last_event_id: str = "",
    ) -> None:
        if max_line_bytes <= 0 or max_event_bytes <= 0:
            raise ValueError("limits must be positive")
        self._max_line = max_line_bytes
        self._max_event = max_event_bytes
        # A chunk no longer than this cannot break either limit once it starts at an event boundary.
        self._fast_max = min(max_line_bytes, max_event_bytes)
        self._comments = comments
        # the current unfinished line: one growing buffer (a list of the chunks that brought it, one
        # byte each from a trickling server, would hold ~80 bytes per byte and more again to join)
        self._partial = bytearray()
        self._skip_lf = False  # the previous chunk ended with CR: a leading LF belongs to it
        self._started = False  # BOM handled
        # True at an event boundary: started, not failed, no CR to pair, no partial line or event.
        self._clean = False
        self._data: list[bytes] = []
        self._data_size = 0
        self._etype = b""
        self._id_buffer = last_event_id
        self._last_id = last_event_id
        self._failed: ProtocolError | None = None
        self._type_cache: dict[bytes, str] = {}
        #: The reconnection time the stream asked for, in milliseconds, or None.
        self.retry: int | None = None

    @property
    def last_event_id(self) -> str:
        """The last event id in force (set at each dispatch point, ``""`` when none or reset)."""
        return self._last_id

    def feed(self, data: bytes | bytearray) -> list[Event | Comment]:
        """Decode ``data`` and return the events (and comments, if asked) it completed."""
        if not isinstance(data, bytes):
            data = bytes(data)  # a bytearray, say: what follows (and the mypyc build) wants bytes
        if self._clean and 2 <= len(data) <= self._fast_max and data[-1] == 10 == data[-2] and 13 not in data:
            # The common case: whole events with LF line ends and nothing pending.
            return self._blocks(data)
        return self._feed(data)

    def close(self) -> list[Event | Comment]:
        """End of stream: drop any partial line and event; ready the decoder for a new connection."""
        self._partial.clear()
        self._skip_lf = False
        self._started = False
        self._clean = False
        self._data = []
        self._data_size = 0
        self._etype = b""
        self._id_buffer = self._last_id
        self._failed = None
        return []

    # -- internals ---------------------------------------------------------------------------------

    def _blocks(self, raw: bytes) -> list[Event | Comment]:
        """Decode complete events: ``raw`` starts at an event boundary, ends with LF LF and has no CR.

        The caller has checked that ``raw`` is within both limits, so no check is needed here.
        Decoding all of ``raw`` at once gives the same text as decoding each value on its own: LF,
        ``:`` and space are ASCII, so no invalid UTF-8 sequence can run across them.
        """
        out: list[Event | Comment] = []
        data: str | None = None  # the first data line of the event
        more: list[str] | None = None  # all data lines, once there is a second one
        etype = ""
        id_buffer = self._id_buffer
        for line in raw.decode("utf-8", "replace").split("\n"):
            if not line:
                # dispatch point (the empty string after the final LF dispatches nothing)
                if data is not None:
                    if more is not None:
                        data = "\n".join(more)
                        more = None
                    out.append(Event(data, etype or "message", id_buffer))
                    data = None
                etype = ""
                continue
            field, _, value = line.partition(": ")
            while True:  # runs twice only when the first colon is not followed by a space
                if field == "data":
                    if data is None:
                        data = value
                    elif more is None:
                        more = [data, value]
                    else:
                        more.append(value)
                elif field == "event":
                    etype = value
                elif field == "id":
                    if "\0" not in value:
                        id_buffer = value
                elif ":" in field:
                    field, _, value = line.partition(":")
                    continue
                elif not field:
                    if self._comments:
                        out.append(Comment(value))
                elif field == "retry" and value.isascii() and value.isdigit():
                    if len(value) > RETRY_MAX_DIGITS:
                        value = value.lstrip("0") or "0"
                    self.retry = int(value) if len(value) <= RETRY_MAX_DIGITS else RETRY_CEILING
                break
        self._id_buffer = self._last_id = id_buffer
        return out

    def _feed(self, data: bytes) -> list[Event | Comment]:
        failed = self._failed
        if failed is not None:
            # a new error each time, without the first one's events (already handed over with it)
            again = ProtocolError(f"the decoder failed earlier: {failed}", rule=failed.rule,
                                  limit=failed.limit, size=failed.size)
            again.__cause__ = failed  # set, not ``raise from``: the mypyc build drops a raise's cause
            raise again
        if not data:
            return []
        if (
            self._started
            and not self._skip_lf
            and 13 not in data
            and len(data) <= self._fast_max
            and (k := data.rfind(b"\n\n")) >= 0
        ):
            # Complete events in the middle of the chunk take the fast path; the partial event before
            # them (if any) and the partial event after them take the general one.
            out: list[Event | Comment] = []
            if self._partial or self._data or self._etype:
                j = data.find(b"\n\n") + 2
                out = self._general(data[:j])
                data = data[j:]
                k -= j
            if k >= 0:
                k += 2
                out += self._blocks(data[:k])
                data = data[k:]
            if data:
                out += self._general(data)
            else:
                self._clean = True
            return out
        return self._general(data)

    def _general(self, data: bytes) -> list[Event | Comment]:
        if self._skip_lf:
            self._skip_lf = False
            if data[0] == 10:
                data = data[1:]
                if not data:
                    self._clean = self._started and not (self._partial or self._data or self._etype)
                    return []
        if not self._started:
            if self._partial:
                data = bytes(self._partial) + data
                self._partial.clear()
            if len(data) < 3 and _BOM.startswith(data):
                self._partial += data
                return []
            self._started = True
            if data.startswith(_BOM):
                data = data[3:]
                if not data:
                    self._clean = True
                    return []
        if b"\n" not in data and b"\r" not in data:
            self._partial += data
            self._clean = False
            if len(self._partial) > self._max_line:
                self._fail_line(len(self._partial), [])
            return []
        if self._partial:
            self._partial += data
            data = bytes(self._partial)
            self._partial.clear()
        lines = data.splitlines()
        last = data[-1]
        if last == 13:
            self._skip_lf = True
        elif last != 10:
            self._partial += lines.pop()
        out = self._process_checked(lines) if len(data) > self._max_line else self._process(lines)
        self._clean = not (self._skip_lf or self._partial or self._data or self._etype)
        return out

    def _fail_line(self, size: int, events: list[Event | Comment]) -> None:
        err = ProtocolError(
            f"SSE line of {size} bytes exceeds max_line_bytes={self._max_line}",
            rule="max_line_bytes",
            limit=self._max_line,
            size=size,
            events=events,
        )
        self._failed = err
        self._clean = False
        raise err

    def _process_checked(self, lines: list[bytes]) -> list[Event | Comment]:
        limit = self._max_line
        for i, line in enumerate(lines):
            if len(line) > limit:
                events = self._process(lines[:i])
                self._fail_line(len(line), events)
        if len(self._partial) > limit:
            events = self._process(lines)
            self._fail_line(len(self._partial), events)
        return self._process(lines)

    def _process(self, lines: list[bytes]) -> list[Event | Comment]:
        out: list[Event | Comment] = []
        data = self._data
        size = self._data_size
        etype = self._etype
        id_buffer = self._id_buffer
        for line in lines:
            if not line:
                # dispatch point
                self._last_id = id_buffer
                if data:
                    if len(data) == 1:
                        text = data[0].decode("utf-8", "replace")
                    else:
                        text = b"\n".join(data).decode("utf-8", "replace")
                    if etype:
                        name = self._type_cache.get(etype)
                        if name is None:
                            name = etype.decode("utf-8", "replace")
                            if len(self._type_cache) < 256:
                                self._type_cache[etype] = name
                        out.append(Event(text, name, id_buffer))
                    else:
                        out.append(Event(text, "message", id_buffer))
                    data = []
                    size = 0
                etype = b""
                continue
            field, _, value = line.partition(b":")
            if value and value[0] == 32:
                value = value[1:]
            if field == b"data":
                size += len(value) + 1  # the data so far plus the LF that joins (or ends) it
                if size - 1 > self._max_event:
                    self._data, self._data_size, self._etype, self._id_buffer = [], 0, b"", id_buffer
                    err = ProtocolError(
                        f"SSE event data of {size - 1} bytes exceeds max_event_bytes={self._max_event}",
                        rule="max_event_bytes",
                        limit=self._max_event,
                        size=size - 1,
                        events=out,
                    )
                    self._failed = err
                    self._clean = False
                    raise err
                data.append(value)
            elif field == b"event":
                etype = value
            elif field == b"id":
                if 0 not in value:
                    id_buffer = value.decode("utf-8", "replace")
            elif not field:
                if self._comments:
                    out.append(Comment(value.decode("utf-8", "replace")))
            elif field == b"retry" and value.isdigit():
                if len(value) > RETRY_MAX_DIGITS:
                    value = value.lstrip(b"0") or b"0"
                self.retry = int(value) if len(value) <= RETRY_MAX_DIGITS else RETRY_CEILING
        self._data = data
        self._data_size = size
        self._etype = etype
        self._id_buffer = id_buffer
        return out


def _check_token(kind: str, value: str) -> None:
    if "\r" in value or "\n" in value or "\0" in value:
        raise EncodeError(f"SSE {kind} must not contain CR, LF or NUL: {value!r}")


def _data_lines(data: str) -> Iterable[str]:
    if "\r" in data:
        return data.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    return data.split("\n")


def encode(
    data: str | None = None,
    *,
    event: str | None = None,
    id: str | None = None,
    retry: int | None = None,
    comment: str | None = None,
) -> bytes:
    """Encode one SSE block to UTF-8 bytes.

    ``data`` may span lines (CR, LF or CRLF); each becomes a ``data:`` line. ``id`` and ``event`` must
    not contain CR, LF or NUL (:class:`EncodeError` otherwise); ``id=""`` resets the client's last id.
    ``retry`` must be a non-negative integer (milliseconds). ``comment`` lines are written first. Every
    block ends with a blank line, so the stream stays well formed.
    """
    parts: list[str] = []
    if comment is not None:
        parts.extend(": " + line if line else ":" for line in _data_lines(comment))
    if retry is not None:
        if isinstance(retry, bool) or not isinstance(retry, int) or retry < 0:
            raise EncodeError(f"SSE retry must be a non-negative integer of milliseconds: {retry!r}")
        parts.append(f"retry: {retry}")
    if id is not None:
        _check_token("id", id)
        parts.append(f"id: {id}" if id else "id")
    if event is not None:
        _check_token("event name", event)
        parts.append(f"event: {event}")
    if data is not None:
        parts.extend("data: " + line if line else "data" for line in _data_lines(data))
    if not parts:
        raise EncodeError("nothing to encode: give data, id, event, retry or a comment")
    try:
        return ("\n".join(parts) + "\n\n").encode("utf-8")
    except UnicodeEncodeError as exc:
        raise EncodeError(f"SSE text must be encodable as UTF-8: {exc}") from exc


class Encoder:
    """Writes events as SSE bytes. Event names are validated once and cached.

    ``encoder.event(data, event=..., id=...)`` is the hot path used by the gateway;
    ``encoder.encode(Event)`` writes a decoded :class:`Event` back out (round trip). Text that cannot
    be UTF-8 (a lone surrogate) raises :class:`EncodeError`.
    """

    #: Event names whose validated line is cached (a stream of ever new names stays bounded).
    MAX_CACHED_NAMES = 256

    __slots__ = ("_names",)

    def __init__(self) -> None:
        self._names: dict[str, bytes] = {}

    def event(self, data: str, *, event: str | None = None, id: str | None = None) -> bytes:
        """Encode one event with data; see :func:`encode` for the rules."""
        try:
            return self._event(data, event, id)
        except UnicodeEncodeError as exc:
            raise EncodeError(f"SSE text must be encodable as UTF-8: {exc}") from exc

    def _event(self, data: str, event: str | None, id: str | None) -> bytes:
        head = b""
        if id is not None:
            _check_token("id", id)
            head = b"id: " + id.encode("utf-8") + b"\n" if id else b"id\n"
        if event is not None and event != "message":
            line = self._names.get(event)
            if line is None:
                _check_token("event name", event)
                line = b"event: " + event.encode("utf-8") + b"\n"
                if len(self._names) < self.MAX_CACHED_NAMES:
                    self._names[event] = line
            head += line
        if "\n" in data or "\r" in data:
            body = "\n".join("data: " + ln if ln else "data" for ln in _data_lines(data)).encode("utf-8")
            return head + body + b"\n\n"
        return head + (b"data: " + data.encode("utf-8") if data else b"data") + b"\n\n"

    def encode(self, ev: Event) -> bytes:
        """Encode a decoded :class:`Event` so that it decodes to the same event, whatever came before:
        its id line is always written (a bare ``id`` line when ``ev.id`` is empty, a reset)."""
        return self.event(ev.data, event=ev.event, id=ev.id)

    @staticmethod
    def comment(text: str = "") -> bytes:
        """A comment block (for keepalives): ``: text``."""
        return encode(comment=text)

    @staticmethod
    def retry(milliseconds: int) -> bytes:
        """A ``retry:`` block asking clients to wait this long before reconnecting."""
        return encode(retry=milliseconds)


def _use_compiled() -> bool:
    """Swap in the mypyc build of this module, if there is one built from this very file.

    Wheels of sidechain ship ``_sidechain_sse``, this file compiled with mypyc (see ``hatch_build.py``),
    which decodes 1.2 to 1.6 times as fast. Its ``Decoder``, ``Event`` and ``Comment`` replace the ones
    above only when its ``SOURCE_SHA256`` matches this file, so an edited ``sse.py`` in an editable
    install runs as written until it is installed again. ``SIDECHAIN_PURE_PYTHON=1`` keeps the
    pure-Python code. ``encode`` and ``Encoder`` stay pure Python either way: compiled code checks
    argument types itself, so ``encode(retry=1.5)`` would raise ``TypeError``, not ``EncodeError``.
    """
    if __name__ != "sidechain.sse" or os.environ.get("SIDECHAIN_PURE_PYTHON"):
        return False  # the compiled twin itself, or asked not to
    try:
        twin = importlib.import_module("_sidechain_sse")
        with open(__file__, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
    except (ImportError, OSError):
        return False
    if getattr(twin, "SOURCE_SHA256", None) != digest:
        return False
    names = ("Event", "Comment", "Decoder")
    for name in names:
        cls = getattr(twin, name)
        try:
            cls.__module__ = __name__  # pickles and reprs name sidechain.sse, as in pure Python
        except (AttributeError, TypeError):
            pass
        globals()[name] = cls
    return True


#: Whether ``Decoder``, ``Event`` and ``Comment`` come from the compiled twin.
_COMPILED = _use_compiled()
