"""The store manager: the sessions, the lock that guards them, and the process serving them.

:class:`Store` lives in the manager process. Its methods are the whole manager-side
surface (:data:`EXPOSED`): they take and return plain values and orjson bytes, and each
runs under one ``RLock``, so every operation is atomic however many worker processes call
at once (``changes`` releases it while it waits). The data flow of a write is::

    worker: Client.report(id, status, ...)           (client.py)
      -> StoreProxy -> wire.Connection                (C pickle envelope over the socket)
      -> manager thread: Store.report()               (this module, under the lock)
      -> transition_record() / touch_record()         (model.py: the change, on the record)
      -> Store._commit(): orjson bytes, revision + 1, one event on the feed
    subscriber: Watch -> Client.changes() -> Store.changes() wakes, sends the events

The stock ``multiprocess`` server supplies the request loop and one thread per client
connection; :class:`_Server` bounds the handshake and the connections, and :func:`serve`
adds the address, the key file, signals, the reaper pass and clean-up.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import gc
import ipaddress
import logging
import os
import pickle
import secrets
import signal
import socket
import stat
import sys
import threading
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterator
from itertools import islice
from pathlib import Path
from typing import Any

import multiprocess
import orjson
from multiprocess import managers

from . import address as addr
from . import procs, wire
from .errors import (
    AddressInUseError,
    AuthenticationError,
    ConflictError,
    NotFoundError,
    ResyncRequiredError,
    ShmstoreError,
    StoreFullError,
    StoreUnavailableError,
    ValidationError,
)
from .model import (
    MAX_ID_LENGTH,
    MAX_WAIT,
    AgentType,
    EventKind,
    Record,
    Session,
    Status,
    add_usage_record,
    check_agent_type,
    check_count,
    check_dir,
    check_duration,
    check_id,
    check_pid,
    check_status,
    encode_event,
    now,
    touch_record,
    transition_record,
)

log = logging.getLogger(__name__)

#: The methods a client may call on the manager's store, and nothing else.
EXPOSED = (
    "get",
    "set",
    "remove",
    "list_all",
    "transition",
    "add_usage",
    "report",
    "recently_closed",
    "prune",
    "reap",
    "revision",
    "snapshot",
    "changes",
    "once",
)
#: The writes a client may wrap in :meth:`Store.once` so that a retry is never applied twice.
WRITES = frozenset(("set", "remove", "transition", "add_usage", "report", "prune"))
#: Clients whose newest write the manager remembers, for retries (the oldest is forgotten).
MAX_REMEMBERED_CLIENTS = 4096

#: History entries kept per session by default; older ones are dropped.
DEFAULT_MAX_HISTORY = 20
#: Events the change feed keeps by default. Each refers to the session bytes it carries,
#: so the log costs little more than the session versions it keeps alive.
DEFAULT_LOG_SIZE = 256
#: Sessions a store holds by default before ``set`` refuses new ones.
DEFAULT_MAX_SESSIONS = 10_000
#: Closed sessions kept (with their resume ids) by default; the oldest go first.
DEFAULT_MAX_CLOSED = 100
#: Seconds a working session may stay silent before the manager marks it stale.
DEFAULT_STALE_AFTER = 600.0
#: Seconds between the manager's passes over the sessions for dead agents and stale ones.
DEFAULT_REAP_INTERVAL = 5.0
#: The most bytes one stored session (its JSON) may take, by default. Measured: a typical
#: session is ~1.2 KB (bench/bench.py's record, with a 10-entry history: 1,175 bytes); the
#: largest the field limits allow with 20 history entries, a 4,096-byte working dir,
#: 256-byte ids and every number at its widest is 6,838 bytes, and 11,445 bytes when every
#: character of the dir and the ids needs a two-byte escape (" or \). 16 KiB holds all of
#: these and RECORD_RESERVE; only a dir made mostly of control characters, each a six-byte
#: \u escape (up to 27,825 bytes), is refused.
DEFAULT_MAX_RECORD_BYTES = 16 * 2**10
#: The least ``max_record_bytes``: the largest session of characters that need no escape,
#: with 20 history entries (6,838 bytes, as above), plus RECORD_RESERVE, fits.
MIN_RECORD_BYTES = 8 * 2**10
#: Of ``max_record_bytes``, what a session written from outside (``set``, or created by
#: ``report``) must leave free for the store's own later changes to it, so that those never
#: fail for size. Measured from the smallest form of a session to the largest the store can
#: make of it without history: a resume id set by a report (514 bytes of JSON for 256
#: escaped characters, where there was null), token counts, pid, pid_start, revision, times
#: and flags at their widest add 644 bytes. The history entries the store adds are not
#: covered: when one would not fit, the oldest entries go, as they do past ``max_history``.
RECORD_RESERVE = 2**10
#: The most bytes the live sessions may take together, by default, which is also the most
#: one reply of ``changes()`` carries. One ``snapshot()`` or ``list_all()`` carries them all,
#: and must stay under the wire's MAX_MESSAGE (64 MiB) or it fails for every subscriber.
#: 32 MiB holds the default 10,000 sessions (max_sessions) at 3.3 KB each, nearly three times
#: the typical size, or 2,048 of the largest (16 KiB) ones.
DEFAULT_MAX_STORE_BYTES = 32 * 2**20
#: The highest ``max_store_bytes``: half of what the wire carries. The rest is framing,
#: measured at 6 bytes per session for ``list_all`` (pickle's per-item header) and 39 bytes
#: in all for ``snapshot``, far under the other half even for sessions of the minimum size.
MAX_STORE_BYTES = wire.MAX_MESSAGE // 2
#: Events one ``changes()`` call returns by default; a caller asks again from the last one.
DEFAULT_CHANGES_LIMIT = 1000
#: Connections the manager serves at once by default; more are closed on arrival.
DEFAULT_MAX_CONNECTIONS = 256
#: Seconds a new connection has to authenticate.
DEFAULT_HANDSHAKE_TIMEOUT = 2.0


class Store:
    """Every session, keyed by id, as orjson bytes, guarded by one re-entrant lock.

    Sessions are kept encoded: that is what clients are sent, and bytes are the most
    compact form CPython holds. Each change decodes one session, applies the model's pure
    function to it, re-encodes it and bumps the store-wide revision.

    Live sessions and closed ones are kept apart: a session that closes leaves the live
    sessions (``list_all``, ``snapshot``) for a bounded list of recently closed ones, where
    its resume id waits for a later resume; reporting on it again brings it back.

    Every reply must fit one wire message (``wire.MAX_MESSAGE``), so sizes are bounded in
    bytes: one session's JSON by ``max_record_bytes``, the live sessions together (one
    ``snapshot``) by ``max_store_bytes``, the recently closed ones by ``max_closed`` times
    ``max_record_bytes`` (checked here to be within ``max_store_bytes``), and one
    ``changes`` reply by its ``limit`` and by ``max_store_bytes``.
    """

    def __init__(
        self,
        *,
        max_sessions: int = DEFAULT_MAX_SESSIONS,
        max_history: int = DEFAULT_MAX_HISTORY,
        max_id_length: int = MAX_ID_LENGTH,
        log_size: int = DEFAULT_LOG_SIZE,
        max_closed: int = DEFAULT_MAX_CLOSED,
        stale_after: float = DEFAULT_STALE_AFTER,
        reap_interval: float = DEFAULT_REAP_INTERVAL,
        max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES,
        max_store_bytes: int = DEFAULT_MAX_STORE_BYTES,
    ) -> None:
        self.max_sessions = _positive(max_sessions, "max_sessions")
        self.max_closed = _positive(max_closed, "max_closed")
        self.stale_after = check_duration(stale_after, "stale_after")
        self.reap_interval = check_duration(reap_interval, "reap_interval")
        if not self.reap_interval:
            raise ValidationError("reap_interval", "must be more than 0")
        self.max_history = _positive(max_history, "max_history")
        self.max_id_length = min(_positive(max_id_length, "max_id_length"), MAX_ID_LENGTH)
        self.max_record_bytes = _positive(max_record_bytes, "max_record_bytes")
        if self.max_record_bytes < MIN_RECORD_BYTES:
            raise ValidationError(
                "max_record_bytes",
                f"must be at least {MIN_RECORD_BYTES}, to hold a session as long as the field limits allow; "
                f"got {max_record_bytes}",
            )
        self.max_store_bytes = _positive(max_store_bytes, "max_store_bytes")
        if self.max_store_bytes > MAX_STORE_BYTES:
            raise ValidationError(
                "max_store_bytes",
                f"must be at most {MAX_STORE_BYTES}, half the largest message the wire carries; got {max_store_bytes}",
            )
        if self.max_closed * self.max_record_bytes > self.max_store_bytes:
            raise ValidationError(
                "max_closed",
                f"{self.max_closed} closed sessions of up to {self.max_record_bytes} bytes (max_record_bytes) could "
                f"take more than max_store_bytes ({self.max_store_bytes}), which recently_closed() must fit in",
            )
        #: Tells this store's revisions from those of an earlier manager at the same address.
        self.epoch = secrets.token_hex(8)
        # Guards every field below; re-entrant because once() holds it across the write it
        # runs, which takes it again.
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._sessions: dict[str, bytes] = {}
        self._live_bytes = 0  # of every value in _sessions together
        self._closed: dict[str, bytes] = {}  # oldest first
        self._revision = 0
        self._log: deque[tuple[int, EventKind, str, bytes | None]] = deque(maxlen=_positive(log_size, "log_size"))
        # Each client's newest write as (request number, result), oldest client first: what
        # once() answers a retry with instead of applying the write again.
        self._done: dict[bytes, tuple[int, Any]] = {}

    # -- reads ------------------------------------------------------------------------------

    def get(self, id: str) -> bytes | None:
        """A live session, or else a recently closed one, or None."""
        self._check_id(id)
        with self._lock:
            return self._sessions.get(id) or self._closed.get(id)

    def list_all(self) -> list[bytes]:
        """Every session, each as its stored JSON (a client reuses what it already decoded)."""
        with self._lock:
            return list(self._sessions.values())

    def recently_closed(self) -> list[bytes]:
        """The closed sessions still kept, newest first."""
        with self._lock:
            return list(reversed(self._closed.values()))

    def revision(self) -> int:
        with self._lock:
            return self._revision

    def snapshot(self) -> bytes:
        """The epoch, the revision and every session, taken at one instant."""
        with self._lock:
            return b'{"epoch":"%s","revision":%d,"sessions":[%s]}' % (
                self.epoch.encode(),
                self._revision,
                b",".join(self._sessions.values()),
            )

    def changes(
        self, since: int, timeout: float = 0.0, epoch: str | None = None, limit: int = DEFAULT_CHANGES_LIMIT
    ) -> bytes:
        """The store's epoch and the events after revision ``since``, as JSON: the oldest
        ``limit`` of them, fewer if they would carry more than ``max_store_bytes`` (at least
        one); the caller asks again from the last one it got.

        Returns at once when there are any; otherwise waits up to ``timeout`` seconds for
        one, without holding the lock (writers and readers go on). Raises
        :class:`ResyncRequiredError` when the log no longer reaches back to ``since``, or
        when ``epoch`` names another manager's store.
        """
        check_count(since, "since")
        wait = check_duration(timeout, "timeout", MAX_WAIT)
        if epoch is not None and not isinstance(epoch, str):
            raise ValidationError("epoch", f"must be a string or None, not {type(epoch).__name__}")
        _positive(limit, "limit")
        with self._changed:
            self._check_feed(since, epoch)
            if since == self._revision and wait:
                self._changed.wait_for(lambda: self._revision != since, wait)
                self._check_feed(since, epoch)  # a burst while we waited may have outrun the log
            first = len(self._log) - (self._revision - since)
            budget = self.max_store_bytes
            events: list[bytes] = []
            for event in islice(self._log, first, first + limit):
                encoded = encode_event(*event)
                budget -= len(encoded) + 1
                if budget < 0 and events:
                    break
                events.append(encoded)
            return b'{"epoch":"%s","events":[%s]}' % (self.epoch.encode(), b",".join(events))

    # -- writes -----------------------------------------------------------------------------

    def set(self, data: bytes, expected_revision: int | None = None) -> tuple[int, int | None]:
        """Create or replace a session from its JSON; returns the revision it is stored at
        and its ``pid_start`` (the caller has the rest: sending it back would only cost a
        decode).

        With ``expected_revision``, replace only if the stored session still has that
        revision (0: only if there is none), else raise :class:`ConflictError`. A history
        longer than ``max_history`` is refused, not cut. The session's ``pid_start`` is
        kept when given; else the manager reads it (see :meth:`report`).
        """
        if not isinstance(data, bytes):
            raise ValidationError("session", f"must be JSON bytes, not {type(data).__name__}")
        session = Session.from_json(data)
        self._check_id(session.id)
        if len(session.history) > self.max_history:
            raise ValidationError(
                "history", f"has {len(session.history)} entries; this store keeps at most {self.max_history}"
            )
        if expected_revision is not None:
            check_count(expected_revision, "expected_revision")
        pid = session.pid
        same_namespace, fresh = _see_pid(pid, session.pid_start)
        with self._lock:
            current = self._sessions.get(session.id) or self._closed.get(session.id)
            if expected_revision is not None:
                current_revision = 0 if current is None else orjson.loads(current)["revision"]
                if current_revision != expected_revision:
                    raise _conflict(session.id, expected_revision, current_revision)
            record = session.to_dict()
            if pid is not None:
                if not same_namespace:
                    record["pid_start"] = None
                elif session.pid_start is None:
                    record["pid_start"] = _pid_start(pid, fresh, current)
            self._commit(record, EventKind.SET, outside=True)
            return self._revision, record["pid_start"]

    def remove(self, id: str) -> bytes | None:
        self._check_id(id)
        with self._lock:
            data = self._sessions.pop(id, None)
            if data is not None:
                self._live_bytes -= len(data)
            else:
                data = self._closed.pop(id, None)
            if data is not None:
                self._publish(EventKind.REMOVE, id, None)
            return data

    def transition(self, id: str, status: str) -> bytes:
        """Move a session to ``status``: one more history entry, ``since`` reset."""
        self._check_id(id)
        to = check_status(status)
        with self._lock:
            record = self._load(id)
            return self._commit(transition_record(record, to, now(), self.max_history), EventKind.TRANSITION)

    def add_usage(self, id: str, input_tokens: int, output_tokens: int) -> bytes:
        """Add token counts to a session, live or recently closed (as ``get`` finds it): a
        closed one stays closed, where it was among the recently closed."""
        self._check_id(id)
        check_count(input_tokens, "input_tokens")
        check_count(output_tokens, "output_tokens")
        with self._lock:
            record = touch_record(add_usage_record(self._load(id), input_tokens, output_tokens), now())
            return self._commit(record, EventKind.ADD_USAGE)

    def report(
        self,
        id: str,
        status: str,
        working_dir: str,
        pid: int | None = None,
        session_id: str | None = None,
        agent_type: str = AgentType.CLAUDE_CODE,
    ) -> bytes:
        """What an agent's hook says: create the session if it is new, else move it to
        ``status`` (a history entry only if the status changes), in one step.

        Every report counts as activity (``last_activity``, and no longer stale). A report
        on a recently closed session brings it back: the agent resumed it. ``pid`` and
        ``session_id``, when given, replace what the session had.

        The agent is identified by ``pid`` and the start time /proc gives for it now (the
        reporting agent is running), kept as ``pid_start``; if the pid has no process any
        more, the start time the session already had for that pid is kept. A caller in
        another pid namespace (see :mod:`shmstore.procs`) names a pid that means nothing
        here: it is recorded as given, with no ``pid_start``, and never used to close the
        session.
        """
        self._check_id(id)
        to = check_status(status)
        check_dir(working_dir)
        kind = check_agent_type(agent_type)
        if pid is not None:
            check_pid(pid)
        if session_id is not None:
            check_id(session_id, "session_id")
        same_namespace, fresh = _see_pid(pid, None)
        with self._lock:
            at = now()
            current = self._sessions.get(id) or self._closed.get(id)
            if current is not None:
                record = orjson.loads(current)
                if record["status"] != to:
                    transition_record(record, to, at, self.max_history)
                touch_record(record, at)
            else:
                new = Session(id=id, working_dir=working_dir, agent_type=kind, status=to, since=at)
                record = new.to_dict()
            if pid is not None:
                record["pid"] = pid
                record["pid_start"] = _pid_start(pid, fresh, current) if same_namespace else None
            if session_id is not None:
                record["session_id"] = session_id
            return self._commit(record, EventKind.REPORT, outside=current is None)

    def once(self, client: bytes, number: int, method: str, *args: Any) -> Any:
        """Run the write ``method(*args)`` unless this client's request ``number`` already
        ran, and return its result either way.

        A client whose connection failed during a write cannot know whether it was applied;
        it retries with the same ``client`` token and ``number`` and gets the first
        attempt's result instead of a second application, whichever of the two arrives
        first. Numbers rise per client, and a client only ever retries its newest request,
        so one entry per client is enough; the newest :data:`MAX_REMEMBERED_CLIENTS`
        clients are remembered. A request older than the client's newest is not run.
        """
        if not isinstance(client, bytes) or not 8 <= len(client) <= 64:
            raise ValidationError("client", f"must be 8 to 64 bytes, not {client!r:.80}")
        check_count(number, "number")
        if method not in WRITES:
            raise ValidationError("method", f"must be one of {', '.join(sorted(WRITES))}; got {method!r:.80}")
        with self._lock:
            done = self._done.get(client)
            if done is not None and number <= done[0]:
                return done[1] if number == done[0] else None
            result = getattr(self, method)(*args)
            self._done.pop(client, None)
            self._done[client] = (number, result)
            if len(self._done) > MAX_REMEMBERED_CLIENTS:
                del self._done[next(iter(self._done))]
            return result

    def reap(self) -> int:
        """One pass over the live sessions: close those whose agent process is gone, and
        mark stale those working with no activity for ``stale_after`` seconds (a session
        that waits for the user is never marked). Returns how many it changed; each change
        is an event. The manager runs this every ``reap_interval`` seconds.

        An agent is gone when no live process has its pid *and* its start time
        (:func:`procs.agent_alive`); no clock is compared, so a clock that steps never
        closes a live agent. A session with no ``pid_start`` (its pid came from another pid
        namespace, or named no process when reported) is never closed for its pid.

        The sessions are examined outside the lock (reading /proc for 10,000 of them takes
        ~0.2 s, which must not stall every client); a session that changed meanwhile is
        left for the next pass, since its news is newer than what was examined.
        """
        with self._lock:
            sessions = list(self._sessions.items())
        at = now()
        dead, silent = [], []
        for id, data in sessions:
            record = orjson.loads(data)
            pid, start = record["pid"], record["pid_start"]
            if pid is not None and start is not None and not procs.agent_alive(pid, start):
                dead.append((id, data))
            elif (
                record["status"] == Status.WORKING
                and not record["stale"]
                and at - record["last_activity"] >= self.stale_after
            ):
                silent.append((id, data))
        changed = 0
        with self._lock:
            for id, data in dead:
                if self._sessions.get(id) is data:  # unchanged since examined
                    record = transition_record(orjson.loads(data), Status.CLOSED, now(), self.max_history)
                    self._commit(record, EventKind.CLOSE)
                    changed += 1
            for id, data in silent:
                if self._sessions.get(id) is data:
                    record = orjson.loads(data)
                    record["stale"] = True
                    self._commit(record, EventKind.STALE)
                    changed += 1
        return changed

    def prune(self, older_than: float) -> int:
        """Forget recently closed sessions that closed ``older_than`` seconds ago or more;
        returns how many went. Each is a ``remove`` event."""
        age = check_duration(older_than, "older_than")
        with self._lock:
            cutoff = now() - age
            old = [id for id, data in self._closed.items() if orjson.loads(data)["since"] <= cutoff]
            for id in old:
                del self._closed[id]
                self._publish(EventKind.REMOVE, id, None)
            return len(old)

    # -- internals ---------------------------------------------------------------------------

    def _check_id(self, id: object) -> str:
        return check_id(id, max_length=self.max_id_length)

    def _load(self, id: str) -> Record:
        """The session ``id``, live or recently closed, as a record."""
        data = self._sessions.get(id) or self._closed.get(id)
        if data is None:
            raise NotFoundError(f"no live session with id {id!r}")
        record: Record = orjson.loads(data)
        return record

    def _commit(self, record: Record, kind: EventKind, outside: bool = False) -> bytes:
        """Store ``record`` as the next revision: among the live sessions, or, once closed,
        among the recently closed (its event is then ``close``, unless it only had tokens
        added while closed). Changes nothing and raises when the record cannot be kept:
        StoreFullError when it would be one live session too many or take the live sessions
        past ``max_store_bytes``; ValidationError when a record written from outside
        (``outside``) leaves less than RECORD_RESERVE of ``max_record_bytes`` free. A record
        the store changed that outgrows ``max_record_bytes`` loses its oldest history entries.
        """
        id = record["id"]
        closing = record["status"] == Status.CLOSED
        live = self._sessions.get(id)
        if not closing and live is None and len(self._sessions) >= self.max_sessions:
            raise StoreFullError(
                f"the store holds {len(self._sessions)} live sessions, its limit; {id!r} was not added"
            )
        record["revision"] = self._revision + 1
        # orjson builds its result in a 4 KiB buffer and shrinks it in place, which leaves
        # a hole that later buffers do not fit: kept for long, a 1 KiB session pinned about
        # 3.7 KiB of heap (measured). An exact-size copy costs 0.15 us and packs tightly.
        data = memoryview(orjson.dumps(record)).tobytes()
        if outside and len(data) > self.max_record_bytes - RECORD_RESERVE:
            raise ValidationError(
                "session",
                f"is {len(data)} bytes of JSON; a session may be at most {self.max_record_bytes - RECORD_RESERVE} "
                f"(max_record_bytes {self.max_record_bytes}, less {RECORD_RESERVE} kept for the store's own changes)",
            )
        if len(data) > self.max_record_bytes:
            data = self._shed_history(record, data)
        if closing:
            if live is not None:
                del self._sessions[id]
                self._live_bytes -= len(live)
            if kind is EventKind.ADD_USAGE and id in self._closed:
                self._closed[id] = data  # not a status change: it keeps its place, and its event
            else:
                self._closed.pop(id, None)  # re-insert as the newest
                self._closed[id] = data
                while len(self._closed) > self.max_closed:
                    del self._closed[next(iter(self._closed))]
                kind = EventKind.CLOSE
        else:
            total = self._live_bytes + len(data) - (0 if live is None else len(live))
            if total > self.max_store_bytes:
                raise StoreFullError(
                    f"the live sessions would take {total} bytes, past max_store_bytes ({self.max_store_bytes}); "
                    f"{id!r} was not written"
                )
            self._closed.pop(id, None)
            self._sessions[id] = data
            self._live_bytes = total
        self._publish(kind, id, data)
        return data

    def _shed_history(self, record: Record, data: bytes) -> bytes:
        """``record`` without as many of its oldest history entries as it takes to fit in
        ``max_record_bytes``. Only records the store itself grew come here, and RECORD_RESERVE
        leaves them room for everything but history, so this always succeeds."""
        history = record["history"]
        excess, drop = len(data) - self.max_record_bytes, 0
        while excess > 0 and drop < len(history):
            excess -= len(orjson.dumps(history[drop])) + 1  # the entry and its comma
            drop += 1
        del history[:drop]
        data = memoryview(orjson.dumps(record)).tobytes()
        if len(data) > self.max_record_bytes:  # not reachable while RECORD_RESERVE holds
            raise ValidationError("session", f"is {len(data)} bytes of JSON; the limit is {self.max_record_bytes}")
        return data

    def _publish(self, kind: EventKind, id: str, data: bytes | None) -> None:
        """Count a change, log its event, and wake every waiting ``changes`` call."""
        self._revision += 1
        self._log.append((self._revision, kind, id, data))
        self._changed.notify_all()

    def _check_feed(self, since: int, epoch: str | None) -> None:
        if epoch is not None and epoch != self.epoch:
            raise ResyncRequiredError(
                f"the store is a new one (epoch {self.epoch}, not {epoch}): the manager restarted"
            )
        if since > self._revision:
            raise ResyncRequiredError(f"revision {since} is ahead of the store's {self._revision}")
        oldest = self._log[0][0] if self._log else self._revision + 1
        if since + 1 < oldest and since < self._revision:
            raise ResyncRequiredError(
                f"the events after revision {since} have left the log, which holds {oldest}..{self._revision}"
            )


def _see_pid(pid: int | None, given_start: int | None) -> tuple[bool, int | None]:
    """Whether the caller is in our pid namespace, so that its ``pid`` can be checked here;
    and, if so and it gave no start time, the pid's start time now. Called before taking
    the lock: reading /proc costs a few microseconds."""
    same = getattr(procs.caller, "same_pid_namespace", True) is True  # unset: called in-process
    fresh = procs.process_start(pid) if pid is not None and same and given_start is None else None
    return same, fresh


def _pid_start(pid: int, fresh: int | None, current: bytes | None) -> int | None:
    """The start time that identifies agent ``pid``, for a caller in our pid namespace:
    /proc's answer now (``fresh``), or, when the pid has no process any more, what the
    stored session (``current``) already had for the same pid: the agent it identified is
    gone, which the reaper will find."""
    if fresh is not None or current is None:
        return fresh
    stored = orjson.loads(current)
    return stored["pid_start"] if stored["pid"] == pid else None


def _positive(value: object, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValidationError(field, f"must be an int >= 1; got {value!r}")
    return value


def _conflict(id: str, expected: int, current: int) -> ConflictError:
    return ConflictError(f"session {id!r} is at revision {current}, not the expected {expected}")


class _Server(managers.Server):
    """The stock manager server, made safe to leave running next to crashing processes and
    hostile neighbours.

    The stock one starts a thread per accepted connection and waits for the peer's half of
    the authentication handshake for ever, answers a wrong key with a pickled traceback,
    and its accept loop retries at once on any error, so a peer that connects and says
    nothing, or running out of file descriptors, could stop service. Here the whole
    handshake (both proofs of the key and the first request) must be done within
    ``handshake_timeout``; a peer that fails it is closed without a word (and logged); at
    most ``max_connections`` are open at once (more are told the manager is full); and a
    failing ``accept`` backs off instead of spinning.
    """

    def __init__(self, *args: Any, max_connections: int, handshake_timeout: float) -> None:
        super().__init__(*args)
        self.handshake_timeout = handshake_timeout
        self.max_connections = max_connections
        self._slots = threading.BoundedSemaphore(max_connections)

    def accepter(self) -> None:
        while True:
            try:
                conn = self.listener.accept()
            except OSError:
                if self.listener.closed:
                    return  # serve() is on its way out
                time.sleep(0.05)  # e.g. EMFILE: give connections time to close
                continue
            if not self._slots.acquire(blocking=False):
                log.warning("refused a connection: all %d slots are taken", self.max_connections)
                wire.refuse_as_full(conn)
                continue
            conn.deadline = time.monotonic() + self.handshake_timeout
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: wire.Connection) -> None:
        try:
            try:
                wire.handshake_as_server(conn, self.authkey)
                request = conn.recv()
                _, name, args, kwds = request
                if name not in ("create", "accept_connection"):
                    raise AuthenticationError(f"first request {name!r} is not one a client makes")
                # This thread serves this one client: what the store needs to know of it.
                procs.caller.same_pid_namespace = procs.peer_same_pid_namespace(conn.fileno())
            except (AuthenticationError, EOFError, OSError, ValueError, TypeError, pickle.UnpicklingError) as exc:
                log.warning("closed a connection that did not complete the handshake: %s", _why(exc))
                return
            if name == "accept_connection":
                self.accept_connection(conn, *args)  # replies, then serves this client's calls
            else:
                conn.send(("#RETURN", self.create(conn, *args, **kwds)))
        except SystemExit:
            pass  # serve_client() ends this way when its client hangs up
        except Exception as exc:  # an authenticated client's bad request, or its connection failing
            log.info("a connection ended: %s", _why(exc))
        finally:
            conn.close()
            self._slots.release()

    def accept_connection(self, conn: wire.Connection, name: str) -> None:
        conn.deadline = None  # authenticated: a client may stay idle as long as it likes
        super().accept_connection(conn, name)


def _why(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


def _server(
    store: Store, address: wire.Address, authkey: bytes, max_connections: int, handshake_timeout: float
) -> _Server:
    """A manager server whose only shared object is ``store``, with only :data:`EXPOSED` callable."""

    class StoreManager(managers.BaseManager):
        pass

    StoreManager.register("store", callable=lambda: store, exposed=EXPOSED)
    return _Server(
        StoreManager._registry,
        address,
        authkey,
        wire.SERIALIZER,
        max_connections=_positive(max_connections, "max_connections"),
        handshake_timeout=check_duration(handshake_timeout, "handshake_timeout"),
    )


def _check_exposure(address: wire.Address, allow_remote: bool) -> None:
    """Refuse a TCP address off the loopback unless the caller opted in, and then warn."""
    if isinstance(address, str):
        return
    host = address[0]
    try:
        loopback = ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
    except (OSError, ValueError):
        loopback = False
    if loopback:
        return
    if not allow_remote:
        raise ValidationError(
            "address",
            f"{host} is not a loopback address; anyone who holds the authkey can run code in the "
            "manager (its protocol is pickle), so serving beyond this host needs allow_remote=True "
            "(--allow-remote)",
        )
    warnings.warn(
        f"shmstore is serving on {host}:{address[1]}, beyond this host: anyone who holds the authkey "
        "can run code in the manager",
        stacklevel=3,
    )


def _claim(address: wire.Address) -> None:
    """Make sure nothing live holds ``address`` and its directory is one clients will trust;
    remove a socket a dead manager left, and nothing else."""
    if not isinstance(address, str):
        return  # TCP: bind() itself tells us the port is taken
    path = Path(address)
    directory = addr.socket_dir(address)
    if addr.is_runtime_dir(directory):
        addr.ensure_private_dir(directory)
    else:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        addr.check_socket_dir(directory)
    try:
        info = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        raise AddressInUseError(
            f"{address} exists and is {addr.describe(info.st_mode)}, not a socket; shmstore removes only a socket "
            "that a dead manager left. Choose another address, or remove it if you do not need it"
        )
    probe = socket.socket(socket.AF_UNIX)
    probe.settimeout(1.0)
    try:
        probe.connect(address)
    except (ConnectionRefusedError, FileNotFoundError):
        path.unlink(missing_ok=True)  # stale: nobody listens there any more
        return
    except OSError as exc:
        raise AddressInUseError(f"{address} exists and cannot be probed: {exc}") from None
    finally:
        probe.close()
    raise AddressInUseError(f"a manager is already serving at {address}")


def serve(
    address: wire.Address | os.PathLike[str] | None = None,
    authkey: bytes | str | None = None,
    *,
    store: Store | None = None,
    allow_remote: bool = False,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
    on_ready: Callable[[wire.Address], None] | None = None,
    stop_signals: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGINT),
    stop_event: threading.Event | None = None,
) -> None:
    """Serve ``store`` (a new, empty one by default) at ``address`` until ``stop_event``
    is set, one of ``stop_signals`` arrives, or a ``shutdown`` call.

    Blocks the calling thread, which may be any thread. Only in the main thread of the
    main interpreter (where Python allows it) does it handle ``stop_signals``, and on
    return it puts back exactly the handlers it replaced; a signal whose handler was not
    set from Python is left alone. From another thread, pass a ``threading.Event`` as
    ``stop_event`` and set it to stop the manager: ``serve`` returns once it has cleaned up.

    On the way out it closes the listener and removes the socket and the key file it wrote.
    ``on_ready`` is called with the bound address once clients can connect. A TCP address
    off the loopback needs ``allow_remote``. At most ``max_connections`` clients are
    connected at once, and each must authenticate within ``handshake_timeout`` seconds.
    """
    address = addr.resolve(address)
    key = addr.new_key() if authkey is None else addr.as_key(authkey)
    store = Store() if store is None else store
    stop = threading.Event() if stop_event is None else stop_event
    _check_exposure(address, allow_remote)
    _one_malloc_arena()
    with _stop_signals(stop_signals, stop):
        try:
            _claim(address)
            server = _server(store, address, key, max_connections, handshake_timeout)
        except ShmstoreError:
            raise  # ours say what is wrong (and some are OSErrors)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise AddressInUseError(f"{addr.format_address(address)} is already in use") from None
            raise StoreUnavailableError(f"cannot listen on {addr.format_address(address)}: {exc}") from None
        key_file = addr.key_path(address)
        written = None
        try:
            if isinstance(address, str):
                os.chmod(address, 0o600)
            else:
                addr.ensure_private_dir(key_file.parent)
            written = addr.create_key_file(key_file, key)  # we hold the address: a key file there is stale
            server.stop_event = stop
            threading.Thread(target=server.accepter, name="shmstore-accept", daemon=True).start()
            if on_ready is not None:
                on_ready(server.address)
            while not stop.wait(store.reap_interval):
                try:
                    store.reap()
                except Exception as exc:  # a failed pass must not take the manager down
                    print(f"shmstore: reaping failed: {exc!r}", file=sys.stderr)
        finally:
            server.listener.close()  # also unlinks the unix socket
            if written is not None:
                _remove_key(key_file, key, written)


@contextlib.contextmanager
def _stop_signals(signals: tuple[signal.Signals, ...], stop: threading.Event) -> Iterator[None]:
    """While the block runs, have each of ``signals`` set ``stop``; then put back exactly
    the handlers that were replaced.

    Python lets only the main thread of the main interpreter set handlers; elsewhere none
    are set, and the caller stops the manager through ``stop``. A handler that was not set
    from Python (``getsignal`` gives None) could not be put back, so it is left in place.
    """
    signums = [signal.Signals(s) for s in signals]  # a bad number fails here, before any change
    replaced: dict[signal.Signals, Any] = {}
    try:
        if threading.current_thread() is threading.main_thread():
            for signum in signums:
                previous = signal.getsignal(signum)
                if previous is None:
                    continue
                try:
                    signal.signal(signum, lambda signum, frame: stop.set())
                except ValueError:  # the main thread of a subinterpreter: signals are not ours
                    break
                replaced[signum] = previous
        yield
    finally:
        for signum, previous in replaced.items():
            signal.signal(signum, previous)


def _one_malloc_arena() -> None:
    """Ask glibc for a single malloc arena in this process (a no-op elsewhere).

    glibc gives each thread that allocates its own arena; the manager runs a thread per
    client, so its heap grew with every client that ever called at once (a soak with eight
    workers: 5.4 -> 11 MiB USS). The GIL serialises the manager's threads anyway, so one
    arena costs no contention, and the same soak stays at about 8 MiB.
    """
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).mallopt(_M_ARENA_MAX, 1)  # the process's own symbols: libc's, on Linux


_M_ARENA_MAX = -8  # from glibc's malloc.h


def _remove_key(path: Path, key: bytes, written: tuple[int, int] | None = None) -> None:
    """Remove our key file: only if it still holds ``key`` and (given ``written``, its
    ``(st_dev, st_ino)``) is the very file we wrote, never one another manager has since
    put there, and never through a symlink."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return
    try:
        info = os.fstat(fd)
        ours = (
            stat.S_ISREG(info.st_mode)
            and (written is None or (info.st_dev, info.st_ino) == written)
            and os.read(fd, len(key) + 1) == key
        )
    except OSError:
        ours = False
    finally:
        os.close(fd)
    if ours:
        with contextlib.suppress(OSError):
            path.unlink()


class ServerProcess:
    """A manager running in a child process, as :func:`start_server` returns it."""

    def __init__(self, process: Any, address: wire.Address, authkey: bytes) -> None:
        self.process = process
        self.address = address
        self.authkey = authkey

    @property
    def pid(self) -> int:
        return int(self.process.pid)

    def is_alive(self) -> bool:
        return bool(self.process.is_alive())

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM the manager and wait for it; SIGKILL it if it has not gone by ``timeout``."""
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(timeout)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(timeout)

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<ServerProcess pid={self.process.pid} address={addr.format_address(self.address)!r}>"


def start_server(
    address: wire.Address | os.PathLike[str] | None = None,
    authkey: bytes | str | None = None,
    *,
    store: Store | None = None,
    allow_remote: bool = False,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
    timeout: float = 10.0,
) -> ServerProcess:
    """Fork a manager process serving at ``address`` and return once it accepts clients.

    For a daemon that embeds the store. The child is forked, so it shares the parent's
    loaded code instead of importing its own; it ignores SIGINT (the parent decides when
    it ends) and stops on SIGTERM or :meth:`ServerProcess.stop`. Pass ``store`` to set
    its limits, e.g. ``Store(max_history=20)``; the other options are :func:`serve`'s.
    """
    address = addr.resolve(address)
    key = addr.new_key() if authkey is None else addr.as_key(authkey)
    options = {
        "store": store or Store(),
        "allow_remote": allow_remote,
        "max_connections": max_connections,
        "handshake_timeout": handshake_timeout,
    }
    ctx = multiprocess.get_context("fork")
    reader, writer = ctx.Pipe(duplex=False)
    process = ctx.Process(
        target=_serve_child, args=(address, key, options, writer), name="shmstore-manager", daemon=True
    )
    process.start()
    writer.close()
    try:
        if not reader.poll(timeout):
            process.kill()
            raise StoreUnavailableError(f"manager did not start at {addr.format_address(address)} within {timeout} s")
        kind, value = reader.recv()
    except EOFError:
        raise StoreUnavailableError(f"manager process died while starting at {addr.format_address(address)}") from None
    finally:
        reader.close()
    if kind == "error":
        process.join(timeout)
        raise value
    return ServerProcess(process, value, key)


def _serve_child(address: wire.Address, key: bytes, options: dict[str, Any], writer: Any) -> None:
    # Objects inherited from the parent are never collected here; freezing them keeps the
    # garbage collector from touching (and so copying) every page the fork shares.
    gc.freeze()
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def ready(bound: wire.Address) -> None:
        writer.send(("ready", bound))
        writer.close()

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")  # the remote-exposure warning reaches stderr
            serve(address, key, on_ready=ready, stop_signals=(signal.SIGTERM,), **options)
    except ShmstoreError as exc:
        if writer.closed:
            raise
        writer.send(("error", exc))  # the parent raises it from start_server()
