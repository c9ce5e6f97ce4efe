"""The store in Redis (or Valkey): the same operations as :class:`~shmstore.store.Store`
(the :class:`~shmstore.backend.Backend` protocol), with the same arguments, results and
errors, for sessions that several machines share. A
:class:`~shmstore.clients.client.Client` given a ``redis://`` address calls this instead of
a manager (through :mod:`shmstore.redis.proxy`), so ``Client``, ``Watch`` and ``Follower``
work unchanged. It needs the ``redis`` package (``pip install 'shmstore[redis]'``).

Keys, all under one hash tag so that a cluster keeps them in one slot::

    {NS}:meta          hash: epoch, revision, bytes (of the live records), limits
    {NS}:live          hash: id -> record (shmstore.record's stored form)
    {NS}:closed        hash: id -> record, the recently closed
    {NS}:closed_order  sorted set: id -> the revision it closed at (oldest first)
    {NS}:revs          hash: id -> the revision of its stored record
    {NS}:feed          stream: one entry per change, id "<revision>-<mark>": kind, id, data
    {NS}:done:TOKEN    hash: a client's newest write (number, revision, data), for one hour

How a write is atomic without decoding JSON in Lua (Redis 7.0's cjson turns ``[]`` into
``{}`` and prints 15-digit numbers in exponent form): the client reads the record and
Redis's clock (``TIME``) in one round trip, makes the change in Python with the manager's
own functions (:mod:`shmstore.rules`), and hands the result to one Lua script
(:data:`~shmstore.redis.scripts.COMMIT`), which stores it only if the session's revision
is still the one read, and else changes nothing and says so (the write is tried again,
within the call's deadline). The script checks the limits, counts the revision, writes
the record with it, moves it between the live and the closed, and appends the feed entry,
all or nothing: every check comes before the first change. Two round trips a write.

A follower's place in the history it follows, and why a Redis gone back to older data is
noticed: :mod:`shmstore.redis.history`.

Several hosts: each session carries the host its agent runs on (``Session.host``,
:func:`procs.host_id`), and a pid with the start time that host's /proc gave, so a pid is
only ever checked on its own host. :meth:`RedisStore.reap`, run on every host (``shmstore
reaper``), closes its own host's sessions whose agent died and renews the host's lease
(``{NS}:lease:HOST``, three reap intervals; a report from the host renews it too); one
reaper at a time, elected with ``SET NX PX`` (``{NS}:reaper``), also marks silent sessions
stale and, for hosts whose lease expired, marks their sessions stale at once and closes
those silent for ``host_grace`` more (a later report brings a session back). Times are
Redis's (``TIME``).

The commands sent are few, so that a least-privilege ACL user can run it: its ACL line is
``COMMANDS`` in tests/test_redis_security.py, which checks that the user needs each one; a
command added here, in Python or in the Lua scripts, goes there too. CONFIG GET (the
maxmemory-policy check) is tried, and skipped when refused.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, overload

import orjson

try:
    import redis
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ImportError(
        "a redis:// address needs the redis package: pip install 'shmstore[redis]'", name="redis"
    ) from exc

from .. import procs, rules
from ..backend import DEFAULT_CHANGES_LIMIT, Listing
from ..checks import MAX_WAIT, check_count, check_duration, check_id, check_positive
from ..config import Limits
from ..errors import ConflictError, NotFoundError, StoreFullError, ValidationError
from ..feed import EventKind, encode_event, encode_snapshot, fit_events, join_changes
from ..model import AgentType, ClosedReason, check_status
from ..record import (
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
    Record,
    trim,
)
from . import history
from .address import RedisAddress
from .connection import connection_pool
from .hosts import gone_since, lease_ms
from .scripts import COMMIT, DONE_SECONDS, OLD, REMOVE, answer, damaged, earlier_answer, refused

log = logging.getLogger(__name__)

#: The widest revision: records are sized with it before Redis counts the real one.
_WIDEST_REVISION = 2**63 - 1


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
        self._redis: Any = redis.Redis(connection_pool=connection_pool(address, options))
        tag = "{" + address.namespace + "}"
        self._keys = [f"{tag}:{name}" for name in ("meta", "live", "closed", "closed_order", "revs", "feed")]
        self._meta, self._live, self._closed, self._order, self._revs, self._feed = self._keys
        self._no_client = f"{tag}:done:-"
        self._tag = tag
        #: This host, as the sessions it reports name it.
        self.host = procs.host_id()
        self._commit_script = self._redis.register_script(COMMIT)
        self._remove_script = self._redis.register_script(REMOVE)
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

    @overload
    def list_all(self) -> list[bytes]: ...
    @overload
    def list_all(self, epoch: str | None, revision: int) -> Listing | None: ...

    def list_all(self, epoch: str | None = None, revision: int | None = None) -> list[bytes] | Listing | None:
        if revision is None:
            return list(self._redis.hvals(self._live))
        check_count(revision, "revision")
        rules.check_epoch(epoch)
        now_epoch, now_revision, _, (live,) = self._at_one_instant(lambda pipe: pipe.hgetall(self._live))
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
        return self._at_one_instant(lambda pipe: None)[1]  # with the check of a damaged namespace

    def info(self) -> dict[str, Any]:
        epoch, revision, _, (live, closed) = self._at_one_instant(
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
        epoch, revision, mark, (live,) = self._at_one_instant(lambda pipe: pipe.hvals(self._live))
        return encode_snapshot(history.marked(epoch, mark), revision, live)

    def changes(
        self, after_revision: int, timeout: float = 0.0, epoch: str | None = None, limit: int = DEFAULT_CHANGES_LIMIT
    ) -> bytes:
        check_count(after_revision, "after_revision")
        wait = check_duration(timeout, "timeout", MAX_WAIT)
        rules.check_epoch(epoch)
        asked, seen = history.place(epoch)
        limit = min(check_positive(limit, "limit"), self.limits.log_size)
        start, waited_until = f"{after_revision + 1}-0", time.monotonic() + wait
        at = history.entries_at(after_revision)
        while True:
            now_epoch, revision, _, (oldest, there, entries) = self._at_one_instant(
                lambda pipe: (
                    pipe.xrange(self._feed, "-", "+", count=1),
                    pipe.xrange(self._feed, *at, count=1),
                    pipe.xrange(self._feed, start, "+", count=limit),
                )
            )
            first = int(oldest[0][0].split(b"-")[0]) if oldest else revision + 1
            rules.check_feed(now_epoch, revision, first, after_revision, asked, "Redis lost or replaced its data")
            mark = history.check_place(there[0][0] if there else None, seen, after_revision)
            left = waited_until - time.monotonic()
            if entries or left <= 0:
                break
            # Nothing yet: wait in Redis for the next entry (in slices shorter than the
            # socket's timeout, so a stopped Redis fails the call within it), then read it as
            # above: the wait may end on an entry of a store that was emptied and began again.
            self._redis.xread({self._feed: at[1]}, count=1, block=_slice_ms(left, self.timeout))
        events = [
            encode_event(
                int(entry_id.split(b"-")[0]),
                EventKind(fields[b"kind"].decode()),
                fields[b"id"].decode(),
                fields.get(b"data"),
            )
            for entry_id, fields in entries
        ]
        given = fit_events(events, self.limits.max_store_bytes)
        mark = history.mark_of(entries[len(given) - 1][0]) if given else mark
        return join_changes(history.marked(now_epoch, mark), given)

    # -- writes -----------------------------------------------------------------------------

    def once(self, client: bytes, number: int, method: str, *args: Any) -> Any:
        """:meth:`Store.once`: the write, unless this client's request ``number`` already ran."""
        rules.check_once(client, number, method)
        return getattr(self, method)(*args, once=(client, number))

    def reap(self) -> int:
        """One reaper pass for this host (run it every ``reap_interval`` seconds on every
        host whose agents report here: ``shmstore reaper``); returns how many sessions it
        changed. See the module's docstring for what it does and who does what."""
        at, me, tag = self._time(), self.host, self._tag
        ttl = lease_ms(self.limits)
        self._redis.set(f"{tag}:lease:{me}", b"1", px=ttl)
        elected = self._redis.set(f"{tag}:reaper", me, nx=True, px=ttl)
        leader = bool(elected) or self._redis.get(f"{tag}:reaper") == me.encode()
        if leader:  # the one reaper that also looks after other hosts' sessions: renewed
            self._redis.pexpire(f"{tag}:reaper", ttl)
        records = [orjson.loads(data) for data in self._redis.hvals(self._live)]
        hosts = sorted({record[HOST] for record in records if record[HOST] not in (None, me)})
        gone = gone_since(self._redis, self._tag, hosts, at, self.limits) if leader else {}
        changed = 0
        for record in records:
            host, silent = record[HOST], at - record[ACTIVITY]
            if host == me and rules.agent_gone(record):  # a pid is checked on its own host only
                changed += self._reaped(record, at, ClosedReason.AGENT_GONE)
                continue
            quiet = rules.silent_at_work(record, at, self.limits.stale_after)
            if host in gone and record[STALE] and silent > 0 and at - gone[host] >= self.limits.host_grace:
                changed += self._reaped(record, at, ClosedReason.HOST_GONE)
            elif leader and not record[STALE] and (host in gone or quiet):
                record[STALE] = True
                changed += self._commit(None, record, record[REVISION], EventKind.STALE, outside=False) is not None
        return changed

    def _reaped(self, record: Record, at: float, why: str) -> bool:
        """Close ``record``'s session for ``why``, unless it changed since it was read."""
        expected = record[REVISION]
        rules.transition_record(record, CLOSED, at, self.limits.max_history, why)
        return self._commit(None, record, expected, EventKind.CLOSE, outside=False) is not None

    # -- the writes: :class:`Store`'s, each also taking the client's once() token and number --

    def set(
        self, data: bytes, expected_revision: int | None = None, *, once: tuple[bytes, int] | None = None
    ) -> tuple[int, int | None]:
        record = rules.checked_set(data, expected_revision, self.limits)
        # Stored as given (a session without a host is never judged by its pid); a pid of
        # this host's gets its start time from here, as a report's does.
        if record[PID] is not None and record[PID_START] is None and record[HOST] == self.host:
            record[PID_START] = procs.process_start(record[PID])
        # Its last activity by Redis's clock at the latest: one from a writer whose clock runs
        # ahead would be in every reaper's future, and its host's sessions never judged
        # silent (a set() an hour ahead was never closed as host_gone; a report is stamped
        # with Redis's clock already). No two hosts' clocks are compared.
        record[ACTIVITY] = min(record[ACTIVITY], self._time())
        result = self._commit(once, record, expected_revision, EventKind.SET, outside=True, conflict=True)
        if result is OLD:
            return None  # type: ignore[return-value]  # as Store.once answers an old request
        assert result is not None  # a conflict raised
        return int(result[0]), record[PID_START]

    def remove(self, id: str, *, once: tuple[bytes, int] | None = None, expected: int | None = None) -> bytes | None:
        check_id(id, max_length=self.limits.max_id_length)
        token, number = self._once_keys(once)
        fresh = history.new_epoch(), history.new_mark()
        reply = self._remove_script(
            keys=[*self._keys, token],
            args=[id, "" if expected is None else expected, number, self.limits.log_size, *fresh],
        )
        status = reply[0].decode()
        if status in ("ok", "done"):
            return reply[2] or None
        if status == "damaged":
            raise damaged(self.address, reply[1])
        if status == "noperm":
            raise refused(self.address, reply[1])
        if status == "conflict":
            raise ConflictError(id, expected or 0, int(reply[1]))
        return None

    def transition(self, id: str, status: str, *, once: tuple[bytes, int] | None = None) -> bytes:
        check_id(id, max_length=self.limits.max_id_length)
        to = STATUS_CODE[check_status(status)]
        return self._change(
            once,
            id,
            lambda record, at: rules.transition_record(
                record, to, at, self.limits.max_history, ClosedReason.TRANSITION
            ),
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
            lambda record, at: rules.touch_record(rules.add_usage_record(record, input_tokens, output_tokens), at),
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
        subagent: str | None = None,
        background: str | None = None,
        pid_start: int | None = None,
        terminal: list[str | None] | None = None,
        *,
        once: tuple[bytes, int] | None = None,
    ) -> bytes | None:
        said = rules.checked_report(
            id, status, working_dir, pid, session_id, agent_type, reason, at, subagent, background, pid_start,
            terminal, max_id_length=self.limits.max_id_length,
        )  # fmt: skip
        for _ in self._tries():
            current, now, done = self._read(id, once)
            if done is not None:  # a retry of a write already made, or older than the newest
                return None if done is OLD else done
            record, moved = rules.report_record(current, said, now, self.limits.max_history)
            if record is None:
                return None
            record[HOST] = self.host
            # its start time from this host's /proc: the reporter runs beside the agent
            if pid is not None and moved:
                start = said.pid_start if said.pid_start is not None else procs.process_start(pid)
                record[PID], record[PID_START] = pid, rules.pid_start_for(pid, start, current)
            expected = 0 if current is None else orjson.loads(current)[REVISION]
            result = self._commit(once, record, expected, EventKind.REPORT, outside=current is None, lease=True)
            if result is not None:
                return answer(result)
        raise AssertionError("unreachable")

    def prune(self, older_than: float, *, once: tuple[bytes, int] | None = None) -> int:
        age = check_duration(older_than, "older_than")
        if once is not None:
            done = earlier_answer(once, self._redis.hmget(self._once_keys(once)[0], "number", "data"))
            if done is not None:
                return None if done is OLD else int(done)  # type: ignore[return-value]
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
                return None if done is OLD else done  # type: ignore[return-value]
            if current is None:
                raise NotFoundError(id, f"no live session with id {id!r}")
            record = orjson.loads(current)
            expected = record[REVISION]
            was_closed = record[STATUS] == CLOSED
            record = change(record, at)
            keep_place = kind is EventKind.ADD_USAGE and was_closed
            result = self._commit(once, record, expected, kind, outside=False, keep_place=keep_place)
            if result is not None:
                return answer(result)
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
        returns (revision, record bytes), None when it was not (try again), or OLD when
        ``once`` names an older request than the client's newest (nothing is run). With
        ``conflict``, a changed session raises ConflictError instead (set's
        expected_revision)."""
        record[REVISION] = _WIDEST_REVISION
        rules.encoded(record, self.limits.max_record_bytes, outside)  # the size checks, at the widest
        whole = trim(record)
        head, tail = orjson.dumps(whole[:REVISION]), orjson.dumps(whole[REVISION + 1 :])
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
                history.new_epoch(),
                lease_ms(self.limits) if lease else "",
                history.new_mark(),
            ],
        )
        status = reply[0].decode()
        if status in ("ok", "done"):
            return reply[1], reply[2]
        if status == "old":
            return OLD
        if status == "damaged":
            raise damaged(self.address, reply[1])
        if status == "noperm":
            raise refused(self.address, reply[1])
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
        client's ``once`` request already got: None (not run yet), its record, or OLD (older
        than the client's newest). The commit checks the last again: this only spares a
        retry the change, which may no longer apply (its session removed since)."""
        pipe = self._redis.pipeline(transaction=True)
        pipe.hget(self._live, id)
        pipe.hget(self._closed, id)
        pipe.time()
        if once is not None:
            pipe.hmget(self._once_keys(once)[0], "number", "data")
        live, closed, (seconds, micros), *done = pipe.execute()
        return (live if live is not None else closed), _clock(seconds, micros), earlier_answer(once, *done)

    def _time(self) -> float:
        seconds, micros = self._redis.time()
        return _clock(seconds, micros)

    def _once_keys(self, once: tuple[bytes, int] | None) -> tuple[str, str]:
        if once is None:
            return self._no_client, ""
        token, number = once
        return f"{{{self.address.namespace}}}:done:{token.hex()}", str(number)

    def _at_one_instant(self, read: Callable[[Any], Any]) -> tuple[str, int, str, list[Any]]:
        """The store's epoch (made on first use), revision and the mark of its newest event
        ("" for none), and what ``read`` queues on the same transaction (MULTI/EXEC: one
        instant of the store)."""
        pipe = self._redis.pipeline(transaction=True)
        pipe.hsetnx(self._meta, "epoch", history.new_epoch())
        pipe.hmget(self._meta, "epoch", "revision", "bytes")
        pipe.xrevrange(self._feed, "+", "-", count=1)
        pipe.exists(self._live)
        read(pipe)
        _, (epoch, revision, live_bytes), top, live, *rest = pipe.execute()
        revision = int(revision or 0)
        # A feed past the revision: the meta key was deleted or replaced (by hand, or lost)
        # while the feed kept its entries. Read as it is, its old events came out as new
        # ones, in a loop of snapshots; the namespace is damaged, for readers as for writers.
        if top and int(top[0][0].split(b"-")[0]) > revision:
            raise damaged(self.address, top[0][0])
        # A key evicted (maxmemory-policy allkeys-*) or deleted whole: the feed, which a
        # write never leaves empty, or the live sessions, which meta still counts bytes of.
        # Read as they are, a follower kept every session the store no longer had.
        if revision and not top:
            raise damaged(self.address, b"feed")
        if int(live_bytes or 0) > 0 and not live:
            raise damaged(self.address, b"live")
        return epoch.decode(), revision, history.mark_of(top[0][0]) if top else "", rest


def _slice_ms(left: float, timeout: float) -> int:
    """One XREAD BLOCK of a wait with ``left`` seconds to go, on a connection whose reads
    time out after ``timeout``: at most half of that (Redis's 0 means for ever)."""
    return max(1, round(min(left, timeout / 2) * 1000))


def _clock(seconds: int, micros: int) -> float:
    """Redis's TIME as epoch seconds to the millisecond, as :func:`checks.now` gives them."""
    return round(seconds + micros / 1e6, 3)


if TYPE_CHECKING:
    from ..backend import Backend

    def _is_a_backend(store: RedisStore) -> Backend:
        return store  # mypy checks this backend against the written protocol
