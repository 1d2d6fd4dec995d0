"""SafeByteStream: the only path by which response bytes reach a consumer.

aiohttp hangs a reader forever when the session is closed under it (even with a read timeout), reports
a dropped connection as assorted exception types, and holds a dropped response's connection until the
server ends the stream. This wrapper owns those paths:

* A small state machine, ``open → ended | failed | invalidated | closed``, decides what the consumer
  sees. Once it leaves ``open`` every later read gives the same answer (``b""`` or the same error).
* :meth:`SafeByteStream.fail` (used for session invalidation and deadlines) may be called from any task
  on the loop: it first moves the state and records the typed error, then wakes the reader blocked in
  aiohttp's buffer with that error, then closes the transport, in that order. The reader wakes at once.
* Backpressure is aiohttp's own bounded read buffer (reading from the socket pauses when it is full), so
  bytes are not copied into a second buffer and no producer task is needed: the consumer reads through.
* A stream dropped without being closed is released by a finalizer that schedules the close on its loop
  (if the loop still runs) and warns with :class:`ResourceWarning`. No I/O happens in ``__del__``.
"""

from __future__ import annotations

import asyncio
import enum
import warnings
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any

import aiohttp

from ..errors import ReadError, ReadTimeout, SidechainError
from .finalize import detach, on_drop

if TYPE_CHECKING:  # pragma: no cover
    from .sessions import Session

__all__ = ["SafeByteStream", "StreamState", "map_aiohttp_error"]


def _clear_aiohttp_frames(tb: TracebackType | None) -> None:
    """Clear the locals of the aiohttp frames an error was just raised through, from the top down to
    the first frame that is not aiohttp's. An error raised earlier (one passed to :meth:`fail`) carries
    older frames further down, possibly of a coroutine that is only suspended: those are never touched
    (clearing a suspended coroutine's frame would close it)."""
    while tb is not None and str(tb.tb_frame.f_globals.get("__name__", "")).startswith("aiohttp."):
        try:
            tb.tb_frame.clear()
        except RuntimeError:  # still executing
            pass
        tb = tb.tb_next


class StreamState(enum.Enum):
    OPEN = "open"
    ENDED = "ended"
    FAILED = "failed"
    INVALIDATED = "invalidated"
    CLOSED = "closed"


def map_aiohttp_error(exc: BaseException, *, read_timeout: float | None = None) -> SidechainError:
    """Translate an aiohttp/OS error seen while reading a body into sidechain's typed tree."""
    if isinstance(exc, SidechainError):
        return exc
    if isinstance(exc, aiohttp.ServerTimeoutError | asyncio.TimeoutError):
        return ReadTimeout(f"no data for {read_timeout}s", timeout=read_timeout)
    detail = str(exc) or type(exc).__name__
    return ReadError(f"connection broke while reading the response: {detail}")


def _release_dropped(
    loop: asyncio.AbstractEventLoop,
    response: aiohttp.ClientResponse,
    on_release: Callable[[], None] | None,
    session: Session | None,
    stream_id: int,
) -> None:
    """Finalizer of a stream that was garbage collected while still open."""
    if session is not None:
        session._forget(stream_id)
    if not loop.is_closed():
        try:
            loop.call_soon_threadsafe(_close_response, response, on_release)
        except RuntimeError:  # loop closed in between
            pass
    warnings.warn(
        f"sidechain stream of {response.url} was garbage collected without being closed; its connection "
        "was released by a finalizer. Use `async with` or call aclose().",
        ResourceWarning,
        stacklevel=2,
    )


def _close_response(response: aiohttp.ClientResponse, on_release: Callable[[], None] | None) -> None:
    response.close()
    if on_release is not None:
        on_release()


class SafeByteStream:
    """A response body as a stream of ``bytes`` chunks with a typed, never-hanging end.

    ``await read()`` returns the next non-empty chunk, ``b""`` once the body ended cleanly, or raises:
    :class:`ReadError` (connection broke), :class:`ReadTimeout`, :class:`SessionInvalidated` or the
    deadline error given to :meth:`fail`. Cancelling a reader propagates ``CancelledError`` and leaves
    the stream open for :meth:`aclose`, which releases the connection (idempotent).
    """

    __slots__ = (
        "__weakref__",
        "_content",
        "_error",
        "_finalizer",
        "_on_release",
        "_read_timeout",
        "_response",
        "_session",
        "state",
    )

    def __init__(
        self,
        response: aiohttp.ClientResponse,
        *,
        session: Session | None = None,
        read_timeout: float | None = None,
        on_release: Callable[[], None] | None = None,
    ) -> None:
        self._response = response
        self._content = response.content
        self._read_timeout = read_timeout
        self._session = session
        self._on_release = on_release
        self._error: SidechainError | None = None
        self.state = StreamState.OPEN
        loop = asyncio.get_running_loop()
        self._finalizer = on_drop(self, _release_dropped, loop, response, on_release, session, id(self))
        if session is not None:
            session._register(self)

    @property
    def response(self) -> aiohttp.ClientResponse:
        return self._response

    @property
    def error(self) -> SidechainError | None:
        """The error that ended the stream, if any."""
        return self._error

    async def read(self) -> bytes:
        """The next chunk of the body; ``b""`` at its clean end. See the class doc for errors."""
        try:
            if self.state is not StreamState.OPEN:
                if self._error is not None:
                    raise self._error
                return b""
            try:
                data = await self._content.readany()
            except Exception as exc:
                # aiohttp's buffer keeps the error it raised, and the error's traceback reaches the
                # buffer again through aiohttp's finished frames: a cycle that would hold the response
                # until the garbage collector runs. Those frames' locals are dropped (lines stay).
                if exc.__traceback__ is not None:
                    _clear_aiohttp_frames(exc.__traceback__.tb_next)
                if self._error is not None:
                    raise self._error from None
                err = map_aiohttp_error(exc, read_timeout=self._read_timeout)
                err.__cause__ = exc
                # aiohttp discards bytes it already buffered once the connection breaks; they were
                # received, so they are handed out first and the error comes on the next read
                leftover = self._salvage()
                self._set_failed(err, StreamState.FAILED)
                if leftover:
                    return leftover
                raise err
            if data:
                return data
            if self._error is not None:
                raise self._error
            self.state = StreamState.ENDED
            return b""
        finally:
            # an error raised from here keeps this frame: without these locals the frame leads back
            # neither to the stream (which keeps the error) nor to the error itself
            self = err = None  # type: ignore[assignment]

    def _salvage(self) -> bytes:
        content: Any = self._content
        try:
            if content._buffer:
                data: bytes = content._read_nowait(-1)
                return data
        except Exception:
            pass
        return b""

    def __aiter__(self) -> SafeByteStream:
        return self

    async def __anext__(self) -> bytes:
        data = await self.read()
        if not data:
            raise StopAsyncIteration
        return data

    def fail(self, error: SidechainError, *, state: StreamState = StreamState.FAILED) -> None:
        """End the stream with ``error`` from any task: the reader wakes at once with it.

        Order: state and error recorded, reader woken, transport closed. Idempotent; a stream that
        already ended keeps its first outcome.
        """
        if self.state is not StreamState.OPEN:
            return
        self._set_failed(error, state)

    def invalidate(self, error: SidechainError) -> None:
        """The session closed under this stream: same as :meth:`fail`, state ``invalidated``."""
        self.fail(error, state=StreamState.INVALIDATED)

    def _set_failed(self, error: SidechainError, state: StreamState) -> None:
        self.state = state
        self._error = error
        self._content.set_exception(error)
        self._release(close=True)

    def _release(self, *, close: bool) -> None:
        if not detach(self._finalizer):
            return  # already released
        if close:
            self._response.close()
        else:
            self._response.release()
        if self._session is not None:
            self._session._unregister(self)
        if self._on_release is not None:
            self._on_release()

    async def aclose(self) -> None:
        """Release the connection: back to the pool after a clean, complete end; closed otherwise.

        Idempotent and safe from any task. Never raises for a stream that failed.
        """
        self.close_nowait()

    def close_nowait(self) -> None:
        """Synchronous :meth:`aclose` (it never awaits anything)."""
        if self.state is StreamState.ENDED:
            self._release(close=False)
            self.state = StreamState.CLOSED
            return
        if self.state is StreamState.OPEN:
            self.state = StreamState.CLOSED
        self._release(close=True)
