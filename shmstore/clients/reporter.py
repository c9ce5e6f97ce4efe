"""The hook's one call, ``report``, made with nothing but the standard library.

``shmstore hook`` runs once per Claude Code event, several times per tool call, so its
start-up is most of its cost: the full :class:`~shmstore.clients.client.Client` imports
``multiprocess``, ``dill`` and ``orjson`` (~100 ms before anything happens, measured with
``python -X importtime``). :func:`report` sends what the Client sends for ``report``
instead, over :mod:`shmstore.transport.protocol`, on one connection: after the handshake its first
and only request is ``once(token, 1, "report", ...)``, which the manager serves on that
connection alone (a Client opens two: one to ``create`` its proxy, one to call it). The
manager applies a write at most once per token and number, so a retry on a fresh
connection, after a connection that failed at once (a manager restarting), is never
applied twice; a hook that gives up keeps the same token in its spool entry
(:mod:`shmstore.spool`), for the same reason.

Replies are unpickled only from a manager that proved it holds the authkey; an error it
raised arrives as one of :mod:`shmstore.errors`, a light module.
"""

from __future__ import annotations

import os
import time

from ..errors import ShmstoreError, StoreUnavailableError
from ..transport import address as addr
from ..transport.protocol import Address, Channel, open_authenticated

# The type checker's names, not imported at run time: ``typing`` costs the hook ~4 ms of
# start-up (mypy takes any name TYPE_CHECKING as true).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


def report(
    address: Address, authkey: bytes | None, args: tuple[Any, ...], *, token: bytes | None = None, deadline: float
) -> bytes | None:
    """What :meth:`Client.report <shmstore.clients.client.Client.report>` does, done by
    ``deadline`` (a ``time.monotonic()`` value): ``args`` are :meth:`Store.report
    <shmstore.store.Store.report>`'s, in its order. Returns the session as the store keeps
    it (orjson bytes; None for a report that changed nothing). ``authkey`` None reads the
    key file (:func:`shmstore.transport.address.read_key`); ``token`` is the request's
    (default: a new one).

    One try may use all the time there is: a manager that answers slowly is busy, and a
    second connection would only add to its queue. A connection that fails at once
    (refused, or closed before the reply: a manager restarting) is tried again after
    :data:`RETRY_PAUSE` while time is left, up to :data:`TRIES` in all. Raises the
    manager's own errors (:class:`~shmstore.errors.ValidationError`, ...) as they come,
    and :class:`StoreUnavailableError` when the manager cannot be reached or fails.
    """
    key = addr.read_key(address) if authkey is None else authkey
    while args and args[-1] is None:  # only what is given, so that an older manager takes it
        args = args[:-1]
    request = (token or os.urandom(16), 1, "report", *args)
    for attempt in range(1, TRIES + 1):
        try:
            reply = one_call(address, key, "once", request, deadline)
            return None if reply is None else bytes(reply)
        except ShmstoreError:  # the manager's own (StoreUnavailableError is an OSError too)
            raise
        except (EOFError, OSError) as exc:
            if isinstance(exc, TimeoutError) or attempt == TRIES or time.monotonic() + RETRY_PAUSE >= deadline:
                raise unavailable(address, "report", exc) from None
            time.sleep(RETRY_PAUSE)
    raise AssertionError("unreachable")


#: Tries of a report whose connection fails at once, and the pause between them: a manager
#: that restarts is back within ~0.1-0.3 s (``shmstore serve``'s start-up), inside a hook's
#: budget; one that is down stays down, and the report goes to the spool.
TRIES = 4
RETRY_PAUSE = 0.05


def one_call(address: Address, key: bytes, method: str, args: tuple[Any, ...], deadline: float) -> Any:
    """The manager's answer to ``method(*args)``, asked as the first and only request of a
    connection of its own, by ``deadline`` (the manager serves ``once`` and ``list_all`` so,
    without a proxy). Raises the manager's own errors
    as they come, and EOFError or OSError (TimeoutError at the deadline) as the connection
    failed: the caller says what that means (:func:`unavailable`)."""
    conn = open_authenticated(address, key, max(0.001, deadline - time.monotonic()), Channel)
    conn.deadline = deadline
    with conn:
        return _dispatch(conn, None, method, args, address)


def unavailable(address: Address, method: str, exc: BaseException) -> StoreUnavailableError:
    """The error of a call to ``method`` whose connection failed with ``exc``."""
    where = addr.format_address(address)
    return StoreUnavailableError(f"manager at {where} failed during {method}(): {_describe(exc)}", address=where)


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
