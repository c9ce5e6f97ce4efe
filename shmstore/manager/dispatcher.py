"""The manager's dispatcher: it accepts and authenticates connections, bounds them, serves
each client's calls on the store, and drains them when the manager stops.

The stock ``multiprocess`` server supplies the listener and the registry; :class:`Dispatcher`
bounds the handshake and the connections, keeps slots for hook reports, tells the store who
is calling, answers calls itself (the store is the only object, its
:data:`~shmstore.backend.EXPOSED` methods the only calls), hands the shared segment to
readers, and drains every connection at a stop (:meth:`Dispatcher.drain`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import socket
import threading
import time
from typing import Any

from multiprocess import managers

from .. import procs
from ..backend import EXPOSED
from ..config import ServeOptions
from ..errors import AuthKeyError, StoreUnavailableError, ValidationError
from ..store import Store
from ..transport import address as addr
from ..transport import segment, wire

log = logging.getLogger("shmstore.manager")


class Dispatcher(managers.Server):
    """The stock manager server (this process's dispatcher of calls), made safe to leave
    running next to crashing processes and hostile neighbours, and to stop without losing
    a write it acknowledged.

    The stock one starts a thread per accepted connection and waits for the peer's half of
    the authentication handshake for ever, answers a wrong key with a pickled traceback,
    and its accept loop retries at once on any error, so a peer that connects and says
    nothing, or running out of file descriptors, could stop service. Here the whole
    handshake (both proofs of the key and the first request) must be done within
    ``handshake_timeout``; a peer that fails it is closed without a word (and logged); at
    most ``max_connections`` are open at once (more are told the manager is full), of which
    :func:`report_slots` are kept for connections that make one call and go (a hook's
    report, a client's ``create``), so that a process holding many connections cannot
    turn the hooks away; and a failing ``accept`` backs off instead of spinning.

    Calls are served by :meth:`serve_calls`, not the stock loop: the store is the only
    object, and its :data:`EXPOSED` methods the only calls. :meth:`drain` ends every
    connection once its call in flight has been answered, which is how a stop loses no
    acknowledged write (see :func:`serve`).
    """

    def __init__(self, *args: Any, store: Store, options: ServeOptions) -> None:
        super().__init__(*args)
        self.store = store
        self.options = options
        self._long_lived_limit = options.max_connections - report_slots(options.max_connections)
        # Guards _open (each open connection -> the thread serving it), _long_lived (how many
        # of them are a client's lasting connection) and _stopping. A connection leaves _open
        # before it is closed, and drain() shuts connections down only while holding the
        # lock, so it never touches a descriptor that was closed (and maybe reused).
        self._lock = threading.Lock()
        self._open: dict[wire.Connection, threading.Thread] = {}
        self._long_lived = 0
        self._stopping = False

    def connections(self) -> int:
        """How many connections are open now, handshakes included."""
        with self._lock:
            return len(self._open)

    def accepter(self) -> None:
        while True:
            try:
                conn = self.listener.accept()
            except OSError:
                if self.listener.closed:
                    return  # serve() is on its way out
                time.sleep(0.05)  # e.g. EMFILE: give connections time to close
                continue
            conn.deadline = time.monotonic() + self.options.handshake_timeout
            with self._lock:
                stopping = self._stopping
                admitted = not stopping and len(self._open) < self.options.max_connections
                if admitted:
                    thread = threading.Thread(target=self._handle, args=(conn,), daemon=True)
                    self._open[conn] = thread
                    thread.start()
            if stopping:
                conn.close()  # accepted as the listener closed: its client sees the manager gone
            elif not admitted:
                log.warning("refused a connection: all %d slots are taken", self.options.max_connections)
                wire.refuse_as_full(conn)

    def _handle(self, conn: wire.Connection) -> None:
        lasting = False
        try:
            try:
                wire.handshake_as_server(conn, self.authkey)
                request = conn.recv()
                _, name, args, kwds = request
                if name not in _FIRST_REQUESTS:
                    raise AuthKeyError(f"first request {name!r} is not one a client makes")
                # This thread serves this one client: what the store needs to know of it.
                procs.caller.same_pid_namespace = procs.peer_same_pid_namespace(conn.fileno())
            except (AuthKeyError, EOFError, OSError, ValueError, TypeError, pickle.UnpicklingError) as exc:
                self._handshake_failed(exc)
                return
            if name in _LASTING:
                lasting = self._admit_lasting()
                if not lasting:
                    conn.send(("#ERROR", self._full()))
                    return
            if name == "accept_connection":
                conn.deadline = None  # authenticated: a client may stay idle as long as it likes
                conn.send(("#RETURN", None))
                self.serve_calls(conn)
            elif name == "segment":
                self._share_segment(conn)
            elif name in _ONE_SHOT:  # one call on a connection of its own: a hook's report, a glance
                _reply(conn, self._answer(name, args, kwds))
            else:
                conn.send(("#RETURN", self.create(conn, *args, **kwds)))
        except Exception as exc:  # an authenticated client's bad request, or its connection failing
            log.info("a connection ended: %s", _why(exc))
        finally:
            with self._lock:
                del self._open[conn]
                if lasting:
                    self._long_lived -= 1
            conn.close()

    def _handshake_failed(self, exc: BaseException) -> None:
        with self._lock:
            ours = self._stopping and isinstance(exc, EOFError)
        if ours:  # drain() shut it down for reading: nothing the peer did (as far as can be told)
            log.debug("closed a connection in its handshake at stop")
        else:
            log.warning("closed a connection that did not complete the handshake: %s", _why(exc))

    def _admit_lasting(self) -> bool:
        """Count one more lasting connection, unless that would leave fewer than
        report_slots() for connections that make one call and go."""
        with self._lock:
            if self._long_lived >= self._long_lived_limit:
                return False
            self._long_lived += 1
            return True

    def _full(self) -> StoreUnavailableError:
        where = addr.format_address(self.address)
        limit, kept = self.options.max_connections, report_slots(self.options.max_connections)
        return StoreUnavailableError(
            f"the manager at {where} is serving as many clients as it may (max_connections {limit}, of which "
            f"{kept} are kept for hook reports); close clients that are not needed, or try again later",
            address=where,
        )

    def serve_calls(self, conn: wire.Connection) -> None:
        """Answer one client's calls, one at a time, until it hangs up (or :meth:`drain`
        ends the connection, after the call in flight is answered)."""
        while True:
            try:
                request = conn.recv()
            except EOFError:
                return
            try:
                _, name, args, kwds = request
            except (TypeError, ValueError):
                conn.send(("#TRACEBACK", f"a request is (ident, method, args, kwds), not {request!r:.80}"))
                continue
            _reply(conn, self._answer(name, args, kwds))

    def _answer(self, name: object, args: Any, kwds: Any) -> tuple[str, Any]:
        """The reply to one call: ``#RETURN`` and the result, ``#ERROR`` and the exception
        the store raised (the client raises it as it is), or ``#TRACEBACK`` and a text for
        a call that is not one (the client raises a RemoteError)."""
        if name not in _EXPOSED:
            return "#TRACEBACK", f"{name!r:.80} is not a method the store exposes ({', '.join(EXPOSED)})"
        try:
            return "#RETURN", getattr(self.store, name)(*args, **kwds)
        except Exception as exc:
            return "#ERROR", exc

    def drain(self, deadline: float) -> None:
        """End every connection once it has nothing in flight: no more requests are read
        from any (each is shut down for reading), the call a thread is serving is answered,
        and the thread ends. Connections whose threads are still busy at ``deadline`` (a
        client that does not take its reply) are then shut down whole. Returns once every
        thread has ended, or a second past ``deadline``. The listener is closed first, by
        the caller: no new connection comes."""
        with self._lock:
            self._stopping = True
            threads = list(self._open.values())
            for conn in self._open:
                conn.shutdown(socket.SHUT_RD)
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        with self._lock:
            busy = len(self._open)
            for conn in self._open:
                conn.shutdown()
        if busy:
            log.warning("cut %d connections whose calls were still under way at the drain's deadline", busy)
        for thread in threads:
            thread.join(max(0.0, deadline + 1.0 - time.monotonic()))

    def _share_segment(self, conn: wire.Connection) -> None:
        """Reply whether a segment follows, send it (its fd, SCM_RIGHTS: only on a unix
        socket, never TCP), then keep the connection open, idle, until the client closes it:
        the client polls it to know that this manager is alive before it trusts the segment."""
        _LIVENESS.add(conn)  # before the client can have the segment, so before any fork it makes
        try:
            self._send_segment(conn)
            conn.deadline = None
            with contextlib.suppress(EOFError):  # the client closed it; anything it sends ends it too
                conn.recv()
        finally:
            _LIVENESS.discard(conn)

    def _send_segment(self, conn: wire.Connection) -> None:
        """Reply whether a segment follows, and send it if so (the store lock is not held)."""
        with contextlib.ExitStack() as closing:
            shared = None
            if _is_unix(conn) and segment.supported():
                try:
                    shared = self.store.shared_segment(_new_segment)
                except OSError as exc:  # e.g. out of memory: clients read over the socket
                    log.error("cannot share the sessions in memory: %s", exc)
            if shared is not None:
                closing.callback(os.close, shared[0])
            conn.send(("#RETURN", shared is not None))
            if shared is not None:
                sock = socket.socket(fileno=conn.fileno())
                try:
                    segment.send_segment(sock, shared[1], fd=shared[0])
                finally:
                    sock.detach()


#: The manager's ends of the connections its segment's readers poll for its liveness. A
#: process forked from the manager's (an application that embeds one, then forks a worker)
#: closes its copies at once: else, the manager killed, each reader would find its
#: connection still open, held by the fork, and read the dead manager's last sessions as
#: current. A set, as the child runs one thread and takes no lock a parent's thread held.
_LIVENESS: set[wire.Connection] = set()


def _close_liveness_in_child() -> None:
    for conn in list(_LIVENESS):
        with contextlib.suppress(OSError):
            conn.close()  # this process's copy; the handle is then None, never closed twice
    _LIVENESS.clear()


os.register_at_fork(after_in_child=_close_liveness_in_child)


def _why(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


#: What a new connection may ask first: a client's proxy (``create``, then a lasting
#: connection with ``accept_connection``), the shared segment, or one write (``once``).
#: What a connection of its own may ask once, with no proxy made for it: a hook's report
#: (``once``) and ``status --line``'s listing (:mod:`shmstore.clients.glance`).
_ONE_SHOT = frozenset({"once", "list_all"})
_FIRST_REQUESTS = frozenset({"create", "accept_connection", "segment"}) | _ONE_SHOT
#: First requests after which a connection stays open for as long as its client likes.
_LASTING = frozenset({"accept_connection", "segment"})
_EXPOSED = frozenset(EXPOSED)


def _reply(conn: wire.Connection, answer: tuple[str, Any]) -> None:
    """Send ``answer``; one that cannot be sent (it does not pickle, or is larger than a
    message may be: nothing was sent) is answered with why, as a remote failure."""
    try:
        conn.send(answer)
    except ValidationError as exc:
        conn.send(("#UNSERIALIZABLE", f"ValidationError: {exc}"))


def report_slots(max_connections: int) -> int:
    """Of ``max_connections``, how many lasting connections may never take: a sixteenth
    (16 of the default 256), kept for connections that make one call and go, so that a
    process holding connections by the hundred (a thread each, say) cannot turn a hook
    away. Fewer than 16 connections in all keep none."""
    return max_connections // 16


def dispatcher_for(store: Store, address: wire.Address, authkey: bytes, options: ServeOptions) -> Dispatcher:
    """A dispatcher whose only shared object is ``store``, with only :data:`EXPOSED` callable."""

    class StoreManager(managers.BaseManager):
        pass

    StoreManager.register("store", callable=lambda: store, exposed=EXPOSED)
    return Dispatcher(
        StoreManager._registry,
        address,
        authkey,
        wire.SERIALIZER,
        store=store,
        options=options,
    )


def _is_unix(conn: wire.Connection) -> bool:
    sock = socket.socket(fileno=conn.fileno())
    try:
        return sock.family == socket.AF_UNIX
    finally:
        sock.detach()


#: The slot of one session in the shared segment. A session with the default 20-entry
#: history (two minutes between changes), a 36-character id and resume id, token counts,
#: pid and a 21-character working dir is a 473-byte record (2,045 bytes of public JSON;
#: measured); a slot also holds its id and 24 bytes of header. 768 leaves ~235 bytes for a
#: longer dir; a larger session is marked too big and read over the socket.
SLOT_SIZE = 768
#: Slots a new segment has at least; it doubles when full. Sized for max_sessions from the
#: start, the index alone (16 bytes a slot, touched all over by the hash) took 256 KiB of the
#: manager's memory with 100 sessions (measured); a doubling at 10,000 sessions copies them
#: in ~10 ms.
FIRST_SLOTS = 64


def _new_segment(live: int, epoch: str) -> segment.Segment:
    """The segment a store shares, made in the manager's process (one made before a fork
    would be kept alive by the parent) when the first client asks for it, so that a manager
    whose clients only write (hooks) never pays for it: room for twice the live sessions."""
    return segment.Segment(max(FIRST_SLOTS, 2 * live), SLOT_SIZE, bytes.fromhex(epoch))
