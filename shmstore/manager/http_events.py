"""The manager's HTTP endpoint for agents' events (``serve --http-port PORT``): an agent
whose hooks can POST (Claude Code's ``"type": "http"`` hooks) sends each event's JSON
payload to ``http://127.0.0.1:PORT/shmstore/hook/AGENT``, and the manager applies it with
the same rules as the ``shmstore hook`` command: no process per event.

* One request is one event. Its answer is sent once the write is applied: ``200`` with an
  empty body (nothing an agent shows or parses); an event the store ignores gets the same.
  A bad body gets a ``4xx`` and changes nothing; a body over :data:`MAX_BODY` is refused
  unread (``413``); a stopping manager answers ``503`` (the agent logs a non-blocking error).
* Only the user's own processes may report: the listener is on the loopback, and each
  connection's peer socket must belong to this process's uid (:mod:`~shmstore.transport.
  peer`); any other is answered ``403`` and closed. No secret is involved.
* Events are applied in the order the agent fired them: Claude awaits each http hook
  before its next event, so a request's arrival time is its event's time (``at``), which
  the store compares with the command hooks' (their process's start time).

Standard library only, and small: it parses just what an agent's HTTP client sends
(``Content-Length`` bodies, keep-alive), one thread per connection, at most
:data:`MAX_CONNECTIONS` at once.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time

from .. import agents
from ..agents.settings import HTTP_PATH
from ..errors import ShmstoreError, StoreFullError, StoreUnavailableError
from ..store import Store
from ..transport.peer import peer_uid

log = logging.getLogger("shmstore.manager")

#: The largest event body taken. A prompt with a pasted log can be a few MiB (the hook
#: command reads up to 64 MiB from a pipe; a body here is held whole in memory, at most
#: one per connection).
MAX_BODY = 16 << 20
#: The largest request line and headers taken.
MAX_HEAD = 16 << 10
#: Connections served at once; more are answered 503 and closed. An agent's client keeps
#: one or a few; several agents, a few each.
MAX_CONNECTIONS = 32
#: How often the accepting thread looks whether the endpoint is being drained: closing a
#: listener does not wake a thread in accept(), and one systemd shares must not be shut down.
ACCEPT_POLL = 0.25
#: Seconds a kept-alive connection may sit idle, and a request take to arrive whole.
IDLE_TIMEOUT = 30.0
REQUEST_TIMEOUT = 5.0

_REASONS = {200: "OK", 400: "Bad Request", 403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed"}
_REASONS |= {411: "Length Required", 413: "Content Too Large", 431: "Request Header Fields Too Large"}
_REASONS |= {500: "Internal Server Error", 503: "Service Unavailable"}


class RefusedRequestError(Exception):
    """A request we refuse, with its status code and a one-line reason."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code


class EventServer:
    """Takes events over HTTP for ``store`` on ``host``:``port`` (0: any free port;
    :attr:`port` is the one bound), or on a ``listener`` given (one systemd holds:
    :func:`inherited_listener`). :meth:`run` accepts until :meth:`drain`."""

    def __init__(self, store: Store, port: int, host: str = "127.0.0.1", listener: socket.socket | None = None) -> None:
        self.store = store
        self._owned = listener is None  # one systemd passed us is shared with it: never shut down
        self.listener = socket.create_server((host, port)) if listener is None else listener
        self.listener.settimeout(ACCEPT_POLL)
        self.port: int = self.listener.getsockname()[1]
        self.events = 0
        # Protects _connections (each served connection's socket, and whether a request on
        # it is being answered) and _closing. Held only to read or change them, never across
        # I/O: by run() when it adds one, by each connection's thread when it starts or ends
        # a request, and by drain().
        self._lock = threading.Lock()
        self._connections: dict[socket.socket, bool] = {}
        self._threads: list[threading.Thread] = []
        self._closing = False
        self._accepter: threading.Thread | None = None

    def start(self) -> None:
        """Accept connections in a thread of their own until :meth:`drain`."""
        self._accepter = threading.Thread(target=self.run, name="shmstore-http-accept", daemon=True)
        self._accepter.start()

    def run(self) -> None:
        """Accept connections until :meth:`drain`."""
        while not self._closing:
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue  # look at _closing again
            except OSError:
                return  # closed by drain()
            self._take(conn)

    def _take(self, conn: socket.socket) -> None:
        uid = peer_uid(conn)
        if uid != os.getuid():
            log.warning("refused an HTTP event from uid %s: only this user's processes may report", uid)
            _refuse(conn, 403, b"only the manager's own user may report\n")
            return
        with self._lock:
            full = len(self._connections) >= MAX_CONNECTIONS or self._closing
            if not full:
                self._connections[conn] = False
                thread = threading.Thread(target=self._serve, args=(conn,), name="shmstore-http", daemon=True)
                # Started under the lock: drain() joins every thread of the list, and
                # joining one not yet started raises (found in review: the stop then
                # failed before its final save).
                thread.start()
                self._threads = [t for t in self._threads if t.is_alive()] + [thread]
        if full:
            _refuse(conn, 503, b"the manager is serving as many connections as it may\n")

    def _serve(self, conn: socket.socket) -> None:
        """Answer the requests of one connection, in order, until it closes, idles past
        :data:`IDLE_TIMEOUT`, sends something we cannot read, or the manager stops. A
        request whose first byte has come must arrive whole within :data:`REQUEST_TIMEOUT`
        (else ``408``), so a client that trickles cannot hold a connection for long."""
        try:
            buffered = b""
            while True:
                try:
                    head, buffered, deadline = _read_head(conn, buffered)
                except (OSError, EOFError):
                    return
                except RefusedRequestError as exc:
                    _answer(conn, exc.code, f"{exc}\n".encode(), close=True)
                    return
                with self._lock:
                    self._connections[conn] = True  # a drain lets it finish: it is applied and answered
                try:
                    code, body, keep = self._one(conn, head, buffered, deadline)
                    buffered = b""
                except RefusedRequestError as exc:
                    code, body, keep = exc.code, f"{exc}\n".encode(), False
                except (OSError, EOFError):
                    return
                with self._lock:
                    self._connections[conn] = False
                    keep = keep and not self._closing
                _answer(conn, code, body, close=not keep)
                if not keep:
                    return
        finally:
            with self._lock:
                self._connections.pop(conn, None)
            conn.close()

    def _one(self, conn: socket.socket, head: bytes, buffered: bytes, deadline: float) -> tuple[int, bytes, bool]:
        """Read the rest of one request (its head is ``head``) and apply it: the status
        code, the answer's body, and whether the connection may be kept."""
        method, path, version, headers = _parse_head(head)
        keep = version == "HTTP/1.1" and headers.get("connection", "").lower() != "close"
        if "transfer-encoding" in headers:
            raise RefusedRequestError(411, "send the body with a Content-Length")
        length = _content_length(headers)
        if length > MAX_BODY:
            raise RefusedRequestError(413, f"an event of {length} bytes is over the {MAX_BODY} taken")
        body = _read_body(conn, buffered, length, deadline)
        if method != "POST":
            raise RefusedRequestError(405, "events are POSTed")
        agent = path[len(HTTP_PATH) :] if path.startswith(HTTP_PATH) else ""
        if agent not in agents.ADAPTERS:
            raise RefusedRequestError(
                404, f"no agent at {path[:80]!r}: POST to {HTTP_PATH}AGENT, one of {', '.join(agents.names())}"
            )
        try:
            self.apply(agent, body)
        except (StoreUnavailableError, StoreFullError) as exc:  # not the event's fault: 503, as for a stop
            return 503, f"{exc}\n".encode(), False
        return 200, b"", keep

    def apply(self, agent: str, body: bytes) -> None:
        """Apply one event of ``agent`` as the hook command would, timed by its arrival."""
        at = time.time()
        try:
            payload = json.loads(body)
        except (ValueError, RecursionError) as exc:  # RecursionError: nested past the interpreter's depth
            raise RefusedRequestError(400, f"the event is not JSON: {str(exc)[:200]}") from None
        if not isinstance(payload, dict):
            raise RefusedRequestError(400, "the event must be a JSON object")
        adapter = agents.get(agent)
        try:
            said = adapter.read(payload, {})
            if said.status is not None:
                self.store.report(
                    said.session, said.status, said.cwd, None, said.session, adapter.NAME, said.reason, at,
                    said.subagent, said.background,
                )  # fmt: skip
        except (StoreUnavailableError, StoreFullError):
            raise
        except ShmstoreError as exc:  # ValidationError: the event's fault, and the store is as it was
            raise RefusedRequestError(400, str(exc)) from None
        self.events += 1

    def drain(self, deadline: float) -> None:
        """Stop taking events: close the listener, let each request being answered finish
        (its write is applied and answered), close idle connections, and wait for every
        connection's thread until ``deadline`` (``time.monotonic()``)."""
        with self._lock:
            self._closing = True  # run() sees it within ACCEPT_POLL
        if self._owned:
            with contextlib.suppress(OSError):
                self.listener.shutdown(socket.SHUT_RDWR)  # no more connections queue; wakes accept() now
        if self._accepter is not None:
            self._accepter.join(max(0.0, deadline - time.monotonic()))
        self.listener.close()  # a socket systemd holds stays open, its backlog kept for the next manager
        with self._lock:
            idle = [conn for conn, busy in self._connections.items() if not busy]
            threads = list(self._threads)
        for conn in idle:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)  # wakes its thread's recv()
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))


def _read_head(conn: socket.socket, buffered: bytes) -> tuple[bytes, bytes, float]:
    """The request line and headers of the next request, what came after them, and the
    deadline (``time.monotonic()``) by which the whole request must have come: it starts
    with the request's first byte, after up to :data:`IDLE_TIMEOUT` of waiting for one."""
    data = buffered
    deadline = time.monotonic() + REQUEST_TIMEOUT if data else None
    while b"\r\n\r\n" not in data:
        if len(data) > MAX_HEAD:
            raise RefusedRequestError(431, "the request's head is too long")
        data += _recv(conn, 65536, deadline)
        deadline = time.monotonic() + REQUEST_TIMEOUT if deadline is None else deadline
    head, _, rest = data.partition(b"\r\n\r\n")
    if len(head) > MAX_HEAD:
        raise RefusedRequestError(431, "the request's head is too long")
    assert deadline is not None  # set with the first byte
    return head, rest, deadline


def _recv(conn: socket.socket, size: int, deadline: float | None) -> bytes:
    """Up to ``size`` bytes of a request: by ``deadline`` once it has begun (past it,
    ``408``), or within :data:`IDLE_TIMEOUT` for its first byte (None: the connection idles,
    and a timeout then just ends it). EOFError when the client closed."""
    if deadline is None:
        conn.settimeout(IDLE_TIMEOUT)
    else:
        left = deadline - time.monotonic()
        if left <= 0:
            raise _too_slow()
        conn.settimeout(left)
    try:
        chunk = conn.recv(size)
    except TimeoutError:
        if deadline is None:
            raise
        raise _too_slow() from None
    if not chunk:
        raise EOFError
    return chunk


def _too_slow() -> RefusedRequestError:
    return RefusedRequestError(408, f"the request did not arrive whole within {REQUEST_TIMEOUT:g} s")


def _parse_head(head: bytes) -> tuple[str, str, str, dict[str, str]]:
    try:
        line, *fields = head.decode("latin-1").split("\r\n")
        method, path, version = line.split(" ")
    except ValueError:
        raise RefusedRequestError(400, "not an HTTP request") from None
    headers: dict[str, str] = {}
    for field in fields:
        name, colon, value = field.partition(":")
        if not colon:
            raise RefusedRequestError(400, "a header line without a colon")
        name, value = name.strip().lower(), value.strip()
        if name == "content-length" and headers.get(name, value) != value:
            raise RefusedRequestError(400, "two different Content-Length headers")
        headers[name] = value
    return method, path.partition("?")[0], version, headers


def _content_length(headers: dict[str, str]) -> int:
    text = headers.get("content-length")
    if text is None:
        raise RefusedRequestError(411, "send the body with a Content-Length")
    if not (text.isascii() and text.isdigit()):  # not "²": str.isdigit() takes it, int() does not
        raise RefusedRequestError(400, "Content-Length must be a number")
    return int(text)


def _read_body(conn: socket.socket, buffered: bytes, length: int, deadline: float) -> bytes:
    if len(buffered) > length:
        raise RefusedRequestError(400, "a request was sent before the answer to the one before it")
    parts, have = [buffered], len(buffered)
    while have < length:
        parts.append(_recv(conn, min(length - have, 1 << 20), deadline))
        have += len(parts[-1])
    return b"".join(parts)


#: Refusals answered at once (each lingers up to a second in a thread of its own); past
#: this, a connection to refuse is closed without an answer, so that another user's process
#: opening connections as fast as it can costs the manager no more than this many threads.
MAX_REFUSING = 8
_refusing = threading.BoundedSemaphore(MAX_REFUSING)


def _refuse(conn: socket.socket, code: int, body: bytes) -> None:
    """Answer ``code`` and close, in a thread of its own: the request is not read, but up
    to :data:`MAX_HEAD` of it is taken in for a moment after the answer (closing with
    unread data would reset the connection, and the client would see that, not why)."""
    if not _refusing.acquire(blocking=False):
        conn.close()
        return

    def refuse() -> None:
        try:
            conn.settimeout(1.0)
            _answer(conn, code, body, close=True)
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_WR)
                taken = 0
                while taken < MAX_HEAD and (chunk := conn.recv(4096)):
                    taken += len(chunk)
        finally:
            conn.close()
            _refusing.release()

    threading.Thread(target=refuse, name="shmstore-http-refuse", daemon=True).start()


def _answer(conn: socket.socket, code: int, body: bytes, close: bool) -> None:
    head = f"HTTP/1.1 {code} {_REASONS.get(code, 'Error')}\r\nContent-Length: {len(body)}\r\n"
    if body:
        head += "Content-Type: text/plain; charset=utf-8\r\n"
    if close:
        head += "Connection: close\r\n"
    with contextlib.suppress(OSError):
        conn.sendall(head.encode() + b"\r\n" + body)


#: The first file descriptor systemd passes (SD_LISTEN_FDS_START), and the name the socket
#: unit install-service writes gives it (FileDescriptorName=).
LISTEN_FDS_START = 3
LISTEN_NAME = "http"


def inherited_listener() -> socket.socket | None:
    """The listening socket systemd passed this process for events (socket activation:
    ``shmstore.socket``, which install-service writes), or None. systemd holds that socket
    while the manager is down or restarting, so an agent's http hook waits in its backlog
    (within the hook's timeout) instead of being refused, which Claude Code would show the
    user as "hook failed"; and a connection to it starts a stopped manager."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return None
    count = int(os.environ.get("LISTEN_FDS", "0") or 0)
    names = os.environ.get("LISTEN_FDNAMES", "").split(":")
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)  # for this process only: a child must not take them as its own
    for index in range(count):
        if names[index : index + 1] in ([LISTEN_NAME], [""], []):
            listener = socket.socket(fileno=LISTEN_FDS_START + index)
            if listener.family in (socket.AF_INET, socket.AF_INET6) and listener.type == socket.SOCK_STREAM:
                os.set_inheritable(listener.fileno(), False)
                return listener
            listener.detach()
    return None
