"""The manager process: accepting and authenticating connections, claiming the address,
and the lifecycle of serving a :class:`~shmstore.store.Store` (in this process with
:func:`serve`, or in a child process with :func:`start_server`).

The stock ``multiprocess`` server supplies the request loop and one thread per client
connection; :class:`_Dispatcher` bounds the handshake and the connections and tells the
store who is calling; :func:`serve` adds the address, the key file, signals, the reaper's
pass, the state file (restored on start, saved while serving and on stop: a
:class:`_StateKeeper`, with :mod:`shmstore.state`'s format) and clean-up.

The manager logs through :mod:`logging` (the ``shmstore`` logger; ``shmstore serve`` sends
it to stderr): its start and stop, connections refused or failing the handshake, sessions
reaped or gone stale with the reason, and state file restores and saves (a periodic save is
logged at DEBUG, since it may come every few seconds; the final one, and any failure, at
INFO and ERROR). The roles, one noun each: the *manager* is the process, the
*dispatcher* serves its connections, the *store* holds the sessions.
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
import signal
import socket
import stat
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import multiprocess
from multiprocess import managers

from . import address as addr
from . import procs, segment, spool, state, wire
from .config import ServeOptions, changed
from .errors import AddressInUseError, AuthKeyError, ShmstoreError, StoreUnavailableError, ValidationError
from .store import EXPOSED, Store

log = logging.getLogger(__name__)


class _Dispatcher(managers.Server):
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
            elif name == "once":  # one write on a connection of its own: a hook's report
                _reply(conn, self._answer("once", args, kwds))
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
            for conn in self._open:
                conn.shutdown()
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
_FIRST_REQUESTS = frozenset({"create", "accept_connection", "segment", "once"})
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


def _dispatcher(store: Store, address: wire.Address, authkey: bytes, options: ServeOptions) -> _Dispatcher:
    """A dispatcher whose only shared object is ``store``, with only :data:`EXPOSED` callable."""

    class StoreManager(managers.BaseManager):
        pass

    StoreManager.register("store", callable=lambda: store, exposed=EXPOSED)
    return _Dispatcher(
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
        os.makedirs(directory, mode=0o700, exist_ok=True)
        addr.check_socket_dir(directory)
    try:
        info = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        raise AddressInUseError(
            f"{address} exists and is {addr.describe(info.st_mode)}, not a socket; shmstore removes only a socket "
            "that a dead manager left. Choose another address, or remove it if you do not need it",
            address=address,
        )
    probe = socket.socket(socket.AF_UNIX)
    probe.settimeout(1.0)
    try:
        probe.connect(address)
    except (ConnectionRefusedError, FileNotFoundError):
        path.unlink(missing_ok=True)  # stale: nobody listens there any more
        return
    except OSError as exc:
        raise AddressInUseError(f"{address} exists and cannot be probed: {exc}", address=address) from None
    finally:
        probe.close()
    raise AddressInUseError(f"a manager is already serving at {address}", address=address)


def serve(
    address: wire.Address | os.PathLike[str] | None = None,
    authkey: bytes | str | None = None,
    *,
    store: Store | None = None,
    options: ServeOptions | None = None,
    on_ready: Callable[[wire.Address], None] | None = None,
    stop_signals: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGINT),
    stop_event: threading.Event | None = None,
    **changes: Any,
) -> None:
    """Serve ``store`` (a new, empty one by default) at ``address`` until ``stop_event``
    is set, one of ``stop_signals`` arrives, or a ``shutdown`` call.

    Blocks the calling thread, which may be any thread. Only in the main thread of the
    main interpreter (where Python allows it) does it handle ``stop_signals``, and on
    return it puts back exactly the handlers it replaced; a signal whose handler was not
    set from Python is left alone. From another thread, pass a ``threading.Event`` as
    ``stop_event`` and set it to stop the manager: ``serve`` returns once it has cleaned up.

    On the way out it closes the listener and removes the socket and the key file it wrote.
    ``on_ready`` is called with the bound address once clients can connect. ``options``
    (or keywords changing single ones, e.g. ``max_connections=16``) say how to serve: a TCP
    address off the loopback needs ``allow_remote``; at most ``max_connections`` clients are
    connected at once, and each must authenticate within ``handshake_timeout`` seconds.

    With ``state`` (a file path), the sessions a previous manager saved there are restored
    before clients can connect (with a new epoch, and the revision continued), and saved
    back every ``save_interval`` seconds when they changed and once more on the way out. A
    file that cannot be restored is renamed to ``FILE.corrupt-STAMP`` with a warning, and
    the store starts empty.
    """
    options = changed(ServeOptions, options, changes, "options")
    address = addr.resolve(address)
    key = addr.new_key() if authkey is None else addr.as_key(authkey)
    store = Store() if store is None else store
    stop = threading.Event() if stop_event is None else stop_event
    _check_exposure(address, options.allow_remote)
    _one_malloc_arena()
    with _stop_signals(stop_signals, stop):
        try:
            _claim(address)
            dispatcher = _dispatcher(store, address, key, options)
        except ShmstoreError:
            raise  # ours say what is wrong (and some are OSErrors)
        except OSError as exc:
            where = addr.format_address(address)
            if exc.errno == errno.EADDRINUSE:
                raise AddressInUseError(f"{where} is already in use", address=where) from None
            raise StoreUnavailableError(f"cannot listen on {where}: {exc}", address=where) from None
        key_file = addr.key_path(address)
        written = None
        serving = False
        keeper = None
        try:
            if isinstance(address, str):
                os.chmod(address, 0o600)
            else:
                addr.ensure_private_dir(os.path.dirname(key_file))
            written = addr.create_key_file(key_file, key)  # we hold the address: a key file there is stale
            dispatcher.stop_event = stop
            keeper = _StateKeeper(Path(options.state).expanduser(), store) if options.state else None
            if keeper is not None:
                keeper.restore()
            courier = _Courier(store, spool.path_for(address))
            started = time.time()
            store.manager_info = lambda: {
                "started": started,
                "address": addr.format_address(dispatcher.address),
                "clients": dispatcher.connections(),
                "uss": _uss(),
                "state": None if keeper is None else keeper.info(),
                "spool": courier.info(),
            }
            accepter = threading.Thread(target=dispatcher.accepter, name="shmstore-accept", daemon=True)
            accepter.start()
            serving = True
            log.info("serving at %s (pid %d)", addr.format_address(dispatcher.address), os.getpid())
            if on_ready is not None:
                on_ready(dispatcher.address)
            _run(store, stop, keeper, options.save_interval, courier)
        finally:
            failed = _stop(dispatcher, store, keeper if serving else None, accepter if serving else None)
            if written is not None:
                _remove_key(key_file, key, written)
        log.info("stopped serving at %s", addr.format_address(address))
        if failed is not None:
            raise failed


def _stop(
    dispatcher: _Dispatcher, store: Store, keeper: _StateKeeper | None, accepter: threading.Thread | None
) -> state.StateNotSavedError | None:
    """Stop as a drain, so that no write a client saw succeed is lost: stop accepting
    (the listener closes, and a unix socket goes), refuse every write from now on (a
    client sees an error, never a success that is then lost), let each connection's call
    in flight be answered and its thread end (within :data:`DRAIN_TIMEOUT`), then save
    (``keeper``: the final save, holding every write that was acknowledged). Returns the
    error to raise if that save failed, once everything else is done."""
    dispatcher.listener.close()  # also unlinks the unix socket
    if accepter is not None:
        accepter.join(DRAIN_TIMEOUT)  # a close wakes its accept() at once
    store.stop_writes()
    dispatcher.drain(time.monotonic() + DRAIN_TIMEOUT)
    failed = None if keeper is None else keeper.final_save()
    store.unshare()
    return failed


#: How long a stopping manager waits for its calls in flight to be answered. A call takes
#: well under a millisecond; only a client that does not read its reply takes longer, and
#: a stop does not wait for it (systemd allows 90 s for the whole stop).
DRAIN_TIMEOUT = 5.0


def _run(
    store: Store, stop: threading.Event, keeper: _StateKeeper | None, save_interval: float, courier: _Courier
) -> None:
    """Reap every ``reap_interval``, deliver the spool every :data:`spool.DELIVER_INTERVAL`
    and, with a state file, save every ``save_interval`` (each of the last two in a thread
    of its own: a slow disk must not delay the reaper) until ``stop``; then wait for the
    other two threads (the final save is :func:`_stop`'s)."""
    workers = [threading.Thread(target=courier.run, args=(stop,), name="shmstore-spool", daemon=True)]
    if keeper is not None:
        workers.append(
            threading.Thread(target=keeper.run, args=(stop, save_interval), name="shmstore-save", daemon=True)
        )
    for worker in workers:
        worker.start()
    try:
        while not stop.wait(store.limits.reap_interval):
            try:
                store.reap()
            except Exception:  # a failed pass must not take the manager down
                log.exception("a reaper pass failed")
    finally:
        stop.set()
        for worker in workers:
            worker.join(_SAVE_JOIN_TIMEOUT)


class _Courier:
    """Delivers the reports hooks kept in the manager's spool (:mod:`shmstore.spool`):
    all of them at start, then whenever the spool changes (a stat of its directory every
    :data:`spool.DELIVER_INTERVAL`). Each goes through ``once`` with its hook's token,
    oldest event first, and is removed once applied; one the store refuses as invalid is
    set aside (``NAME.bad``) and logged. Only its own thread runs :meth:`deliver`, apart
    from tests; ``_lock`` guards the counts that :meth:`info` reads."""

    def __init__(self, store: Store, directory: str) -> None:
        self.store = store
        self.directory = directory
        self._seen: tuple[int, int] | None = None
        self._lock = threading.Lock()
        self._delivered = 0
        self._dropped = 0

    def run(self, stop: threading.Event) -> None:
        while True:
            try:
                self.deliver()
            except Exception:  # never take the manager down for its spool
                log.exception("delivering the spool %s failed", self.directory)
            if stop.wait(spool.DELIVER_INTERVAL):
                return

    def deliver(self) -> int:
        """Deliver what is spooled now, if the spool changed; returns how many."""
        seen = spool.changed_since(self.directory, self._seen)
        if seen is None:
            return 0
        delivered, oldest = 0, None
        for entry in spool.entries(self.directory):
            if isinstance(entry, str):
                log.warning("set aside %s in the spool %s: not a report this manager reads", entry, self.directory)
                spool.set_aside(self.directory, entry)
                continue
            procs.caller.same_pid_namespace = entry.same_pid_namespace
            try:
                self.store.once(entry.token, 1, "report", *entry.report)
            except StoreUnavailableError:
                return delivered  # stopping: the next manager delivers the rest
            except ShmstoreError as exc:
                bad = spool.set_aside(self.directory, entry.name)
                log.warning("a spooled report was refused (%s); kept as %s in %s", exc, bad, self.directory)
                continue
            spool.done(self.directory, entry.name)
            delivered += 1
            oldest = entry.at if oldest is None else min(oldest, entry.at)
        self._seen = spool.changed_since(self.directory, None)
        counts = spool.counts(self.directory)
        with self._lock:
            self._delivered += delivered
            newly_dropped, self._dropped = counts["dropped"] - self._dropped, counts["dropped"]
        if oldest is not None:
            log.info("delivered %d spooled reports (the oldest fired %.1f s ago)", delivered, time.time() - oldest)
        if newly_dropped > 0:
            log.warning("%d reports were dropped: the spool %s was full", newly_dropped, self.directory)
        return delivered

    def info(self) -> dict[str, Any]:
        counts = spool.counts(self.directory)
        with self._lock:
            return dict(counts, delivered=self._delivered, path=self.directory)


#: How long the final save waits for a periodic save in progress (one of 10,000 sessions
#: took 90-190 ms, measured; a disk that takes longer than this is not one to wait for).
_SAVE_JOIN_TIMEOUT = 10.0


class _StateKeeper:
    """The state file of one manager (:mod:`shmstore.state`): restores the store from it
    once, saves the store to it when it changed, and remembers how the last save went.
    When the final save fails (a full disk), it keeps the sessions in a rescue file in the
    runtime directory instead (:func:`state.rescue_path`), which the next manager restores
    from, and removes once it has saved them to the state file.

    The store's lock is held only to copy the sessions (:meth:`Store.dump`); encoding and
    writing happen outside it, under ``_writing``, which makes saves one at a time (a
    periodic one and the final one never interleave) and guards ``_saved_revision`` and
    ``_rescued``. ``_lock`` guards ``_last`` and is only held for a moment, so ``info``
    (what ``status`` shows) answers even while a slow disk holds a save.
    """

    def __init__(self, path: Path, store: Store) -> None:
        self.path = path  # changed only by restore(), before the saver starts
        self.store = store
        self.rescue = state.rescue_path(path, addr.runtime_dir())
        self._writing = threading.Lock()
        self._saved_revision = 0  # an empty store needs no file; restore() sets what it read
        self._rescued = False  # restored from the rescue file, which goes once saved
        self._lock = threading.Lock()
        self._last: dict[str, Any] = {"saved": None, "sessions": 0, "ms": None, "error": None}

    def restore(self) -> None:
        """Fill the (new) store from the state file, or from the rescue file when a
        manager whose final save failed left a newer one; a state file that cannot be
        restored is renamed aside with a warning, and the store starts empty. Temporary
        files that interrupted saves left are removed first."""
        began = time.perf_counter()
        for leftover in state.remove_leftovers(self.path):
            log.info("removed %s, left by an interrupted save", leftover)
        try:
            saved = state.read(self.path)
        except state.StateFileError as exc:
            self._keep_aside(exc)
            saved = None
        rescued = state.read_rescue(self.rescue)
        source = self.path
        if rescued is not None and (saved is None or rescued.revision >= saved.revision):
            saved, source, self._rescued = rescued, self.rescue, True
            log.warning(
                "restoring from %s, which the last manager wrote when it could not save to %s", source, self.path
            )
        if saved is None:
            log.info("no state file at %s yet: starting empty", self.path)
            return
        for line in self.store.restore(saved.revision, saved.live, saved.closed):
            log.warning("not restored from %s: session %s", source, line)
        _, revision, live, closed = self.store.dump()
        with self._writing:
            self._saved_revision = -1 if self._rescued else revision  # from a rescue: save at once
        log.info(
            "restored %d live and %d closed sessions from %s (revision %d) in %.1f ms",
            len(live),
            len(closed),
            source,
            revision,
            (time.perf_counter() - began) * 1000,
        )

    def _keep_aside(self, exc: state.StateFileError) -> None:
        try:
            aside = state.keep_aside(self.path)
        except OSError as error:
            log.warning(
                "%s; starting empty; it could not be moved aside (%s), so it will not be saved over", exc, error
            )
            self.path = self.path.with_name(self.path.name + ".unsaved")  # never write over what we could not read
            return
        log.warning("%s; starting empty; the file is kept as %s", exc, aside)

    def run(self, stop: threading.Event, interval: float) -> None:
        """Save every ``interval`` seconds when the store changed, until ``stop``."""
        while not stop.wait(interval):
            self.save()

    def save(self, final: bool = False) -> bool:
        """Write the store to the state file if it changed since the last save; False if
        that failed (logged and remembered, never raised: the manager serves on). Waits at
        most _SAVE_JOIN_TIMEOUT for a save in progress, so a hung disk cannot hang the stop."""
        if not self._writing.acquire(timeout=_SAVE_JOIN_TIMEOUT):
            self._failed("an earlier save is still writing")
            return False
        try:
            began = time.perf_counter()
            epoch, revision, live, closed = self.store.dump()
            if revision == self._saved_revision:
                return True
            try:
                state.write(self.path, state.encode(epoch, revision, live, closed))
            except OSError as exc:
                self._failed(str(exc))
                return False
            ms = (time.perf_counter() - began) * 1000
            self._saved_revision = revision
            if self._rescued:
                self.rescue.unlink(missing_ok=True)
                self._rescued = False
                log.info("saved the rescued sessions to %s; removed %s", self.path, self.rescue)
            with self._lock:
                self._last.update(saved=time.time(), sessions=len(live) + len(closed), ms=round(ms, 1), error=None)
        finally:
            self._writing.release()
        log.log(
            logging.INFO if final else logging.DEBUG,
            "saved %d live and %d closed sessions to %s in %.1f ms",
            len(live),
            len(closed),
            self.path,
            ms,
        )
        return True

    def _failed(self, problem: str) -> None:
        with self._lock:
            self._last["error"] = f"{time.strftime('%Y-%m-%d %H:%M:%S')}: {problem}"
        log.error("could not save the sessions to %s: %s", self.path, problem)

    def final_save(self) -> state.StateNotSavedError | None:
        """The last save, once nothing can change any more. If it fails, the sessions go
        to the rescue file instead; returns the error that says where they are (or that
        they are lost), for the manager to exit with, or None when they are saved."""
        if self.save(final=True):
            return None
        with self._lock:
            problem = str(self._last["error"]).partition(": ")[2]
        epoch, revision, live, closed = self.store.dump()
        rescue: Path | None = self.rescue
        try:
            addr.ensure_private_dir(str(self.rescue.parent))
            state.write(self.rescue, state.encode(epoch, revision, live, closed))
        except (OSError, ShmstoreError) as exc:
            log.error("could not keep the sessions in %s either: %s", self.rescue, exc)
            rescue = None
        error = state.StateNotSavedError(self.path, problem, saved_revision=max(0, self._saved_revision), rescue=rescue)
        log.error("%s", error)
        return error

    def info(self) -> dict[str, Any]:
        with self._lock:
            return dict(self._last, path=str(self.path))


def _uss() -> int | None:
    """Bytes of memory only this process uses (Private_Clean + Private_Dirty of
    /proc/self/smaps_rollup), or None where there is no such file."""
    try:
        text = Path("/proc/self/smaps_rollup").read_text()
    except OSError:
        return None
    kib = 0
    for line in text.splitlines():
        if line.startswith(("Private_Clean:", "Private_Dirty:")):
            kib += int(line.split()[1])
    return kib * 1024


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


def _remove_key(path: str, key: bytes, written: tuple[int, int] | None = None) -> None:
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
            os.unlink(path)


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
    options: ServeOptions | None = None,
    timeout: float = 10.0,
    start_method: str | None = None,
    **changes: Any,
) -> ServerProcess:
    """Start a manager process serving at ``address`` and return once it accepts clients.

    For a daemon that embeds the store. The child ignores SIGINT (the parent decides when
    it ends) and stops on SIGTERM or :meth:`ServerProcess.stop`. Pass ``store`` to set
    its limits, e.g. ``Store(max_history=20)``; ``options`` and keywords are :func:`serve`'s.
    Both values travel to the child whole.

    ``start_method`` is how the child is made. ``"fork"``, the default in a process that
    runs a single thread, shares the parent's loaded code (the child starts fastest and
    owns least memory); so start the manager before any thread. Forking a process that
    runs other threads can leave the child stuck on a lock one of them held (Python 3.12+
    warns), so there the default is ``"forkserver"``: the child is forked from a
    single-threaded server process (started once, on first use, with shmstore loaded),
    and ``store`` and ``options`` travel to it pickled. ``"spawn"`` starts a fresh
    interpreter each time. Start times are in :data:`START_METHODS`' comment.
    """
    options = changed(ServeOptions, options, changes, "options")
    address = addr.resolve(address)
    key = addr.new_key() if authkey is None else addr.as_key(authkey)
    store = Store() if store is None else store
    ctx = _context(start_method)
    reader, writer = ctx.Pipe(duplex=False)
    process = ctx.Process(
        target=_serve_child,
        # A forked child has the caller's environment; one made by the fork server would have
        # the server's (as it was when the server started), so it is sent the current one.
        args=(address, key, store, options, writer, None if ctx.get_start_method() == "fork" else dict(os.environ)),
        name="shmstore-manager",
        daemon=True,
    )
    process.start()
    writer.close()
    try:
        if not reader.poll(timeout):
            process.kill()
            raise StoreUnavailableError(f"manager did not start at {addr.format_address(address)} within {timeout} s")
        kind, value = reader.recv()
    except EOFError:
        hint = "" if ctx.get_start_method() == "fork" else _MAIN_HINT
        raise StoreUnavailableError(
            f"manager process died while starting at {addr.format_address(address)}{hint}"
        ) from None
    finally:
        reader.close()
    if kind == "error":
        process.join(timeout)
        raise value
    return ServerProcess(process, value, key)


#: The ways :func:`start_server` can make the manager's process. Measured from the call to
#: its return (the manager accepting clients) on a shared 2-CPU machine, median of 5 after a
#: first: fork 9-10 ms; forkserver 27-29 ms, and 370-460 ms for the first call, which also
#: starts the server process; spawn 220-260 ms, each a new interpreter importing shmstore.
START_METHODS = ("fork", "forkserver", "spawn")


# The usual cause: the new process runs the caller's main script again, which starts another.
_MAIN_HINT = (
    "; it was not forked from this process, so it imported the main script again: start the manager "
    "under `if __name__ == '__main__':`, or before any thread (then it is forked)"
)


def _context(start_method: str | None) -> Any:
    if start_method is None:
        start_method = "fork" if _threads() == 1 else "forkserver"
    if start_method not in START_METHODS:
        raise ValidationError("start_method", f"{start_method!r} is not one of {', '.join(START_METHODS)}")
    ctx = multiprocess.get_context(start_method)
    if start_method == "forkserver":
        ctx.set_forkserver_preload([__name__])  # each child then starts with shmstore loaded
    return ctx


def _threads() -> int:
    """The threads this process runs, counted as Python 3.12's fork warning counts them:
    from the kernel where it can (threads started outside ``threading`` count too)."""
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return threading.active_count()


def _serve_child(
    address: wire.Address, key: bytes, store: Store, options: ServeOptions, writer: Any, environ: dict[str, str] | None
) -> None:
    if environ is not None:
        os.environ.clear()
        os.environ.update(environ)
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
            serve(address, key, store=store, options=options, on_ready=ready, stop_signals=(signal.SIGTERM,))
    except state.StateNotSavedError:
        sys.exit(1)  # logged, with where the sessions went: a failure for whoever waits on the process
    except ShmstoreError as exc:
        if writer.closed:
            raise
        writer.send(("error", exc))  # the parent raises it from start_server()
