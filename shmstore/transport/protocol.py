"""shmstore's wire protocol, with nothing but the standard library: how a message is framed
and numbered, how both ends prove they hold the authkey, and how a connection is opened.

:mod:`shmstore.transport.wire` plugs this into ``multiprocess``'s managers (its
:class:`~shmstore.transport.wire.Connection` is a :class:`Channel`);
:mod:`shmstore.clients.reporter` uses it alone, so that ``shmstore hook``
never imports ``multiprocess`` and ``dill`` (~100 ms of a hook's start-up, measured with
``python -X importtime``). On the wire, a message is:

* a 4-byte big-endian length, then that many bytes (at most :data:`MAX_MESSAGE`), of which
* the first 8 are the request number (a client numbers its requests 1, 2, ... per
  connection; the manager echoes the number in its reply), outside the pickle, and
* the rest is the message, pickled with the standard C pickler.

Before any message, the handshake (:func:`handshake_as_server`, :func:`handshake_as_client`)
authenticates both ends with HMAC-SHA256, within one deadline for the whole exchange.
"""

from __future__ import annotations

# The C modules under pickle and socket: pickle.dumps and loads *are* _pickle's, and socket's
# class is _socket's with conveniences this module does not use. pickle.py and socket.py
# (with re, enum and selectors behind them) were a fifth of the hook's start-up (callgrind:
# 21M of its 124M instructions; `python -c pass` is 40M).
import _pickle
import _socket
import errno
import io
import os
import select
import struct
import time
from _operator import _compare_digest as compare_digest  # hmac.compare_digest without OpenSSL

from ..errors import AuthKeyError, StoreUnavailableError, ValidationError

# The type checker's names, not imported at run time: ``typing`` costs the hook ~4 ms of
# start-up (mypy takes any name TYPE_CHECKING as true).
TYPE_CHECKING = False
# HMAC-SHA256 (RFC 2104) over the interpreter's built-in SHA-256 rather than hmac's, which
# loads OpenSSL: 13M of the hook's 107M instructions. The digests are hmac's (tested).
if TYPE_CHECKING:
    from hashlib import sha256  # the same interface, typed
    from typing import Any, TypeVar
else:
    try:
        from _sha2 import sha256  # Python 3.12+
    except ImportError:  # Python 3.11, or a build without the built-in hashes
        try:
            from _sha256 import sha256
        except ImportError:
            from hashlib import sha256

#: Seconds a client waits to connect and for each reply before giving up.
DEFAULT_TIMEOUT = 5.0
#: The largest message either side accepts (64 MiB holds ~50,000 ordinary sessions).
MAX_MESSAGE = 64 * 2**20
#: Seconds the manager gives a client to take a reply before it drops the connection.
REPLY_TIMEOUT = 30.0

_PROTOCOL = 5  # pickle.HIGHEST_PROTOCOL since Python 3.8
_HEADER = struct.Struct("!i")
# Every message starts with its request number, outside the pickle.
_NUMBER = struct.Struct("!Q")
# multiprocess sends a message larger than this in two writes (header, then body); so do we.
_ONE_WRITE = 16384

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


class Channel:
    """One end of a connection: C pickle, numbered messages, deadlines on every byte.

    The descriptor is non-blocking; every read and write waits in ``poll`` for at most
    what is left until :attr:`deadline` (a ``time.monotonic()`` value; None: no limit).
    A client sets the deadline before each call, so a manager that stops mid-reply, or
    a large message to a stopped manager, costs the call its timeout and no more.
    """

    def __init__(self, handle: int, *, serving: bool = False) -> None:
        self._handle: int | None = handle
        os.set_blocking(handle, False)
        #: When the current exchange must be over (``time.monotonic()``), or None.
        self.deadline: float | None = None
        # A client numbers its requests; the manager's side echoes the number it last
        # received in its reply, so each side of one connection knows its role.
        self._serving = serving
        self._number = 0
        self._pollers: dict[int, select.poll] = {}

    def __enter__(self: _C) -> _C:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        return self._handle is None

    def fileno(self) -> int:
        return self._fileno()

    def close(self) -> None:
        handle, self._handle = self._handle, None
        if handle is not None:
            os.close(handle)

    def _check_closed(self) -> None:
        if self._handle is None:
            raise OSError("handle is closed")

    # -- messages ------------------------------------------------------------------------------

    def send(self, obj: Any) -> None:
        """Send ``obj`` as one numbered message. Raises :class:`ValidationError`, having sent
        nothing, when it cannot be pickled or is too large for the peer to accept."""
        self._check_closed()
        what = "reply" if self._serving else "arguments"
        try:
            payload = _pickle.dumps(obj, _PROTOCOL)
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
        return _pickle.loads(view[_NUMBER.size :])

    # -- bytes ---------------------------------------------------------------------------------

    def send_bytes(self, buf: bytes) -> None:
        """Send ``buf`` as one framed message (the handshake's, unnumbered)."""
        self._check_closed()
        self._send_bytes(buf)

    def recv_bytes(self, maxlength: int | None = None) -> bytes:
        """One framed message of at most ``maxlength`` bytes (the handshake's, unnumbered)."""
        self._check_closed()
        return self._recv_bytes(maxlength).getvalue()

    def _send_bytes(self, buf: bytes) -> None:
        header = _HEADER.pack(len(buf))
        if len(buf) > _ONE_WRITE:
            self._send(header)
            self._send(buf)
        else:
            self._send(header + buf)

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

    def shutdown(self, how: int = _socket.SHUT_RDWR) -> None:
        """Stop all traffic now (``how``: ``SHUT_RD`` stops only what comes in, so that a
        reply still goes out): a call blocked on this connection in another thread sees
        the connection end at once. The descriptor stays open until :meth:`close`, so it
        cannot be reused under that call's feet."""
        if self._handle is not None:
            sock = _socket.socket(fileno=self._handle)
            try:
                sock.shutdown(how)
            except OSError:
                pass  # already disconnected
            finally:
                sock.detach()


if TYPE_CHECKING:
    _C = TypeVar("_C", bound=Channel)


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


def handshake_as_server(conn: Channel, authkey: bytes) -> None:
    """Authenticate a new client, and be authenticated by it, before the deadline.

    Raises :class:`AuthKeyError` on a wrong key (the caller closes the connection
    without a word), ``TimeoutError``, ``EOFError`` or ``OSError`` when the peer is
    too slow or goes away.
    """
    nonce = os.urandom(_NONCE)
    conn.send_bytes(_CHALLENGE + nonce)
    if not compare_digest(conn.recv_bytes(64), _sign(authkey, b"client", nonce)):
        raise AuthKeyError("a client gave a wrong digest")
    conn.send_bytes(_WELCOME)
    theirs = conn.recv_bytes(len(_CHALLENGE) + _NONCE)
    if not theirs.startswith(_CHALLENGE):
        raise AuthKeyError("a client sent no challenge")
    conn.send_bytes(_sign(authkey, b"manager", theirs[len(_CHALLENGE) :]))
    if conn.recv_bytes(64) != _WELCOME:
        raise AuthKeyError("a client refused our digest")


def handshake_as_client(conn: Channel, authkey: bytes, where: str) -> None:
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
    if not compare_digest(conn.recv_bytes(64), _sign(authkey, b"manager", nonce)):
        conn.send_bytes(b"#SHMSTORE-1#FAILURE#")
        raise AuthKeyError(f"the peer at {where} does not hold the authkey: not our manager", address=where)
    conn.send_bytes(_WELCOME)


def refuse_as_full(conn: Channel) -> None:
    """Tell a new client the manager is full (best effort: never waits), then close."""
    conn.deadline = time.monotonic()
    try:
        conn.send_bytes(_FULL)
    except OSError:
        pass
    finally:
        conn.close()


def _sign(authkey: bytes, role: bytes, nonce: bytes) -> bytes:
    return hmac_sha256(authkey, role + nonce)


_BLOCK = 64  # SHA-256's block size in bytes
_INNER = bytes(b ^ 0x36 for b in range(256))
_OUTER = bytes(b ^ 0x5C for b in range(256))


def hmac_sha256(key: bytes, message: bytes) -> bytes:
    """HMAC-SHA256 of ``message`` under ``key`` (RFC 2104), as ``hmac.digest(key, message,
    "sha256")`` gives it."""
    if len(key) > _BLOCK:
        key = sha256(key).digest()
    key = key.ljust(_BLOCK, b"\0")
    inner = sha256(key.translate(_INNER) + message).digest()
    return sha256(key.translate(_OUTER) + inner).digest()


# -- connecting -------------------------------------------------------------------------------------


def connect(address: Address, timeout: float, kind: type[_C]) -> _C:
    """Open a connection of ``kind`` to ``address`` within ``timeout`` seconds (not yet
    authenticated); its deadline is then the end of that time.

    A unix socket whose listen backlog is full refuses at once with EAGAIN rather than
    queueing the caller the way TCP does; a busy manager is not a dead one, so that is
    retried, backing off, until the timeout.
    """
    deadline = time.monotonic() + timeout
    family = _socket.AF_UNIX if isinstance(address, str) else _socket.AF_INET
    pause = 0.001
    while True:
        sock = _socket.socket(family)
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
        if family != _socket.AF_UNIX:
            sock.setsockopt(_socket.IPPROTO_TCP, _socket.TCP_NODELAY, 1)
        # One step from the socket to the connection that owns its descriptor, so that an
        # exception from a signal handler in between cannot leak it (measured: ~100 leaked
        # in 21,000 interrupted connects when the descriptor passed through a helper).
        conn = kind(sock.detach())
    except BaseException:
        sock.close()  # nothing to do once detached
        raise
    conn.deadline = deadline
    return conn


def open_authenticated(address: Address, authkey: bytes | None, timeout: float, kind: type[_C]) -> _C:
    """Connect to a manager and authenticate both ways, all within ``timeout`` seconds.

    Raises ``OSError`` (``TimeoutError`` included) when the manager cannot be reached or
    does not answer in time, :class:`StoreUnavailableError` when it is full, and
    :class:`AuthKeyError` when the keys do not match.
    """
    conn = connect(address, timeout, kind)
    try:
        if authkey is not None:
            handshake_as_client(conn, authkey, address if isinstance(address, str) else f"{address[0]}:{address[1]}")
    except BaseException:
        conn.close()
        raise
    return conn
