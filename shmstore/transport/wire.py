"""How a call and its payload travel between a client and the manager.

``multiprocess`` pickles every manager message (the call envelope, its arguments and its
result) with dill, whose pickler is pure Python. Its managers let the serializer be chosen
by name, so this module registers one more, :data:`SERIALIZER`, whose connections speak
shmstore's own protocol (:mod:`shmstore.transport.protocol`, which needs only the standard library):

* the envelope is pickled with the standard C pickler (sessions themselves already travel
  as orjson bytes, so nothing dill-specific ever needs to cross);
* every request is numbered and its reply echoes the number, so a reply that is not the
  answer to the call waiting for it is detected (:class:`OutOfStepError`), never delivered;
* nothing waits forever: every read and every write of a message, chunk by chunk, finishes
  by the connection's :attr:`~shmstore.transport.protocol.Channel.deadline` or raises ``TimeoutError``;
* messages larger than :data:`MAX_MESSAGE` are refused (:class:`MessageTooLargeError`)
  instead of allocating whatever a peer's length header claims;
* both ends authenticate with HMAC-SHA256 (:func:`handshake_as_client`,
  :func:`handshake_as_server`) within one deadline for the whole exchange, and a client is
  told that the manager is full rather than just hung up on;
* Nagle's algorithm is off on TCP, so a request and its reply are never held back.

This module plugs the protocol into ``multiprocess``; the protocol itself is decided in
:mod:`shmstore.transport.protocol`, and everything follows it.
"""

from __future__ import annotations

import contextlib
import socket

from multiprocess import connection, managers

from .protocol import (
    DEFAULT_TIMEOUT,
    MAX_MESSAGE,
    REPLY_TIMEOUT,
    Address,
    Channel,
    MessageTooLargeError,
    OutOfStepError,
    handshake_as_client,
    handshake_as_server,
    open_authenticated,
    refuse_as_full,
)
from .protocol import connect as _connect

__all__ = [
    "DEFAULT_TIMEOUT",
    "MAX_MESSAGE",
    "REPLY_TIMEOUT",
    "SERIALIZER",
    "Address",
    "Client",
    "Connection",
    "Listener",
    "MessageTooLargeError",
    "OutOfStepError",
    "connect",
    "handshake_as_client",
    "handshake_as_server",
    "refuse_as_full",
]

#: The serializer name shmstore's managers and proxies use.
SERIALIZER = "shmstore"


class Connection(Channel, connection.Connection):
    """A manager connection: a :class:`~shmstore.transport.protocol.Channel` (numbered C-pickle
    messages, deadlines on every byte) that ``multiprocess``'s managers can use as theirs."""

    def __init__(self, handle: int, *, serving: bool = False) -> None:
        connection.Connection.__init__(self, handle)
        Channel.__init__(self, handle, serving=serving)


# -- connecting -------------------------------------------------------------------------------------


class Listener(connection.Listener):
    """The manager's listener; hands out :class:`Connection` objects."""

    @property
    def closed(self) -> bool:
        return self._listener is None

    def close(self) -> None:
        """Stop listening (and remove a unix socket). A thread blocked in :meth:`accept`
        is woken: closing the descriptor alone would leave it blocked on Linux."""
        inner = self._listener
        if inner is not None:
            with contextlib.suppress(OSError):
                inner._socket.shutdown(socket.SHUT_RDWR)
        super().close()

    def accept(self) -> Connection:
        stock = super().accept()
        # Take over its descriptor rather than dup() it: near the descriptor limit, a dup
        # is what would fail.
        handle, stock._handle = stock.fileno(), None
        _no_delay(handle)
        return Connection(handle, serving=True)


def connect(address: Address, timeout: float = DEFAULT_TIMEOUT) -> Connection:
    """Open a connection to ``address`` within ``timeout`` seconds (not yet authenticated)."""
    return _connect(address, timeout, Connection)


def Client(  # noqa: N802 - named like the multiprocess factory it stands in for
    address: Address, family: str | None = None, authkey: bytes | None = None, *, timeout: float = DEFAULT_TIMEOUT
) -> Connection:
    """Connect to a manager and authenticate both ways, all within ``timeout`` seconds.

    Raises ``OSError`` (``TimeoutError`` included) when the manager cannot be reached or
    does not answer in time, :class:`StoreUnavailableError` when it is full, and
    :class:`AuthKeyError` when the keys do not match.
    """
    return open_authenticated(address, authkey, timeout, Connection)


def _no_delay(handle: int) -> None:
    sock = socket.socket(fileno=handle)
    try:
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    finally:
        sock.detach()


managers.listener_client[SERIALIZER] = (Listener, Client)
