"""The manager's life: :func:`serve` claims the address, restores the state, serves until
told to stop, and stops as a drain (:func:`stop`): no write that a client saw succeed is
lost.

The manager logs through :mod:`logging` (the ``shmstore`` logger; ``shmstore serve`` sends
it to stderr): its start and stop, connections refused or failing the handshake, sessions
reaped or gone stale with the reason, spooled reports delivered, and state file restores
and saves (a periodic save is logged at DEBUG, since it may come every few seconds; the
final one, and any failure, at INFO and ERROR). "stopped serving" is its last line. The
roles, one noun each: the *manager* is the process, the *dispatcher* serves its
connections (:mod:`~shmstore.manager.dispatcher`), the *store* holds the sessions, the
*keeper* its state file (:mod:`~shmstore.manager.keeper`), the *courier* the spool
(:mod:`~shmstore.manager.courier`).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .. import spool
from ..agents.settings import HTTP_PATH
from ..config import ServeOptions, changed
from ..errors import AddressInUseError, ShmstoreError, StoreUnavailableError
from ..store import Store
from ..transport import address as addr
from ..transport import wire
from . import state
from .claim import check_exposure, claim, remove_key
from .courier import Courier
from .dispatcher import Dispatcher, dispatcher_for
from .http_events import EventServer, inherited_listener
from .keeper import SAVE_JOIN_TIMEOUT, StateKeeper

log = logging.getLogger("shmstore.manager")


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
    is set or one of ``stop_signals`` arrives; then stop as a drain (:func:`_stop`).

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
    the store starts empty. The state file is one manager's at a time (a lock beside it,
    held from before the restore to after the final save): a manager started while another
    still stops waits for its final save. The spool's reports are delivered before clients
    are accepted, so that a report sent after them is applied after them.
    """
    options = changed(ServeOptions, options, changes, "options")
    address = addr.resolve(address)
    key = addr.new_key() if authkey is None else addr.as_key(authkey)
    store = Store() if store is None else store
    stop = threading.Event() if stop_event is None else stop_event
    check_exposure(address, options.allow_remote)
    _one_malloc_arena()
    with _stop_signals(stop_signals, stop):
        try:
            claim(address)
            dispatcher = dispatcher_for(store, address, key, options)
        except ShmstoreError:
            raise  # ours say what is wrong (and some are OSErrors)
        except OSError as exc:
            raise _cannot_listen(exc, addr.format_address(address)) from None
        key_file = addr.key_path(address)
        written = None
        serving = False
        keeper = None
        events = None
        try:
            if isinstance(address, str):
                os.chmod(address, 0o600)
            else:
                addr.ensure_private_dir(os.path.dirname(key_file))
            written = addr.create_key_file(key_file, key)  # we hold the address: a key file there is stale
            dispatcher.stop_event = stop
            store.allow_writes()  # a store served before was stopped for writes
            keeper = StateKeeper(Path(options.state).expanduser(), store) if options.state else None
            if keeper is not None:
                keeper.lock(stop)
                keeper.restore()
            courier = Courier(store, spool.path_for(address))
            courier.deliver()
            events = _event_server(store, options.http)
            started = time.time()
            store.manager_info = lambda: {
                "started": started,
                "address": addr.format_address(dispatcher.address),
                "clients": dispatcher.connections(),
                "uss": _uss(),
                "state": None if keeper is None else keeper.info(),
                "spool": courier.info(),
                "http": None if events is None else {"port": events.port, "events": events.events},
            }
            accepter = threading.Thread(target=dispatcher.accepter, name="shmstore-accept", daemon=True)
            accepter.start()
            if events is not None:
                events.start()
            serving = True
            log.info("serving at %s (pid %d)", addr.format_address(dispatcher.address), os.getpid())
            if on_ready is not None:
                on_ready(dispatcher.address)
            _run(store, stop, keeper, options.save_interval, courier)
        finally:
            failed = _stop(dispatcher, store, keeper if serving else None, accepter if serving else None, events)
            if keeper is not None:
                keeper.unlock()
            if written is not None:
                remove_key(key_file, key, written)
        log.info("stopped serving at %s", addr.format_address(address))
        if failed is not None:
            raise failed


def _stop(
    dispatcher: Dispatcher,
    store: Store,
    keeper: StateKeeper | None,
    accepter: threading.Thread | None,
    events: EventServer | None = None,
) -> state.StateNotSavedError | None:
    """Stop as a drain, so that no write a client saw succeed is lost: stop accepting
    (the listener closes, and a unix socket goes), refuse every write from now on (a
    client sees an error, never a success that is then lost), let each connection's call
    in flight be answered and its thread end (within :data:`DRAIN_TIMEOUT`), then save
    (``keeper``: the final save, holding every write that was acknowledged). Returns the
    error to raise if that save failed, once everything else is done. Events coming over
    HTTP (``events``) are drained first, while writes are still taken: an agent's event in
    flight is applied, not refused (an http hook's event cannot be sent again)."""
    if events is not None:
        events.drain(time.monotonic() + DRAIN_TIMEOUT)
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
    store: Store, stop: threading.Event, keeper: StateKeeper | None, save_interval: float, courier: Courier
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
            worker.join(SAVE_JOIN_TIMEOUT)


def _cannot_listen(exc: OSError, where: str) -> ShmstoreError:
    """Why the manager cannot listen at ``where``: in use by another, or ``exc``."""
    if exc.errno == errno.EADDRINUSE:
        return AddressInUseError(f"{where} is already in use", address=where)
    return StoreUnavailableError(f"cannot listen on {where}: {exc}", address=where)


def _event_server(store: Store, http: str) -> EventServer | None:
    """The HTTP endpoint for agents' events on the loopback, when ``http`` names a port
    (``auto``: a free one), else None."""
    if not http:
        return None
    try:
        events = EventServer(store, 0 if http == "auto" else int(http), listener=inherited_listener())
    except OSError as exc:
        raise _cannot_listen(exc, f"127.0.0.1:{http}") from None
    log.info("taking agents' events over HTTP at http://127.0.0.1:%d%s", events.port, HTTP_PATH)
    return events


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
