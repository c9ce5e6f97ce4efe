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
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import multiprocess
from multiprocess import managers

from . import address as addr
from . import procs, segment, state, wire
from .config import ServeOptions, changed
from .errors import AddressInUseError, AuthKeyError, ShmstoreError, StoreUnavailableError, ValidationError
from .store import EXPOSED, Store

log = logging.getLogger(__name__)


class _Dispatcher(managers.Server):
    """The stock manager server (this process's dispatcher of calls), made safe to leave
    running next to crashing processes and hostile neighbours.

    The stock one starts a thread per accepted connection and waits for the peer's half of
    the authentication handshake for ever, answers a wrong key with a pickled traceback,
    and its accept loop retries at once on any error, so a peer that connects and says
    nothing, or running out of file descriptors, could stop service. Here the whole
    handshake (both proofs of the key and the first request) must be done within
    ``handshake_timeout``; a peer that fails it is closed without a word (and logged); at
    most ``max_connections`` are open at once (more are told the manager is full); and a
    failing ``accept`` backs off instead of spinning.
    """

    def __init__(self, *args: Any, store: Store, options: ServeOptions) -> None:
        super().__init__(*args)
        self.store = store
        self.options = options
        self._slots = threading.BoundedSemaphore(options.max_connections)
        # Guards _open, the connections being served now (for info()).
        self._open_lock = threading.Lock()
        self._open = 0

    def connections(self) -> int:
        """How many connections are open now, handshakes included."""
        with self._open_lock:
            return self._open

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
                log.warning("refused a connection: all %d slots are taken", self.options.max_connections)
                wire.refuse_as_full(conn)
                continue
            conn.deadline = time.monotonic() + self.options.handshake_timeout
            with self._open_lock:
                self._open += 1
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: wire.Connection) -> None:
        try:
            try:
                wire.handshake_as_server(conn, self.authkey)
                request = conn.recv()
                _, name, args, kwds = request
                if name not in ("create", "accept_connection", "segment"):
                    raise AuthKeyError(f"first request {name!r} is not one a client makes")
                # This thread serves this one client: what the store needs to know of it.
                procs.caller.same_pid_namespace = procs.peer_same_pid_namespace(conn.fileno())
            except (AuthKeyError, EOFError, OSError, ValueError, TypeError, pickle.UnpicklingError) as exc:
                log.warning("closed a connection that did not complete the handshake: %s", _why(exc))
                return
            if name == "accept_connection":
                self.accept_connection(conn, *args)  # replies, then serves this client's calls
            elif name == "segment":
                self._share_segment(conn)
            else:
                conn.send(("#RETURN", self.create(conn, *args, **kwds)))
        except SystemExit:
            pass  # serve_client() ends this way when its client hangs up
        except Exception as exc:  # an authenticated client's bad request, or its connection failing
            log.info("a connection ended: %s", _why(exc))
        finally:
            conn.close()
            with self._open_lock:
                self._open -= 1
            self._slots.release()

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

    def accept_connection(self, conn: wire.Connection, name: str) -> None:
        conn.deadline = None  # authenticated: a client may stay idle as long as it likes
        super().accept_connection(conn, name)


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
            started = time.time()
            store.manager_info = lambda: {
                "started": started,
                "address": addr.format_address(dispatcher.address),
                "clients": dispatcher.connections(),
                "uss": _uss(),
                "state": None if keeper is None else keeper.info(),
            }
            threading.Thread(target=dispatcher.accepter, name="shmstore-accept", daemon=True).start()
            log.info("serving at %s (pid %d)", addr.format_address(dispatcher.address), os.getpid())
            if on_ready is not None:
                on_ready(dispatcher.address)
            _run(store, stop, keeper, options.save_interval)
        finally:
            dispatcher.listener.close()  # also unlinks the unix socket
            store.unshare()
            if written is not None:
                _remove_key(key_file, key, written)
        log.info("stopped serving at %s", addr.format_address(address))


def _run(store: Store, stop: threading.Event, keeper: _StateKeeper | None, save_interval: float) -> None:
    """Reap every ``reap_interval`` and, with a state file, save every ``save_interval`` (in
    a thread of its own: a slow disk must not delay the reaper) until ``stop``; then save
    once more, after the saver has finished."""
    saver = None
    if keeper is not None:
        saver = threading.Thread(target=keeper.run, args=(stop, save_interval), name="shmstore-save", daemon=True)
        saver.start()
    try:
        while not stop.wait(store.limits.reap_interval):
            try:
                store.reap()
            except Exception:  # a failed pass must not take the manager down
                log.exception("a reaper pass failed")
    finally:
        stop.set()
        if keeper is not None and saver is not None:
            saver.join(_SAVE_JOIN_TIMEOUT)
            keeper.save(final=True)


#: How long the final save waits for a periodic save in progress (one of 10,000 sessions
#: took 90-190 ms, measured; a disk that takes longer than this is not one to wait for).
_SAVE_JOIN_TIMEOUT = 10.0


class _StateKeeper:
    """The state file of one manager (:mod:`shmstore.state`): restores the store from it
    once, saves the store to it when it changed, and remembers how the last save went.

    The store's lock is held only to copy the sessions (:meth:`Store.dump`); encoding and
    writing happen outside it, under ``_writing``, which makes saves one at a time (a
    periodic one and the final one never interleave) and guards ``_saved_revision``.
    ``_lock`` guards ``_last`` and is only held for a moment, so ``info`` (what ``status``
    shows) answers even while a slow disk holds a save.
    """

    def __init__(self, path: Path, store: Store) -> None:
        self.path = path  # changed only by restore(), before the saver starts
        self.store = store
        self._writing = threading.Lock()
        self._saved_revision = 0  # an empty store needs no file; restore() sets what it read
        self._lock = threading.Lock()
        self._last: dict[str, Any] = {"saved": None, "sessions": 0, "ms": None, "error": None}

    def restore(self) -> None:
        """Fill the (new) store from the state file; a file that cannot be restored is
        renamed aside with a warning, and the store starts empty."""
        began = time.perf_counter()
        try:
            saved = state.read(self.path)
        except state.StateFileError as exc:
            self._keep_aside(exc)
            return
        if saved is None:
            log.info("no state file at %s yet: starting empty", self.path)
            return
        for line in self.store.restore(saved.revision, saved.live, saved.closed):
            log.warning("not restored from %s: session %s", self.path, line)
        _, revision, live, closed = self.store.dump()
        with self._writing:
            self._saved_revision = revision
        log.info(
            "restored %d live and %d closed sessions from %s (revision %d) in %.1f ms",
            len(live),
            len(closed),
            self.path,
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

    def save(self, final: bool = False) -> None:
        """Write the store to the state file if it changed since the last save (a failure
        is logged and remembered, never raised: the manager serves on). Waits at most
        _SAVE_JOIN_TIMEOUT for a save in progress, so a hung disk cannot hang the stop."""
        if not self._writing.acquire(timeout=_SAVE_JOIN_TIMEOUT):
            log.error("did not save the sessions to %s: an earlier save is still writing", self.path)
            return
        try:
            began = time.perf_counter()
            epoch, revision, live, closed = self.store.dump()
            if revision == self._saved_revision:
                return
            try:
                state.write(self.path, state.encode(epoch, revision, live, closed))
            except OSError as exc:
                with self._lock:
                    self._last["error"] = f"{time.strftime('%Y-%m-%d %H:%M:%S')}: {exc}"
                log.error("could not save the sessions to %s: %s", self.path, exc)
                return
            ms = (time.perf_counter() - began) * 1000
            self._saved_revision = revision
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
    except ShmstoreError as exc:
        if writer.closed:
            raise
        writer.send(("error", exc))  # the parent raises it from start_server()
