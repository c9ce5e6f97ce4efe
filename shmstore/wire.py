"""How a call and its payload travel between a client and the manager.

``multiprocess`` pickles every manager message (the call envelope, its arguments and its
result) with dill, whose pickler is pure Python. Its managers let the serializer be chosen
by name, so this module registers one more, :data:`SERIALIZER`, whose connections:

* pickle the envelope with the standard C pickler (sessions themselves already travel as
  orjson bytes, so nothing dill-specific ever needs to cross);
* number every request and echo the number in its reply, so a reply that is not the
  answer to the call waiting for it is detected (:class:`OutOfStepError`), never delivered;
* never wait forever: every read and every write of a message, chunk by chunk, finishes by
  the connection's :attr:`~Connection.deadline` or raises ``TimeoutError``;
* refuse messages larger than :data:`MAX_MESSAGE` (:class:`MessageTooLargeError`) instead
  of allocating whatever a peer's length header claims;
* authenticate both ends with HMAC-SHA256 (:func:`handshake_as_client`,
  :func:`handshake_as_server`) within one deadline for the whole exchange, and tell a
  client that the manager is full rather than just hanging up;
* turn off Nagle's algorithm on TCP, so a request and its reply are never held back.

This is the one place that decides how bytes move; swap it here and everything follows.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import hmac
import io
import os
import pickle
import select
import socket
import struct
import time
from typing import Any

from multiprocess import connection, managers

from .errors import AuthKeyError, StoreUnavailableError, ValidationError

#: The serializer name shmstore's managers and proxies use.
SERIALIZER = "shmstore"
#: Seconds a client waits to connect and for each reply before giving up.
DEFAULT_TIMEOUT = 5.0
#: The largest message either side accepts (64 MiB holds ~50,000 ordinary sessions).
MAX_MESSAGE = 64 * 2**20
#: Seconds the manager gives a client to take a reply before it drops the connection.
REPLY_TIMEOUT = 30.0

_PROTOCOL = pickle.HIGHEST_PROTOCOL
_HEADER = struct.Struct("!i")
# Every message starts with its request number, outside the pickle.
_NUMBER = struct.Struct("!Q")

Address = str | tuple[str, int]


class OutOfStepError(ConnectionError):
    """A reply did not carry the number of the request it should answer: the connection is
    out of step (e.g. an earlier call was interrupted) and must be dropped."""


class MessageTooLargeError(ConnectionError):
    """A peer announced a message larger than the ``limit`` (:data:`MAX_MESSAGE`, or less
    during the handshake); its body was not read, so the connection must be dropped."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"a message of {size} bytes is larger than the {limit}-byte limit")
        self.size = size
        self.limit = limit

    def __reduce__(self) -> tuple[type[MessageTooLargeError], tuple[int, int]]:
        return type(self), (self.size, self.limit)


class Connection(connection.Connection):
    """A manager connection: C pickle, numbered messages, deadlines on every byte.

    The descriptor is non-blocking; every read and write waits in ``poll`` for at most
    what is left until :attr:`deadline` (a ``time.monotonic()`` value; None: no limit).
    A client sets the deadline before each call, so a manager that stops mid-reply, or
    a large message to a stopped manager, costs the call its timeout and no more.
    """

    def __init__(self, handle: int, *, serving: bool = False) -> None:
        super().__init__(handle)
        os.set_blocking(handle, False)
        #: When the current exchange must be over (``time.monotonic()``), or None.
        self.deadline: float | None = None
        # A client numbers its requests; the manager's side echoes the number it last
        # received in its reply, so each side of one connection knows its role.
        self._serving = serving
        self._number = 0
        self._pollers: dict[int, select.poll] = {}

    # -- messages ------------------------------------------------------------------------------

    def send(self, obj: Any) -> None:
        """Send ``obj`` as one numbered message. Raises :class:`ValidationError`, having sent
        nothing, when it cannot be pickled or is too large for the peer to accept."""
        self._check_closed()
        what = "reply" if self._serving else "arguments"
        try:
            payload = pickle.dumps(obj, _PROTOCOL)
        except Exception as exc:  # PicklingError, RecursionError, or whatever __reduce__ raised
            raise ValidationError(what, f"cannot be pickled: {exc!r:.200}") from None
        if len(payload) + _NUMBER.size > MAX_MESSAGE:
            raise ValidationError(what, f"make {len(payload)} bytes; the most one message carries is {MAX_MESSAGE}")
        if self._serving:
            deadline = self.deadline
            if deadline is None:  # a reply: a client that will not take it loses the connection
                self.deadline = time.monotonic() + REPLY_TIMEOUT
            try:
                self._send_bytes(_NUMBER.pack(self._number) + payload)
            finally:
                self.deadline = deadline
        else:
            self._number += 1
            self._send_bytes(_NUMBER.pack(self._number) + payload)

    def recv(self) -> Any:
        """The next message. Its number is read before its body is unpickled, so that even
        a reply about a request that could not be unpickled answers the right number."""
        self._check_closed()
        try:
            view = self._recv_bytes().getbuffer()
        except MessageTooLargeError:
            if self._serving:  # the body is still unread: this connection is done
                self.close()
                raise EOFError("a client sent a message over the limit") from None
            raise
        (number,) = _NUMBER.unpack_from(view)
        if self._serving:
            self._number = number
        elif number != self._number:
            raise OutOfStepError(f"got the reply to request {number} while waiting for request {self._number}'s")
        return pickle.loads(view[_NUMBER.size :])

    # -- bytes ---------------------------------------------------------------------------------

    def _recv_bytes(self, maxsize: int | None = None) -> io.BytesIO:
        # Every receive goes through here, the handshake's included.
        (size,) = _HEADER.unpack(self._recv(4, first=True).getbuffer())
        limit = MAX_MESSAGE if maxsize is None else min(maxsize, MAX_MESSAGE)
        if size < 0 or size > limit:  # -1 announces a 64-bit length: far beyond any limit here
            raise MessageTooLargeError(size if size >= 0 else 2**31, limit)
        return self._recv(size)

    def _recv(self, size: int, read: Any = None, *, first: bool = False) -> io.BytesIO:
        buf = io.BytesIO()
        remaining = size
        if first:
            self._wait(select.POLLIN)  # a reply is rarely there already: poll, then read
        while remaining > 0:
            try:
                chunk = os.read(self._fileno(), remaining)
            except BlockingIOError:
                self._wait(select.POLLIN)
                continue
            if not chunk:
                if remaining == size and first:
                    raise EOFError
                raise EOFError("the connection closed in the middle of a message")
            buf.write(chunk)
            remaining -= len(chunk)
        return buf

    def _send(self, buf: Any, write: Any = None) -> None:
        view = memoryview(buf)
        while view:
            try:
                view = view[os.write(self._fileno(), view) :]
            except BlockingIOError:
                self._wait(select.POLLOUT)

    def _wait(self, events: int) -> None:
        """Wait until the socket is ready for ``events``, or raise TimeoutError at the deadline."""
        poller = self._pollers.get(events)
        if poller is None:
            poller = self._pollers[events] = select.poll()
            poller.register(self._fileno(), events)
        while True:
            deadline = self.deadline
            ms = None if deadline is None else max(0, round((deadline - time.monotonic()) * 1000))
            if poller.poll(ms):
                return
            if ms is not None:
                raise TimeoutError("no reply in time" if events == select.POLLIN else "could not send in time")

    def _fileno(self) -> int:
        handle = self._handle
        if handle is None:
            raise OSError(errno.EBADF, "the connection is closed")
        return int(handle)

    def shutdown(self) -> None:
        """Stop all traffic now: a call blocked on this connection in another thread sees
        the connection end at once. The descriptor stays open until :meth:`close`, so it
        cannot be reused under that call's feet."""
        if self._handle is not None:
            sock = socket.socket(fileno=self._handle)
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already disconnected
            finally:
                sock.detach()


# -- the handshake -------------------------------------------------------------------------------
#
# Both ends prove they hold the authkey before anything is unpickled: the manager first
# (so a client never unpickles what an impostor sends), then the client. Each side signs
# the other's random challenge with HMAC-SHA256 and a label of its role, so a signature
# made by one side can never be replayed as the other's.

_CHALLENGE = b"#SHMSTORE-1#CHALLENGE#"
_WELCOME = b"#SHMSTORE-1#WELCOME#"
_FULL = b"#SHMSTORE-1#FULL#"
_NONCE = 32


def handshake_as_server(conn: Connection, authkey: bytes) -> None:
    """Authenticate a new client, and be authenticated by it, before the deadline.

    Raises :class:`AuthKeyError` on a wrong key (the caller closes the connection
    without a word), ``TimeoutError``, ``EOFError`` or ``OSError`` when the peer is
    too slow or goes away.
    """
    nonce = os.urandom(_NONCE)
    conn.send_bytes(_CHALLENGE + nonce)
    if not hmac.compare_digest(conn.recv_bytes(64), _sign(authkey, b"client", nonce)):
        raise AuthKeyError("a client gave a wrong digest")
    conn.send_bytes(_WELCOME)
    theirs = conn.recv_bytes(len(_CHALLENGE) + _NONCE)
    if not theirs.startswith(_CHALLENGE):
        raise AuthKeyError("a client sent no challenge")
    conn.send_bytes(_sign(authkey, b"manager", theirs[len(_CHALLENGE) :]))
    if conn.recv_bytes(64) != _WELCOME:
        raise AuthKeyError("a client refused our digest")


def handshake_as_client(conn: Connection, authkey: bytes, where: str) -> None:
    """Authenticate to the manager and make it prove it holds the key too.

    Raises :class:`AuthKeyError` when either side's key is wrong, and
    :class:`StoreUnavailableError` when the manager is serving all the clients it may.
    """
    greeting = conn.recv_bytes(len(_CHALLENGE) + _NONCE)
    if greeting == _FULL:
        raise StoreUnavailableError(
            f"the manager at {where} is serving as many clients as it may (max_connections); try again later",
            address=where,
        )
    if not greeting.startswith(_CHALLENGE):
        raise AuthKeyError(f"the peer at {where} is not a shmstore manager", address=where)
    conn.send_bytes(_sign(authkey, b"client", greeting[len(_CHALLENGE) :]))
    try:
        welcome = conn.recv_bytes(64)
    except EOFError:  # a manager hangs up on a wrong digest without a word
        welcome = b""
    if welcome != _WELCOME:
        raise AuthKeyError(f"the manager at {where} refused our authkey", address=where)
    nonce = os.urandom(_NONCE)
    conn.send_bytes(_CHALLENGE + nonce)
    if not hmac.compare_digest(conn.recv_bytes(64), _sign(authkey, b"manager", nonce)):
        conn.send_bytes(b"#SHMSTORE-1#FAILURE#")
        raise AuthKeyError(f"the peer at {where} does not hold the authkey: not our manager", address=where)
    conn.send_bytes(_WELCOME)


def refuse_as_full(conn: Connection) -> None:
    """Tell a new client the manager is full (best effort: never waits), then close."""
    conn.deadline = time.monotonic()
    try:
        conn.send_bytes(_FULL)
    except OSError:
        pass
    finally:
        conn.close()


def _sign(authkey: bytes, role: bytes, nonce: bytes) -> bytes:
    return hmac.new(authkey, role + nonce, hashlib.sha256).digest()


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
    """Open a connection to ``address`` within ``timeout`` seconds (not yet authenticated).

    A unix socket whose listen backlog is full refuses at once with EAGAIN rather than
    queueing the caller the way TCP does; a busy manager is not a dead one, so that is
    retried, backing off, until the timeout.
    """
    deadline = time.monotonic() + timeout
    family = getattr(socket, connection.address_type(address))
    pause = 0.001
    while True:
        sock = socket.socket(family)
        try:
            sock.settimeout(max(0.0, deadline - time.monotonic()))
            sock.connect(address)
            break
        except BlockingIOError:  # EAGAIN: the backlog is full
            sock.close()
            if time.monotonic() + pause >= deadline:
                raise TimeoutError(f"the manager's listen queue stayed full for {timeout:g} s") from None
            time.sleep(pause)
            pause = min(pause * 2, 0.05)
        except BaseException:
            sock.close()
            raise
    try:
        if family != socket.AF_UNIX:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # One step from the socket to the connection that owns its descriptor, so that an
        # exception from a signal handler in between cannot leak it (measured: ~100 leaked
        # in 21,000 interrupted connects when the descriptor passed through a helper).
        conn = Connection(sock.detach())
    except BaseException:
        sock.close()  # nothing to do once detached
        raise
    conn.deadline = deadline
    return conn


def Client(  # noqa: N802 - named like the multiprocess factory it stands in for
    address: Address, family: str | None = None, authkey: bytes | None = None, *, timeout: float = DEFAULT_TIMEOUT
) -> Connection:
    """Connect to a manager and authenticate both ways, all within ``timeout`` seconds.

    Raises ``OSError`` (``TimeoutError`` included) when the manager cannot be reached or
    does not answer in time, :class:`StoreUnavailableError` when it is full, and
    :class:`AuthKeyError` when the keys do not match.
    """
    conn = connect(address, timeout)
    try:
        if authkey is not None:
            handshake_as_client(conn, authkey, address if isinstance(address, str) else f"{address[0]}:{address[1]}")
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
