"""The manager's store: every session, the lock that guards them, the operations on them
(:class:`~shmstore.backend.Backend`, which it satisfies), and the change feed.

:class:`Store` is a plain object: the manager process serves one, and tests use one
in-process. Each method runs under one ``RLock``, so every operation is atomic however many
processes call at once (``changes`` releases it while it waits). A write::

    Client.report(...) -> StoreProxy (clients/) -> the dispatcher's thread (manager/)
      -> Store.once -> Store.report (here, under the lock)
      -> rules.report_record (the change, on the record: rules.py)
      -> Store._commit: orjson bytes, revision + 1, one event on the feed, the segment
    subscriber: Watch -> Client.changes() -> Store.changes() wakes, sends the events
    reader: Client.get() -> the segment, mapped in its own process (clients/shared.py)
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
from collections import deque
from collections.abc import Callable, Sequence
from itertools import islice
from typing import TYPE_CHECKING, Any, overload

import orjson

from . import procs, rules
from .backend import DEFAULT_CHANGES_LIMIT, Listing
from .checks import (
    MAX_WAIT,
    check_count,
    check_duration,
    check_id,
    check_positive,
    now,
)
from .config import RECORD_RESERVE, Limits, changed
from .errors import (
    ConflictError,
    NotFoundError,
    StoreFullError,
    StoreUnavailableError,
    ValidationError,
)
from .feed import EventKind, encode_changes, encode_snapshot
from .listing import ListingCache
from .mirror import Mirror
from .model import AgentType, ClosedReason, Session, check_status
from .record import (
    CLOSED,
    ENTRY,
    HISTORY,
    ID,
    PID,
    PID_START,
    REVISION,
    SINCE,
    STALE,
    STATUS,
    STATUS_CODE,
    Record,
    load_record,
    to_record,
)
from .retries import NewestWrites
from .transport.segment import Segment

log = logging.getLogger(__name__)


class Store:
    """Every session, keyed by id, as the orjson bytes of its record, guarded by one
    re-entrant lock.

    Sessions are kept encoded, in the stored form (a positional array, see
    :mod:`shmstore.record`): that is what clients are sent, and bytes are the most compact
    form CPython holds. Each change decodes one record, applies one of :mod:`shmstore.rules`'
    functions to it, re-encodes it and bumps the store-wide revision.

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
        # What once() answers a retry with, instead of applying the write again.
        self._done = NewestWrites()
        # The last list_all reply (guarded with the sessions, so it matches their revision).
        self._listing = ListingCache()
        # The live sessions again, for readers in other processes (share()).
        self._mirror = Mirror()
        # Set once by stop_writes(), as the manager stops: no write is applied after it.
        self._stopping: str | bool = False

    # The lock and its condition are not data: a store sent to another process (start_server
    # with "forkserver" or "spawn") gets fresh ones. Pickled whole, dill's copy of an RLock
    # comes out held by the unpickling thread, and every call then waits for it for ever.
    def __getstate__(self) -> dict[str, Any]:
        with self._lock:
            skip = ("_lock", "_changed", "_mirror")  # a segment belongs to the process that made it
            return {name: value for name, value in vars(self).items() if name not in skip}

    def __setstate__(self, state: dict[str, Any]) -> None:
        vars(self).update(state)
        self._mirror = Mirror()
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
        rules.check_epoch(epoch)
        with self._lock:
            if epoch == self.epoch and revision == self._revision:
                return None
            return self._listing.reply(self.epoch, self._revision, self._sessions)

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
        rules.check_epoch(epoch)
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
        record = rules.checked_set(data, expected_revision, self.limits)
        id, pid, given_start = record[ID], record[PID], record[PID_START]
        same_namespace, fresh = procs.seen_by_caller(pid, given_start)
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
                    record[PID_START] = rules.pid_start_for(pid, fresh, current)
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
            record = rules.transition_record(record, to, now(), self.limits.max_history, ClosedReason.TRANSITION)
            return self._commit(record, EventKind.TRANSITION)

    def add_usage(self, id: str, input_tokens: int, output_tokens: int) -> bytes:
        """Add token counts to a session, live or recently closed (as ``get`` finds it): a
        closed one stays closed, where it was among the recently closed."""
        self._check_id(id)
        check_count(input_tokens, "input_tokens")
        check_count(output_tokens, "output_tokens")
        with self._lock:
            record = rules.touch_record(rules.add_usage_record(self._load(id), input_tokens, output_tokens), now())
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
        subagent: str | None = None,
        background: str | None = None,
        pid_start: int | None = None,
        terminal: list[str | None] | None = None,
    ) -> bytes | None:
        """What an agent's hook says, in one step (:func:`rules.report_record` has the
        rules): create the session if it is new, else count the report as activity and
        move the session to ``status`` (a history entry only if the status changes), unless
        the event fired at ``at`` (the agent's clock) is older than the session's
        ``last_event``, or a ``subagent``'s work would take it from waiting on the user. A
        report on a recently closed session brings it back; the end of a session the store
        does not hold changes nothing (None). A report that closes the session records its
        ``closed_reason`` as ``session_end`` (``session_end:REASON`` with the agent's
        ``reason``, e.g. ``logout``); ``background`` is the agent's background job, and
        ``terminal`` where it runs (:data:`shmstore.terminal.FIELDS`; kept until a report
        names another).

        The agent is identified by ``pid`` and its start time: ``pid_start`` as the
        reporter read it when the event fired (a report delivered from a spool comes late),
        else what /proc gives for it now (if the pid has no process any more, the one the
        session had for it). A caller in another pid namespace (:mod:`shmstore.procs`) names
        a pid that means nothing here: it is recorded with no ``pid_start``, never reaped.
        """
        said = rules.checked_report(
            id, status, working_dir, pid, session_id, agent_type, reason, at, subagent, background, pid_start,
            terminal, max_id_length=self.limits.max_id_length,
        )  # fmt: skip
        same_namespace, fresh = procs.seen_by_caller(pid, said.pid_start)
        fresh = said.pid_start if fresh is None else fresh
        with self._lock:
            current = self._sessions.get(id) or self._closed.get(id)
            record, moved = rules.report_record(current, said, now(), self.limits.max_history)
            if record is None:
                return None
            if pid is not None and moved:
                record[PID] = pid
                record[PID_START] = rules.pid_start_for(pid, fresh, current) if same_namespace else None
            return self._commit(record, EventKind.REPORT, outside=current is None)

    def once(self, client: bytes, number: int, method: str, *args: Any) -> Any:
        """Run the write ``method(*args)`` unless this client's request ``number`` already
        ran, and return its result either way.

        A client whose connection failed during a write cannot know whether it was applied;
        it retries with the same ``client`` token and ``number`` and gets the first
        attempt's result instead of a second application, whichever of the two arrives
        first (:class:`~shmstore.retries.NewestWrites`: the newest 4,096 clients are
        remembered). A request older than the client's newest is not run.
        """
        rules.check_once(client, number, method)
        with self._lock:
            ran, answer = self._done.answer(client, number)
            if ran:
                return answer
            result = getattr(self, method)(*args)
            self._done.remember(client, number, result)
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
        at, found = now(), []
        for id, data in sessions:
            record = orjson.loads(data)
            if rules.agent_gone(record):
                found.append((id, data, True))
            elif not record[STALE] and rules.silent_at_work(record, at, self.limits.stale_after):
                found.append((id, data, False))
        changed = 0
        with self._lock:
            for id, data, gone in found:
                if self._sessions.get(id) is not data:
                    continue  # changed since it was examined: its news is newer
                record = orjson.loads(data)
                if gone:
                    rules.transition_record(record, CLOSED, now(), self.limits.max_history, ClosedReason.AGENT_GONE)
                    self._commit(record, EventKind.CLOSE)
                    log.info("closed session %r: agent_gone (pid %d is no longer its agent)", id, record[PID])
                else:
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
        """Keep the live sessions in ``segment`` too, from now on (:class:`Mirror`)."""
        with self._lock:
            if self._mirror.segment is not None:
                raise ValidationError("segment", "this store already shares one")
            self._mirror.attach(segment, self._sessions.items(), self._revision)

    def unshare(self) -> None:
        """Stop sharing: the segment is closed (its readers read over the socket again)."""
        with self._lock:
            self._mirror.detach()

    def shared_segment(self, make: Callable[[int, str], Segment] | None = None) -> tuple[int, Segment] | None:
        """:meth:`Mirror.handle`; with ``make`` (the live sessions' count and the epoch -> a
        new segment), one is made and shared first if there is none."""
        with self._lock:
            if self._mirror.segment is None and make is not None:
                self.share(make(len(self._sessions), self.epoch))
            return self._mirror.handle()

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
            self._listing.forget()  # the sessions changed without a new revision
            return left_out

    def _fitted(self, session: Session) -> bytes:
        """``session``'s record within this store's history and record size limits."""
        record = to_record(session)
        del record[HISTORY][: -ENTRY * self.limits.max_history]
        # Within the record limit less RECORD_RESERVE, as set() keeps a session from outside,
        # so that the store's own later changes to it still fit (a file saved by a store with
        # a larger max_record_bytes sheds history here, or its session is left out).
        return rules.encoded(record, self.limits.max_record_bytes - RECORD_RESERVE, outside=False)

    # -- internals ---------------------------------------------------------------------------

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
        data = rules.encoded(record, self.limits.max_record_bytes, outside)
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

    def allow_writes(self) -> None:
        """Take writes again (a manager serves a store it stopped before)."""
        with self._lock:
            self._stopping = False

    def _check_writable(self, id: str | None) -> None:
        """Raise if :meth:`stop_writes` was called (lock held): before any change is made."""
        if self._stopping:
            what = "" if id is None else f" to {id!r}"
            raise StoreUnavailableError(f"{self._stopping}: the write{what} was not applied; try again once it is back")

    def _publish(self, kind: EventKind, id: str, data: bytes | None) -> None:
        """Count a change, log its event, and wake every waiting ``changes`` call."""
        self._revision += 1
        self._log.append((self._revision, kind, id, data))
        self._mirror.put(id, self._sessions.get(id), self._revision)  # put if live, else gone
        self._changed.notify_all()

    def _check_feed(self, after_revision: int, epoch: str | None) -> None:
        oldest = self._log[0][0] if self._log else self._revision + 1
        rules.check_feed(self.epoch, self._revision, oldest, after_revision, epoch, "the manager restarted")


if TYPE_CHECKING:
    from .backend import Backend

    def _is_a_backend(store: Store) -> Backend:
        return store  # mypy checks this backend against the written protocol
