"""No call ever returns another call's data, and nothing waits past its deadline.

Interrupted calls, forks, clients sharing a thread, writes whose outcome was lost, hostile
or slow peers, a full manager, oversized messages: each against a real manager process.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import multiprocess
import pytest
from helpers import StartServer, make_session, wait_until_stopped

import shmstore
from shmstore import ApiUsage, StoreUnavailableError
from shmstore.record import session_from_store
from shmstore.store import Store
from shmstore.transport import protocol, wire


@pytest.fixture
def stopped(server: shmstore.ServerProcess) -> Iterator[shmstore.ServerProcess]:
    """The manager, SIGSTOPped for the test (and always resumed after it)."""
    os.kill(server.pid, signal.SIGSTOP)
    wait_until_stopped(server.pid)
    try:
        yield server
    finally:
        os.kill(server.pid, signal.SIGCONT)


def resume_after(server: shmstore.ServerProcess, seconds: float) -> threading.Timer:
    timer = threading.Timer(seconds, os.kill, (server.pid, signal.SIGCONT))
    timer.start()
    return timer


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


# -- 1. an interrupted call ----------------------------------------------------------------------


def test_a_call_interrupted_by_a_signal_never_hands_its_reply_to_the_next_call(
    server: shmstore.ServerProcess, store: shmstore.Client
) -> None:
    store.set(make_session("alpha"))
    store.set(make_session("beta"))

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.2)
        with pytest.raises(KeyboardInterrupt):
            store.changes(store.revision(), timeout=5)  # waits in the manager
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    with shmstore.connect(server.address, server.authkey) as other:
        other.transition("alpha", "attention")  # the abandoned changes() call now gets its reply
    time.sleep(0.1)  # and it has reached the client's side
    for _ in range(3):
        beta = store.get("beta")
        assert beta is not None
        assert beta.id == "beta"
    assert store.list_all()[0].id in ("alpha", "beta")


def test_a_reply_out_of_step_with_its_request_is_detected_not_delivered(server: shmstore.ServerProcess) -> None:
    setup = wire.Client(server.address, authkey=server.authkey, timeout=5)
    ident, _ = multiprocess.managers.dispatch(setup, None, "create", ("store",))
    setup.close()
    conn = wire.Client(server.address, authkey=server.authkey, timeout=5)
    try:
        multiprocess.managers.dispatch(conn, None, "accept_connection", ("test",))  # request 1
        conn.send((ident, "get", ("alpha",), {}))  # its reply is never read...
        conn.send((ident, "get", ("beta",), {}))
        with pytest.raises(wire.OutOfStepError, match="reply to request 2 while waiting for request 3"):
            conn.recv()  # ...so the next one read is the first's
    finally:
        conn.close()


# -- 2. fork -------------------------------------------------------------------------------------------


def test_a_forked_child_and_its_parent_each_get_only_their_own_replies(store: shmstore.Client) -> None:
    store.set(make_session("child"))
    for _ in range(4):  # had they shared a socket, each round would cross their replies half the time
        revision = store.revision()  # the parent's connection exists before the fork
        pid = os.fork()
        if pid == 0:  # the child: a wrong reply or an error is a non-zero exit
            code = 1
            try:
                time.sleep(0.05)  # while the parent's changes() waits in the manager
                session = store.get("child")
                code = 0 if session is not None and session.id == "child" else 2
            finally:
                os._exit(code)
        changes = store.changes(revision, timeout=0.3)
        _, status = os.waitpid(pid, 0)
        assert changes.events == ()
        assert os.waitstatus_to_exitcode(status) == 0


def test_writes_from_a_forked_child_are_never_taken_for_its_parents_retries(store: shmstore.Client) -> None:
    store.set(make_session("s1"))
    store.add_usage("s1", 1)  # the parent's request number 2 on its thread
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            store.add_usage("s1", 10)  # the child's first write must not be deduplicated away
            code = 0
        finally:
            os._exit(code)
    store.add_usage("s1", 100)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    session = store.get("s1")
    assert session is not None
    assert session.api_usage is not None
    assert session.api_usage.input_tokens == 111


# -- 3. every Client owns its connections ---------------------------------------------------------


def test_each_client_keeps_its_own_timeout_in_one_thread(server: shmstore.ServerProcess) -> None:
    impatient = shmstore.connect(server.address, server.authkey, timeout=0.2)
    patient = shmstore.connect(server.address, server.authkey, timeout=10)
    impatient.revision()  # the impatient client's connection opens first in this thread
    os.kill(server.pid, signal.SIGSTOP)
    wait_until_stopped(server.pid)
    timer = resume_after(server, 0.8)
    try:
        started = time.monotonic()
        assert patient.revision() == 0
        assert time.monotonic() - started > 0.6
    finally:
        timer.join()
        impatient.close()
        patient.close()


def test_close_closes_the_clients_sockets(server: shmstore.ServerProcess) -> None:
    before = open_fds()
    client = shmstore.connect(server.address, server.authkey)
    client.revision()
    # Three calls at once (each waits in the manager for half a second) take a connection each.
    threads = [threading.Thread(target=client.changes, args=(0, 0.5)) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert open_fds() >= before + 3  # the first call's connection serves one of the three
    client.close()
    assert open_fds() == before


# -- 4. the outcome of a failed write -------------------------------------------------------------


def test_a_write_that_timed_out_is_retried_and_applied_exactly_once(server: shmstore.ServerProcess) -> None:
    store = shmstore.Client(server.address, server.authkey, timeout=1.0)
    store.set(make_session("s1"))
    store.add_usage("s1", 1)
    os.kill(server.pid, signal.SIGSTOP)
    wait_until_stopped(server.pid)
    # After the first try timed out, early in the retry: 0.8 s for the resumed manager to
    # answer (with a 0.3 s timeout and 0.15 s of it, a loaded machine missed it).
    timer = resume_after(server, 1.2)
    try:
        session = store.add_usage("s1", 100)
    finally:
        timer.join()
    assert session.api_usage is not None
    assert session.api_usage.input_tokens == 101
    stored = store.get("s1")
    assert stored is not None
    assert stored.api_usage is not None
    assert stored.api_usage.input_tokens == 101


def test_the_store_runs_a_request_once_however_often_it_arrives() -> None:
    store = Store()
    store.set(make_session("s1").to_json())
    first = store.once(b"c" * 16, 1, "add_usage", "s1", 5, 0)
    again = store.once(b"c" * 16, 1, "add_usage", "s1", 5, 0)
    assert first == again
    assert store.once(b"c" * 16, 0, "add_usage", "s1", 5, 0) is None  # older than the newest: not run
    assert session_from_store(store.get("s1")).api_usage == ApiUsage(5, 0)
    store.once(b"d" * 16, 1, "add_usage", "s1", 5, 0)  # another client's number 1 is its own
    assert session_from_store(store.get("s1")).api_usage == ApiUsage(10, 0)


def test_once_refuses_what_is_not_a_write() -> None:
    store = Store()
    with pytest.raises(shmstore.ValidationError, match="method"):
        store.once(b"c" * 16, 1, "snapshot")
    with pytest.raises(shmstore.ValidationError, match="client"):
        store.once(b"", 1, "prune", 0)
    assert store.revision() == 0


# -- 7, 8. hostile and slow peers ---------------------------------------------------------------


def frame(payload: bytes) -> bytes:
    return struct.pack("!i", len(payload)) + payload


def read_frame(sock: socket.socket) -> bytes:
    (size,) = struct.unpack("!i", sock.recv(4, socket.MSG_WAITALL))
    return sock.recv(size, socket.MSG_WAITALL)


def test_a_wrong_digest_is_answered_by_silence_not_a_traceback(server: shmstore.ServerProcess) -> None:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(5)
        sock.connect(str(server.address))
        assert read_frame(sock).startswith(b"#SHMSTORE-1#CHALLENGE#")
        sock.sendall(frame(b"x" * 32))
        rest = b""
        while chunk := sock.recv(4096):
            rest += chunk
    assert rest == b""


def test_a_trickling_peer_is_dropped_at_the_handshake_deadline(
    start_server: StartServer,
) -> None:
    server = start_server(handshake_timeout=1.0)
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(str(server.address))
        started = time.monotonic()
        read_frame(sock)
        dropped = None
        for byte in frame(b"y" * 64):  # one byte every 0.3 s: each read alone is quick
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                dropped = time.monotonic() - started
                break
            time.sleep(0.3)
        assert dropped is not None
        assert dropped < 2.0


def test_a_client_turned_away_by_a_full_manager_is_told_so(sock_dir: Path) -> None:
    with shmstore.start_server(sock_dir / "f.sock", max_connections=2, handshake_timeout=30) as server:
        squatters = [socket.socket(socket.AF_UNIX) for _ in range(2)]
        try:
            for sock in squatters:
                sock.connect(str(server.address))
                read_frame(sock)  # accepted: it holds a slot
            with pytest.raises(StoreUnavailableError, match="as many clients as it may"):
                shmstore.connect(server.address, server.authkey, timeout=2)
        finally:
            for sock in squatters:
                sock.close()


def test_a_full_listen_queue_is_waited_out_within_the_timeout(stopped: shmstore.ServerProcess) -> None:
    crowd = []
    try:
        while len(crowd) < 1000:  # fill the stopped manager's backlog until connect() refuses
            sock = socket.socket(socket.AF_UNIX)
            sock.setblocking(False)
            try:
                sock.connect(str(stopped.address))
            except BlockingIOError:
                sock.close()
                break
            crowd.append(sock)
        assert len(crowd) < 1000, "the backlog never filled"
        timer = resume_after(stopped, 0.5)
        for sock in crowd:
            sock.close()
        with shmstore.connect(stopped.address, stopped.authkey, timeout=5) as store:
            assert store.revision() == 0
        timer.join()
    finally:
        for sock in crowd:
            sock.close()


# -- 9, 10. oversized messages and sends with a deadline -----------------------------------------


def test_an_announced_message_over_the_limit_is_a_typed_error_at_once() -> None:
    ours, theirs = socket.socketpair()
    conn = wire.Connection(ours.detach())
    conn.deadline = time.monotonic() + 5
    try:
        theirs.sendall(struct.pack("!i", wire.MAX_MESSAGE + 1))
        with pytest.raises(wire.MessageTooLargeError, match="larger than"):
            conn.recv()
    finally:
        conn.close()
        theirs.close()


def test_a_reply_over_the_limit_is_a_typed_error_and_the_next_call_works(
    start_server: StartServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(protocol, "MAX_MESSAGE", 256 * 1024)  # the forked manager inherits it
    # Forked even from a pytest process that runs a thread (xdist's), which start_server would
    # otherwise not fork: that thread holds nothing the manager needs.
    server = start_server(start_method="fork")
    with shmstore.connect(server.address, server.authkey) as store:
        for n in range(100):
            store.set(make_session(f"s{n}", working_dir="/" + "d" * 4000))  # 100 x ~4 KB > 256 KiB
        with pytest.raises(StoreUnavailableError, match=r"reply: make [0-9]+ bytes; the most one message carries"):
            store.list_all()
        assert store.get("s7") is not None


def test_a_large_send_to_a_stopped_manager_gives_up_at_the_deadline(server: shmstore.ServerProcess) -> None:
    with shmstore.connect(server.address, server.authkey, timeout=0.5) as store:
        os.kill(server.pid, signal.SIGSTOP)
        wait_until_stopped(server.pid)
        big = make_session("big", working_dir="/" + "w" * 4000, session_id="r" * 200)
        started = time.monotonic()

        def send_far_more_than_the_socket_buffers_hold() -> None:
            for _ in range(400):  # ~2 MB in all
                store.set(big)

        with pytest.raises(StoreUnavailableError):
            send_far_more_than_the_socket_buffers_hold()
        assert time.monotonic() - started < 3.0  # two tries of 0.5 s, and their connects
        os.kill(server.pid, signal.SIGCONT)


# -- 14. Watch ---------------------------------------------------------------------------------------


def test_watch_sessions_reflect_only_the_events_yielded(store: shmstore.Client) -> None:
    start = store.revision()
    for id in ("a", "b", "c"):
        store.set(make_session(id))
    watch = store.watch(after_revision=start)
    first = watch.poll(1)
    assert first is not None
    assert first.id == "a"
    assert set(watch.sessions) == {"a"}
    assert watch.revision == first.revision
    watch.poll(1)
    assert set(watch.sessions) == {"a", "b"}


def test_serve_in_a_thread_leaves_no_thread_behind(sock_dir: Path) -> None:
    stop = threading.Event()
    ready = threading.Event()
    thread = threading.Thread(
        target=shmstore.serve,
        args=(sock_dir / "thread.sock",),
        kwargs={"stop_event": stop, "on_ready": lambda _: ready.set()},
    )
    thread.start()
    assert ready.wait(5)
    stop.set()
    thread.join(10)
    deadline = time.monotonic() + 2
    while any(t.name == "shmstore-accept" for t in threading.enumerate()) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not thread.is_alive()
    assert not any(t.name == "shmstore-accept" for t in threading.enumerate())


def test_a_watch_does_not_take_a_closed_session_changed_after_closing_for_a_live_one(store: shmstore.Client) -> None:
    store.set(make_session("s1"))
    watch = store.watch()
    assert watch.poll(1) is not None  # the snapshot
    store.transition("s1", "closed")
    store.add_usage("s1", 5)  # recently closed sessions still take token counts
    kinds = [event.kind for event in (watch.poll(1), watch.poll(1)) if event is not None]
    assert kinds == [shmstore.EventKind.CLOSE, shmstore.EventKind.ADD_USAGE]
    assert "s1" not in watch.sessions


def test_set_returns_the_session_as_stored(store: shmstore.Client) -> None:
    returned = store.set(make_session("s1", pid=os.getpid()))
    assert returned == store.get("s1")
    assert returned.pid_start is not None


# -- found by review: forks and threads against the deadline, arguments that cannot travel ----


def test_a_child_forked_while_a_thread_connects_is_not_stuck(server: shmstore.ServerProcess) -> None:
    client = shmstore.Client(server.address, server.authkey, timeout=1.0)
    os.kill(server.pid, signal.SIGSTOP)
    wait_until_stopped(server.pid)

    def first_call() -> None:
        with contextlib.suppress(StoreUnavailableError):  # either outcome is fine here
            client.revision()

    connecting = threading.Thread(target=first_call)
    connecting.start()
    time.sleep(0.2)  # the thread is now inside its first connect
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            code = 0 if client.revision() == 0 else 2
        finally:
            os._exit(code)
    os.kill(server.pid, signal.SIGCONT)
    deadline = time.monotonic() + 10
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    if done[0] == 0:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    connecting.join()
    assert done[0] == pid, "the child hung"
    assert os.waitstatus_to_exitcode(done[1]) == 0


def test_threads_sharing_a_client_each_give_up_within_their_own_deadline(server: shmstore.ServerProcess) -> None:
    client = shmstore.Client(server.address, server.authkey, timeout=0.5)
    os.kill(server.pid, signal.SIGSTOP)
    wait_until_stopped(server.pid)
    took: list[float] = []

    def call() -> None:
        started = time.monotonic()
        with pytest.raises(StoreUnavailableError):
            client.revision()
        took.append(time.monotonic() - started)

    threads = [threading.Thread(target=call) for _ in range(8)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
    finally:
        os.kill(server.pid, signal.SIGCONT)
    assert len(took) == 8
    assert max(took) < 2 * 0.5 + 0.5  # two tries of 0.5 s each, not a queue of them


class _Custom(str):
    pass


@pytest.mark.parametrize(
    "bad",
    [lambda: None, _Custom("s1"), [[[]]], "x" * (wire.MAX_MESSAGE + 1)],
    ids=["a function", "a str subclass", "a list", "70 MB"],
)
def test_arguments_that_cannot_travel_are_a_validation_error_and_the_connection_stays(
    store: shmstore.Client, bad: object
) -> None:
    store.set(make_session("s1"))
    before = store.revision()
    with pytest.raises(shmstore.ValidationError):
        store.get(bad)  # type: ignore[arg-type]
    assert store.revision() == before
    assert store.get("s1") is not None


def test_a_huge_changes_limit_is_only_an_upper_bound(store: shmstore.Client) -> None:
    store.set(make_session("s1"))
    assert [event.id for event in store.changes(0, limit=2**63).events] == ["s1"]


def test_an_authenticated_client_announcing_an_oversized_message_is_disconnected(
    server: shmstore.ServerProcess,
) -> None:
    conn = wire.Client(server.address, authkey=server.authkey, timeout=5)
    try:
        multiprocess.managers.dispatch(conn, None, "accept_connection", ("big",))
        os.write(conn.fileno(), struct.pack("!i", wire.MAX_MESSAGE + 1))  # and no body
        with pytest.raises(EOFError):
            conn.recv()
    finally:
        conn.close()


class _SlowManager:
    """A relay in front of a real manager that passes each connection's first ``quick``
    messages from the manager after ``delay`` seconds each and holds back every later one:
    a manager alive but slow at every stage of a call (handshake, create, accept, reply)."""

    def __init__(self, upstream: str, path: str, delay: float, quick: int) -> None:
        self.upstream, self.delay, self.quick = upstream, delay, quick
        self.sockets: list[socket.socket] = []
        self.listener = socket.socket(socket.AF_UNIX)
        self.listener.bind(path)
        self.listener.listen(16)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                client, _ = self.listener.accept()
                manager = socket.socket(socket.AF_UNIX)
                manager.connect(self.upstream)
                self.sockets += [client, manager]
                threading.Thread(target=self._pass, args=(client, manager), daemon=True).start()
                threading.Thread(target=self._hold, args=(manager, client), daemon=True).start()

    def _pass(self, source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)

    def _hold(self, manager: socket.socket, client: socket.socket) -> None:
        sent, pending = 0, b""
        with contextlib.suppress(OSError, struct.error):
            while sent < self.quick:
                while len(pending) < 4 or len(pending) < 4 + struct.unpack("!i", pending[:4])[0]:
                    data = manager.recv(65536)
                    if not data:
                        return
                    pending += data
                size = 4 + struct.unpack("!i", pending[:4])[0]
                time.sleep(self.delay)
                client.sendall(pending[:size])
                pending, sent = pending[size:], sent + 1

    def close(self) -> None:
        self.listener.close()
        for sock in self.sockets:
            sock.close()


def test_one_deadline_covers_every_stage_of_a_try(server: shmstore.ServerProcess, sock_dir: Path) -> None:
    relay = _SlowManager(str(server.address), str(sock_dir / "relay.sock"), delay=0.22, quick=4)
    try:
        store = shmstore.Client(sock_dir / "relay.sock", server.authkey, timeout=1.0)
        started = time.monotonic()
        with pytest.raises(StoreUnavailableError):
            store.revision()
        assert time.monotonic() - started < 2 * 1.0 + 0.5  # two tries; once took 5.6 s
    finally:
        relay.close()
