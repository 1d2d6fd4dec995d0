"""Session ownership: a pooled, shareable :class:`Session`, and the dedicated sessions calls own.

A :class:`Session` wraps one aiohttp ``ClientSession``. Closing it from any task, at any time, first
wakes every stream still reading from it and every request still connecting through it with
:class:`SessionInvalidated`, then tears the transport down. aiohttp alone would leave those readers
hanging forever.
"""

from __future__ import annotations

import asyncio
import errno
import inspect
import os
import socket
import warnings
import weakref
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import aiohttp
import yarl
from aiohttp.client_proto import ResponseHandler

from ..errors import (
    ConnectError,
    ConnectTimeout,
    ProtocolError,
    ReadError,
    ReadTimeout,
    SessionInvalidated,
    SidechainError,
)
from .finalize import DropHandle, detach, on_drop
from .resolver import SHARED_RESOLVER

if TYPE_CHECKING:  # pragma: no cover
    from .safe_stream import SafeByteStream

__all__ = ["Session", "map_request_error"]


def map_request_error(exc: BaseException, *, connect_timeout: float | None, read_timeout: float | None
                      ) -> SidechainError:
    """Translate an error raised while sending a request and waiting for its headers."""
    if isinstance(exc, SidechainError):
        return exc
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return ConnectTimeout(f"no connection within {connect_timeout}s", timeout=connect_timeout)
    if isinstance(exc, aiohttp.ServerTimeoutError | asyncio.TimeoutError):
        return ReadTimeout(f"no response within read_timeout={read_timeout}s", timeout=read_timeout)
    if isinstance(exc, aiohttp.ClientConnectorError):
        return ConnectError(f"cannot connect: {exc}")
    if isinstance(exc, aiohttp.ClientResponseError):
        return ProtocolError(f"malformed HTTP response: {exc.message}", rule="http")
    if isinstance(exc, aiohttp.ClientError | OSError):
        return ReadError(f"connection broke before the response headers: {exc or type(exc).__name__}")
    return ReadError(f"request failed: {exc!r}")


def _request_error(exc: BaseException, url: str, *, connect_timeout: float | None, read_timeout: float | None
                   ) -> SidechainError:
    """:func:`map_request_error`; a connection that could not be made also makes the shared resolver
    forget the host, so the next call looks it up again (it may have moved)."""
    error = map_request_error(exc, connect_timeout=connect_timeout, read_timeout=read_timeout)
    if isinstance(error, ConnectError | ConnectTimeout):
        _forget_host(url)
    return error


def _deadline_passed(url: str, error: SidechainError | None, connect_timeout: float | None) -> SidechainError:
    """The error for a deadline that passed before the response headers. The host is forgotten too: a
    lookup costs little, and the address may be one that no longer answers."""
    _forget_host(url)
    return error or ConnectTimeout("deadline passed while connecting", timeout=connect_timeout)


def _forget_host(url: str) -> None:
    # yarl's host, as aiohttp resolves it (IDNA 2008); trailing dots are ignored by forget()
    host = yarl.URL(url).raw_host
    if host:
        SHARED_RESOLVER.forget(host)


_NO_TOTAL_TIMEOUT = aiohttp.ClientTimeout(total=None)
_IDENTITY = {"Accept-Encoding": "identity"}


class DirectConnector(aiohttp.TCPConnector):
    """aiohttp's ``TCPConnector`` with a direct way to a host that has one address.

    aiohttp opens every connection through aiohappyeyeballs: a socket made in Python, ``sock_connect``,
    then ``loop.create_connection(sock=...)``. For a plain-TCP host with a single address (an IP literal,
    as a local gateway's URL usually is) there is nothing for happy eyeballs to race, and on uvloop that
    path costs about 0.1 ms more per connection than ``loop.create_connection(host, port)``, which
    uvloop makes natively (bench/README.md: a fifth of a dedicated call's time to first event). Such
    connections are made directly; TLS, several addresses, a local address or a socket factory take
    aiohttp's own path. Errors are mapped as aiohttp maps them.
    """

    async def _wrap_create_connection(
        self,
        *args: Any,
        addr_infos: list[Any],
        req: aiohttp.ClientRequest,
        timeout: aiohttp.ClientTimeout,  # noqa: ASYNC109 - aiohttp's signature
        client_error: type[Exception] = aiohttp.ClientConnectorError,
        **kwargs: Any,
    ) -> tuple[asyncio.Transport, ResponseHandler]:
        address = _single_address(addr_infos)
        if (address is None or kwargs.get("ssl") or not kwargs.keys() <= _DIRECT_KWARGS
                or getattr(self, "_local_addr_infos", None)
                or getattr(self, "_socket_factory", None) is not None):
            return await super()._wrap_create_connection(
                *args, addr_infos=addr_infos, req=req, timeout=timeout, client_error=client_error, **kwargs
            )
        family, proto, host, port = address
        loop: Any = self._loop
        limit = timeout.sock_connect if timeout.sock_connect and timeout.sock_connect > 0 else None
        made: tuple[asyncio.Transport, ResponseHandler]
        try:
            async with asyncio.timeout(limit):
                if isinstance(loop, asyncio.selector_events.BaseSelectorEventLoop):
                    sock = await _selector_connect(loop, family, proto, host, port)
                    try:
                        made = await loop.create_connection(*args, sock=sock, **kwargs)
                    except BaseException:
                        # closed by its transport if one was made; else it would leak (closing twice
                        # is a no-op, and a closing transport no longer touches the fd)
                        sock.close()
                        raise
                else:
                    made = await loop.create_connection(
                        *args, host=host, port=port, family=family, proto=proto, **kwargs
                    )
                return made
        except OSError as exc:
            if exc.errno is None and isinstance(exc, TimeoutError):
                raise  # aiohttp turns it into its connect timeout
            raise client_error(req.connection_key, exc) from exc


#: What a second ``connect()`` of a non-blocking socket answers while its handshake is still going on.
_IN_PROGRESS = frozenset({errno.EINPROGRESS, errno.EALREADY, errno.EAGAIN, errno.EINTR})


async def _selector_connect(loop: asyncio.AbstractEventLoop, family: int, proto: int, host: str, port: int
                            ) -> socket.socket:
    """A connected non-blocking TCP socket, for the standard (selector) event loop.

    asyncio's ``sock_connect`` always waits for the socket to turn writable, even when the kernel
    finished the handshake inside the ``connect()`` call, as it does over loopback; that wait is two
    loop iterations, ~35 µs per connection here (bench/README.md). A second ``connect()`` tells at
    once: ``EISCONN`` means connected; a handshake still going on (a remote host) is awaited as asyncio
    does; any other error is the connect's own. The socket is closed if this fails or is cancelled.
    """
    sock = socket.socket(family, socket.SOCK_STREAM, proto)
    try:
        sock.setblocking(False)
        address = (host, port)
        err = sock.connect_ex(address)
        if err in _IN_PROGRESS:
            err = sock.connect_ex(address)
            if err == errno.EISCONN:
                err = 0
            elif err and err not in _IN_PROGRESS:  # the handshake failed: as asyncio words it then
                raise OSError(err, f"Connect call failed {address}")
        elif err:  # connect() itself failed (unreachable, ...): the socket's own error, as in asyncio
            raise OSError(err, os.strerror(err))
        if err in _IN_PROGRESS:
            await loop.sock_connect(sock, address)
    except BaseException:
        sock.close()
        raise
    return sock


#: The keyword arguments aiohttp's plain-TCP path passes on; with any other, aiohttp's own path is taken.
_DIRECT_KWARGS = frozenset({"ssl", "server_hostname"})


def _single_address(addr_infos: list[Any]) -> tuple[int, int, str, int] | None:
    """``(family, proto, host, port)`` of the one address, else None (also for a scoped IPv6 address:
    aiohttp keeps the scope in the host string, ``fe80::1%eth0``, which is left to its own path)."""
    if len(addr_infos) != 1:
        return None
    family, _type, proto, _name, sockaddr = addr_infos[0]
    host, port = sockaddr[0], sockaddr[1]
    if family == socket.AF_INET or (family == socket.AF_INET6 and "%" not in host and not sockaddr[3]):
        return family, proto, host, port
    return None


def _direct_hook_fits() -> bool:
    """Whether the installed aiohttp calls the hook :class:`DirectConnector` overrides, as it expects."""
    hook = getattr(aiohttp.TCPConnector, "_wrap_create_connection", None)
    if hook is None:
        return False
    try:
        params = inspect.signature(hook).parameters
    except (TypeError, ValueError):
        return False
    return {"addr_infos", "req", "timeout", "client_error"} <= params.keys()


#: The connector class sessions use: :class:`DirectConnector` when the installed aiohttp fits it.
CONNECTOR: type[aiohttp.TCPConnector] = DirectConnector if _direct_hook_fits() else aiohttp.TCPConnector


def _close_unclaimed(task: asyncio.Task[aiohttp.ClientResponse]) -> None:
    """Done-callback of an abandoned request: a response that arrived anyway is closed, not leaked."""
    if task.cancelled():
        return
    if task.exception() is None:
        task.result().close()


class Session:
    """A pooled HTTP session, shareable between calls on purpose.

    Give it to ``stream_post(..., session=s)`` to reuse connections; each call then releases only its
    own connection. ``await s.aclose()`` (alias :meth:`invalidate_and_cancel`) may be called from any
    task at any time: streams still open on it get :class:`SessionInvalidated` at once, requests still
    connecting through it are abandoned with the same error, then every connection is closed.
    Use it as ``async with Session() as s:``.
    """

    def __init__(
        self,
        *,
        limit: int = 100,
        limit_per_host: int = 0,
        keepalive_timeout: float = 15.0,
        dedicated: bool = False,
    ) -> None:
        self._limit = limit
        self._limit_per_host = limit_per_host
        self._keepalive = keepalive_timeout
        self.dedicated = dedicated
        self._client: aiohttp.ClientSession | None = None
        self._finalizer: DropHandle[Session] | None = None
        # weak: a stream dropped by its user must stay collectable so its finalizer can release it (and
        # remove it here). By id(): a dict of plain weak references gives the collector 2 objects per
        # stream to track where a WeakSet gives it 8
        self._streams: dict[int, weakref.ref[SafeByteStream]] = {}
        self._wakers: set[asyncio.Future[None]] = set()
        self._closed = False

    async def __aenter__(self) -> Session:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    @property
    def closed(self) -> bool:
        return self._closed

    def _ensure(self) -> aiohttp.ClientSession:
        if self._closed:
            raise SessionInvalidated("the session is closed")
        if self._client is None:
            connector = CONNECTOR(
                limit=self._limit,
                limit_per_host=self._limit_per_host,
                keepalive_timeout=None if self.dedicated else self._keepalive,
                # names are resolved once for every session (a dedicated one's own cache lived one call)
                resolver=SHARED_RESOLVER,
                use_dns_cache=False,
            )
            self._client = aiohttp.ClientSession(
                connector=connector,
                trust_env=False,
                timeout=_NO_TOTAL_TIMEOUT,
                # bodies are read raw (an event stream is decoded as it arrives), so none may come
                # compressed: aiohttp would otherwise offer gzip and deflate, which a proxy may take up
                headers=_IDENTITY,
                auto_decompress=False,
            )
            self._finalizer = on_drop(self, _reap_session, asyncio.get_running_loop(), self._client,
                                      not self.dedicated)
        return self._client

    def connection_count(self) -> int:
        """Connections this session holds right now (in use and idle in the pool)."""
        client = self._client
        if client is None or client.connector is None or client.closed:
            return 0
        connector: Any = client.connector
        idle = sum(len(conns) for conns in connector._conns.values())
        return idle + len(connector._acquired)

    @property
    def open_streams(self) -> int:
        """Streams registered on this session and not released yet (a dropped one until its finalizer ran)."""
        return len(self._streams)

    def _register(self, stream: SafeByteStream) -> None:
        if self._closed:
            stream.invalidate(SessionInvalidated("the session was closed while the stream was opening"))
            return
        self._streams[id(stream)] = weakref.ref(stream)

    def _unregister(self, stream: SafeByteStream) -> None:
        self._streams.pop(id(stream), None)

    def _forget(self, stream_id: int) -> None:
        """A stream was garbage collected (its finalizer runs while its id is still its own)."""
        self._streams.pop(stream_id, None)

    async def request(
        self,
        method: str,
        url: str,
        *,
        data: bytes | None,
        headers: Mapping[str, str],
        connect_timeout: float | None,
        read_timeout: float | None,
        deadline: float | None = None,
        deadline_error: SidechainError | None = None,
    ) -> aiohttp.ClientResponse:
        """Send a request and return its response once the headers arrived.

        Raises a typed error (:class:`ConnectError`, :class:`ConnectTimeout`, :class:`ReadError`,
        :class:`ReadTimeout`); :class:`SessionInvalidated` if the session closes meanwhile;
        ``deadline_error`` if the loop time ``deadline`` passes. On cancellation the request is
        abandoned, its connection released, and ``CancelledError`` propagates.
        """
        limit: asyncio.Timeout | None = None
        try:
            client = self._ensure()
            loop = asyncio.get_running_loop()
            timeout = aiohttp.ClientTimeout(total=None, connect=connect_timeout, sock_read=read_timeout)
            if self.dedicated:
                # Only its owning call uses a dedicated session, so no other task can close it under this
                # request: send inline, without the watcher task a shared session needs.
                limit = asyncio.timeout_at(deadline)
                try:
                    async with limit:
                        return await _send(client, method, url, data, headers, timeout)
                except TimeoutError as exc:
                    # expired(), not a clock comparison: uvloop's timers may fire a little before
                    # loop.time() reaches the deadline (millisecond ticks)
                    if limit.expired():
                        raise _deadline_passed(url, deadline_error, connect_timeout) from exc
                    raise _request_error(exc, url, connect_timeout=connect_timeout, read_timeout=read_timeout
                                         ) from exc
                except Exception as exc:
                    if self._closed:
                        raise SessionInvalidated("the session was closed while a request was connecting"
                                                 ) from exc
                    raise _request_error(exc, url, connect_timeout=connect_timeout, read_timeout=read_timeout
                                         ) from exc
            task: asyncio.Task[aiohttp.ClientResponse] = loop.create_task(
                _send(client, method, url, data, headers, timeout)
            )
            waker: asyncio.Future[None] = loop.create_future()
            self._wakers.add(waker)
            try:
                wait_for = None if deadline is None else max(0.0, deadline - loop.time())
                waitables: set[asyncio.Future[Any]] = {task, waker}
                done, _ = await asyncio.wait(waitables, timeout=wait_for, return_when=asyncio.FIRST_COMPLETED)
            except BaseException:
                await _abandon(task)
                raise
            finally:
                self._wakers.discard(waker)
            if waker.done() or self._closed:
                # the session closed meanwhile: whatever the request did, the answer is SessionInvalidated
                await _abandon(task)
                raise SessionInvalidated("the session was closed while a request was connecting")
            if task in done:
                try:
                    return task.result()
                except Exception as exc:
                    raise _request_error(exc, url, connect_timeout=connect_timeout, read_timeout=read_timeout
                                         ) from exc
            await _abandon(task)
            raise _deadline_passed(url, deadline_error, connect_timeout)
        finally:
            # an error raised from here keeps this frame: holding that error (deadline_error) or the
            # timeout (which holds this task, which holds the error) here would close a reference cycle
            deadline_error = limit = None

    async def aclose(self) -> None:
        """Invalidate every open stream and pending request, then close every connection. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for waker in list(self._wakers):
            if not waker.done():
                waker.set_result(None)
        for ref in list(self._streams.values()):
            stream = ref()
            if stream is not None:
                stream.invalidate(SessionInvalidated("the session was closed while the stream was open"))
        self._streams.clear()
        client, self._client = self._client, None
        if self._finalizer is not None:
            detach(self._finalizer)
        if client is not None:
            await client.close()

    invalidate_and_cancel = aclose


_REAPING: set[asyncio.Task[None]] = set()


def _reap_session(loop: asyncio.AbstractEventLoop, client: aiohttp.ClientSession, warn: bool) -> None:
    """Finalizer of a Session dropped without ``aclose``: its close is scheduled on its loop."""
    if not loop.is_closed():
        try:
            loop.call_soon_threadsafe(_spawn_close, loop, client)
        except RuntimeError:  # the loop closed in between
            pass
    if warn:
        warnings.warn("sidechain Session was garbage collected without aclose(); closed by a finalizer",
                      ResourceWarning, stacklevel=2)


def _spawn_close(loop: asyncio.AbstractEventLoop, client: aiohttp.ClientSession) -> None:
    task = loop.create_task(client.close())
    _REAPING.add(task)  # owned by the reaper set until done
    task.add_done_callback(_REAPING.discard)


async def _send(
    client: aiohttp.ClientSession,
    method: str,
    url: str,
    data: bytes | None,
    headers: Mapping[str, str],
    timeout: aiohttp.ClientTimeout,  # noqa: ASYNC109 - aiohttp's own per-phase timeouts
) -> aiohttp.ClientResponse:
    return await client.request(method, url, data=data, headers=headers, timeout=timeout,
                                allow_redirects=True)


async def _abandon(task: asyncio.Task[aiohttp.ClientResponse]) -> None:
    """Cancel a request task and wait for it to finish; a response it still produced is closed."""
    task.add_done_callback(_close_unclaimed)
    if task.done():
        return
    task.cancel()
    await asyncio.wait({task})
