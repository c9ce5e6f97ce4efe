"""The store manager: the sessions, the lock that guards them, and the process serving them.

:class:`Store` lives in the manager process. Its methods are the whole manager-side
surface (:data:`EXPOSED`): they take and return plain values and orjson bytes, and each
runs entirely under one ``RLock``, so every operation is atomic however many worker
processes call at once. The data flow of a write is::

    worker: Client.transition(id, status)          (client.py)
      -> StoreProxy -> wire.Connection              (C pickle envelope over the socket)
      -> manager thread: Store.transition()         (this module, under the lock)
      -> Session.transitioned() -> to_json()        (model.py: the change and its encoding)

The stock ``multiprocess`` server supplies the accept loop and one thread per client
connection; :func:`serve` adds the address, the key file, signals and clean-up.
"""

from __future__ import annotations

import errno
import gc
import os
import signal
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import multiprocess
import orjson
from multiprocess import managers

from . import address as addr
from . import wire
from .errors import (
    AddressInUseError,
    ConflictError,
    NotFoundError,
    ShmstoreError,
    StoreUnavailableError,
    ValidationError,
)
from .model import Record, Session, add_usage_record, check_count, check_id, check_status, now, transition_record

#: The methods a client may call on the manager's store, and nothing else.
EXPOSED = ("get", "set", "remove", "list_all", "transition", "add_usage", "revision")

#: History entries kept per session by default; older ones are dropped.
DEFAULT_MAX_HISTORY = 100


class Store:
    """Every session, keyed by id, as orjson bytes, guarded by one re-entrant lock.

    Sessions are kept encoded: that is what clients are sent, and bytes are the most
    compact form CPython holds. Each change decodes one session, applies the model's pure
    function to it, re-encodes it and bumps the store-wide revision.
    """

    def __init__(self, *, max_history: int = DEFAULT_MAX_HISTORY) -> None:
        if isinstance(max_history, bool) or not isinstance(max_history, int) or max_history < 1:
            raise ValidationError("max_history", f"must be an int >= 1; got {max_history!r}")
        self.max_history = max_history
        self._lock = threading.RLock()
        self._sessions: dict[str, bytes] = {}
        self._revision = 0

    # -- reads ------------------------------------------------------------------------------

    def get(self, id: str) -> bytes | None:
        check_id(id)
        with self._lock:
            return self._sessions.get(id)

    def list_all(self) -> bytes:
        """Every session, as one JSON array."""
        with self._lock:
            return b"[" + b",".join(self._sessions.values()) + b"]"

    def revision(self) -> int:
        with self._lock:
            return self._revision

    # -- writes -----------------------------------------------------------------------------

    def set(self, data: bytes, expected_revision: int | None = None) -> bytes:
        """Create or replace a session from its JSON.

        With ``expected_revision``, replace only if the stored session still has that
        revision (0: only if there is none), else raise :class:`ConflictError`.
        """
        if not isinstance(data, bytes):
            raise ValidationError("session", f"must be JSON bytes, not {type(data).__name__}")
        session = Session.from_json(data)
        if expected_revision is not None:
            check_count(expected_revision, "expected_revision")
        with self._lock:
            if expected_revision is not None:
                current = self._sessions.get(session.id)
                current_revision = 0 if current is None else orjson.loads(current)["revision"]
                if current_revision != expected_revision:
                    raise _conflict(session.id, expected_revision, current_revision)
            return self._commit(session.to_dict())

    def remove(self, id: str) -> bytes | None:
        check_id(id)
        with self._lock:
            if id not in self._sessions:
                return None
            self._revision += 1
            return self._sessions.pop(id)

    def transition(self, id: str, status: str) -> bytes:
        """Move a session to ``status``: one more history entry, ``since`` reset."""
        check_id(id)
        to = check_status(status)
        with self._lock:
            return self._commit(transition_record(self._load(id), to, now(), self.max_history))

    def add_usage(self, id: str, input_tokens: int, output_tokens: int) -> bytes:
        check_id(id)
        check_count(input_tokens, "input_tokens")
        check_count(output_tokens, "output_tokens")
        with self._lock:
            return self._commit(add_usage_record(self._load(id), input_tokens, output_tokens))

    # -- internals (called with the lock held) ---------------------------------------------

    def _load(self, id: str) -> Record:
        data = self._sessions.get(id)
        if data is None:
            raise NotFoundError(f"no session with id {id!r}")
        record: Record = orjson.loads(data)
        return record

    def _commit(self, record: Record) -> bytes:
        """Store ``record`` as the next revision. Everything that can fail has failed by now."""
        self._revision += 1
        record["revision"] = self._revision
        data = orjson.dumps(record)
        self._sessions[record["id"]] = data
        return data


def _conflict(id: str, expected: int, current: int) -> ConflictError:
    return ConflictError(f"session {id!r} is at revision {current}, not the expected {expected}")


def _manager(store: Store, address: wire.Address, authkey: bytes) -> managers.BaseManager:
    """A BaseManager whose only shared object is ``store``, with only :data:`EXPOSED` callable."""

    class StoreManager(managers.BaseManager):
        pass

    StoreManager.register("store", callable=lambda: store, exposed=EXPOSED)
    return StoreManager(address=address, authkey=authkey, serializer=wire.SERIALIZER)


def _claim(address: wire.Address) -> None:
    """Make sure nothing live holds ``address``; remove a socket a dead manager left."""
    if not isinstance(address, str):
        return  # TCP: bind() itself tells us the port is taken
    path = Path(address)
    if path.parent == addr.runtime_dir():
        addr.ensure_private_dir(path.parent)
    else:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    if not path.exists() and not path.is_symlink():
        return
    probe = socket.socket(socket.AF_UNIX)
    probe.settimeout(1.0)
    try:
        probe.connect(address)
    except (ConnectionRefusedError, FileNotFoundError):
        path.unlink(missing_ok=True)  # stale: nobody listens there any more
        return
    except OSError as exc:
        raise AddressInUseError(f"{address} exists and cannot be probed: {exc}") from None
    finally:
        probe.close()
    raise AddressInUseError(f"a manager is already serving at {address}")


def serve(
    address: wire.Address | os.PathLike[str] | None = None,
    authkey: bytes | str | None = None,
    *,
    max_history: int = DEFAULT_MAX_HISTORY,
    on_ready: Callable[[wire.Address], None] | None = None,
    stop_signals: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGINT),
) -> None:
    """Serve a new, empty store at ``address`` until SIGTERM, SIGINT or a ``shutdown`` call.

    Blocks the calling thread. On the way out it closes the listener and removes the
    socket and the key file it wrote. ``on_ready`` is called with the bound address once
    clients can connect.
    """
    address = addr.resolve(address)
    key = addr.new_key() if authkey is None else addr.as_key(authkey)
    store = Store(max_history=max_history)
    try:
        _claim(address)
        server = _manager(store, address, key).get_server()
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise AddressInUseError(f"{addr.format_address(address)} is already in use") from None
        raise StoreUnavailableError(f"cannot listen on {addr.format_address(address)}: {exc}") from None
    key_file = addr.key_path(address)
    try:
        if isinstance(address, str):
            os.chmod(address, 0o600)
        else:
            addr.ensure_private_dir(key_file.parent)
        addr.write_key(key_file, key)
        stop = server.stop_event = threading.Event()
        for signum in stop_signals:
            signal.signal(signum, lambda signum, frame: stop.set())
        threading.Thread(target=server.accepter, name="shmstore-accept", daemon=True).start()
        if on_ready is not None:
            on_ready(server.address)
        while not stop.wait(1.0):
            pass
    finally:
        server.listener.close()  # also unlinks the unix socket
        _remove_key(key_file, key)


def _remove_key(path: Path, key: bytes) -> None:
    """Remove our key file, unless another manager has since written its own there."""
    try:
        if path.read_bytes() == key:
            path.unlink()
    except OSError:
        pass


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
    max_history: int = DEFAULT_MAX_HISTORY,
    timeout: float = 10.0,
) -> ServerProcess:
    """Fork a manager process serving at ``address`` and return once it accepts clients.

    For a daemon that embeds the store. The child is forked, so it shares the parent's
    loaded code instead of importing its own; it ignores SIGINT (the parent decides when
    it ends) and stops on SIGTERM or :meth:`ServerProcess.stop`.
    """
    address = addr.resolve(address)
    key = addr.new_key() if authkey is None else addr.as_key(authkey)
    ctx = multiprocess.get_context("fork")
    reader, writer = ctx.Pipe(duplex=False)
    process = ctx.Process(
        target=_serve_child, args=(address, key, max_history, writer), name="shmstore-manager", daemon=True
    )
    process.start()
    writer.close()
    try:
        if not reader.poll(timeout):
            process.kill()
            raise StoreUnavailableError(f"manager did not start at {addr.format_address(address)} within {timeout} s")
        kind, value = reader.recv()
    except EOFError:
        raise StoreUnavailableError(f"manager process died while starting at {addr.format_address(address)}") from None
    finally:
        reader.close()
    if kind == "error":
        process.join(timeout)
        raise value
    return ServerProcess(process, value, key)


def _serve_child(address: wire.Address, key: bytes, max_history: int, writer: Any) -> None:
    # Objects inherited from the parent are never collected here; freezing them keeps the
    # garbage collector from touching (and so copying) every page the fork shares.
    gc.freeze()
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def ready(bound: wire.Address) -> None:
        writer.send(("ready", bound))
        writer.close()

    try:
        serve(address, key, max_history=max_history, on_ready=ready, stop_signals=(signal.SIGTERM,))
    except ShmstoreError as exc:
        if writer.closed:
            raise
        writer.send(("error", exc))  # the parent raises it from start_server()
