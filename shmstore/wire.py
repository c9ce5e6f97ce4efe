"""How a call and its payload travel between a client and the manager.

``multiprocess`` pickles every manager message (the call envelope, its arguments and its
result) with dill, whose pickler is pure Python. Its managers let the serializer be chosen
by name, so this module registers one more, :data:`SERIALIZER`, whose connections:

* pickle the envelope with the standard C pickler (sessions themselves already travel as
  orjson bytes, so nothing dill-specific ever needs to cross);
* never wait forever: every receive on the client side is bounded by a timeout;
* refuse messages larger than :data:`MAX_MESSAGE` instead of allocating whatever a
  peer's length header claims;
* turn off Nagle's algorithm on TCP, so a request and its reply are never held back.

This is the one place that decides how bytes move; swap it here and everything follows.
"""

from __future__ import annotations

import pickle
import select
import socket
import struct
from typing import Any

from multiprocess import connection, managers

#: The serializer name shmstore's managers and proxies use.
SERIALIZER = "shmstore"
#: Seconds a client waits to connect and for each reply before giving up.
DEFAULT_TIMEOUT = 5.0
#: The largest message either side accepts (64 MiB holds ~100,000 sessions).
MAX_MESSAGE = 64 * 2**20

_PROTOCOL = pickle.HIGHEST_PROTOCOL

Address = str | tuple[str, int]


class Connection(connection.Connection):
    """A manager connection: C pickle for envelopes, a timeout on every receive."""

    def __init__(self, handle: int, timeout: float | None = None) -> None:
        super().__init__(handle)
        self.timeout = timeout
        self._poller = select.poll()
        self._poller.register(handle, select.POLLIN)

    def send(self, obj: Any) -> None:
        self._check_closed()
        self._send_bytes(pickle.dumps(obj, _PROTOCOL))

    def recv(self) -> Any:
        self._check_closed()
        return pickle.loads(self._recv_bytes(MAX_MESSAGE).getbuffer())

    def set_read_timeout(self, seconds: float | None) -> None:
        """Make every read of this socket fail after ``seconds`` (None: wait for ever).

        Unlike :attr:`timeout`, which is checked before a message starts, this bounds each
        read itself, so a peer that sends half a message cannot hold the reader either.
        """
        whole = 0.0 if seconds is None else seconds
        sock = socket.socket(fileno=self.fileno())
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", int(whole), int(whole % 1 * 1e6)))
        finally:
            sock.detach()

    def _recv_bytes(self, maxsize: int | None = None) -> Any:
        # Every receive goes through here, the authentication handshake's included.
        if self.timeout is not None and not self._poller.poll(self.timeout * 1000):
            raise TimeoutError(f"no reply within {self.timeout:g} s")
        return super()._recv_bytes(MAX_MESSAGE if maxsize is None else maxsize)


class Listener(connection.Listener):
    """The manager's listener; hands out :class:`Connection` objects."""

    def accept(self) -> Connection:
        stock = super().accept()
        # Take over its descriptor rather than dup() it: near the descriptor limit, a dup
        # is what would fail.
        handle, stock._handle = stock.fileno(), None
        _no_delay(handle)
        return Connection(handle)


def Client(  # noqa: N802 - named like the multiprocess factory it stands in for
    address: Address, family: str | None = None, authkey: bytes | None = None, *, timeout: float = DEFAULT_TIMEOUT
) -> Connection:
    """Connect to a manager, authenticate, and return the connection.

    Raises ``OSError`` (``TimeoutError`` included) when the manager cannot be reached or
    does not answer in time, and ``multiprocess.AuthenticationError`` on a key mismatch.
    """
    family = family or connection.address_type(address)
    sock = socket.socket(getattr(socket, family))
    try:
        sock.settimeout(timeout)
        sock.connect(address)
        sock.setblocking(True)
    except BaseException:
        sock.close()
        raise
    handle = sock.detach()
    _no_delay(handle)
    conn = Connection(handle, timeout)
    try:
        if authkey is not None:
            connection.answer_challenge(conn, authkey)
            connection.deliver_challenge(conn, authkey)
    except BaseException:
        conn.close()
        raise
    return conn


def _no_delay(handle: int) -> None:
    sock = socket.socket(fileno=handle)
    try:
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    finally:
        sock.detach()


managers.listener_client[SERIALIZER] = (Listener, Client)
