"""Starting a manager in a child process (:func:`start_server`), for a daemon that embeds
the store, and the handle on it (:class:`ServerProcess`).
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import sys
import threading
import warnings
from typing import Any

import multiprocess

from ..config import ServeOptions, changed
from ..errors import ShmstoreError, StoreUnavailableError, ValidationError
from ..store import Store
from ..transport import address as addr
from ..transport import wire
from . import state
from .keeper import SAVE_JOIN_TIMEOUT
from .lifecycle import DRAIN_TIMEOUT, serve

log = logging.getLogger("shmstore.manager")


#: How long :meth:`ServerProcess.stop` waits before it kills: the drain's deadline, a
#: second more for its threads, and the final save's own wait for a save in progress.
STOP_TIMEOUT = DRAIN_TIMEOUT + 1.0 + SAVE_JOIN_TIMEOUT + 4.0


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

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """SIGTERM the manager and wait for it; SIGKILL it if it has not gone by ``timeout``
        (the default leaves room for a whole drain and a slow final save: a manager killed
        mid-save loses what it had not saved)."""
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
