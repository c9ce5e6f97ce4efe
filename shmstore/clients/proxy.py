"""The manager's store seen from a client process: :class:`StoreProxy`, the call envelope
and a small pool of connections that a client's threads share."""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import multiprocess
from multiprocess import managers

from ..errors import StoreUnavailableError, ValidationError
from ..transport import address as addr
from ..transport import wire

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
        # A connection in _busy is used by the one thread that took it, for a call that
        # waits in the manager (True: changes() with a timeout) or not. Each kind has its own
        # max_connections: calls that wait up to a minute must not starve those that do not.
        self._pool = threading.Condition(threading.Lock())
        self._idle: list[wire.Connection] = []  # the most recently used last
        self._busy: dict[wire.Connection, bool] = {}
        self._opening = {False: 0, True: 0}
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

    def _take(self, deadline: float, waits: bool) -> wire.Connection:
        """A connection for one call (``waits``: one that waits in the manager): an idle
        one, else a new one if that kind has room, else the first given back by
        ``deadline``."""
        self._forget_if_forked()
        with self._pool:
            while True:
                if self._idle:
                    idle = self._idle.pop()
                    self._busy[idle] = waits
                    return idle
                in_use = sum(1 for kind in self._busy.values() if kind is waits) + self._opening[waits]
                if in_use < self.max_connections:
                    self._opening[waits] += 1
                    break
                if not self._pool.wait(seconds_left(deadline)) and time.monotonic() >= deadline:
                    where = addr.format_address(self._token.address)
                    raise StoreUnavailableError(
                        f"all {self.max_connections} connections of this client to {where} stayed in use by other "
                        "threads (Client's max_connections)",
                        address=where,
                    )
        conn = None
        try:
            conn = wire.Client(self._token.address, authkey=bytes(self._authkey), timeout=seconds_left(deadline))
            managers.dispatch(conn, None, "accept_connection", (_thread_name(),))
        except BaseException:
            if conn is not None:
                conn.close()
            raise
        finally:
            with self._pool:
                self._opening[waits] -= 1
                if conn is not None and not conn.closed:
                    self._busy[conn] = waits
                self._pool.notify_all()
        return conn

    def _give_back(self, conn: wire.Connection) -> None:
        with self._pool:
            if self._busy.pop(conn, None) is not None:
                if self._shut or conn.closed:
                    conn.close()
                else:
                    self._idle.append(conn)
            self._pool.notify_all()

    def call(self, method: str, args: tuple[Any, ...], deadline: float, waits: bool = False) -> Any:
        """Call ``method`` in the manager; connecting and the reply must all be done by
        ``deadline`` (``time.monotonic()``). ``waits``: the call waits in the manager."""
        conn = self._take(deadline, waits)
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
            self._busy.pop(conn, None)
            conn.close()
            self._pool.notify_all()

    def connections(self) -> int:
        """How many connections this proxy holds now (idle, in use, and being opened)."""
        with self._pool:
            return len(self._idle) + len(self._busy) + sum(self._opening.values())

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


def seconds_left(deadline: float) -> float:
    """Seconds until ``deadline``, never quite zero (a zero timeout means something else)."""
    return max(0.001, deadline - time.monotonic())


def _thread_name() -> str:
    return f"{multiprocess.current_process().name}|{threading.current_thread().name}"
