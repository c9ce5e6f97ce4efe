"""A client's reads from the manager's shared segment: ``get``, ``list_all`` and
``snapshot`` with no round trip (the segment, its layout and its guarantees are
:mod:`shmstore.transport.segment`'s).

:class:`SharedReads` asks the manager for its segment on a connection of its own (the
``segment`` request, right after the handshake; a unix socket only, as the fd travels with
``SCM_RIGHTS``), maps it read-only, and keeps that connection open and idle. The manager
never writes on it again, so any event on it (hang-up, end of file) means the manager is
gone: every answer from the segment is given only after polling it (~1 µs), so a dead
manager's last sessions are never presented as current.

Each read answers None when the segment cannot answer it: not attached (TCP, a machine
where :func:`~shmstore.transport.segment.supported` is False, a manager that shares none), the
manager gone, a slot busy for all its tries, a record too big for its slot, an id not
live (recently closed sessions are not in the segment), or no scan of one instant in
:data:`SCANS` tries. The caller then asks over the socket, which raises
StoreUnavailableError when the manager is gone. Attaching that gets no answer within the
client's timeout raises StoreUnavailableError itself, so that a read of an unresponsive
manager gives up within twice the timeout, as a call over the socket does. A segment that moved (the manager grew
it) is left for the new one at once.

The manager writes each change into the segment before it replies, so a client reads its
own writes. That ordering, and a record never being torn, rest on x86-64's (see
:mod:`shmstore.transport.segment`); elsewhere nothing is mapped and every read uses the socket.
"""

from __future__ import annotations

import os
import select
import socket
import threading
import time
import weakref
from collections.abc import Callable

from multiprocess import managers

from ..errors import ShmstoreError, StoreUnavailableError
from ..feed import Snapshot
from ..model import Session
from ..transport import wire
from ..transport.segment import TOO_BIG, Reader, Scan, SegmentBusyError, SegmentMovedError, receive_segment

#: Whole-segment scans tried for one that no change overlapped, before the socket answers.
SCANS = 3
#: After failing to attach (e.g. no manager), the seconds the socket answers before the next try.
RETRY_AFTER = 1.0
_HANG_UP = select.POLLIN | select.POLLRDHUP | select.POLLHUP | select.POLLERR


class SharedReads:
    """One client's map of the manager's segment and the sessions decoded from it.

    ``connect()(deadline)`` opens an authenticated connection to the manager; ``decode()``
    makes a session of a record's bytes (the client's, whose cache hands out the session it
    already decoded from the same bytes, e.g. its own write's reply). Both are the client's
    methods, held weakly (``weakref.WeakMethod``), so the client is never kept alive by a
    reference cycle. Safe to share
    between threads: ``_lock`` guards every field (attaching, a read, closing), since a
    map closed under a reading thread would fail it. A process forked from one that used
    it drops its copies of the parent's map and connection at the fork, and attaches afresh."""

    def __init__(
        self,
        connect: Callable[[], Callable[[float], wire.Connection] | None],
        decode: Callable[[], Callable[[bytes], Session] | None],
        timeout: float,
    ) -> None:
        self._connect = connect
        self._decode = decode
        self._timeout = timeout
        self._check_sequence = True  # False only to show that the stress test catches torn reads
        self._own()
        _EVERY.add(self)

    def _own(self) -> None:
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._conn: wire.Connection | None = None  # open while attached, polled for liveness
        self._poller = select.poll()
        self._reader: Reader | None = None  # None while attached: the manager shares none
        self._retry_at = 0.0
        self._forget_sessions()

    def _forget_sessions(self) -> None:
        # Each slot's session as last decoded, with the slot's seq then: a decode is done
        # once per version of a record (14-25 µs a session, measured: most of a read's cost).
        self._slots: dict[int, tuple[int, Session | None]] = {}  # None: too big for its slot
        self._big: set[int] = set()
        self._where: dict[str, int] = {}  # id -> the slot it was decoded from (checked at use)
        self._known: list[int] | None = None  # every slot's seq at the last scan
        self._listed: list[Session] | None = None  # _slots' sessions, as of the last scan

    # -- reads ----------------------------------------------------------------------------------

    def get(self, id: str) -> Session | None:
        """Live session ``id`` from the segment; None: ask the socket."""
        with self._locked():
            for _ in (1, 2):  # a second time after the segment moved
                reader = self._attached()
                if reader is None:
                    return None
                try:
                    slot = self._where.get(id, -1)
                    seq, session = self._slots.get(slot, (-1, None))
                    if session is not None and session.id == id and reader.sequence(slot) == seq:
                        return session if self._alive() else None  # unchanged since decoded: no copy
                    record = reader.read_record(id)
                except SegmentMovedError:
                    self._detach()
                    continue
                except SegmentBusyError:
                    return None
                if record is None or record.data is TOO_BIG or not self._alive():
                    return None
                session = _current(self._slots.get(record.slot), record.seq)
                if session is not None:
                    return session
                session = self._decoded(record.data)
                self._slots[record.slot] = (record.seq, session)
                self._where[id] = record.slot
                return session
            return None

    def list_all(self) -> list[Session] | None:
        """Every live session (in no set order); None: ask the socket."""
        with self._locked():
            scan = self._scan()
            return None if scan is None or self._listed is None else list(self._listed)

    def snapshot(self) -> Snapshot | None:
        with self._locked():
            scan = self._scan()
            if scan is None or self._reader is None or self._listed is None:
                return None
            return Snapshot(self._reader.epoch.hex(), scan.revision, tuple(self._listed))

    def _scan(self) -> Scan | None:
        """Bring the decoded sessions up to date with a scan no change overlapped."""
        for _ in (1, 2):  # a second time after the segment moved
            reader = self._attached()
            if reader is None:
                return None
            try:
                for _ in range(SCANS):
                    scan = reader.read_all(self._known)
                    self._update(scan)
                    if scan.consistent:
                        break
                else:
                    return None
            except SegmentMovedError:
                self._detach()
                continue
            except SegmentBusyError:
                return None
            return None if self._big or not self._alive() else scan
        return None

    def _update(self, scan: Scan) -> None:
        if scan.changed:
            old = {slot: self._slots.pop(slot) for slot in scan.changed if slot in self._slots}
            self._big.difference_update(scan.changed)
            for record in scan.records:
                cached = _current(old.get(record.slot), record.seq)
                if record.data is TOO_BIG:
                    self._slots[record.slot] = (record.seq, None)
                    self._big.add(record.slot)
                elif cached is not None:
                    self._slots[record.slot] = (record.seq, cached)
                else:
                    self._slots[record.slot] = (record.seq, self._decoded(record.data))
                    self._where[record.id] = record.slot
            self._listed = None
        self._known = scan.sequences
        if self._listed is None:
            self._listed = [session for _, session in self._slots.values() if session is not None]

    # -- the segment and the manager's liveness ---------------------------------------------------

    def _locked(self) -> threading.Lock:
        """The lock, in this process (a generator context manager would cost ~1 µs a read)."""
        if self._pid != os.getpid():
            self._forget_parent()
        return self._lock

    def _attached(self) -> Reader | None:
        """The segment, attaching if need be; None when there is none to read."""
        if self._conn is not None and self._reader is None:
            self._alive()  # the manager that shares none may have been replaced by one that does
            if self._conn is not None and time.monotonic() >= self._retry_at:
                self._detach()  # or may share one now: it could not (e.g. out of fds), so ask again
        if self._conn is None:
            if time.monotonic() < self._retry_at:
                return None
            deadline = time.monotonic() + self._timeout
            try:
                self._attach(deadline)
            except (ShmstoreError, OSError, EOFError, managers.RemoteError) as exc:
                self._retry_at = time.monotonic() + RETRY_AFTER
                if time.monotonic() >= deadline:
                    # No answer in the client's timeout: the socket would say so too, after
                    # waiting up to twice as long again (a read took 3x its timeout).
                    if isinstance(exc, StoreUnavailableError):
                        raise
                    raise StoreUnavailableError(
                        f"attaching to the manager: no reply within {self._timeout:g} s"
                    ) from None
                return None
        return self._reader

    def _decoded(self, data: bytes) -> Session:
        decode = self._decode()
        if decode is None:
            raise ShmstoreError("the client was freed")
        return decode(data)

    def _attach(self, deadline: float) -> None:
        connect = self._connect()
        if connect is None:
            raise ShmstoreError("the client was freed")
        conn = connect(deadline)
        try:
            conn.deadline = deadline
            reader = None
            if managers.dispatch(conn, None, "segment", ()):  # True: the segment's fd follows
                sock = socket.socket(fileno=conn.fileno())
                try:
                    reader = receive_segment(sock, deadline)
                finally:
                    sock.detach()
                reader._check = self._check_sequence
        except BaseException:
            conn.close()
            raise
        self._conn, self._reader = conn, reader
        if reader is None:
            self._retry_at = time.monotonic() + RETRY_AFTER
        self._poller = select.poll()
        self._poller.register(conn.fileno(), _HANG_UP)

    def _alive(self) -> bool:
        """Whether the manager still holds our connection; if not, let go of its segment."""
        if self._poller.poll(0):
            self._detach()
            return False
        return True

    def _detach(self) -> None:
        conn, reader, self._conn, self._reader = self._conn, self._reader, None, None
        self._forget_sessions()
        if reader is not None:
            reader.close()
        if conn is not None:
            self._poller.unregister(conn.fileno())
            conn.close()

    def close(self) -> None:
        with self._locked():
            self._detach()

    def _forget_parent(self) -> None:
        """In a forked child: close this process's copies of the parent's map and
        connection (the parent's stay open) and start afresh."""
        reader, conn = self._reader, self._conn
        self._own()
        if reader is not None:
            reader.close()
        if conn is not None:
            conn.close()


def _current(decoded: tuple[int, Session | None] | None, seq: int) -> Session | None:
    """The session a slot's cache entry holds, if it was decoded at sequence ``seq``."""
    if decoded is None or decoded[0] != seq:
        return None
    return decoded[1]


#: Every SharedReads of this process, weakly. A forked child closes its copies of their
#: maps and connections at once, not at its first read: a child that never reads (a worker
#: forked for other work) held its parent's connection open, and with it a manager's slot
#: and thread, after the parent closed its client, until the child exited.
_EVERY: weakref.WeakSet[SharedReads] = weakref.WeakSet()


def _forget_parents_in_child() -> None:
    for shared in list(_EVERY):
        if shared._pid != os.getpid():
            shared._forget_parent()


os.register_at_fork(after_in_child=_forget_parents_in_child)
