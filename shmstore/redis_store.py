"""The store in Redis (or Valkey): the same operations as :class:`~shmstore.store.Store`,
with the same arguments, results and errors, for sessions that several machines share.

A :class:`~shmstore.client.Client` given a ``redis://`` address (:mod:`shmstore.address`)
calls this instead of a manager, so ``Client``, ``Watch`` and ``Follower`` work unchanged.
It needs the ``redis`` package (``pip install 'shmstore[redis]'``), imported only here.

Keys, all under one hash tag so that a cluster keeps them in one slot::

    {NS}:meta          hash: epoch, revision, bytes (of the live records), limits
    {NS}:live          hash: id -> record (shmstore.model's stored form)
    {NS}:closed        hash: id -> record, the recently closed
    {NS}:closed_order  sorted set: id -> the revision it closed at (oldest first)
    {NS}:revs          hash: id -> the revision of its stored record
    {NS}:feed          stream: one entry per change, id "<revision>-0": kind, id, data
    {NS}:done:TOKEN    hash: a client's newest write (number, revision, data), for one hour

How a write is atomic without decoding JSON in Lua (Redis 7.0's cjson turns ``[]`` into
``{}`` and prints 15-digit numbers in exponent form): the client reads the record and
Redis's clock (``TIME``) in one round trip, makes the change in Python with the same
functions the manager uses (``store.transition_record`` and the rest), and hands the
result to one Lua script (:data:`_COMMIT`), which stores it only if the session's
revision is still the one read, and else changes nothing and says so (the write is
tried again, within the call's deadline). The script checks the limits, counts the
revision, writes the record with it (the record's bytes around the revision, joined in
Lua), moves it between the live and the closed, and appends the feed entry, all or
nothing: every check comes before the first change. Two round trips a write; a race on
one session costs a third.

Several hosts: each session carries the host its agent runs on (``Session.host``,
:func:`procs.host_id`), and a pid with the start time that host's /proc gave, so a pid is
only ever checked on its own host. :meth:`RedisStore.reap`, run on every host
(``shmstore reaper``), closes its own host's sessions whose agent died and renews the
host's lease (``{NS}:lease:HOST``, three reap intervals; a report from the host renews
it too, in its commit); one reaper at a time, elected
with ``SET NX PX`` (``{NS}:reaper``), also marks silent sessions stale and, for hosts
whose lease expired, marks their sessions stale at once and closes those silent for
``host_grace`` more (a later report brings a session back). No clocks of two hosts are
compared: times are Redis's (``TIME``).

The commands sent are few, so that a least-privilege ACL user can run it: its ACL line is
``COMMANDS`` in tests/test_redis_security.py, which checks that the user needs each one; a
command added here, in Python or in the Lua scripts, goes there too. CONFIG GET (the
maxmemory-policy check) is tried, and skipped when refused.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import Callable
from typing import Any

import orjson

try:
    import redis
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ImportError(
        "a redis:// address needs the redis package: pip install 'shmstore[redis]'", name="redis"
    ) from exc

from . import procs
from .checks import (
    MAX_WAIT,
    check_count,
    check_duration,
    check_id,
    check_positive,
)
from .config import Limits
from .errors import (
    ConflictError,
    NotFoundError,
    ShmstoreError,
    StoreFullError,
    StoreUnavailableError,
    ValidationError,
)
from .feed import EventKind, encode_changes, encode_snapshot
from .model import (
    ACTIVITY,
    CLOSED,
    HOST,
    ID,
    PID,
    PID_START,
    REVISION,
    SINCE,
    STALE,
    STATUS,
    STATUS_CODE,
    WORKING,
    AgentType,
    ClosedReason,
    Record,
    check_status,
)
from .redis_address import RedisAddress
from .store import (
    DEFAULT_CHANGES_LIMIT,
    EXPOSED,
    Listing,
    add_usage_record,
    check_epoch,
    check_feed,
    check_once,
    checked_report,
    checked_set,
    encoded,
    pid_start_for,
    report_record,
    touch_record,
    transition_record,
)

log = logging.getLogger(__name__)

#: How long Redis keeps a client's newest write for a retry (the manager keeps the newest
#: 4,096 clients'; a key per client with a lifetime bounds them here). A client retries
#: within twice its timeout; every hook run is a client, so this also bounds the keys that
#: hooks leave (one record each).
DONE_SECONDS = 300
#: The widest revision: records are sized with it before Redis counts the real one.
_WIDEST_REVISION = 2**63 - 1
#: What _commit returns for a client's request older than its newest (nothing was run).
_OLD = ("old",)


def _preamble(number: int, epoch: int) -> str:
    """The checks both scripts make, in Lua, before any change: the store's epoch (made on
    first use, from ARGV[epoch]); a client's retry (ARGV[number]: its request number, or
    "") answered from what the first try stored, or refused as older than its newest; the
    session still at the revision the caller read (ARGV[2], "" for any); and the feed not
    past the store's revision (a damaged namespace, whose feed the write would fork)."""
    return """
local id = ARGV[1]
redis.call('HSETNX', meta, 'epoch', ARGV[EPOCH])
if ARGV[NUMBER] ~= '' then
  local number = redis.call('HGET', done, 'number')
  if number then
    if tonumber(number) == tonumber(ARGV[NUMBER]) then
      return {'done', redis.call('HGET', done, 'revision'), redis.call('HGET', done, 'data')}
    elseif tonumber(number) > tonumber(ARGV[NUMBER]) then
      return {'old'}
    end
  end
end
local have = tonumber(redis.call('HGET', revs, id) or '0')
if ARGV[2] ~= '' and have ~= tonumber(ARGV[2]) then
  return {'conflict', string.format('%d', have)}
end
local revision = string.format('%d', tonumber(redis.call('HGET', meta, 'revision') or '0') + 1)
local top = redis.call('XREVRANGE', feed, '+', '-', 'COUNT', 1)[1]
if top and tonumber((string.gsub(top[1], '-.*', ''))) >= tonumber(revision) then
  return {'damaged', top[1]}
end
""".replace("EPOCH", str(epoch)).replace("NUMBER", str(number))


# KEYS: meta, live, closed, closed_order, revs, feed, done (a key no one uses when the
# write is not a client's once()), and the writer's host lease (renewed by a report: the
# host is alive; a key no one uses otherwise).
# ARGV: id, expected revision ("" = any; "0" = none), record before the revision, record
# after it, closing (1/0), kind, max_sessions, max_store_bytes, max_closed, log_size,
# request number ("" = not once), keep its place among the closed (1/0), a new epoch, the
# lease's lifetime in ms ("" = no lease).
# Returns {"ok", revision, record, kind}, {"done", revision, record} (the client's retry of
# a write already made), {"old"} (older than its newest), {"conflict", revision},
# {"sessions", count} or {"bytes", total}: past a limit, nothing changed.
_COMMIT = """
local meta, live, closed, order, revs, feed, done, lease = unpack(KEYS)
PREAMBLE
local data = ARGV[3] .. revision .. ARGV[4]
local bytes = tonumber(redis.call('HGET', meta, 'bytes') or '0')
local current = redis.call('HGET', live, id)
local kind = ARGV[6]
if ARGV[5] == '1' then
  if current then
    redis.call('HDEL', live, id)
    bytes = bytes - #current
  end
  if ARGV[12] == '1' and redis.call('HEXISTS', closed, id) == 1 then
    redis.call('HSET', closed, id, data)
  else
    redis.call('HSET', closed, id, data)
    redis.call('ZADD', order, revision, id)
    while redis.call('ZCARD', order) > tonumber(ARGV[9]) do
      local oldest = redis.call('ZRANGE', order, 0, 0)[1]
      redis.call('ZREM', order, oldest)
      redis.call('HDEL', closed, oldest)
      redis.call('HDEL', revs, oldest)
    end
    kind = 'close'
  end
else
  if not current then
    local count = redis.call('HLEN', live)
    if count >= tonumber(ARGV[7]) then
      return {'sessions', count}
    end
  end
  local total = bytes + #data - (current and #current or 0)
  if total > tonumber(ARGV[8]) then
    return {'bytes', total}
  end
  bytes = total
  redis.call('HDEL', closed, id)
  redis.call('ZREM', order, id)
  redis.call('HSET', live, id, data)
end
redis.call('HSET', revs, id, revision)
redis.call('HSET', meta, 'revision', revision, 'bytes', bytes)
redis.call('XADD', feed, 'MAXLEN', ARGV[10], revision .. '-0', 'kind', kind, 'id', id, 'data', data)
if ARGV[11] ~= '' then
  redis.call('HSET', done, 'number', ARGV[11], 'revision', revision, 'data', data)
  redis.call('EXPIRE', done, DONE_SECONDS)
end
if ARGV[14] ~= '' then
  redis.call('SET', lease, '1', 'PX', ARGV[14])
end
return {'ok', revision, data, kind}
""".replace("DONE_SECONDS", str(DONE_SECONDS)).replace("PREAMBLE", _preamble(11, 13))

# KEYS as for _COMMIT. ARGV: id, expected revision ("" = any), request number ("" = not
# once), log_size, a new epoch. Returns {"ok", revision, record}, {"none"} (no such
# session), {"done", revision, record} or {"old"} (as _COMMIT), {"conflict", revision}.
_REMOVE = """
local meta, live, closed, order, revs, feed, done = unpack(KEYS)
PREAMBLE
local data = redis.call('HGET', live, id)
if data then
  redis.call('HDEL', live, id)
  redis.call('HINCRBY', meta, 'bytes', -#data)
else
  data = redis.call('HGET', closed, id)
  if data then
    redis.call('HDEL', closed, id)
    redis.call('ZREM', order, id)
  end
end
if not data then
  if ARGV[3] ~= '' then
    redis.call('HSET', done, 'number', ARGV[3], 'revision', '0', 'data', '')
    redis.call('EXPIRE', done, DONE_SECONDS)
  end
  return {'none'}
end
redis.call('HDEL', revs, id)
redis.call('HSET', meta, 'revision', revision)
redis.call('XADD', feed, 'MAXLEN', ARGV[4], revision .. '-0', 'kind', 'remove', 'id', id)
if ARGV[3] ~= '' then
  redis.call('HSET', done, 'number', ARGV[3], 'revision', revision, 'data', data)
  redis.call('EXPIRE', done, DONE_SECONDS)
end
return {'ok', revision, data}
""".replace("DONE_SECONDS", str(DONE_SECONDS)).replace("PREAMBLE", _preamble(3, 5))


class RedisStore:
    """The store's operations on one namespace of one Redis server. Safe to share between
    threads (redis-py's connection pool gives each call a connection of its own).

    A namespace's :class:`Limits` live in Redis with it, so that every client applies the
    same ones: the first client to use a namespace writes its ``limits`` (the defaults when
    None) and every later one reads them, whatever it was given."""

    def __init__(self, address: RedisAddress, timeout: float, limits: Limits | None = None) -> None:
        self.address = address
        self.timeout = timeout
        options: dict[str, Any] = {
            "db": address.db,
            "username": address.username,
            "password": address.password,
            "socket_timeout": timeout,
            "socket_connect_timeout": timeout,
        }
        self._redis: Any = redis.Redis(connection_pool=_pool(address, options))
        tag = "{" + address.namespace + "}"
        self._keys = [f"{tag}:{name}" for name in ("meta", "live", "closed", "closed_order", "revs", "feed")]
        self._meta, self._live, self._closed, self._order, self._revs, self._feed = self._keys
        self._no_client = f"{tag}:done:-"
        self._tag = tag
        #: This host, as the sessions it reports name it.
        self.host = procs.host_id()
        self._commit_script = self._redis.register_script(_COMMIT)
        self._remove_script = self._redis.register_script(_REMOVE)
        try:
            self.limits = self._namespace_limits(limits or Limits())
        except BaseException:  # the first command: Redis refused us, or is not there
            self.close()
            raise

    def _namespace_limits(self, limits: Limits) -> Limits:
        pipe = self._redis.pipeline(transaction=True)
        pipe.hsetnx(self._meta, "limits", orjson.dumps(dataclasses.asdict(limits)))
        pipe.hget(self._meta, "limits")
        _, stored = pipe.execute()
        try:
            policy = self._redis.config_get("maxmemory-policy")
        except redis.exceptions.ResponseError:  # CONFIG refused (a restricted ACL user): no policy check
            policy = {}
        evicts = policy.get("maxmemory-policy", "noeviction") if isinstance(policy, dict) else "noeviction"
        if evicts not in ("noeviction", b"noeviction"):
            log.warning(
                "Redis at %s evicts keys (maxmemory-policy %s): an evicted key corrupts the store; "
                "set maxmemory-policy noeviction",
                self.address,
                evicts.decode() if isinstance(evicts, bytes) else evicts,
            )
        try:
            return Limits(**orjson.loads(stored))
        except (orjson.JSONDecodeError, TypeError, ValidationError) as exc:
            raise ValidationError("limits", f"the namespace's limits in Redis are not valid: {exc}") from None

    def delete_namespace(self) -> int:
        """Delete every key of this namespace (the demo's, when it ends); returns how many."""
        keys = list(self._redis.scan_iter(match=f"{self._tag}:*", count=1000))
        return int(self._redis.delete(*keys)) if keys else 0

    def close(self) -> None:
        self._redis.close()
        self._redis.connection_pool.disconnect()

    # -- reads ------------------------------------------------------------------------------

    def get(self, id: str) -> bytes | None:
        check_id(id, max_length=self.limits.max_id_length)
        pipe = self._redis.pipeline(transaction=False)
        pipe.hget(self._live, id)
        pipe.hget(self._closed, id)
        live, closed = pipe.execute()
        found: bytes | None = live if live is not None else closed
        return found

    def list_all(self, epoch: str | None = None, revision: int | None = None) -> list[bytes] | Listing | None:
        if revision is None:
            return list(self._redis.hvals(self._live))
        check_count(revision, "revision")
        check_epoch(epoch)
        now_epoch, now_revision, (live,) = self._at_one_instant(lambda pipe: pipe.hgetall(self._live))
        if epoch == now_epoch and revision == now_revision:
            return None
        ids = [id.decode() for id in live]
        datas = list(live.values())
        revisions = [orjson.loads(data)[REVISION] for data in datas]
        return (now_epoch, now_revision, orjson.dumps([ids, revisions]), datas)

    def recently_closed(self) -> list[bytes]:
        ids = self._redis.zrevrange(self._order, 0, -1)
        if not ids:
            return []
        return [data for data in self._redis.hmget(self._closed, ids) if data is not None]

    def revision(self) -> int:
        return int(self._redis.hget(self._meta, "revision") or 0)

    def info(self) -> dict[str, Any]:
        epoch, revision, (live, closed) = self._at_one_instant(
            lambda pipe: (pipe.hlen(self._live), pipe.hlen(self._closed))
        )
        return {
            "backend": "redis",
            "address": str(self.address),
            "epoch": epoch,
            "revision": revision,
            "live": live,
            "closed": closed,
            "host": self.host,
            "reap_interval": self.limits.reap_interval,
        }

    def snapshot(self) -> bytes:
        epoch, revision, (live,) = self._at_one_instant(lambda pipe: pipe.hvals(self._live))
        return encode_snapshot(epoch, revision, live)

    def changes(
        self, after_revision: int, timeout: float = 0.0, epoch: str | None = None, limit: int = DEFAULT_CHANGES_LIMIT
    ) -> bytes:
        check_count(after_revision, "after_revision")
        wait = check_duration(timeout, "timeout", MAX_WAIT)
        check_epoch(epoch)
        limit = min(check_positive(limit, "limit"), self.limits.log_size)
        start, waited_until = f"{after_revision + 1}-0", time.monotonic() + wait
        while True:
            now_epoch, revision, (oldest, entries) = self._at_one_instant(
                lambda pipe: (
                    pipe.xrange(self._feed, "-", "+", count=1),
                    pipe.xrange(self._feed, start, "+", count=limit),
                )
            )
            first = int(oldest[0][0].split(b"-")[0]) if oldest else revision + 1
            check_feed(now_epoch, revision, first, after_revision, epoch, "Redis lost or replaced its data")
            left = waited_until - time.monotonic()
            if entries or left <= 0:
                break
            # Nothing yet: wait in Redis for the next entry (in slices shorter than the
            # socket's timeout, so a stopped Redis fails the call within it), then read it as
            # above: the wait may end on an entry of a store that was emptied and began again.
            self._redis.xread({self._feed: f"{after_revision}-0"}, count=1, block=_slice_ms(left, self.timeout))
        events = (
            (
                int(entry_id.split(b"-")[0]),
                EventKind(fields[b"kind"].decode()),
                fields[b"id"].decode(),
                fields.get(b"data"),
            )
            for entry_id, fields in entries
        )
        return encode_changes(now_epoch, events, self.limits.max_store_bytes)

    # -- writes -----------------------------------------------------------------------------

    def once(self, client: bytes, number: int, method: str, *args: Any) -> Any:
        """:meth:`Store.once`: the write, unless this client's request ``number`` already ran."""
        check_once(client, number, method)
        return getattr(self, method)(*args, once=(client, number))

    def reap(self) -> int:
        """One reaper pass for this host (run it every ``reap_interval`` seconds on every
        host whose agents report here: ``shmstore reaper``); returns how many sessions it
        changed. See the module's docstring for what it does and who does what."""
        at, me, tag = self._time(), self.host, self._tag
        ttl = self._lease_ms()
        self._redis.set(f"{tag}:lease:{me}", b"1", px=ttl)
        elected = self._redis.set(f"{tag}:reaper", me, nx=True, px=ttl)
        leader = bool(elected) or self._redis.get(f"{tag}:reaper") == me.encode()
        if leader:  # the one reaper that also looks after other hosts' sessions: renewed
            self._redis.pexpire(f"{tag}:reaper", ttl)
        records = [orjson.loads(data) for data in self._redis.hvals(self._live)]
        hosts = sorted({record[HOST] for record in records if record[HOST] not in (None, me)})
        gone = self._gone_since(hosts, at) if leader else {}
        changed = 0
        for record in records:
            host, silent = record[HOST], at - record[ACTIVITY]
            pid, start = record[PID], record[PID_START]
            if host == me and pid is not None and start is not None and not procs.agent_alive(pid, start):
                changed += self._reaped(record, at, ClosedReason.AGENT_GONE)
                continue
            quiet = record[STATUS] == WORKING and silent >= self.limits.stale_after
            if host in gone and record[STALE] and silent > 0 and at - gone[host] >= self.limits.host_grace:
                changed += self._reaped(record, at, ClosedReason.HOST_GONE)
            elif leader and not record[STALE] and (host in gone or quiet):
                record[STALE] = True
                changed += self._commit(None, record, record[REVISION], EventKind.STALE, outside=False) is not None
        return changed

    def _lease_ms(self) -> int:
        """How long a host stays alive without a report or a reaper pass: three passes."""
        return max(1, round(3 * self.limits.reap_interval * 1000))

    def _gone_since(self, hosts: list[str], at: float) -> dict[str, float]:
        """Of ``hosts``, those whose lease expired, each with when a reaper first found it so
        (``{NS}:gone:HOST``, by Redis's clock): the grace counts from then, not from the
        session's last activity (an idle session of a host cut off for a moment must not
        close at once). A host whose lease is back has its mark cleared."""
        pipe = self._redis.pipeline(transaction=False)
        for host in hosts:
            pipe.exists(f"{self._tag}:lease:{host}")
        alive = [bool(found) for found in pipe.execute()]
        keep = round((self.limits.host_grace + self.limits.reap_interval * 10) * 1000)
        pipe = self._redis.pipeline(transaction=False)
        for host, lease in zip(hosts, alive, strict=True):
            mark = f"{self._tag}:gone:{host}"
            if lease:  # back: forget when it went (SET XX PX 1, as DEL is not ours to use)
                pipe.set(mark, b"", xx=True, px=1)
            else:
                pipe.set(mark, repr(at), nx=True, px=keep)
                pipe.get(mark)
        marks = iter(pipe.execute())
        since: dict[str, float] = {}
        for host, lease in zip(hosts, alive, strict=True):
            next(marks)
            if not lease:
                when = next(marks)
                since[host] = float(when) if when else at
        return since

    def _reaped(self, record: Record, at: float, why: str) -> bool:
        """Close ``record``'s session for ``why``, unless it changed since it was read."""
        expected = record[REVISION]
        transition_record(record, CLOSED, at, self.limits.max_history, why)
        return self._commit(None, record, expected, EventKind.CLOSE, outside=False) is not None

    # -- the writes: :class:`Store`'s, each also taking the client's once() token and number --

    def set(
        self, data: bytes, expected_revision: int | None = None, *, once: tuple[bytes, int] | None = None
    ) -> tuple[int, int | None]:
        record = checked_set(data, expected_revision, self.limits)
        # Stored as given (a session without a host is never judged by its pid); a pid of
        # this host's gets its start time from here, as a report's does.
        if record[PID] is not None and record[PID_START] is None and record[HOST] == self.host:
            record[PID_START] = procs.process_start(record[PID])
        result = self._commit(once, record, expected_revision, EventKind.SET, outside=True, conflict=True)
        if result is _OLD:
            return None  # type: ignore[return-value]  # as Store.once answers an old request
        assert result is not None  # a conflict raised
        return int(result[0]), record[PID_START]

    def remove(self, id: str, *, once: tuple[bytes, int] | None = None, expected: int | None = None) -> bytes | None:
        check_id(id, max_length=self.limits.max_id_length)
        token, number = self._once_keys(once)
        reply = self._remove_script(
            keys=[*self._keys, token],
            args=[id, "" if expected is None else expected, number, self.limits.log_size, _new_epoch()],
        )
        status = reply[0].decode()
        if status in ("ok", "done"):
            return reply[2] or None
        if status == "damaged":
            raise _damaged(self.address, reply[1])
        if status == "conflict":
            raise ConflictError(id, expected or 0, int(reply[1]))
        return None

    def transition(self, id: str, status: str, *, once: tuple[bytes, int] | None = None) -> bytes:
        check_id(id, max_length=self.limits.max_id_length)
        to = STATUS_CODE[check_status(status)]
        return self._change(
            once,
            id,
            lambda record, at: transition_record(record, to, at, self.limits.max_history, ClosedReason.TRANSITION),
            EventKind.TRANSITION,
        )

    def add_usage(
        self, id: str, input_tokens: int, output_tokens: int, *, once: tuple[bytes, int] | None = None
    ) -> bytes:
        check_id(id, max_length=self.limits.max_id_length)
        check_count(input_tokens, "input_tokens")
        check_count(output_tokens, "output_tokens")
        return self._change(
            once,
            id,
            lambda record, at: touch_record(add_usage_record(record, input_tokens, output_tokens), at),
            EventKind.ADD_USAGE,
        )

    def report(
        self,
        id: str,
        status: str,
        working_dir: str,
        pid: int | None = None,
        session_id: str | None = None,
        agent_type: str = AgentType.CLAUDE_CODE,
        reason: str | None = None,
        at: float | None = None,
        *,
        once: tuple[bytes, int] | None = None,
    ) -> bytes:
        to, agent, why, event = checked_report(
            id, status, working_dir, pid, session_id, agent_type, reason, at, self.limits.max_id_length
        )
        for _ in self._tries():
            current, now, done = self._read(id, once)
            if done is not None:  # a retry of a write already made, or older than the newest
                return None if done is _OLD else done  # type: ignore[return-value]
            record, late = report_record(
                current, id, to, working_dir, agent, why, now, self.limits.max_history, session_id, event
            )
            record[HOST] = self.host
            # its start time from this host's /proc: the reporter runs beside the agent
            if pid is not None and not late:
                record[PID], record[PID_START] = pid, pid_start_for(pid, procs.process_start(pid), current)
            expected = 0 if current is None else orjson.loads(current)[REVISION]
            result = self._commit(once, record, expected, EventKind.REPORT, outside=current is None, lease=True)
            if result is not None:
                return _answer(result)
        raise AssertionError("unreachable")

    def prune(self, older_than: float, *, once: tuple[bytes, int] | None = None) -> int:
        age = check_duration(older_than, "older_than")
        if once is not None:
            done = _done(once, self._redis.hmget(self._once_keys(once)[0], "number", "data"))
            if done is not None:
                return None if done is _OLD else int(done)  # type: ignore[return-value]
            gone = self.prune(age)
            key, number = self._once_keys(once)
            pipe = self._redis.pipeline(transaction=True)
            pipe.hset(key, mapping={"number": number, "revision": "0", "data": str(gone)})
            pipe.expire(key, DONE_SECONDS)
            pipe.execute()
            return gone
        cutoff = self._time() - age
        gone = 0
        for id, data in self._redis.hgetall(self._closed).items():
            record = orjson.loads(data)
            if record[SINCE] <= cutoff:
                with contextlib.suppress(ConflictError):  # changed since: newer than the cutoff now
                    gone += self.remove(id.decode(), expected=record[REVISION]) is not None
        return gone

    # -- internals ---------------------------------------------------------------------------

    def _change(
        self, once: tuple[bytes, int] | None, id: str, change: Callable[[Record, float], Record], kind: EventKind
    ) -> bytes:
        """Read session ``id`` and Redis's clock, ``change`` the record, and commit it if the
        session is still at the revision read; else read again."""
        for _ in self._tries():
            current, at, done = self._read(id, once)
            if done is not None:  # a retry of a write already made (the session may be gone since)
                return None if done is _OLD else done  # type: ignore[return-value]
            if current is None:
                raise NotFoundError(id, f"no live session with id {id!r}")
            record = orjson.loads(current)
            expected = record[REVISION]
            was_closed = record[STATUS] == CLOSED
            record = change(record, at)
            keep_place = kind is EventKind.ADD_USAGE and was_closed
            result = self._commit(once, record, expected, kind, outside=False, keep_place=keep_place)
            if result is not None:
                return _answer(result)
        raise AssertionError("unreachable")

    def _commit(
        self,
        once: tuple[bytes, int] | None,
        record: Record,
        expected: int | None,
        kind: EventKind,
        *,
        outside: bool,
        conflict: bool = False,
        keep_place: bool = False,
        lease: bool = False,
    ) -> Any:
        """Store ``record`` if the session is still at revision ``expected`` (None: any);
        returns (revision, record bytes), None when it was not (try again), or _OLD when
        ``once`` names an older request than the client's newest (nothing is run). With
        ``conflict``, a changed session raises ConflictError instead (set's
        expected_revision)."""
        record[REVISION] = _WIDEST_REVISION
        encoded(record, self.limits.max_record_bytes, outside)  # the size checks, at the widest
        head, tail = orjson.dumps(record[:REVISION]), orjson.dumps(record[REVISION + 1 :])
        token, number = self._once_keys(once)
        limits = self.limits
        reply = self._commit_script(
            keys=[*self._keys, token, f"{self._tag}:lease:{self.host}" if lease else self._no_client],
            args=[
                record[ID],
                "" if expected is None else expected,
                head[:-1] + b",",
                b"," + tail[1:],
                "1" if record[STATUS] == CLOSED else "0",
                kind.value,
                limits.max_sessions,
                limits.max_store_bytes,
                limits.max_closed,
                limits.log_size,
                number,
                "1" if keep_place else "0",
                _new_epoch(),
                self._lease_ms() if lease else "",
            ],
        )
        status = reply[0].decode()
        if status in ("ok", "done"):
            return reply[1], reply[2]
        if status == "old":
            return _OLD
        if status == "damaged":
            raise _damaged(self.address, reply[1])
        if status == "conflict":
            if conflict and expected is not None:
                raise ConflictError(record[ID], expected, int(reply[1]))
            return None
        if status == "sessions":
            raise StoreFullError(
                f"the store holds {int(reply[1])} live sessions, its limit; {record[ID]!r} was not added",
                limit="max_sessions",
                id=record[ID],
            )
        raise StoreFullError(
            f"the live sessions would take {int(reply[1])} bytes, past max_store_bytes "
            f"({limits.max_store_bytes}); {record[ID]!r} was not written",
            limit="max_store_bytes",
            id=record[ID],
        )

    def _tries(self) -> Any:
        """Attempts at a read-change-commit, until the call's deadline: each loses only to
        another write of the same session, which has then succeeded."""
        deadline = time.monotonic() + self.timeout
        yield 1
        while time.monotonic() < deadline:
            yield 1
        raise ConnectionError(f"the session kept changing under this write for {self.timeout:g} s")

    def _read(self, id: str, once: tuple[bytes, int] | None = None) -> tuple[bytes | None, float, Any]:
        """Session ``id`` as stored (live, else closed, else None), Redis's clock, and what a
        client's ``once`` request already got: None (not run yet), its record, or _OLD (older
        than the client's newest). The commit checks the last again: this only spares a
        retry the change, which may no longer apply (its session removed since)."""
        pipe = self._redis.pipeline(transaction=True)
        pipe.hget(self._live, id)
        pipe.hget(self._closed, id)
        pipe.time()
        if once is not None:
            pipe.hmget(self._once_keys(once)[0], "number", "data")
        live, closed, (seconds, micros), *done = pipe.execute()
        return (live if live is not None else closed), _clock(seconds, micros), _done(once, *done)

    def _time(self) -> float:
        seconds, micros = self._redis.time()
        return _clock(seconds, micros)

    def _once_keys(self, once: tuple[bytes, int] | None) -> tuple[str, str]:
        if once is None:
            return self._no_client, ""
        token, number = once
        return f"{{{self.address.namespace}}}:done:{token.hex()}", str(number)

    def _at_one_instant(self, read: Callable[[Any], Any]) -> tuple[str, int, list[Any]]:
        """The store's epoch (made on first use) and revision, and what ``read`` queues on
        the same transaction (MULTI/EXEC: one instant of the store)."""
        pipe = self._redis.pipeline(transaction=True)
        pipe.hsetnx(self._meta, "epoch", _new_epoch())
        pipe.hget(self._meta, "epoch")
        pipe.hget(self._meta, "revision")
        read(pipe)
        _, epoch, revision, *rest = pipe.execute()
        return epoch.decode(), int(revision or 0), rest


def _pool(address: RedisAddress, options: dict[str, Any]) -> Any:
    """A connection pool to ``address``: its unix socket, or TCP, with TLS (and the URL's
    TLS files; the server's certificate and host name are always checked) for rediss://."""
    if address.path is not None:
        return redis.ConnectionPool(connection_class=redis.UnixDomainSocketConnection, path=address.path, **options)
    if address.tls:
        secure: dict[str, Any] = dict(options, **address.tls_options())
        return redis.ConnectionPool(
            connection_class=redis.SSLConnection, host=address.host, port=address.port, **secure
        )
    return redis.ConnectionPool(connection_class=redis.Connection, host=address.host, port=address.port, **options)


def _damaged(address: RedisAddress, top: bytes) -> ShmstoreError:
    """A namespace whose feed is ahead of its revision (its meta key was deleted or
    replaced by hand): no write could be appended to the feed, so none is made."""
    return ShmstoreError(
        f"the namespace {address.namespace!r} at {address} is damaged: its feed reaches {top.decode()}, past its "
        "revision; delete the namespace's keys (a new store) or restore them together"
    )


def _answer(result: Any) -> bytes:
    """A committed write's answer: its record, or None for a request older than the
    client's newest (Store.once answers one so)."""
    answer: bytes = None if result is _OLD else result[1]  # type: ignore[assignment]
    return answer


def _done(once: tuple[bytes, int] | None, stored: list[bytes | None] | None = None) -> Any:
    """What Redis kept of a client's newest write (``[number, data]``) says of request
    ``once``: None (not run yet), its result's data, or _OLD (older than the newest)."""
    if once is None or not stored or stored[0] is None:
        return None
    number = int(stored[0])
    if number < once[1]:
        return None
    return stored[1] if number == once[1] else _OLD


def _slice_ms(left: float, timeout: float) -> int:
    """One XREAD BLOCK of a wait with ``left`` seconds to go, on a connection whose reads
    time out after ``timeout``: at most half of that (Redis's 0 means for ever)."""
    return max(1, round(min(left, timeout / 2) * 1000))


def _clock(seconds: int, micros: int) -> float:
    """Redis's TIME as epoch seconds to the millisecond, as :func:`checks.now` gives them."""
    return round(seconds + micros / 1e6, 3)


def _new_epoch() -> str:
    return os.urandom(8).hex()


class RedisProxy:
    """What a :class:`~shmstore.client.Client` calls instead of a manager's proxy. Redis's
    errors become those of a manager's connection (OSError: the Client tries once more,
    then raises StoreUnavailableError), never with the password in them."""

    def __init__(self, address: RedisAddress, timeout: float) -> None:
        self.address = address
        # Making the store reads the namespace's limits: the first command, so the one that a
        # wrong password, a TLS mistake or a key outside the user's ACL fails. It is raised as
        # connect() promises, StoreUnavailableError at once (the Client's retry is for calls).
        try:
            self.store = RedisStore(address, timeout)
        except _FAILURES as exc:
            where = str(address)
            raise StoreUnavailableError(
                f"cannot use Redis at {where}: {_os_error(exc, address)}", address=where
            ) from None

    def call(self, method: str, args: tuple[Any, ...], deadline: float) -> Any:
        if method not in EXPOSED:
            raise ValidationError("method", f"{method!r} is not an operation of the store")
        try:
            return getattr(self.store, method)(*args)
        except _FAILURES as exc:
            raise _os_error(exc, self.address) from None

    def close(self) -> None:
        self.store.close()

    def retire(self) -> None:
        """The Client made a new proxy after a failed call: close the idle connections now,
        and leave those other threads' calls hold to finish (redis-py closes them as it
        gives them back, since the pool was disconnected)."""
        self.store._redis.connection_pool.disconnect(inuse_connections=False)


#: Redis's errors that say the store cannot be used (redis-py's AuthenticationError is a
#: ConnectionError, its NoPermissionError a ResponseError).
_FAILURES = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, redis.exceptions.ResponseError)


def _os_error(exc: Exception, address: RedisAddress) -> OSError:
    """Redis's error ``exc`` as the OSError a manager's connection raises. Its text is
    scrubbed of the password (redis-py puts server replies and command arguments in its
    messages; none should hold it, and then none ever can), with a hint for the usual
    mistakes."""
    text = str(exc) or type(exc).__name__
    if address.password:
        text = text.replace(address.password, "***")
    if isinstance(exc, redis.exceptions.AuthenticationError):
        return PermissionError(f"Redis refused the credentials: {text}")
    # Refused inside a Lua script, it is a plain error ("The user executing the script can't ...").
    if isinstance(exc, redis.exceptions.NoPermissionError) or "user executing the script can't" in text:
        return PermissionError(f"Redis refused it (NOPERM: outside the user's ACL): {text}")
    if isinstance(exc, redis.exceptions.ResponseError):
        return ConnectionError(f"Redis answered with an error: {text}")
    if isinstance(exc, redis.exceptions.TimeoutError):
        return TimeoutError(text)
    return ConnectionError(text + _hint(text, address))


def _hint(text: str, address: RedisAddress) -> str:
    """What a connection error most likely means, when its text alone does not say."""
    if address.tls and address.ssl_ca_certs is None and "CERTIFICATE_VERIFY_FAILED" in text:
        return " (a server certificate from a private CA needs ?ssl_ca_certs=/path/to/ca.pem)"
    if address.tls_options() and "No such file" in text:  # redis-py names no file
        return " (a TLS file the URL names is missing)"
    # A server that wants a client certificate ends the handshake without saying why (TLS 1.3):
    # as an EOF, an alert, or (seen with Python 3.13's OpenSSL) a reset of the connection.
    cut_off = ("EOF occurred", "CERTIFICATE_REQUIRED", "Connection reset by peer")
    if address.tls and address.ssl_certfile is None and any(sign in text for sign in cut_off):
        return " (if the server asks for a client certificate: &ssl_certfile=/path/me.pem&ssl_keyfile=/path/me.key)"
    plain_tcp = not address.tls and address.path is None
    if plain_tcp and ("reset by peer" in text or "closed by server" in text):
        return " (a TLS port drops a plain connection: use rediss:// if the server wants TLS)"
    return ""
