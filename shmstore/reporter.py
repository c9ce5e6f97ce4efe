"""The hook's one call, ``report``, made with nothing but the standard library.

``shmstore hook`` runs once per Claude Code event, several times per tool call, so its
start-up is most of its cost: the full :class:`~shmstore.client.Client` imports
``multiprocess``, ``dill`` and ``orjson`` (~100 ms before anything happens, measured with
``python -X importtime``). :func:`report` sends exactly what the Client sends for
``report`` instead, over :mod:`shmstore.protocol`:

1. a connection that asks the manager to ``create`` the ``store`` object and learns its
   id (the manager counts one reference, as for every Client);
2. a connection that says ``accept_connection``, then calls ``once(token, 1, "report",
   ...)`` on the store: a write the manager applies at most once per token and number, so
   the retry on a fresh connection, when the first try's connection failed, is never
   applied twice.

Replies are unpickled only from a manager that proved it holds the authkey; an error it
raised arrives as one of :mod:`shmstore.errors`, a light module.
"""

from __future__ import annotations

import os
import time

from . import address as addr
from .errors import ShmstoreError, StoreUnavailableError
from .protocol import Address, Channel, open_authenticated

# The type checker's names, not imported at run time: ``typing`` costs the hook ~4 ms of
# start-up (mypy takes any name TYPE_CHECKING as true).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

#: What the manager's registry calls the store (server.py registers it under this name).
STORE_TYPEID = "store"
#: The name this client gives its connection in the manager (its thread's name there).
CONNECTION_NAME = "shmstore-hook"


def report(
    address: Address,
    authkey: bytes | None,
    id: str,
    status: str,
    working_dir: str,
    *,
    pid: int | None,
    session_id: str | None,
    agent_type: str = "claude_code",
    reason: str | None = None,
    deadline: float,
) -> bytes:
    """What :meth:`Client.report <shmstore.client.Client.report>` does, done by
    ``deadline`` (a ``time.monotonic()`` value); returns the session as the store keeps it
    (orjson bytes). ``authkey`` None reads the key file (:func:`shmstore.address.read_key`).

    The first try gets half the time left, so that a retry has the other half. Raises the
    manager's own errors (:class:`~shmstore.errors.ValidationError`, ...) as they come, and
    :class:`StoreUnavailableError` when the manager cannot be reached or fails.
    """
    key = addr.read_key(address) if authkey is None else authkey
    request: tuple[Any, ...] = (os.urandom(16), 1, "report", id, status, working_dir, pid, session_id, agent_type)
    if reason is not None:
        request += (reason,)  # only when given, as Client.report sends it
    where = addr.format_address(address)
    for attempt in (1, 2):
        now = time.monotonic()
        try_by = now + (deadline - now) / 2 if attempt == 1 else deadline
        try:
            return bytes(_once(address, key, request, try_by))
        except ShmstoreError:
            raise
        except (EOFError, OSError) as exc:
            if attempt == 2 or time.monotonic() >= deadline:
                raise StoreUnavailableError(
                    f"manager at {where} failed during report(): {_describe(exc)}", address=where
                ) from None
    raise AssertionError("unreachable")


def _once(address: Address, key: bytes, request: tuple[Any, ...], deadline: float) -> Any:
    with _open(address, key, deadline) as setup:
        ident, _exposed = _dispatch(setup, None, "create", (STORE_TYPEID,), address)
    with _open(address, key, deadline) as conn:
        _dispatch(conn, None, "accept_connection", (CONNECTION_NAME,), address)
        return _dispatch(conn, ident, "once", request, address)


def _open(address: Address, key: bytes, deadline: float) -> Channel:
    conn = open_authenticated(address, key, max(0.001, deadline - time.monotonic()), Channel)
    conn.deadline = deadline
    return conn


def _dispatch(conn: Channel, ident: str | None, method: str, args: tuple[Any, ...], address: Address) -> Any:
    """One call as ``multiprocess``'s managers frame it: ``(ident, method, args, kwds)``
    out, ``(kind, result)`` back."""
    conn.send((ident, method, args, {}))
    kind, result = conn.recv()
    if kind == "#RETURN":
        return result
    if kind == "#ERROR" and isinstance(result, BaseException):
        raise result
    # A '#TRACEBACK' (or '#UNSERIALIZABLE') is the text of a failure in the manager.
    lines = [line for line in str(result).splitlines() if line.strip(" -")]
    where = addr.format_address(address)
    raise StoreUnavailableError(
        f"manager at {where} failed during {method}(): {lines[-1] if lines else kind}", address=where
    )


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "no reply in time"
    if isinstance(exc, EOFError):
        return "the connection was closed"
    return str(exc) or type(exc).__name__
