"""The client: typed calls on a manager found by address and authkey (or on a Redis store).

A :class:`Client` speaks to the manager's store through a proxy
(:class:`~shmstore.clients.proxy.StoreProxy`) whose small pool of connections its threads
share. The client turns sessions into bytes and back, sends every write through the
manager's ``once`` with a request number, tries a call whose connection failed once more
on a fresh connection, and turns transport failures into :class:`StoreUnavailableError`,
so that a dead or hung manager is an error, never a hang and never another call's reply.
A client outlives a manager restart at the same address, and a process forked from one
that used it connects afresh.

:class:`Watch` follows the change feed and raises when the manager is gone; a
:class:`~shmstore.clients.follow.Follower` follows it through restarts and hangs.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import weakref
from collections import deque
from typing import Any, NamedTuple

import orjson
from multiprocess import managers

from ..backend import WRITES
from ..checks import MAX_WAIT
from ..errors import ResyncRequiredError, ShmstoreError, StoreUnavailableError, ValidationError
from ..feed import Changes, Event, EventKind, Snapshot
from ..model import AgentType, Session, Status, Terminal, check_status
from ..record import pack, restamped, session_from_store
from ..redis.address import RedisAddress
from ..transport import address as addr
from ..transport import segment, wire
from .proxy import DEFAULT_MAX_CONNECTIONS, StoreProxy, seconds_left
from .shared import SharedReads

DEFAULT_TIMEOUT = wire.DEFAULT_TIMEOUT
#: Decoded sessions a client keeps, keyed by the exact bytes they came from.
DECODE_CACHE_SIZE = 1024


class _Listing(NamedTuple):
    """A client's last ``list_all``: the epoch and revision the manager listed it at, and
    its sessions, by (id, revision) and in order."""

    epoch: str
    revision: int
    by_key: dict[tuple[str, int], Session]
    sessions: list[Session]


#: The types a call's arguments may have: what the manager can unpickle and validate (and
#: a flat list of them: a report's terminal).
_SENDABLE = frozenset({str, int, float, bool, bytes, type(None), Status, AgentType})


class Client:
    """Operations on the sessions of one manager. Safe to share between threads.

    Every method is one round trip and one atomic operation in the manager, but for the
    reads ``get``, ``list_all`` and ``snapshot``, which with ``shared_memory`` (the default,
    on a unix socket, on x86-64 Linux: :func:`shmstore.transport.segment.supported`) come from the
    manager's shared segment with no round trip, and are the same atomic answers (see
    :mod:`shmstore.clients.shared`); ``shared_memory=False`` never maps it. Errors are
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
                from ..redis.proxy import RedisProxy
            except ImportError as exc:
                raise StoreUnavailableError(str(exc), address=str(self.address)) from None
            return RedisProxy(self.address, self.timeout)  # type: ignore[return-value]
        assert not isinstance(self.address, RedisAddress)
        key = self._authkey if self._authkey is not None else addr.read_key(self.address)
        where = addr.format_address(self.address)
        try:
            conn = wire.Client(self.address, authkey=key, timeout=seconds_left(deadline))
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
        return wire.Client(self.address, authkey=bytes(proxy._authkey), timeout=seconds_left(deadline))

    def _call(self, method: str, *args: Any, wait: float = 0.0) -> Any:
        """One call, tried once more on a fresh connection if its connection failed or
        timed out. Writes go through the manager's ``once`` with this thread's next request
        number, so the second try is never applied twice (exactly once, when the manager
        answers it). Each try, connecting included, has ``timeout`` (plus ``wait``) in all,
        so a call gives up after at most twice that."""
        for arg in args:
            if type(arg) not in _SENDABLE and not (type(arg) is list and all(type(item) in _SENDABLE for item in arg)):
                raise ValidationError("arguments", f"{method}() takes plain values, not {type(arg).__name__}")
        if method in WRITES:  # sent through the manager's once()
            args = (*self._next_request(), method, *args)
            method = "once"
        for attempt in (1, 2):
            deadline = time.monotonic() + self.timeout + wait
            proxy = self._get_proxy(deadline)
            try:
                return proxy.call(method, args, deadline, waits=wait > 0)
            except ShmstoreError:
                raise
            except (EOFError, OSError, managers.RemoteError) as exc:
                # The next call makes a fresh proxy (the manager may be a new one). Other
                # threads' calls in flight on this one are left to finish.
                with self._proxy_lock:
                    if self._proxy is proxy:
                        self._proxy = None
                proxy.retire()
                # Refused (NOPERM, a socket we may not open): trying again is refused again,
                # and a write must never be sent twice on the strength of an error that says
                # nothing about whether it was made.
                if attempt == 2 or isinstance(exc, managers.RemoteError | PermissionError):
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
        subagent: str | None = None,
        background: str | None = None,
        pid_start: int | None = None,
        terminal: Terminal | None = None,
    ) -> Session | None:
        """What an agent's hook reports, in one atomic step: create session ``id`` if it is
        new, else move it to ``status`` (recording a transition only if the status changed).
        Either way it counts as activity. Reporting on a recently closed session resumes it.
        A report that closes it records ``closed_reason`` ``session_end``, or
        ``session_end:REASON`` given the agent's ``reason`` (e.g. ``logout``); one that
        closes a session the store does not hold changes nothing and returns None. ``at``
        is when the agent fired the event (epoch seconds), ``subagent`` the subagent that
        fired it, ``background`` the agent's background job, ``pid_start`` the agent's
        start time as read when the event fired, ``terminal`` where the agent runs: see
        :meth:`Store.report`.
        """
        args: tuple[Any, ...] = (id, check_status(status), working_dir, pid, session_id, agent_type)
        where = None if terminal is None else terminal.as_list()
        extra: tuple[Any, ...] = (reason, at, subagent, background, pid_start, where)
        while extra and extra[-1] is None:  # only what is given, so that an older manager takes it
            extra = extra[:-1]
        data = self._call("report", *args, *extra)
        return None if data is None else self._session(data)

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
