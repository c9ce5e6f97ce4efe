"""The store: every session, the lock that guards them, the operations on them, and the
change feed.

:class:`Store` is a plain object: the manager process serves one (server.py), and tests
use one in-process. Its methods are the whole manager-side surface (:data:`EXPOSED`): they
take and return plain values and orjson bytes, and each runs under one ``RLock``, so every
operation is atomic however many worker processes call at once (``changes`` releases it
while it waits). The data flow of a write is::

    worker: Client.report(id, status, ...)           (client.py)
      -> StoreProxy -> wire.Connection                (C pickle envelope over the socket)
      -> manager thread: Store.once -> Store.report() (this module, under the lock)
      -> transition_record() / touch_record()         (this module: the change, on the record)
      -> Store._commit(): orjson bytes, revision + 1, one event on the feed, and the
         session into the shared segment, if one is shared (segment.py)
    subscriber: Watch -> Client.changes() -> Store.changes() wakes, sends the events
    reader: Client.get() -> the segment, mapped in the reader's process (shared.py)
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
from collections import deque
from collections.abc import Callable, Sequence
from itertools import islice
from typing import Any, NamedTuple, overload

import orjson

from . import procs
from .checks import (
    MAX_WAIT,
    check_closed_reason,
    check_count,
    check_dir,
    check_duration,
    check_id,
    check_pid,
    check_positive,
    check_time,
    now,
)
from .config import RECORD_RESERVE, Limits, changed
from .errors import (
    ConflictError,
    NotFoundError,
    ResyncRequiredError,
    StoreFullError,
    StoreUnavailableError,
    ValidationError,
)
from .feed import EventKind, encode_changes, encode_snapshot
from .model import (
    ACTIVITY,
    CLOSED,
    ENTRY,
    HISTORY,
    ID,
    LAST_EVENT,
    PID,
    PID_START,
    REASON,
    RESUME,
    REVISION,
    SAME_AS_ID,
    SINCE,
    STALE,
    STATUS,
    STATUS_CODE,
    USAGE,
    WORKING,
    AgentType,
    ClosedReason,
    Record,
    Session,
    Status,
    append_entry,
    check_agent_type,
    check_status,
    flat_history,
    history_entries,
    load_record,
    new_record,
    stored_record,
    to_record,
)
from .segment import Segment, SegmentFullError

log = logging.getLogger(__name__)

#: The methods a client may call on the manager's store, and nothing else (the Client has
#: one method of the same name for each but ``once``, which wraps the writes).
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
    "info",
    "once",
)
#: The writes a client may wrap in :meth:`Store.once` so that a retry is never applied twice.
WRITES = frozenset(("set", "remove", "transition", "add_usage", "report", "prune"))
#: Clients whose newest write the manager remembers, for retries (the oldest is forgotten).
MAX_REMEMBERED_CLIENTS = 4096

#: Events one ``changes()`` call returns by default; a caller asks again from the last one.
DEFAULT_CHANGES_LIMIT = 1000

#: What ``list_all(epoch, revision)`` returns when the caller's listing is out of date: the
#: store's epoch and revision, the JSON index ``[[id, ...], [revision, ...]]``, and every
#: live session's JSON in the index's order. The index is smaller than the sessions (each
#: id is in its session too), so a listing of at most ``max_store_bytes`` of sessions stays
#: under the wire's MAX_MESSAGE.
Listing = tuple[str, int, bytes, list[bytes]]


class _ListingCache(NamedTuple):
    """The manager's last :data:`Listing`, with what rebuilding the next one reuses."""

    revision: int  # the store's, when the reply was built
    reply: Listing
    ids: list[str]  # of the reply's sessions, in its order
    revisions: list[int]


class Store:
    """Every session, keyed by id, as the orjson bytes of its record, guarded by one
    re-entrant lock.

    Sessions are kept encoded, in the model's stored form (a positional array, see
    :func:`shmstore.model.to_record`): that is what clients are sent, and bytes are the
    most compact form CPython holds. Each change decodes one record, applies one of the
    pure functions at the end of this module to it, re-encodes it and bumps the store-wide
    revision.

    Live sessions and closed ones are kept apart: a session that closes leaves the live
    sessions (``list_all``, ``snapshot``) for a bounded list of recently closed ones, where
    its resume id waits for a later resume; reporting on it again brings it back.

    Every reply must fit one wire message (``wire.MAX_MESSAGE``), so sizes are bounded in
    bytes: one session's JSON by ``max_record_bytes``, the live sessions together (one
    ``snapshot``) by ``max_store_bytes``, the recently closed ones by ``max_closed`` times
    ``max_record_bytes`` (checked here to be within ``max_store_bytes``), and one
    ``changes`` reply by its ``limit`` and by ``max_store_bytes``.
    """

    def __init__(self, limits: Limits | None = None, /, **changes: Any) -> None:
        """A store within ``limits`` (the defaults when None); keywords change single limits,
        e.g. ``Store(max_history=50)``."""
        self.limits = changed(Limits, limits, changes, "limits")
        #: Tells this store's revisions from those of an earlier manager at the same address.
        self.epoch = secrets.token_hex(8)
        #: Set by the manager that serves this store, once, before any client connects (so
        #: no lock guards it): what ``info`` adds of the manager's own (its connections,
        #: address, memory, state file). Called without the lock held: it takes the
        #: dispatcher's and the state keeper's locks, never this one.
        self.manager_info: Callable[[], dict[str, Any]] | None = None
        # Guards every field below, the shared segment's contents included (a reply leaves
        # only once its change is in the segment: a client reads its own writes from it);
        # re-entrant because once() holds it across the write it runs, which takes it again.
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._sessions: dict[str, bytes] = {}
        self._live_bytes = 0  # of every value in _sessions together
        self._closed: dict[str, bytes] = {}  # oldest first
        self._revision = 0
        self._log: deque[tuple[int, EventKind, str, bytes | None]] = deque(maxlen=self.limits.log_size)
        # Each client's newest write as (request number, result), oldest client first: what
        # once() answers a retry with instead of applying the write again.
        self._done: dict[bytes, tuple[int, Any]] = {}
        # The last list_all reply, for the store revision it was built at (the lock guards it
        # with the sessions, so it always matches that revision): rebuilt on the first
        # list_all after a change, from the previous one's ids and revisions wherever the
        # stored bytes are the same object (only a changed session is decoded again). It
        # holds references to the stored bytes, no copy of them: 8 bytes a session, plus
        # its id and revision in the index. Measured in-process for 100 sessions on the
        # development VM: "unchanged" ~1 us; the cached reply ~22 us to pickle (the bare
        # list 18); rebuilt after one change ~45 us, from nothing ~0.5 ms (a decode each).
        self._listing: _ListingCache | None = None
        # The live sessions again, for readers in other processes (share()); None: not shared.
        self._segment: Segment | None = None
        # Set once by stop_writes(), as the manager stops: no write is applied after it.
        self._stopping: str | bool = False

    # The lock and its condition are not data: a store sent to another process (start_server
    # with "forkserver" or "spawn") gets fresh ones. Pickled whole, dill's copy of an RLock
    # comes out held by the unpickling thread, and every call then waits for it for ever.
    def __getstate__(self) -> dict[str, Any]:
        with self._lock:
            skip = ("_lock", "_changed", "_segment")  # a segment belongs to the process that made it
            return {name: value for name, value in vars(self).items() if name not in skip}

    def __setstate__(self, state: dict[str, Any]) -> None:
        vars(self).update(state)
        self._segment = None
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)

    # -- reads ------------------------------------------------------------------------------

    def get(self, id: str) -> bytes | None:
        """A live session, or else a recently closed one, or None."""
        self._check_id(id)
        with self._lock:
            return self._sessions.get(id) or self._closed.get(id)

    @overload
    def list_all(self) -> list[bytes]: ...
    @overload
    def list_all(self, epoch: str | None, revision: int) -> Listing | None: ...

    def list_all(self, epoch: str | None = None, revision: int | None = None) -> list[bytes] | Listing | None:
        """Every live session, each as its stored JSON.

        Called with the ``epoch`` and ``revision`` of the listing the caller already has
        (what :meth:`Client.list_all` sends), it returns None when the store is still at
        that revision of that epoch (the caller's listing is current), else a
        :data:`Listing`: ``(epoch, revision, index, sessions)``, where ``index`` is the JSON
        ``[[id, ...], [revision, ...]]`` of ``sessions``, in the same order, so that a
        client reuses the sessions it decoded before by (id, revision) without reading or
        hashing their bytes. A session's (id, revision) names its content within an epoch:
        every change gives the session it changes a new store revision.
        """
        if revision is None:
            with self._lock:
                return list(self._sessions.values())
        check_count(revision, "revision")
        check_epoch(epoch)
        with self._lock:
            if epoch == self.epoch and revision == self._revision:
                return None
            return self._listing_now()

    def recently_closed(self) -> list[bytes]:
        """The closed sessions still kept, newest first."""
        with self._lock:
            return list(reversed(self._closed.values()))

    def revision(self) -> int:
        with self._lock:
            return self._revision

    def info(self) -> dict[str, Any]:
        """How the manager is: its pid, epoch, revision, how many sessions are live
        and closed, and what the serving manager adds (:attr:`manager_info`). Plain values."""
        with self._lock:
            info: dict[str, Any] = {
                "pid": os.getpid(),
                "epoch": self.epoch,
                "revision": self._revision,
                "live": len(self._sessions),
                "closed": len(self._closed),
            }
        if self.manager_info is not None:
            info.update(self.manager_info())
        return info

    def snapshot(self) -> bytes:
        """The epoch, the revision and every session, taken at one instant."""
        with self._lock:
            return encode_snapshot(self.epoch, self._revision, self._sessions.values())

    def changes(
        self, after_revision: int, timeout: float = 0.0, epoch: str | None = None, limit: int = DEFAULT_CHANGES_LIMIT
    ) -> bytes:
        """The store's epoch and the events after revision ``after_revision``, as JSON: the oldest
        ``limit`` of them, fewer if they would carry more than ``max_store_bytes`` (at least
        one); the caller asks again from the last one it got.

        Returns at once when there are any; otherwise waits up to ``timeout`` seconds for
        one, without holding the lock (writers and readers go on). Raises
        :class:`ResyncRequiredError` when the log no longer reaches back to ``after_revision``, or
        when ``epoch`` names another manager's store.
        """
        check_count(after_revision, "after_revision")
        wait = check_duration(timeout, "timeout", MAX_WAIT)
        check_epoch(epoch)
        limit = min(check_positive(limit, "limit"), self.limits.log_size)  # islice takes no more than sys.maxsize
        with self._changed:
            self._check_feed(after_revision, epoch)
            if after_revision == self._revision and wait:
                self._changed.wait_for(lambda: self._revision != after_revision or self._stopping, wait)
                self._check_feed(after_revision, epoch)  # a burst while we waited may have outrun the log
            first = len(self._log) - (self._revision - after_revision)
            events = islice(self._log, first, first + limit)
            return encode_changes(self.epoch, events, self.limits.max_store_bytes)

    # -- writes -----------------------------------------------------------------------------

    def set(self, data: bytes, expected_revision: int | None = None) -> tuple[int, int | None]:
        """Create or replace a session from its record (:func:`shmstore.model.pack`) or its
        public JSON; returns the revision it is stored at
        and its ``pid_start`` (the caller has the rest: sending it back would only cost a
        decode).

        With ``expected_revision``, replace only if the stored session still has that
        revision (0: only if there is none), else raise :class:`ConflictError`. A history
        longer than ``max_history`` is refused, not cut. The session's ``pid_start`` is
        kept when given; else the manager reads it (see :meth:`report`).
        """
        record = checked_set(data, expected_revision, self.limits)
        id, pid, given_start = record[ID], record[PID], record[PID_START]
        same_namespace, fresh = _see_pid(pid, given_start)
        with self._lock:
            current = self._sessions.get(id) or self._closed.get(id)
            if expected_revision is not None:
                current_revision = 0 if current is None else orjson.loads(current)[REVISION]
                if current_revision != expected_revision:
                    raise ConflictError(id, expected_revision, current_revision)
            if pid is not None:
                if not same_namespace:
                    record[PID_START] = None
                elif given_start is None:
                    record[PID_START] = pid_start_for(pid, fresh, current)
            self._commit(record, EventKind.SET, outside=True)
            return self._revision, record[PID_START]

    def remove(self, id: str) -> bytes | None:
        self._check_id(id)
        with self._lock:
            self._check_writable(id)
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
        to = STATUS_CODE[check_status(status)]
        with self._lock:
            record = self._load(id)
            record = transition_record(record, to, now(), self.limits.max_history, ClosedReason.TRANSITION)
            return self._commit(record, EventKind.TRANSITION)

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
        reason: str | None = None,
        at: float | None = None,
    ) -> bytes:
        """What an agent's hook says: create the session if it is new, else move it to
        ``status`` (a history entry only if the status changes), in one step.

        ``at`` is when the agent fired the event (epoch seconds, its host's clock; None:
        unknown). A report of an event older than the session's ``last_event`` arrived
        late (it waited in a spool, or a faster report overtook it): it counts as activity
        and changes nothing else, so events applied in any order leave the status of the
        newest. A report without ``at`` is applied as it comes.

        Every report counts as activity (``last_activity``, and no longer stale). A report
        on a recently closed session brings it back: the agent resumed it. ``pid`` and
        ``session_id``, when given, replace what the session had. A report that closes the
        session records its ``closed_reason`` as ``session_end``, followed by ``:reason`` when
        the agent said why (Claude Code's SessionEnd ``reason``, e.g. ``session_end:logout``).

        The agent is identified by ``pid`` and the start time /proc gives for it now (the
        reporting agent is running), kept as ``pid_start``; if the pid has no process any
        more, the start time the session already had for that pid is kept. A caller in
        another pid namespace (see :mod:`shmstore.procs`) names a pid that means nothing
        here: it is recorded as given, with no ``pid_start``, and never used to close the
        session.
        """
        to, agent, why, event = checked_report(
            id, status, working_dir, pid, session_id, agent_type, reason, at, self.limits.max_id_length
        )
        same_namespace, fresh = _see_pid(pid, None)
        with self._lock:
            current = self._sessions.get(id) or self._closed.get(id)
            record, late = report_record(
                current, id, to, working_dir, agent, why, now(), self.limits.max_history, session_id, event
            )
            if pid is not None and not late:
                record[PID] = pid
                record[PID_START] = pid_start_for(pid, fresh, current) if same_namespace else None
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
        check_once(client, number, method)
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
            pid, start = record[PID], record[PID_START]
            if pid is not None and start is not None and not procs.agent_alive(pid, start):
                dead.append((id, data))
            elif record[STATUS] == WORKING and not record[STALE] and at - record[ACTIVITY] >= self.limits.stale_after:
                silent.append((id, data))
        changed = 0
        with self._lock:
            for id, data in dead:
                if self._sessions.get(id) is data:  # unchanged since examined
                    record = orjson.loads(data)
                    transition_record(record, CLOSED, now(), self.limits.max_history, ClosedReason.AGENT_GONE)
                    self._commit(record, EventKind.CLOSE)
                    log.info("closed session %r: agent_gone (pid %d is no longer its agent)", id, record[PID])
                    changed += 1
            for id, data in silent:
                if self._sessions.get(id) is data:
                    record = orjson.loads(data)
                    record[STALE] = True
                    self._commit(record, EventKind.STALE)
                    log.info("session %r is stale: no report for %.0f s", id, self.limits.stale_after)
                    changed += 1
        return changed

    def prune(self, older_than: float) -> int:
        """Forget recently closed sessions that closed ``older_than`` seconds ago or more;
        returns how many went. Each is a ``remove`` event."""
        age = check_duration(older_than, "older_than")
        with self._lock:
            self._check_writable(None)
            cutoff = now() - age
            old = [id for id, data in self._closed.items() if orjson.loads(data)[SINCE] <= cutoff]
            for id in old:
                del self._closed[id]
                self._publish(EventKind.REMOVE, id, None)
            return len(old)

    # -- the shared segment (the manager's, not exposed) -------------------------------------

    def share(self, segment: Segment) -> None:
        """Keep the live sessions in ``segment`` too, from now on: each change is written
        there under the lock, before its reply (see :mod:`shmstore.segment`). The serving
        manager makes the segment in its own process, when a client first asks for it."""
        with self._lock:
            if self._segment is not None:
                raise ValidationError("segment", "this store already shares one")
            self._segment = segment
            for id, data in self._sessions.items():
                self._share(id, data)
            if self._segment is not None:
                self._segment.set_revision(self._revision)

    def unshare(self) -> None:
        """Stop sharing: the segment is closed (its readers read over the socket again)."""
        with self._lock:
            segment, self._segment = self._segment, None
            if segment is not None:
                segment.close()

    def shared_segment(self, make: Callable[[int, str], Segment] | None = None) -> tuple[int, Segment] | None:
        """A duplicate of the segment's fd, and the segment (for its hello), or None. With
        ``make`` (the live sessions' count and the epoch -> a new segment), one is made and
        shared if there is none. The caller sends the fd (without the lock: a client that does
        not read must not stall the store) and closes it; the duplicate stays valid whatever
        a grow does meanwhile."""
        with self._lock:
            if self._segment is None and make is not None:
                self.share(make(len(self._sessions), self.epoch))
            segment = self._segment
            return None if segment is None else (os.dup(segment.fd), segment)

    def _share(self, id: str, data: bytes | None) -> None:
        """Write session ``id`` (``data``; None: no longer live) into the segment at the
        store's revision. A full segment is replaced by a grown one (its readers re-attach);
        any other failure (e.g. out of memory) stops sharing, so that readers fall back to
        the socket rather than read a segment that no longer follows the store."""
        segment = self._segment
        if segment is None:
            return
        try:
            try:
                if data is None:
                    segment.delete(id, self._revision)
                else:
                    segment.put(id, data, self._revision)
            except SegmentFullError:
                self._segment = segment = segment.grow()
                log.info("grew the shared segment to %d slots", segment.slot_count)
                self._share(id, data)
        except Exception:
            log.exception("stopped sharing the sessions in memory: the segment failed")
            self._segment = None
            segment.close()

    # -- keeping sessions across a restart (the manager's, not exposed) ---------------------

    def dump(self) -> tuple[str, int, list[bytes], list[bytes]]:
        """The epoch, the revision, the live sessions' records and the recently closed
        ones' (oldest first), taken at one instant under the lock. Copying the two lists
        takes only references to the stored bytes (~0.1 ms for 10,000 sessions), so the
        caller encodes and writes them with the lock released."""
        with self._lock:
            return self.epoch, self._revision, list(self._sessions.values()), list(self._closed.values())

    def restore(self, revision: int, live: Sequence[Session], closed: Sequence[Session]) -> list[str]:
        """Fill an empty store with sessions a previous manager kept (``closed`` oldest
        first) and continue its ``revision``; returns what had to be left out, one line each.

        The revision goes on from the saved one (or the highest a session carries), so that
        every session's ``revision`` stays at or below the store's and ``set``'s
        ``expected_revision`` keeps meaning what it meant; the epoch stays this store's new
        one, so a follower of the old manager is told to resync rather than handed events it
        may have half seen. Sessions are fitted to this store's limits: histories cut to
        ``max_history`` (and to ``max_record_bytes``), and live sessions past
        ``max_sessions`` or ``max_store_bytes`` or closed ones past ``max_closed`` left out.
        No event is published: there is no follower yet that could miss one.
        """
        with self._lock:
            if self._revision or self._sessions or self._closed:
                raise ValidationError("store", "is not empty: only a new store is restored into")
            left_out: list[str] = []
            top = check_count(revision, "revision")
            for session in live:
                try:
                    data = self._fitted(session)
                except ValidationError as exc:
                    left_out.append(f"{session.id!r}: {exc}")
                    continue
                if len(self._sessions) >= self.limits.max_sessions:
                    left_out.append(f"{session.id!r}: past max_sessions ({self.limits.max_sessions})")
                elif self._live_bytes + len(data) > self.limits.max_store_bytes:
                    left_out.append(f"{session.id!r}: past max_store_bytes ({self.limits.max_store_bytes})")
                else:
                    self._sessions[session.id] = data
                    self._live_bytes += len(data)
                    top = max(top, session.revision)
            for session in closed[-self.limits.max_closed :]:
                if session.id in self._sessions:
                    continue
                try:
                    data = self._fitted(session)
                except ValidationError as exc:
                    left_out.append(f"{session.id!r}: {exc}")
                    continue
                self._closed.pop(session.id, None)
                self._closed[session.id] = data
                top = max(top, session.revision)
            left_out += [
                f"{s.id!r}: past max_closed ({self.limits.max_closed})" for s in closed[: -self.limits.max_closed]
            ]
            self._revision = top
            self._listing = None  # the sessions changed without a new revision
            return left_out

    def _fitted(self, session: Session) -> bytes:
        """``session``'s record within this store's history and record size limits."""
        record = to_record(session)
        del record[HISTORY][: -ENTRY * self.limits.max_history]
        # Within the record limit less RECORD_RESERVE, as set() keeps a session from outside,
        # so that the store's own later changes to it still fit (a file saved by a store with
        # a larger max_record_bytes sheds history here, or its session is left out).
        return encoded(record, self.limits.max_record_bytes - RECORD_RESERVE, outside=False)

    # -- internals ---------------------------------------------------------------------------

    def _listing_now(self) -> Listing:
        """The live sessions as a :data:`Listing` at the current revision (lock held)."""
        cached = self._listing
        if cached is not None and cached.revision == self._revision:
            return cached.reply
        before: dict[str, tuple[bytes, int]] = {}
        if cached is not None:
            before = dict(zip(cached.ids, zip(cached.reply[3], cached.revisions, strict=True), strict=True))
        ids, revisions = list(self._sessions), []
        for id, data in self._sessions.items():
            known = before.get(id)
            revisions.append(known[1] if known is not None and known[0] is data else orjson.loads(data)[REVISION])
        index = orjson.dumps([ids, revisions])
        reply = (self.epoch, self._revision, index, list(self._sessions.values()))
        self._listing = _ListingCache(self._revision, reply, ids, revisions)
        return reply

    def _check_id(self, id: object) -> str:
        return check_id(id, max_length=self.limits.max_id_length)

    def _load(self, id: str) -> Record:
        """The session ``id``, live or recently closed, as a record."""
        data = self._sessions.get(id) or self._closed.get(id)
        if data is None:
            raise NotFoundError(id, f"no live session with id {id!r}")
        return load_record(data)

    def _commit(self, record: Record, kind: EventKind, outside: bool = False) -> bytes:
        """Store ``record`` as the next revision: among the live sessions, or, once closed,
        among the recently closed (its event is then ``close``, unless it only had tokens
        added while closed). Changes nothing and raises when the record cannot be kept:
        StoreFullError when it would be one live session too many or take the live sessions
        past ``max_store_bytes``; ValidationError when a record written from outside
        (``outside``) leaves less than RECORD_RESERVE of ``max_record_bytes`` free. A record
        the store changed that outgrows ``max_record_bytes`` loses its oldest history entries.
        """
        id = record[ID]
        self._check_writable(id)
        closing = record[STATUS] == CLOSED
        live = self._sessions.get(id)
        if not closing and live is None and len(self._sessions) >= self.limits.max_sessions:
            raise StoreFullError(
                f"the store holds {len(self._sessions)} live sessions, its limit; {id!r} was not added",
                limit="max_sessions",
                id=id,
            )
        record[REVISION] = self._revision + 1
        data = encoded(record, self.limits.max_record_bytes, outside)
        if closing:
            if live is not None:
                del self._sessions[id]
                self._live_bytes -= len(live)
            if kind is EventKind.ADD_USAGE and id in self._closed:
                self._closed[id] = data  # not a status change: it keeps its place, and its event
            else:
                self._closed.pop(id, None)  # re-insert as the newest
                self._closed[id] = data
                while len(self._closed) > self.limits.max_closed:
                    del self._closed[next(iter(self._closed))]
                kind = EventKind.CLOSE
        else:
            total = self._live_bytes + len(data) - (0 if live is None else len(live))
            if total > self.limits.max_store_bytes:
                raise StoreFullError(
                    f"the live sessions would take {total} bytes, past max_store_bytes "
                    f"({self.limits.max_store_bytes}); "
                    f"{id!r} was not written",
                    limit="max_store_bytes",
                    id=id,
                )
            self._closed.pop(id, None)
            self._sessions[id] = data
            self._live_bytes = total
        self._publish(kind, id, data)
        return data

    def stop_writes(self, why: str = "the manager is stopping") -> None:
        """Refuse every write from now on, with :class:`StoreUnavailableError` (``why``):
        the manager's first step in stopping. Writes run under the lock, so once this
        returns none is half done and none will be applied, and what :meth:`dump` gives
        holds every write that was acknowledged. Wakes every ``changes`` call that waits."""
        with self._lock:
            self._stopping = why
            self._changed.notify_all()

    def _check_writable(self, id: str | None) -> None:
        """Raise if :meth:`stop_writes` was called (lock held): before any change is made."""
        if self._stopping:
            what = "" if id is None else f" to {id!r}"
            raise StoreUnavailableError(f"{self._stopping}: the write{what} was not applied; try again once it is back")

    def _publish(self, kind: EventKind, id: str, data: bytes | None) -> None:
        """Count a change, log its event, and wake every waiting ``changes`` call."""
        self._revision += 1
        self._log.append((self._revision, kind, id, data))
        self._share(id, self._sessions.get(id))  # put if live, else gone from the live set
        self._changed.notify_all()

    def _check_feed(self, after_revision: int, epoch: str | None) -> None:
        oldest = self._log[0][0] if self._log else self._revision + 1
        check_feed(self.epoch, self._revision, oldest, after_revision, epoch, "the manager restarted")


def _see_pid(pid: int | None, given_start: int | None) -> tuple[bool, int | None]:
    """Whether the caller is in our pid namespace, so that its ``pid`` can be checked here;
    and, if so and it gave no start time, the pid's start time now. Called before taking
    the lock: reading /proc costs a few microseconds."""
    same = getattr(procs.caller, "same_pid_namespace", True) is True  # unset: called in-process
    fresh = procs.process_start(pid) if pid is not None and same and given_start is None else None
    return same, fresh


def pid_start_for(pid: int, fresh: int | None, current: bytes | None) -> int | None:
    """The start time that identifies agent ``pid``, for a caller in our pid namespace:
    /proc's answer now (``fresh``), or, when the pid has no process any more, what the
    stored session (``current``) already had for the same pid: the agent it identified is
    gone, which the reaper will find."""
    if fresh is not None or current is None:
        return fresh
    stored = orjson.loads(current)
    return stored[PID_START] if stored[PID] == pid else None


# -- the changes the store makes (the Redis backend makes the same ones) ---------------------
#
# The manager keeps sessions encoded and changes them in their decoded form (a record,
# a list: see shmstore.model), which costs a few microseconds where building and
# validating a Session with a long history costs tens. Records only ever come from
# model.to_record, model.new_record or a check of what a client sent, so they are valid;
# these functions keep them so. Statuses are codes (model.STATUS_CODE).


def transition_record(
    record: Record, to: int, at: float, max_history: int, reason: str = ClosedReason.TRANSITION
) -> Record:
    """Move ``record`` to status code ``to`` at time ``at``: one more history entry,
    ``since`` reset, only the newest ``max_history`` entries kept; ``reason`` is its
    ``closed_reason`` if ``to`` is closed (an open session has none). A clock that stepped
    back never makes a duration negative."""
    at = max(at, record[SINCE])
    append_entry(record, at, to)
    history = record[HISTORY]
    del history[: -ENTRY * max_history]
    if type(history[0]) is float:  # its times in seconds: back to milliseconds once all are whole
        history[:] = flat_history(history_entries(history, at), at)
    record[STATUS] = to
    record[SINCE] = at
    record[REASON] = reason if to == CLOSED else None
    return touch_record(record, at)


def check_feed(epoch: str, revision: int, oldest: int, after: int, asked: str | None, new_store: str) -> None:
    """Whether ``changes(after, epoch=asked)`` can be answered from the feed of store
    ``epoch``, which holds the events ``oldest``..``revision`` (``oldest`` is
    ``revision + 1`` when it holds none); if not, the ResyncRequiredError that says why.
    ``new_store`` says what another epoch means for this backend."""
    if asked is not None and asked != epoch:
        raise ResyncRequiredError(
            f"the store is a new one (epoch {epoch}, not {asked}): {new_store}", reason="epoch", after_revision=after
        )
    if after > revision:
        raise ResyncRequiredError(
            f"revision {after} is ahead of the store's {revision}", reason="ahead", after_revision=after
        )
    if after + 1 < oldest and after < revision:
        raise ResyncRequiredError(
            f"the events after revision {after} have left the log, which holds {oldest}..{revision}",
            reason="compacted",
            after_revision=after,
        )


def check_epoch(epoch: object) -> None:
    """The epoch a caller names: a store's, or None for "whichever"."""
    if epoch is not None and not isinstance(epoch, str):
        raise ValidationError("epoch", f"must be a string or None, not {type(epoch).__name__}")


def check_once(client: object, number: object, method: object) -> None:
    """A client's token, request number and write, as ``once`` takes them."""
    if not isinstance(client, bytes) or not 8 <= len(client) <= 64:
        raise ValidationError("client", f"must be 8 to 64 bytes, not {client!r:.80}")
    check_count(number, "number")
    if not isinstance(method, str) or method not in WRITES:
        raise ValidationError("method", f"must be one of {', '.join(sorted(WRITES))}; got {method!r:.80}")


def checked_set(data: object, expected_revision: object, limits: Limits) -> Record:
    """What ``set`` is sent, checked: the record it stores (:func:`model.stored_record`:
    every field in one pass over the decoded JSON, with the bounds Session's own checks
    apply, at a fraction of the cost of building one), its history within
    ``max_history``, and the expected revision a count or None."""
    if not isinstance(data, bytes):
        raise ValidationError("session", f"must be JSON bytes, not {type(data).__name__}")
    record = stored_record(data, limits.max_id_length)
    entries = len(record[HISTORY]) // ENTRY
    if entries > limits.max_history:
        raise ValidationError("history", f"has {entries} entries; this store keeps at most {limits.max_history}")
    if expected_revision is not None:
        check_count(expected_revision, "expected_revision")
    return record


def checked_report(
    id: object,
    status: object,
    working_dir: object,
    pid: object,
    session_id: object,
    agent_type: object,
    reason: object,
    at: object,
    max_id_length: int,
) -> tuple[Status, AgentType, str, float | None]:
    """A report's arguments checked (ValidationError names the first that is wrong): its
    status, agent type, the closed reason it gives if it closes the session
    (``session_end``, then ``:reason`` when the agent said why), and the event's time."""
    check_id(id, max_length=max_id_length)
    to = check_status(status)
    check_dir(working_dir)
    agent = check_agent_type(agent_type)
    if pid is not None:
        check_pid(pid)
    if session_id is not None:
        check_id(session_id, "session_id")
    why = ClosedReason.SESSION_END.value
    if reason is not None:
        why = check_closed_reason(f"{why}:{reason}" if isinstance(reason, str) else reason, "reason")
    return to, agent, why, None if at is None else check_time(at, "at")


def report_record(
    current: bytes | None,
    id: str,
    to: Status,
    working_dir: str,
    agent: AgentType,
    why: str,
    at: float,
    max_history: int,
    session_id: str | None,
    event: float | None = None,
) -> tuple[Record, bool]:
    """What a report of status ``to`` at ``at`` (the store's clock) makes of the stored
    session ``current`` (a new session if None), and whether the report was late: a
    transition only if the status changes, activity either way; ``why`` is the closed
    reason if it closes; ``session_id``, when given, the resume id. A report whose
    ``event`` time (the agent's clock) is older than the session's last event is late: it
    is activity and nothing more. The pid and its start time are the caller's (each
    backend knows them its own way), and not to be applied to a late report."""
    code = STATUS_CODE[to]
    if current is None:
        record = new_record(id, agent, to, working_dir, at, why if code == CLOSED else None)
    else:
        record = load_record(current)
        last = record[LAST_EVENT]
        if event is not None and last is not None and event < last:
            return touch_record(record, at), True
        if record[STATUS] != code:
            transition_record(record, code, at, max_history, why)
        touch_record(record, at)
    if session_id is not None:
        record[RESUME] = SAME_AS_ID if session_id == id else session_id
    if event is not None:
        record[LAST_EVENT] = event
    return record, False


def encoded(record: Record, limit: int, outside: bool) -> bytes:
    """``record``'s bytes, within ``limit`` (max_record_bytes). A record written from
    ``outside`` (``set``, or created by ``report``) must leave RECORD_RESERVE of it free,
    else ValidationError; a record the store changed that outgrew it loses its oldest
    history entries."""
    # orjson builds its result in a 4 KiB buffer and shrinks it in place, which leaves
    # a hole that later buffers do not fit: kept for long, a 1 KiB session pinned about
    # 3.7 KiB of heap (measured). An exact-size copy costs 0.15 us and packs tightly.
    data = memoryview(orjson.dumps(record)).tobytes()
    if outside and len(data) > limit - RECORD_RESERVE:
        raise ValidationError(
            "session",
            f"is {len(data)} bytes as a stored record; a session's record may be at most {limit - RECORD_RESERVE} "
            f"(max_record_bytes {limit}, less {RECORD_RESERVE} kept for the store's own changes)",
        )
    return _shed_history(record, data, limit) if len(data) > limit else data


def _shed_history(record: Record, data: bytes, limit: int) -> bytes:
    """``record`` without as many of its oldest history entries as it takes to fit in
    ``limit`` bytes. Only records the store itself grew come here, and RECORD_RESERVE
    leaves them room for everything but history, so this always succeeds."""
    history = record[HISTORY]
    excess, drop = len(data) - limit, 0
    while excess > 0 and drop < len(history):
        excess -= len(orjson.dumps(history[drop : drop + ENTRY])) - 1  # its values and their commas
        drop += ENTRY
    del history[:drop]
    data = memoryview(orjson.dumps(record)).tobytes()
    if len(data) > limit:  # not reachable while RECORD_RESERVE holds
        raise ValidationError("session", f"is {len(data)} bytes as a stored record; the limit is {limit}")
    return data


def touch_record(record: Record, at: float) -> Record:
    """The session reported something at ``at``: it is active, so no longer stale."""
    record[ACTIVITY] = max(at, record[ACTIVITY])
    record[STALE] = False
    return record


def add_usage_record(record: Record, input_tokens: int, output_tokens: int) -> Record:
    """Add token counts to ``record``; refuses totals the wire cannot carry."""
    usage = record[USAGE] or (0, 0)
    record[USAGE] = [
        check_count(usage[0] + check_count(input_tokens, "input_tokens"), "api_usage.input_tokens"),
        check_count(usage[1] + check_count(output_tokens, "output_tokens"), "api_usage.output_tokens"),
    ]
    return record
