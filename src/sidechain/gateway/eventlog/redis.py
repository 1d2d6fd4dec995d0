"""Event log on Redis: one Redis Stream of events per conversation, written in transactions.

Every write is enqueued on the event loop and returns at once; one writer task sends each batch (all
that accumulated while the previous batch was in flight, up to ``max_batch`` operations) as one
``MULTI``/``EXEC`` transaction, in the order the writes were enqueued. Only after ``EXEC`` are the
batch's events handed to the sink, so a client never sees an event the store does not hold, and ids
continue after a gateway restart without a gap or reuse. How durable an acknowledged write is, is the
Redis server's setting (``appendonly yes`` with ``appendfsync everysec`` loses at most a second of
writes if the *Redis* host crashes; a gateway crash loses nothing).

Keys (``P`` is the prefix, ``sidechain`` unless the URL says ``?prefix=``; ``C`` a conversation id):

* ``P:conv:C`` hash: ``created_at``, ``last_id`` (the newest event id written), ``thread_uses``;
* ``P:events:C`` stream: event ``n`` is the entry ``n-0`` with fields ``t`` (type) and ``d`` (data);
  trimmed exactly to the newest ``retention`` events;
* ``P:turns:C`` hash: turn id → the turn record (JSON); ``P:unfinished`` set: ``C`` + LF + turn id of
  every queued or running turn;
* ``P:threads:C`` sorted set: btw thread ids scored by their last use; ``P:thread:C:T`` hash: seq → a
  completed exchange (JSON), the newest ``MAX_THREAD_EXCHANGES`` only.

A failed transaction (Redis down or restarting; commands time out after 5 s unless the URL sets
``socket_timeout``) is sent again, first, with backoff, until it succeeds: nothing after it is written
before it and none of its events is delivered before it; ``flush`` waits meanwhile (the gateway bounds
those waits and answers 503 ``store_unavailable``). A transaction whose reply was lost may have been
applied: sent again, its stream entries are already there, which is then not an error. ``close`` gives
up after ``close_timeout`` seconds, logging what was never written.

One gateway per prefix, enforced: a gateway claims ``P:owner`` (its host, boot, pid namespace, pid and
a random token) for :data:`CLAIM_TTL` seconds and renews it while open; another gateway on the prefix
gets :class:`~.base.StoreInUse`, unless the claim is from a process of the same host, boot and pid
namespace that no longer exists (a killed gateway restarting). Every transaction is fenced by the
claim (``WATCH`` on it, checked before ``MULTI``): a gateway whose claim was taken writes nothing more
(its writes fail, and are retried, until it has the claim again); one whose claim lapsed (Redis
restarted empty, or away for longer than the claim) claims it again. A transaction spans several
conversations, so the store needs one Redis (or its primary), not a cluster.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import msgspec

from .base import (
    MAX_THREAD_EXCHANGES,
    ConversationRecord,
    EventSink,
    Op,
    QueuedWrites,
    StoredEvent,
    StoreInUse,
    ThreadExchange,
    TurnRecord,
    TurnState,
)

if TYPE_CHECKING:  # pragma: no cover
    from redis.asyncio import Redis

__all__ = ["RedisEventLog", "redis_target"]

log = logging.getLogger("sidechain.gateway.eventlog")

#: Seconds a Redis command or connect may take, unless the URL says otherwise.
DEFAULT_TIMEOUT = 5.0

#: URL schemes of a Redis store spec (redis-py's own).
SCHEMES = ("redis://", "rediss://", "unix://")


# A use numbers the thread after every earlier use of its conversation (atomic in Redis: no read
# before the write, and the order survives restarts).
_USE_THREAD = """
local n = redis.call('HINCRBY', KEYS[1], 'thread_uses', 1)
redis.call('ZADD', KEYS[2], n, ARGV[1])
return n
"""

#: Seconds a gateway's claim on a prefix lasts unless renewed (it is renewed every third of that).
CLAIM_TTL = 15.0

# Replace the claim only if it still is the one that was read (compare and set).
_TAKE_OVER = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return 1
end
return 0
"""
# Renew the claim while it is ours (1), claim it again if it lapsed (2); 0 if another gateway has it.
_RENEW = """
local current = redis.call('GET', KEYS[1])
if current == ARGV[1] then redis.call('PEXPIRE', KEYS[1], ARGV[2]) return 1 end
if not current then redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) return 2 end
return 0
"""
# Give the claim back only while it is ours.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

#: Redis's answer to an XADD of an id the stream already has (a retried transaction that was applied).
_ALREADY_ADDED = "equal or smaller than the target stream top item"

_encode = msgspec.json.Encoder().encode
_decode_turn = msgspec.json.Decoder(TurnRecord).decode
_decode_pair = msgspec.json.Decoder(tuple[str, str]).decode


def _read(path: str) -> str:
    try:
        with open(path, encoding="ascii") as f:
            return f.read().strip()
    except OSError:
        return ""


def _where() -> dict[str, str]:
    """What tells this process's pid space apart: the host, its boot and the pid namespace (one host
    name can cover several pid namespaces: containers, ``unshare``)."""
    try:
        pidns = str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        pidns = ""
    return {"host": socket.gethostname(), "boot": _read("/proc/sys/kernel/random/boot_id"), "pidns": pidns}


def _dead_local_process(claim: str) -> bool:
    """Whether a claim was made by a process of this host, boot and pid namespace that no longer runs."""
    try:
        owner = msgspec.json.decode(claim)
        pid = int(owner["pid"])
        where = {key: owner[key] for key in ("host", "boot", "pidns")}
    except (msgspec.DecodeError, KeyError, TypeError, ValueError):
        return False
    if where != _where():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # it exists (another user's)
        return False
    return False


def redacted(url: str) -> str:
    """``url`` without its password (for messages and logs)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


class _Rewatch(Exception):
    """The claim changed between the check and EXEC (renewed, or claimed again): nothing was written."""


def redis_target(spec: str) -> tuple[str, str]:
    """``(url for redis-py, key prefix)`` of a store spec such as ``redis://host:6379/0?prefix=gw1``."""
    parts = urlsplit(spec)
    query = parse_qsl(parts.query, keep_blank_values=True)
    prefixes = [v for k, v in query if k == "prefix"]
    rest = [(k, v) for k, v in query if k != "prefix"]
    prefix = prefixes[-1] if prefixes else "sidechain"
    if not prefix or any(c in prefix for c in " \n:"):
        raise ValueError(f"invalid Redis key prefix {prefix!r}: non-empty, no spaces, colons or newlines")
    return urlunsplit(parts._replace(query=urlencode(rest))), prefix


class RedisEventLog(QueuedWrites):
    """An :class:`~.base.EventLog` in Redis (redis-py's asyncio client).

    Owns one client (its connection pool) and, while writes are in flight, one writer task.
    :meth:`close` sends everything enqueued (giving up after ``close_timeout``), then closes the client.
    A failed transaction is sent again until it succeeds, its events held back meanwhile (see the
    module docstring); reads raise the client's error.
    """

    durable = True

    def __init__(self, spec: str, *, retention: int, max_batch: int = 4096, close_timeout: float = 10.0
                 ) -> None:
        super().__init__()
        self.url, self.prefix = redis_target(spec)
        self.retention = retention
        self.close_timeout = close_timeout
        self._max_batch = max_batch
        self._writer: asyncio.Task[None] | None = None
        self._closed = False
        self._redis: Redis | None = None
        self._use_thread: Any = None
        self._claim = ""  # made at open: who this gateway is (host, boot, pid namespace, pid, token)
        self._renewer: asyncio.Task[None] | None = None

    # -- keys ----------------------------------------------------------------------------------------

    def _conv(self, cid: str) -> str:
        return f"{self.prefix}:conv:{cid}"

    def _events(self, cid: str) -> str:
        return f"{self.prefix}:events:{cid}"

    def _turns(self, cid: str) -> str:
        return f"{self.prefix}:turns:{cid}"

    def _threads(self, cid: str) -> str:
        return f"{self.prefix}:threads:{cid}"

    def _thread(self, cid: str, thread_id: str) -> str:
        return f"{self.prefix}:thread:{cid}:{thread_id}"

    @property
    def _unfinished(self) -> str:
        return f"{self.prefix}:unfinished"

    @property
    def _owner(self) -> str:
        return f"{self.prefix}:owner"

    # -- the claim on the prefix ---------------------------------------------------------------------

    async def _take_claim(self, client: Redis) -> None:
        ttl = str(int(CLAIM_TTL * 1000))
        current: str | None = None
        for _ in range(3):  # the claim read may lapse between the tries: then it is free again
            if await client.set(self._owner, self._claim, nx=True, px=int(ttl)):
                return
            current = await client.get(self._owner)  # type: ignore[assignment]
            if current is None:
                continue
            if _dead_local_process(current) and await client.eval(_TAKE_OVER, 1, self._owner, current,
                                                                  self._claim, ttl):
                log.warning("took over the Redis store's claim of a gateway that is gone: %s", current)
                return
            break
        raise StoreInUse(f"the Redis store {redacted(self.url)} (prefix {self.prefix!r}) is in use by "
                         f"another gateway ({current}); its claim lapses {CLAIM_TTL:g}s after that gateway "
                         "stops")

    async def _renew_loop(self, client: Redis) -> None:
        while True:
            await asyncio.sleep(CLAIM_TTL / 3)
            try:
                renewed = await client.eval(_RENEW, 1, self._owner, self._claim,
                                            str(int(CLAIM_TTL * 1000)))
            except Exception as exc:  # Redis away for a moment: the writer reports it too
                log.warning("could not renew the Redis store's claim: %r", exc)
                continue
            if renewed == 2:
                log.warning("the Redis store's claim on prefix %r had lapsed (Redis restarted or was away); "
                            "claimed again", self.prefix)
            elif not renewed:
                log.critical("the Redis store's claim on prefix %r is held by another gateway: this one "
                             "writes nothing more until it has it again", self.prefix)

    # -- lifecycle -----------------------------------------------------------------------------------

    async def open(self, sink: EventSink) -> None:
        """Connect and check the server answers; raises ``ConnectionError`` with the URL when it does not,
        ``RuntimeError`` when the ``redis`` package is missing."""
        try:
            from redis.asyncio import Redis
            from redis.exceptions import RedisError
        except ImportError as exc:  # pragma: no cover - the dev install has it
            raise RuntimeError("the Redis store needs the redis package: pip install 'sidechain[redis]'"
                               ) from exc
        # bounded waits unless the URL sets its own (``?socket_timeout=``): an unreachable Redis must
        # not stall the writer, and with it every event stream, for the kernel's connect timeout
        client = Redis.from_url(self.url, decode_responses=True, socket_timeout=DEFAULT_TIMEOUT,
                                socket_connect_timeout=DEFAULT_TIMEOUT)
        self._claim = msgspec.json.encode({**_where(), "pid": os.getpid(),
                                           "token": secrets.token_hex(8)}).decode()
        try:
            await client.ping()
            await self._take_claim(client)
        except (RedisError, OSError) as exc:
            await client.aclose()
            raise ConnectionError(f"cannot use the Redis store at {redacted(self.url)}: {exc}") from exc
        except BaseException:
            await client.aclose()
            raise
        self._renewer = asyncio.get_running_loop().create_task(self._renew_loop(client),
                                                               name="sidechain-redis-claim")
        self._redis = client
        self._use_thread = client.register_script(_USE_THREAD)
        self._sink = sink

    async def close(self) -> None:
        """Send everything enqueued (delivering its events), then close the client. Idempotent. If
        cancelled while waiting, the writer is cancelled and the client closed before ``CancelledError``
        propagates."""
        if self._closed:
            return
        try:
            await self._flush_before_close(self.close_timeout, "Redis")
        finally:
            self._closed = True
            writer, self._writer = self._writer, None
            if writer is not None and not writer.done():
                writer.cancel()
                await asyncio.gather(writer, return_exceptions=True)
            renewer, self._renewer = self._renewer, None
            if renewer is not None:
                renewer.cancel()
                await asyncio.gather(renewer, return_exceptions=True)
            client, self._redis = self._redis, None
            if client is not None:
                try:
                    async with asyncio.timeout(DEFAULT_TIMEOUT):
                        await client.eval(_RELEASE, 1, self._owner, self._claim)
                except Exception as exc:  # it lapses by itself after CLAIM_TTL
                    log.warning("could not give back the Redis store's claim: %r", exc)
                await client.aclose()
            self._release_waiters(closing=True)

    # -- writes (enqueue only) -----------------------------------------------------------------------

    def _accepting(self) -> bool:
        return not self._closed and self._redis is not None

    def _kick(self) -> None:
        if self._writer is None:
            # its first step runs on the next loop iteration: every write of this step is in its batch
            self._writer = asyncio.get_running_loop().create_task(self._write_loop(),
                                                                  name="sidechain-redis-writer")

    # -- reads ---------------------------------------------------------------------------------------

    def _client(self) -> Redis:
        if self._redis is None:
            raise RuntimeError("the Redis event log is not open")
        return self._redis

    async def load_conversation(self, conversation_id: str) -> ConversationRecord | None:
        await self.flush()
        client = self._client()
        async with client.pipeline(transaction=True) as pipe:
            pipe.hgetall(self._conv(conversation_id))
            pipe.hvals(self._turns(conversation_id))
            pipe.zrange(self._threads(conversation_id), 0, -1)
            conv, turn_values, threads = await pipe.execute()
        if not conv:
            return None
        turns = sorted((_decode_turn(v) for v in turn_values), key=lambda t: t.seq)
        exchanges: list[ThreadExchange] = []
        if threads:
            async with client.pipeline(transaction=True) as pipe:
                for thread_id in threads:
                    pipe.hgetall(self._thread(conversation_id, thread_id))
                stored = await pipe.execute()
            for thread_id, pairs in zip(threads, stored, strict=True):
                for seq in sorted(int(s) for s in pairs):
                    question, answer = _decode_pair(pairs[str(seq)])
                    exchanges.append(ThreadExchange(thread_id, seq, question, answer))
        if "created_at" not in conv:  # Redis lost it (restarted without persistence) and writes came after
            log.warning("conversation %s has no created_at in the Redis store", conversation_id)
        return ConversationRecord(conversation_id, float(conv.get("created_at", 0.0)), turns,
                                  int(conv.get("last_id", 0)), exchanges, list(threads))

    async def read(self, conversation_id: str, after_id: int, limit: int) -> list[StoredEvent]:
        if limit <= 0:
            return []
        key, first = self._events(conversation_id), f"{max(1, after_id + 1)}-0"
        entries: list[tuple[str, dict[str, str]]] = await self._client().xrange(  # type: ignore[assignment]
            key, min=first, max="+", count=limit
        )
        return [StoredEvent(conversation_id, int(entry_id.partition("-")[0]), fields["t"], fields["d"])
                for entry_id, fields in entries]

    async def unfinished_turns(self) -> list[tuple[str, TurnRecord]]:
        await self.flush()
        client = self._client()
        stored: set[str] = await client.smembers(self._unfinished)  # type: ignore[assignment]
        members = sorted(m.split("\n", 1) for m in stored)
        if not members:
            return []
        async with client.pipeline(transaction=True) as pipe:
            for cid, turn_id in members:
                pipe.hget(self._turns(cid), turn_id)
            values = await pipe.execute()
        found = [(cid, _decode_turn(v)) for (cid, _), v in zip(members, values, strict=True) if v is not None]
        found.sort(key=lambda pair: (pair[0], pair[1].seq))
        return [(cid, t) for cid, t in found if t.state in TurnState.UNFINISHED]

    # -- internals -----------------------------------------------------------------------------------

    async def _write_loop(self) -> None:
        try:
            while self._pending:
                batch = self._pending[: self._max_batch]  # stays first in line until it is written
                try:
                    await self._write(batch, again=self._streak > 0)
                except _Rewatch:
                    continue  # the claim was renewed or taken again under the WATCH: check it again
                except Exception as exc:  # the connection, the server: the same batch is sent again
                    await asyncio.sleep(self._failed(batch, exc, "Redis"))
                    continue
                del self._pending[: len(batch)]
                self._written(batch, "Redis")
        finally:
            self._writer = None

    async def _write(self, batch: list[Op], *, again: bool) -> None:
        from redis.exceptions import WatchError

        client = self._client()
        newest: dict[str, int] = {}
        async with client.pipeline(transaction=True) as pipe:
            # fenced by the claim: EXEC does nothing if the claim changed after this check
            await pipe.watch(self._owner)
            owner: str | None = await pipe.get(self._owner)  # type: ignore[assignment]
            if owner != self._claim:
                await pipe.reset()  # type: ignore[no-untyped-call]
                if owner is None and await client.set(self._owner, self._claim, nx=True,
                                                      px=int(CLAIM_TTL * 1000)):
                    log.warning("the Redis store's claim on prefix %r had lapsed; claimed again", self.prefix)
                    raise _Rewatch
                raise StoreInUse(f"prefix {self.prefix!r} is claimed by another gateway ({owner}): "
                                 "not writing")
            pipe.multi()  # type: ignore[no-untyped-call]
            for op in batch:
                kind = op[0]
                if kind == "event":
                    ev: StoredEvent = op[1]
                    pipe.xadd(self._events(ev.conversation_id), {"t": ev.type, "d": ev.data}, id=f"{ev.id}-0")
                    newest[ev.conversation_id] = ev.id
                elif kind == "turn":
                    cid, turn = op[1], op[2]
                    pipe.hset(self._turns(cid), turn.turn_id, _encode(turn))
                    member = f"{cid}\n{turn.turn_id}"
                    if turn.state in TurnState.UNFINISHED:
                        pipe.sadd(self._unfinished, member)
                    else:
                        pipe.srem(self._unfinished, member)
                elif kind == "exchange":
                    cid, x = op[1], op[2]
                    key = self._thread(cid, x.thread_id)
                    pipe.hset(key, str(x.seq), _encode((x.question, x.answer)))
                    if x.seq > MAX_THREAD_EXCHANGES:  # a thread keeps its newest exchanges only
                        pipe.hdel(key, str(x.seq - MAX_THREAD_EXCHANGES))
                elif kind == "use_thread":
                    cid = op[1]
                    # queued on the pipeline (no I/O here), which loads the script before its MULTI if needed
                    await self._use_thread(keys=[self._conv(cid), self._threads(cid)], args=[op[2]],
                                           client=pipe)
                elif kind == "drop_thread":
                    pipe.zrem(self._threads(op[1]), op[2])
                    pipe.delete(self._thread(op[1], op[2]))
                else:
                    cid = op[1]
                    pipe.hsetnx(self._conv(cid), "created_at", repr(op[2]))
                    pipe.hsetnx(self._conv(cid), "last_id", 0)
            for cid, last in newest.items():
                pipe.hset(self._conv(cid), "last_id", last)
                if last > self.retention:
                    pipe.xtrim(self._events(cid), minid=f"{last - self.retention + 1}-0", approximate=False)
            try:
                results = await pipe.execute(raise_on_error=False)
            except WatchError:
                raise _Rewatch from None
        failed = [r for r in results if isinstance(r, Exception)
                  and not (again and _ALREADY_ADDED in str(r))]
        if failed:
            raise RuntimeError(f"{len(failed)} of {len(results)} Redis commands failed; first: {failed[0]!r}")

