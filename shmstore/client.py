"""The client: typed calls on a manager found by address and authkey.

A :class:`Client` speaks to the manager's store through a ``multiprocess`` proxy
(:class:`StoreProxy`) that owns one connection per thread, so one client may be shared by
several threads. The client turns sessions into bytes and back, sends every write through
the manager's ``once`` with a request number, tries a call whose connection failed once
more on a fresh connection, and turns transport failures into
:class:`StoreUnavailableError`, so that a dead or hung manager is an error, never a hang
and never another call's reply. A client outlives a manager restart at the same address,
and a process forked from one that used it connects afresh.

:class:`Watch` follows the change feed and raises when the manager is gone; a
:class:`Follower` follows it through manager restarts and hangs, reconnecting with
back-off (:class:`Backoff`) and telling its caller so (:class:`Notice`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import os
import random
import threading
import time
import weakref
from collections import deque
from typing import Any, NamedTuple

import multiprocess
import orjson
from multiprocess import managers

from . import address as addr
from . import segment, wire
from .checks import MAX_WAIT
from .errors import ResyncRequiredError, ShmstoreError, StoreUnavailableError, ValidationError
from .feed import Changes, Event, EventKind, Snapshot
from .model import AgentType, Session, Status, check_status, pack, restamped, session_from_store
from .redis_address import RedisAddress
from .shared import SharedReads
from .store import WRITES

DEFAULT_TIMEOUT = wire.DEFAULT_TIMEOUT
#: Decoded sessions a client keeps, keyed by the exact bytes they came from.
DECODE_CACHE_SIZE = 1024


#: The most connections one Client keeps to its manager, by default: calls of more threads
#: than this at once wait for a connection (by their deadline). The manager serves one call
#: at a time anyway (its lock, and the GIL), so more connections add no throughput; they
#: only take its slots (max_connections, 256).
DEFAULT_MAX_CONNECTIONS = 8


class StoreProxy(managers.BaseProxy):
    """The manager's store, seen from a client process.

    ``BaseProxy`` supplies the token and the call envelope. Its connections, though, are
    kept per thread in a map shared by every proxy of the process, so one client's timeout
    and failures leaked into another's, and a thread that ended kept its connection open
    for good (300 short-lived threads took 300 of the manager's 256 slots). Here each proxy
    owns a small pool: a call takes an idle connection (or opens one, up to
    ``max_connections``; past that it waits for one, by its deadline), uses it alone, and
    gives it back. A connection is dropped on any exception between sending a request and
    reading its whole reply, a ``KeyboardInterrupt`` included, since the unread reply
    would otherwise answer the next call; and a process forked from one that used the
    proxy connects afresh instead of sharing its parent's sockets.
    """

    def __init__(self, *args: Any, max_connections: int = DEFAULT_MAX_CONNECTIONS, **kwds: Any) -> None:
        super().__init__(*args, **kwds)
        self.max_connections = max_connections
        self._own()

    def _own(self) -> None:
        """Start with no connections, in this process."""
        self._pid = os.getpid()
        # Guards _idle and _busy, the pool: every connection this proxy opened is in one of
        # them, or counted in _opening while a thread opens it. It is held wherever a listed
        # connection is closed or shut down, so that close() never shuts down a descriptor
        # another thread has just closed (and the kernel may have handed to someone else).
        # A connection in _busy is used by the one thread that took it.
        self._pool = threading.Condition(threading.Lock())
        self._idle: list[wire.Connection] = []  # the most recently used last
        self._busy: set[wire.Connection] = set()
        self._opening = 0
        self._shut = False  # set by close(): connections given back are closed, not kept

    def _after_fork(self) -> None:
        """``multiprocess`` children: nothing to do (the pid check handles every fork)."""

    def _incref(self) -> None:
        """Never count references in the manager (see ``Client._new_proxy``). ``BaseProxy``
        would do so in every ``multiprocess`` child it registered itself for, on a
        connection of its own, which the manager refuses as not a client's."""

    def _forget_if_forked(self) -> None:
        if self._pid != os.getpid():
            # The sockets are the parent's: close our copies of the descriptors (which
            # leaves the parent's open) and never shut them down (which would not).
            for inherited in [*self._idle, *self._busy]:
                inherited.close()
            self._own()

    def _take(self, deadline: float) -> wire.Connection:
        """A connection for one call: an idle one, else a new one if the pool has room,
        else the first one given back before ``deadline``."""
        self._forget_if_forked()
        with self._pool:
            while True:
                if self._idle:
                    idle = self._idle.pop()
                    self._busy.add(idle)
                    return idle
                if len(self._busy) + self._opening < self.max_connections:
                    self._opening += 1
                    break
                if not self._pool.wait(_left(deadline)) and time.monotonic() >= deadline:
                    where = addr.format_address(self._token.address)
                    raise StoreUnavailableError(
                        f"all {self.max_connections} connections of this client to {where} stayed in use by other "
                        "threads (Client's max_connections)",
                        address=where,
                    )
        conn = None
        try:
            conn = wire.Client(self._token.address, authkey=bytes(self._authkey), timeout=_left(deadline))
            managers.dispatch(conn, None, "accept_connection", (_thread_name(),))
        except BaseException:
            if conn is not None:
                conn.close()
            raise
        finally:
            with self._pool:
                self._opening -= 1
                if conn is not None and not conn.closed:
                    self._busy.add(conn)
                self._pool.notify()
        return conn

    def _give_back(self, conn: wire.Connection) -> None:
        with self._pool:
            if conn in self._busy:
                self._busy.discard(conn)
                if self._shut or conn.closed:
                    conn.close()
                else:
                    self._idle.append(conn)
            self._pool.notify()

    def call(self, method: str, args: tuple[Any, ...], deadline: float) -> Any:
        """Call ``method`` in the manager; connecting and the reply must all be done by
        ``deadline`` (``time.monotonic()``)."""
        conn = self._take(deadline)
        conn.deadline = deadline
        try:
            conn.send((self._id, method, args, {}))
        except ValidationError:
            self._give_back(conn)
            raise  # nothing was sent: the connection is still in step
        except BaseException:
            self._drop(conn)
            raise
        try:
            kind, result = conn.recv()
        except BaseException:
            self._drop(conn)
            raise
        self._give_back(conn)
        if kind == "#RETURN":
            return result
        if kind == "#ERROR":
            raise result
        raise managers.convert_to_error(kind, result)

    def _drop(self, conn: wire.Connection) -> None:
        with self._pool:
            self._busy.discard(conn)
            conn.close()
            self._pool.notify()

    def connections(self) -> int:
        """How many connections this proxy holds now (idle, in use, and being opened)."""
        with self._pool:
            return len(self._idle) + len(self._busy) + self._opening

    def retire(self) -> None:
        """Keep no connection from now on: idle ones are closed now, those in use when
        their calls end (a client whose call failed makes a new proxy, and leaves other
        threads' calls on this one to finish)."""
        with self._pool:
            self._shut = True
            idle, self._idle = self._idle, []
            for conn in idle:
                conn.close()

    def close(self) -> None:
        """End every connection: idle ones are closed; one in use by a thread is shut down
        (its call in flight fails at once) and closed when the thread gives it back, so its
        descriptor is never reused under it. In a forked child, only the child's copies of
        its parent's descriptors are closed."""
        if self._pid != os.getpid():
            self._forget_if_forked()
            return
        with self._pool:
            self._shut = True
            idle, self._idle = self._idle, []
            for conn in idle:
                conn.close()
            for conn in self._busy:
                conn.shutdown()
            self._pool.notify_all()


class _Listing(NamedTuple):
    """A client's last ``list_all``: the epoch and revision the manager listed it at, and
    its sessions, by (id, revision) and in order."""

    epoch: str
    revision: int
    by_key: dict[tuple[str, int], Session]
    sessions: list[Session]


#: The types a call's arguments may have: what the manager can unpickle and validate.
_SENDABLE = frozenset({str, int, float, bool, bytes, type(None), Status, AgentType})


def _left(deadline: float) -> float:
    """Seconds until ``deadline``, never quite zero (a zero timeout means something else)."""
    return max(0.001, deadline - time.monotonic())


def _thread_name() -> str:
    return f"{multiprocess.current_process().name}|{threading.current_thread().name}"


class Client:
    """Operations on the sessions of one manager. Safe to share between threads.

    Every method is one round trip and one atomic operation in the manager, but for the
    reads ``get``, ``list_all`` and ``snapshot``, which with ``shared_memory`` (the default,
    on a unix socket, on x86-64 Linux: :func:`shmstore.segment.supported`) come from the
    manager's shared segment with no round trip, and are the same atomic answers (see
    :mod:`shmstore.shared`); ``shared_memory=False`` never maps it. Errors are
    ours: :class:`ValidationError` for bad input (the store is left as it was),
    :class:`NotFoundError` for an unknown id, :class:`ConflictError` for a stale expected
    revision, :class:`StoreUnavailableError` when the manager cannot be reached in time.

    Threads share a pool of at most ``max_connections`` connections to the manager (8):
    each call takes one for itself and gives it back, so a client used by a thread per
    request holds a few connections, not one per thread it ever ran; a call that finds
    them all in use waits for one, by its deadline.
    """

    def __init__(
        self,
        address: wire.Address | RedisAddress | os.PathLike[str] | None = None,
        authkey: bytes | str | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        shared_memory: bool = True,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
    ) -> None:
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout > 0:
            raise ValidationError("timeout", f"must be a positive number of seconds; got {timeout!r}")
        if type(max_connections) is not int or max_connections < 1:
            raise ValidationError("max_connections", f"must be a positive whole number; got {max_connections!r}")
        self.max_connections = max_connections
        if not isinstance(shared_memory, bool):
            raise ValidationError("shared_memory", f"must be true or false, not {type(shared_memory).__name__}")
        self.address = addr.resolve_any(address)
        self.timeout = float(timeout)
        self._authkey = None if authkey is None else addr.as_key(authkey)
        self._pid = os.getpid()
        self._proxy: StoreProxy | None = None
        self._proxy_lock = threading.Lock()  # guards _proxy
        self._decoded: dict[bytes, Session] = {}
        self._listing: _Listing | None = None  # the last list_all reply, decoded
        self._requests = threading.local()  # this thread's request token and number
        unix = isinstance(self.address, str)  # a manager's unix socket (not TCP, not Redis)
        self._shared = None
        if shared_memory and unix and segment.supported():
            # Weakly: a client dropped without close() is then freed (its connections closed)
            # at once, as before, instead of at the cyclic collector's next pass.
            self._shared = SharedReads(
                weakref.WeakMethod(self._connect), weakref.WeakMethod(self._session), self.timeout
            )

    def __repr__(self) -> str:
        return f"<shmstore.Client address={addr.format_address(self.address)!r}>"

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- connection -------------------------------------------------------------------------

    def connect(self) -> Client:
        """Connect now rather than at the first call; returns the client."""
        self._get_proxy(time.monotonic() + self.timeout)
        return self

    def close(self) -> None:
        """Close this client's connections. A later call connects again."""
        self._forget_if_forked()
        with self._proxy_lock:
            proxy, self._proxy = self._proxy, None
        if proxy is not None:
            proxy.close()
        if self._shared is not None:
            self._shared.close()

    def _forget_if_forked(self) -> None:
        """In a forked child, start afresh: the lock may have been held by a thread that
        does not exist here (taking it would wait for ever), and the proxy's connections
        are the parent's."""
        if self._pid != os.getpid():
            self._pid = os.getpid()
            self._proxy_lock = threading.Lock()
            proxy, self._proxy = self._proxy, None
            if proxy is not None:
                proxy.close()  # closes only the child's copies of the descriptors

    def _get_proxy(self, deadline: float) -> StoreProxy:
        self._forget_if_forked()
        proxy = self._proxy
        if proxy is not None:
            return proxy
        # Made outside the lock, so that a thread waiting for it never waits for another
        # thread's whole timeout on top of its own; if two race, the first one wins.
        made = self._new_proxy(deadline)
        with self._proxy_lock:
            if self._proxy is None:
                self._proxy = made
            return self._proxy

    def _new_proxy(self, deadline: float) -> StoreProxy:
        if isinstance(self.address, RedisAddress):
            try:
                from .redis_store import RedisProxy  # only a Redis address needs the redis package
            except ImportError as exc:
                raise StoreUnavailableError(str(exc), address=str(self.address)) from None
            return RedisProxy(self.address, self.timeout)  # type: ignore[return-value]
        assert not isinstance(self.address, RedisAddress)
        key = self._authkey if self._authkey is not None else addr.read_key(self.address)
        where = addr.format_address(self.address)
        try:
            conn = wire.Client(self.address, authkey=key, timeout=_left(deadline))
            try:
                ident, exposed = managers.dispatch(conn, None, "create", ("store",))
            finally:
                conn.close()
        except (EOFError, OSError, managers.RemoteError) as exc:
            raise StoreUnavailableError(
                f"cannot reach a manager at {where}: {_describe(exc, self.timeout)}", address=where
            ) from None
        # The manager counted our reference when it created the token; not asking it to
        # count again (incref=False) saves a connection, and a client that dies without
        # saying goodbye can then never make the manager drop its store.
        token = managers.Token("store", self.address, ident)
        return StoreProxy(
            token, wire.SERIALIZER, authkey=key, exposed=exposed, incref=False, max_connections=self.max_connections
        )

    def _connect(self, deadline: float) -> wire.Connection:
        """A connection of its own to this client's manager, authenticated (SharedReads')."""
        assert not isinstance(self.address, RedisAddress)  # never shared: see __init__
        proxy = self._get_proxy(deadline)
        return wire.Client(self.address, authkey=bytes(proxy._authkey), timeout=_left(deadline))

    def _call(self, method: str, *args: Any, wait: float = 0.0) -> Any:
        """One call, tried once more on a fresh connection if its connection failed or
        timed out. Writes go through the manager's ``once`` with this thread's next request
        number, so the second try is never applied twice (exactly once, when the manager
        answers it). Each try, connecting included, has ``timeout`` (plus ``wait``) in all,
        so a call gives up after at most twice that."""
        for arg in args:
            if type(arg) not in _SENDABLE:
                raise ValidationError("arguments", f"{method}() takes plain values, not {type(arg).__name__}")
        if method in WRITES:  # sent through the manager's once()
            args = (*self._next_request(), method, *args)
            method = "once"
        for attempt in (1, 2):
            deadline = time.monotonic() + self.timeout + wait
            proxy = self._get_proxy(deadline)
            try:
                return proxy.call(method, args, deadline)
            except ShmstoreError:
                raise
            except (EOFError, OSError, managers.RemoteError) as exc:
                # The next call makes a fresh proxy (the manager may be a new one). Other
                # threads' calls in flight on this one are left to finish.
                with self._proxy_lock:
                    if self._proxy is proxy:
                        self._proxy = None
                proxy.retire()
                if attempt == 2 or isinstance(exc, managers.RemoteError):
                    where = addr.format_address(self.address)
                    who = "Redis" if isinstance(self.address, RedisAddress) else "manager"
                    name = args[2] if method == "once" else method
                    problem = _describe(exc, self.timeout)
                    raise StoreUnavailableError(
                        f"{who} at {where} failed during {name}(): {problem}", address=where
                    ) from None
        raise AssertionError("unreachable")

    def _next_request(self) -> tuple[bytes, int]:
        """This thread's token and next request number; a forked child gets a token of
        its own, so the manager never mistakes its writes for its parent's."""
        ids = self._requests
        if getattr(ids, "pid", None) != os.getpid():
            ids.pid, ids.token, ids.number = os.getpid(), os.urandom(16), 0
        ids.number += 1
        return ids.token, ids.number

    def _session(self, data: bytes) -> Session:
        """Decode a session the store sent, or hand out the value already decoded from the
        same bytes. Sessions are frozen, so sharing one is safe, and a status line or a
        subscriber that reads unchanged sessions again and again skips the decode, which
        costs about as much as the round trip itself."""
        session = self._decoded.get(data)
        if session is None:
            session = session_from_store(data, remember=True)
            if len(self._decoded) >= DECODE_CACHE_SIZE:
                with contextlib.suppress(KeyError, RuntimeError, StopIteration):  # another thread got there first
                    del self._decoded[next(iter(self._decoded))]  # the oldest entry
            self._decoded[data] = session
        return session

    # -- operations -------------------------------------------------------------------------

    def get(self, id: str) -> Session | None:
        """The live session with ``id``, else a recently closed one, else None."""
        if self._shared is not None and type(id) is str:
            session = self._shared.get(id)
            if session is not None:
                return session
        data = self._call("get", id)
        return None if data is None else self._session(data)

    def set(self, session: Session, *, expected_revision: int | None = None) -> Session:
        """Create or replace ``session``; returns it as stored, with its new revision.

        With ``expected_revision`` (0 for "must not exist yet"), raises ConflictError
        instead of overwriting a session another process changed since it was read.
        """
        if not isinstance(session, Session):
            raise ValidationError("session", f"must be a Session, not {type(session).__name__}")
        try:
            revision, pid_start = self._call("set", pack(session), expected_revision)
        except ValidationError as exc:  # a manager from before records (the package was upgraded)
            if exc.field != "session" or not exc.problem.startswith("must be a JSON object"):
                raise
            revision, pid_start = self._call("set", session.to_json(), expected_revision)
        return restamped(session, revision, pid_start)  # checked when it was made: not again

    def remove(self, id: str) -> Session | None:
        """Remove the session with ``id``; returns what was removed, or None."""
        data = self._call("remove", id)
        return None if data is None else session_from_store(data)

    def list_all(self) -> list[Session]:
        """Every live session (closed ones are in :meth:`recently_closed`), in no set order."""
        listed = None if self._shared is None else self._shared.list_all()
        if listed is not None:
            return listed
        return self._list_all_socket()

    def _list_all_socket(self) -> list[Session]:
        """``list_all`` over the socket. The manager is sent the epoch and revision of this
        client's last listing and answers None if it is still current, which costs it a
        comparison; else it sends the sessions with their ids and revisions, and a session
        listed before at the same (id, revision) is the same value, taken from the last
        listing without looking at its bytes (keying every session by its bytes cost
        hashing ~120 KB for 100 sessions on every call); only the others go through
        :meth:`_session`."""
        last = self._listing
        try:
            reply = self._call("list_all", *((None, 0) if last is None else (last.epoch, last.revision)))
        except TypeError:  # a manager started before list_all took them (the package was upgraded)
            return [self._session(data) for data in self._call("list_all")]
        if reply is None and last is not None:
            return list(last.sessions)
        epoch, revision, index, datas = reply
        ids, revisions = orjson.loads(index)
        # Another epoch is another store, whose revisions mean other sessions.
        known = last.by_key if last is not None and last.epoch == epoch else {}
        by_key: dict[tuple[str, int], Session] = {}
        for position, key in enumerate(zip(ids, revisions, strict=True)):
            session = known.get(key)
            by_key[key] = self._session(datas[position]) if session is None else session
        sessions = list(by_key.values())
        self._listing = _Listing(epoch, revision, by_key, sessions)  # one assignment: threads see all or none
        return list(sessions)

    def transition(self, id: str, status: Status | str) -> Session:
        """Move session ``id`` to ``status``, recording the transition; returns the result."""
        return self._session(self._call("transition", id, check_status(status)))

    def add_usage(self, id: str, input_tokens: int = 0, output_tokens: int = 0) -> Session:
        """Add token counts to session ``id`` atomically; returns the result."""
        return self._session(self._call("add_usage", id, input_tokens, output_tokens))

    def report(
        self,
        id: str,
        status: Status | str,
        working_dir: str,
        *,
        pid: int | None = None,
        session_id: str | None = None,
        agent_type: AgentType | str = AgentType.CLAUDE_CODE,
        reason: str | None = None,
        at: float | None = None,
    ) -> Session:
        """What an agent's hook reports, in one atomic step: create session ``id`` if it is
        new, else move it to ``status`` (recording a transition only if the status changed).
        Either way it counts as activity. Reporting on a recently closed session resumes it.
        A report that closes it records ``closed_reason`` ``session_end``, or
        ``session_end:REASON`` given the agent's ``reason`` (e.g. ``logout``). ``at`` is when
        the agent fired the event (epoch seconds): a report of an event older than the
        session's ``last_event`` only counts as activity (see :meth:`Store.report`).
        """
        args: tuple[Any, ...] = (id, check_status(status), working_dir, pid, session_id, agent_type)
        if at is not None:
            args += (reason, at)
        elif reason is not None:
            args += (reason,)  # only what is given, so that a manager from before `at` takes it
        return self._session(self._call("report", *args))

    def recently_closed(self) -> list[Session]:
        """Sessions that ended, newest first, kept (with their resume ids) up to a limit."""
        return [self._session(data) for data in self._call("recently_closed")]

    def prune(self, older_than: float) -> int:
        """Forget recently closed sessions that closed ``older_than`` seconds ago or more;
        returns how many."""
        return int(self._call("prune", older_than))

    def reap(self) -> int:
        """Make the manager look for dead agents and stale sessions now (it also does so on
        its own every few seconds); returns how many sessions it changed."""
        return int(self._call("reap"))

    def info(self) -> dict[str, Any]:
        """How the manager is, as plain values: ``pid``, ``started`` (epoch seconds),
        ``epoch``, ``revision``, ``live`` and ``closed`` session counts, and from the serving
        manager ``address``, ``clients`` (connected now, this one included), ``uss`` (bytes of
        memory only it uses, or None) and ``state`` (its state file and last save, or None)."""
        return dict(self._call("info"))

    def revision(self) -> int:
        """The store-wide revision: how many changes the store has made."""
        return int(self._call("revision"))

    # -- the change feed ----------------------------------------------------------------------

    def snapshot(self) -> Snapshot:
        """Every session with the revision they are at, taken atomically: the point a
        subscriber starts following :meth:`changes` from."""
        taken = None if self._shared is None else self._shared.snapshot()
        if taken is not None:
            return taken
        return Snapshot.from_json(self._call("snapshot"))

    def changes(
        self, after_revision: int, timeout: float = 0.0, epoch: str | None = None, limit: int = 1000
    ) -> Changes:
        """The events after revision ``after_revision``, in order.

        Returns at once when there are any, else waits in the manager up to ``timeout``
        seconds (at most 60) for one. Raises :class:`ResyncRequiredError` when the log no
        longer reaches back to ``after_revision``, or the store is not the one of ``epoch``. At most
        ``limit`` events come back (fewer if they would make too large a reply): ask again
        from the last one's revision for the rest.
        """
        # The manager validates timeout; the client only needs a sane figure to wait for.
        wait = timeout if type(timeout) in (int, float) and 0 < timeout <= MAX_WAIT else 0.0
        return Changes.from_json(self._call("changes", after_revision, timeout, epoch, limit, wait=float(wait)))

    def watch(self, after_revision: int | None = None, *, poll: float = 1.0) -> Watch:
        """Follow every change from now (or from revision ``after_revision``): see :class:`Watch`."""
        return Watch(self, after_revision, poll=poll)


class Watch:
    """An endless, lossless iterator over the store's changes.

    It starts from a snapshot (yielded as an event of kind ``snapshot``), unless given a
    revision to continue after (``after_revision``), and then yields every change in revision order. When the
    manager's log has moved on past it, or the manager restarted, it takes a new snapshot
    and yields that, so a slow subscriber catches up instead of silently going stale.
    :attr:`sessions` and :attr:`revision` are the state rebuilt from the events yielded so
    far (events fetched but not yet yielded do not count): the live sessions (a ``close``
    event takes one out). Iteration ends after :meth:`close`, within ``poll`` seconds if it
    was waiting. Errors of the store (:class:`StoreUnavailableError`) are raised, never
    swallowed; a :class:`Follower` reconnects instead.
    """

    def __init__(self, client: Client, after_revision: int | None = None, *, poll: float = 1.0) -> None:
        self.client = client
        self.poll_interval = poll
        #: The revision of the last event yielded; None before the first snapshot.
        self.revision = after_revision
        #: The sessions as the events yielded so far have left them.
        self.sessions: dict[str, Session] = {}
        #: How many snapshots the watch has taken (1 at the start, more on each resync).
        self.snapshots = 0
        self._epoch: str | None = None
        self._fetched = after_revision  # the revision of the last event fetched
        self._pending: deque[Event] = deque()
        self._closed = False

    def __iter__(self) -> Watch:
        return self

    def __next__(self) -> Event:
        while not self._closed:
            event = self.poll(self.poll_interval)
            if event is not None:
                return event
        raise StopIteration

    def __enter__(self) -> Watch:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._closed = True

    def poll(self, timeout: float) -> Event | None:
        """The next event, or None if none came within ``timeout`` seconds."""
        if not self._pending:
            self._fetch(timeout)
        if not self._pending:
            return None
        event = self._pending.popleft()
        if event.kind is EventKind.SNAPSHOT:
            self.sessions = {s.id: s for s in event.sessions or ()}
        elif event.session is None or event.session.closed:  # removed, closed, or changed while closed
            self.sessions.pop(event.id or "", None)
        else:
            self.sessions[event.session.id] = event.session
        self.revision = event.revision
        return event

    def _fetch(self, timeout: float) -> None:
        if self._fetched is not None:
            try:
                changes = self.client.changes(self._fetched, timeout, self._epoch)
            except ResyncRequiredError:
                pass
            else:
                self._epoch = changes.epoch
                if changes.events:
                    self._fetched = changes.events[-1].revision
                self._pending.extend(changes.events)
                return
        snapshot = self.client.snapshot()
        self._epoch, self._fetched = snapshot.epoch, snapshot.revision
        self.snapshots += 1
        self._pending.append(Event(snapshot.revision, EventKind.SNAPSHOT, None, sessions=snapshot.sessions))


@dataclasses.dataclass(frozen=True, slots=True)
class Backoff:
    """How long a :class:`Follower` waits before each try to reach the manager again:
    ``first`` seconds, doubling at each failed try up to ``cap``. Each wait is drawn at
    random between half and all of that, so that the followers of one restarted manager
    do not all call it at the same instant."""

    first: float = 0.1
    cap: float = 2.0

    def __post_init__(self) -> None:
        for name in ("first", "cap"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= MAX_WAIT:
                raise ValidationError(
                    f"backoff.{name}", f"must be a number of seconds in (0, {MAX_WAIT}]; got {value!r}"
                )
        if self.cap < self.first:
            raise ValidationError("backoff.cap", f"must be at least first ({self.first!r}); got {self.cap!r}")

    def delay(self, attempt: int, draw: float | None = None) -> float:
        """The wait after failed try number ``attempt`` (1, 2, ...); ``draw`` in [0, 1)
        replaces the random draw (for tests)."""
        full = min(self.cap, self.first * 2.0 ** min(max(attempt, 1) - 1, 64))
        return full * (0.5 + 0.5 * (random.random() if draw is None else draw))


class Link(enum.StrEnum):
    """Whether a :class:`Follower` is following the manager."""

    LIVE = "live"
    RECONNECTING = "reconnecting"


@dataclasses.dataclass(frozen=True, slots=True)
class Notice:
    """Not a change: news of a :class:`Follower`'s connection, for a UI to show.

    ``link`` is ``reconnecting`` after each failed try (``attempt`` counts them, ``retry_in``
    is the wait before the next one, ``problem`` says what failed), or ``live`` once the
    manager answers again; ``resynced`` then says the follower started again from a fresh
    snapshot (the manager restarted, or its log moved on meanwhile), which comes next.
    """

    link: Link
    message: str
    attempt: int = 0
    retry_in: float = 0.0
    problem: StoreUnavailableError | None = None
    resynced: bool = False


class _OwnClient(Client):
    """A follower's own client. Once closed it never connects again, so that a follower
    closed from another thread ends at once instead of making a second try at a hung
    manager (which would take up to the timeout)."""

    _shut = False

    def close(self) -> None:
        self._shut = True
        super().close()

    def _get_proxy(self, deadline: float) -> StoreProxy:
        if self._shut:
            raise StoreUnavailableError("the follower was closed", address=addr.format_address(self.address))
        return super()._get_proxy(deadline)


class Follower:
    """A :class:`Watch` that survives the manager: an endless iterator over the store's
    changes, interleaved with :class:`Notice` values about the connection.

    When a call fails with :class:`StoreUnavailableError` (the manager died, or did not
    answer within the client's timeout because it hangs), the follower yields a ``reconnecting``
    notice and tries again after a :class:`Backoff` wait, with a notice for each failed
    try. When the manager answers, it yields a ``live`` notice and carries on: from the
    log if it is the same manager and its log still reaches back, else from a fresh
    snapshot (a ``snapshot`` event, as a :class:`Watch` yields one), since a restarted
    manager has a new epoch. Other errors are raised.

    The follower uses a client of its own, made with ``client``'s address, authkey and
    timeout, so :meth:`close` may be called from any thread: it ends a call in flight and
    a back-off wait at once, and iteration stops. :attr:`sessions` and :attr:`revision`
    are the state rebuilt from the events yielded so far; :attr:`link` and
    :attr:`problem` are the connection's state now.
    """

    def __init__(
        self,
        client: Client,
        after_revision: int | None = None,
        *,
        poll: float = 1.0,
        backoff: Backoff | None = None,
    ) -> None:
        # Over the socket only, its snapshot too: the connection it long-polls on then exists
        # from the start, so close() can end a call to a hung manager at once (a connection
        # still being made cannot be shut down).
        self.client = _OwnClient(client.address, client._authkey, timeout=client.timeout, shared_memory=False)
        self.backoff = Backoff() if backoff is None else backoff
        self.poll_interval = poll
        #: ``live``, or ``reconnecting`` between a failed call and the next one that works.
        self.link = Link.LIVE
        #: The last failure while reconnecting; None while live.
        self.problem: StoreUnavailableError | None = None
        #: Failed tries since the follower was last live.
        self.attempt = 0
        self._watch = Watch(self.client, after_revision, poll=poll)
        self._retry_at = 0.0
        self._held: deque[Event] = deque()  # an event fetched with the news that the manager is back
        # Set by close(), from any thread; back-off waits wait on it, so closing ends them.
        self._closed = threading.Event()

    @property
    def sessions(self) -> dict[str, Session]:
        """The live sessions as the events yielded so far have left them."""
        return self._watch.sessions

    @property
    def revision(self) -> int | None:
        """The revision of the last event yielded; None before the first snapshot."""
        return self._watch.revision

    @property
    def snapshots(self) -> int:
        """How many snapshots the follower has taken (1 at the start, more on each resync)."""
        return self._watch.snapshots

    def __iter__(self) -> Follower:
        return self

    def __next__(self) -> Event | Notice:
        while not self._closed.is_set():
            item = self.poll(self.poll_interval)
            if item is not None:
                return item
        raise StopIteration

    def __enter__(self) -> Follower:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def close(self) -> None:
        """Stop following; safe from any thread, and more than once."""
        self._closed.set()
        self._watch.close()
        self.client.close()

    def poll(self, timeout: float) -> Event | Notice | None:
        """The next event or notice, or None if none came within ``timeout`` seconds
        (or the follower was closed). While reconnecting, the next try waits for its
        back-off, however often this is called."""
        deadline = time.monotonic() + timeout
        if self._closed.is_set():
            return None
        if self._held:
            return self._held.popleft()
        if self.link is Link.RECONNECTING and not self._wait_for_retry(deadline):
            return None
        snapshots = self._watch.snapshots
        try:
            event = self._watch.poll(max(0.0, deadline - time.monotonic()))
        except StoreUnavailableError as exc:
            return None if self._closed.is_set() else self._failed(exc)
        if self.link is Link.RECONNECTING:
            if event is not None:
                self._held.append(event)
            return self._back(resynced=self._watch.snapshots > snapshots)
        return event

    def _wait_for_retry(self, deadline: float) -> bool:
        """Wait for the next try's time, but not past ``deadline``; True if it has come."""
        wait = min(self._retry_at, deadline) - time.monotonic()
        if wait > 0 and self._closed.wait(wait):
            return False
        return not self._closed.is_set() and time.monotonic() >= self._retry_at

    def _failed(self, exc: StoreUnavailableError) -> Notice:
        self.link, self.problem = Link.RECONNECTING, exc
        self.attempt += 1
        delay = self.backoff.delay(self.attempt)
        self._retry_at = time.monotonic() + delay
        message = f"{exc}; reconnecting (try {self.attempt + 1} in {delay:.1f} s)"
        return Notice(Link.RECONNECTING, message, attempt=self.attempt, retry_in=delay, problem=exc)

    def _back(self, *, resynced: bool) -> Notice:
        tries = self.attempt
        self.link, self.problem, self.attempt = Link.LIVE, None, 0
        where = addr.format_address(self.client.address)
        if resynced:
            message = f"reconnected to {where} after {tries} failed tries; resynced from a fresh snapshot"
        else:
            message = f"reconnected to {where} after {tries} failed tries; no change was missed"
        return Notice(Link.LIVE, message, resynced=resynced)


def _describe(exc: BaseException, timeout: float) -> str:
    if isinstance(exc, TimeoutError):
        return f"no reply within {timeout:g} s"
    if isinstance(exc, EOFError):
        return "the connection was closed"
    if isinstance(exc, managers.RemoteError):  # its text is a whole remote traceback
        lines = [line for line in str(exc).splitlines() if line.strip(" -")]
        return lines[-1] if lines else "remote error"
    return str(exc) or type(exc).__name__


def connect(
    address: wire.Address | os.PathLike[str] | None = None,
    authkey: bytes | str | None = None,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    shared_memory: bool = True,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
) -> Client:
    """Connect to the manager at ``address`` (default: the per-user socket); ``shared_memory``
    and ``max_connections`` are :class:`Client`'s.

    The authkey defaults to ``$SHMSTORE_AUTHKEY``, else the key file beside the socket.
    Raises :class:`StoreUnavailableError` or :class:`AuthKeyError` at once if the
    manager cannot be used, rather than at the first call.
    """
    return Client(
        address, authkey, timeout=timeout, shared_memory=shared_memory, max_connections=max_connections
    ).connect()
