"""An adversarial review of the shared-memory read path (shmstore.clients.shared, shmstore.transport.segment),
against real manager processes: staleness (a manager killed after its process forked, one
stopped, one replaced at the same address), growth under reader processes, records at the
slot boundary, hostile peers of the ``segment`` request, fd hygiene, and shared-memory
reads against socket reads after the writes that touch closed sessions."""

from __future__ import annotations

import json
import mmap
import os
import resource
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import multiprocess
import pytest
from helpers import PYTHON, StartServer, make_session, same_views, serving, wait_until_stopped
from multiprocess import managers

import shmstore
from shmstore.errors import ConflictError
from shmstore.transport import segment, wire

pytestmark = pytest.mark.skipif(not segment.supported(), reason="shared reads need x86-64 Linux with memfd sealing")

KEY = b"k" * 32

#: An application that embeds a manager (serve() in a thread) and, once told on stdin,
#: forks a worker that outlives it (the worker says its pid).
EMBEDDING_APP = """
import os, sys, threading, time
import shmstore
ready = threading.Event()
threading.Thread(
    target=shmstore.serve,
    args=(sys.argv[1], bytes.fromhex(sys.argv[2])),
    kwargs={"stop_event": threading.Event(), "on_ready": lambda address: ready.set()},
    daemon=True,
).start()
ready.wait(30)
print("ready", flush=True)
sys.stdin.readline()
if os.fork() == 0:
    print(os.getpid(), flush=True)  # the fork's handlers have run
    time.sleep(60)
    os._exit(0)
time.sleep(60)
"""

#: A reader process: reads list_all, get and snapshot from shared memory until told to stop
#: (stdin closes) while the test creates sessions N0, N1, ... in order (never removing one):
#: every snapshot must hold exactly the first ``revision`` of them, every listing a prefix.
GROWTH_READER = """
import json, select, sys
import shmstore
client = shmstore.Client(sys.argv[1], bytes.fromhex(sys.argv[2]))
pad = sys.argv[3]
reads, bad, generations = 0, [], set()
poller = select.poll()
poller.register(sys.stdin.fileno(), select.POLLIN | select.POLLHUP)
client.list_all()
print("ready", flush=True)
while not poller.poll(0):
    snap = client.snapshot()
    ids = sorted(int(s.id[len(pad):]) for s in snap.sessions)
    if ids != list(range(len(ids))) or snap.revision != len(ids):
        bad.append(["snapshot", snap.revision, ids[-3:], len(ids)])
    listed = sorted(int(s.id[len(pad):]) for s in client.list_all())
    if listed != list(range(len(listed))) or len(listed) < len(ids):
        bad.append(["list_all", len(listed), len(ids)])
    if ids and client.get(pad + str(ids[-1])) is None:
        bad.append(["get", ids[-1]])
    reader = client._shared._reader
    if reader is not None:
        generations.add(reader.generation)
    reads += 1
print(json.dumps({"reads": reads, "bad": bad[:5], "generations": sorted(generations)}))
"""


def mapped() -> bool:
    return "/memfd:shmstore" in Path("/proc/self/maps").read_text()


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def serving_clients(client: shmstore.Client, count: int) -> None:
    """Wait until the manager serves ``count`` connections (a client's close reaches the
    manager's thread a moment later)."""
    deadline = time.monotonic() + 5
    while (clients := client.info()["clients"]) != count:
        assert time.monotonic() < deadline, f"the manager serves {clients} connections, not {count}"
        time.sleep(0.02)


def settled_fds(server: shmstore.ServerProcess, writer: shmstore.Client) -> int:
    """The manager's open fds once ``writer`` is its only client."""
    serving_clients(writer, 1)
    return fds(server.pid)


# -- staleness ----------------------------------------------------------------------------------


def test_a_manager_killed_after_its_process_forked_is_never_read_as_alive(sock_dir: Path) -> None:
    # The fork held copies of the manager's ends of the readers' liveness connections, so
    # a reader never saw them close and read the dead manager's sessions as current.
    address = str(sock_dir / "embed.sock")
    argv = [PYTHON, "-c", EMBEDDING_APP, address, KEY.hex()]
    with subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as app:
        worker = 0
        try:
            assert app.stdin is not None
            assert app.stdout is not None
            assert app.stdout.readline() == "ready\n"
            with shmstore.Client(address, KEY, timeout=1) as client:
                client.report("s1", "working", "/p")
                assert client.get("s1") is not None
                assert client._shared is not None
                assert client._shared._reader is not None
                app.stdin.write("\n")
                app.stdin.flush()
                worker = int(app.stdout.readline())
                app.kill()
                app.wait(10)
                for read in (lambda: client.get("s1"), client.list_all, client.snapshot):
                    with pytest.raises(shmstore.StoreUnavailableError):
                        print(read())
            assert not mapped()
        finally:
            app.kill()
            if worker:
                os.kill(worker, signal.SIGKILL)


def test_a_read_from_a_stopped_manager_gives_up_within_twice_the_clients_timeout(start_server: StartServer) -> None:
    # Attaching waited the whole timeout, then the socket call twice more (its connection,
    # then a fresh one): 3x, where a call's documented bound is 2x.
    server = start_server()
    clients = [shmstore.Client(server.address, server.authkey, timeout=1).connect() for _ in range(3)]
    try:
        clients[0].report("s1", "working", "/p")
        os.kill(server.pid, signal.SIGSTOP)
        try:
            wait_until_stopped(server.pid)
            reads = (lambda: clients[0].get("s1"), clients[1].list_all, clients[2].snapshot)
            for read in reads:  # each client connected but not attached: the read attaches
                started = time.monotonic()
                with pytest.raises(shmstore.StoreUnavailableError):
                    read()
                assert time.monotonic() - started < 2 * 1 + 0.5
        finally:
            os.kill(server.pid, signal.SIGCONT)
    finally:
        for client in clients:
            client.close()


def test_a_client_attached_to_a_stopped_manager_reads_its_unchanged_sessions(start_server: StartServer) -> None:
    server = start_server()
    with shmstore.Client(server.address, server.authkey, timeout=1) as client:
        written = client.report("s1", "working", "/p")
        assert client.get("s1") == written
        os.kill(server.pid, signal.SIGSTOP)
        try:
            wait_until_stopped(server.pid)
            assert client.get("s1") == written  # nothing can change while it is stopped
            with pytest.raises(shmstore.StoreUnavailableError):
                client.report("s1", "attention", "/p")
        finally:
            os.kill(server.pid, signal.SIGCONT)


def test_a_manager_replaced_at_the_same_address_is_read_with_none_of_the_old_sessions(
    start_server: StartServer,
) -> None:
    old = start_server(authkey=KEY)
    with shmstore.Client(old.address, KEY, timeout=2) as client:
        client.report("old", "working", "/p")
        old_epoch = client.snapshot().epoch
        os.kill(old.pid, signal.SIGKILL)
        old.process.join(10)
        new = start_server(authkey=KEY)
        with shmstore.Client(new.address, KEY, shared_memory=False) as sock:
            sock.report("new", "working", "/p")
            assert client.get("old") is None
            assert [s.id for s in client.list_all()] == ["new"]
            snap = client.snapshot()
            assert (snap.epoch, snap.revision, [s.id for s in snap.sessions]) == (sock.snapshot().epoch, 1, ["new"])
            assert snap.epoch != old_epoch
            time.sleep(shmstore.clients.shared.RETRY_AFTER)  # the failed attach to the dead one is retried
            assert client.get("new") is not None
            assert client._shared is not None
            assert client._shared._reader is not None
            same_views(client, sock, ["old", "new"])


def test_a_client_read_after_close_maps_afresh_and_close_again_unmaps(store: shmstore.Client) -> None:
    written = store.report("s1", "working", "/p")
    assert store.get("s1") == written
    store.close()
    assert not mapped()
    assert store.get("s1") == written
    assert mapped()
    store.close()
    assert not mapped()


# -- growth ---------------------------------------------------------------------------------------


def test_reader_processes_see_every_session_created_in_order_while_the_segment_grows(
    server: shmstore.ServerProcess,
) -> None:
    pad = "i" * 250  # ids near the 256-byte limit
    readers = [
        subprocess.Popen(
            [PYTHON, "-c", GROWTH_READER, str(server.address), server.authkey.hex(), pad],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in "ab"
    ]
    try:
        for proc in readers:
            assert proc.stdout is not None
            assert proc.stdout.readline() == "ready\n"
        with shmstore.Client(server.address, server.authkey, shared_memory=False) as writer:
            for n in range(300):  # 64 slots at first: three moves
                writer.report(pad + str(n), "working", "/p")
        reports = [json.loads(proc.communicate("", timeout=60)[0]) for proc in readers]
    finally:
        for proc in readers:
            proc.kill()
            proc.wait(10)
    for report in reports:
        assert report["bad"] == []
        assert report["reads"] > 0
        assert len(report["generations"]) > 1  # it re-attached to a grown segment


def test_a_record_that_exactly_fills_its_slot_is_read_and_one_byte_more_is_too_big() -> None:
    with segment.Segment(4, 128, b"\0" * 8) as writer:
        fd = os.dup(writer.fd)
        try:
            reader = segment.Reader(fd)
        finally:
            os.close(fd)
        with reader:
            id = "x" * 8
            room = 128 - 24 - len(id)
            writer.put(id, b"a" * room, 1)
            assert reader.read(id) == b"a" * room
            writer.put(id, b"b" * (room + 1), 2)
            assert reader.read(id) is segment.TOO_BIG
            writer.put(id, b"c" * room, 3)
            assert reader.read(id) == b"c" * room


def test_an_id_removed_and_added_again_is_read_as_the_new_session(store: shmstore.Client) -> None:
    with shmstore.Client(store.address, store._authkey, shared_memory=False) as sock:
        for n in range(20):
            first = sock.report("s1", "working", f"/first{n}")
            assert store.get("s1") == first
            sock.report("other", "working", "/p")  # takes the freed slot in between
            sock.remove("s1")
            assert store.get("s1") is None
            again = sock.report("s1", "attention", f"/again{n}")
            assert store.get("s1") == again
            sock.remove("other")
            same_views(store, sock, ["s1", "other"])


# -- hostile peers ----------------------------------------------------------------------------------


def test_a_second_segment_request_ends_only_that_connection(server: shmstore.ServerProcess) -> None:
    conn = wire.Client(server.address, authkey=server.authkey, timeout=5)
    try:
        assert managers.dispatch(conn, None, "segment", ()) is True
        sock = socket.socket(fileno=conn.fileno())
        try:
            segment.receive_segment(sock, time.monotonic() + 5).close()
        finally:
            sock.detach()
        conn.send((None, "segment", (), {}))
        with pytest.raises(EOFError):
            conn.recv()  # the manager closes the connection: no second segment
    finally:
        conn.close()
    with shmstore.connect(server.address, server.authkey) as client:
        assert client.report("s1", "working", "/p").id == "s1"
        assert client.info()["clients"] == 1


def test_peers_that_never_take_the_fd_block_no_write_and_free_their_slots(start_server: StartServer) -> None:
    server = start_server(max_connections=24)
    with shmstore.Client(server.address, server.authkey, shared_memory=False) as writer:
        writer.report("s1", "working", "/p")
        with shmstore.Client(server.address, server.authkey) as first:
            assert first.get("s1") is not None  # the manager makes its segment: one fd more, kept
        base = settled_fds(server, writer)
        peers = [wire.Client(server.address, authkey=server.authkey, timeout=5) for _ in range(20)]
        try:
            for peer in peers:
                peer.send((None, "segment", (), {}))
            started = time.monotonic()
            writer.report("s1", "attention", "/p")
            assert time.monotonic() - started < 1
            assert writer.info()["clients"] == 21
        finally:
            for peer in peers:
                peer.close()
        assert settled_fds(server, writer) == base


def test_the_map_cannot_be_made_writable_even_through_proc_map_files(store: shmstore.Client) -> None:
    store.report("s1", "working", "/p")
    assert store.get("s1") is not None
    line = next(line for line in Path("/proc/self/maps").read_text().splitlines() if "memfd:shmstore" in line)
    fd = os.open(f"/proc/self/map_files/{line.split()[0]}", os.O_RDWR)
    try:
        with pytest.raises(PermissionError):
            mmap.mmap(fd, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        with pytest.raises(PermissionError):
            os.write(fd, b"x")
        with pytest.raises(PermissionError):
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)


# -- fd hygiene ---------------------------------------------------------------------------------------


def test_many_clients_coming_and_going_leave_no_fd_map_or_connection_in_either_process(
    server: shmstore.ServerProcess,
) -> None:
    with shmstore.Client(server.address, server.authkey, shared_memory=False) as writer:
        writer.report("s1", "working", "/p")
        with shmstore.Client(server.address, server.authkey) as first:
            assert first.get("s1") is not None  # the manager makes its segment: one fd more, kept
        mine, theirs = fds(os.getpid()), settled_fds(server, writer)
        for _ in range(40):
            with shmstore.Client(server.address, server.authkey) as client:
                assert client.get("s1") is not None
                assert client.list_all()
                serving_clients(writer, 2)  # a client that only reads holds one connection
        assert not mapped()
        assert fds(os.getpid()) == mine
        assert settled_fds(server, writer) == theirs


def test_a_client_out_of_fds_still_reads_over_its_open_connection(server: shmstore.ServerProcess) -> None:
    script = """
import os, resource, sys
import shmstore
client = shmstore.Client(sys.argv[1], bytes.fromhex(sys.argv[2]), shared_memory=True)
client.report("s1", "working", "/p")
client.revision()  # this thread's connection is open
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))
hoard = []
try:
    while True:
        hoard.append(os.open("/dev/null", os.O_RDONLY))
except OSError:
    pass
print(client.get("s1").id, client._shared._reader is None)
"""
    done = subprocess.run(
        [PYTHON, "-c", script, str(server.address), server.authkey.hex()], capture_output=True, text=True, timeout=60
    )
    assert (done.returncode, done.stdout) == (0, "s1 True\n"), done.stderr


# -- the same answers as the socket --------------------------------------------------------------------


def test_reads_from_shared_memory_equal_the_socket_after_writes_that_touch_closed_sessions(
    store: shmstore.Client,
) -> None:
    ids = ["s1", "s2"]
    with shmstore.Client(store.address, store._authkey, shared_memory=False) as sock:
        sock.report("s1", "working", "/p")
        sock.report("s2", "working", "/p")
        same_views(store, sock, ids)
        sock.report("s1", "closed", "/p")
        same_views(store, sock, ids)
        sock.add_usage("s1", 10, 5)  # a recently closed session's usage
        same_views(store, sock, ids)
        assert store.get("s1") == sock.get("s1")
        resumed = sock.report("s1", "working", "/p")  # resumes the closed session
        assert store.get("s1") == resumed
        same_views(store, sock, ids)
        current = sock.get("s2")
        assert current is not None
        before = store.snapshot()
        with pytest.raises(ConflictError):
            sock.set(make_session("s2", working_dir="/x"), expected_revision=current.revision - 1)
        assert store.snapshot() == before
        sock.set(make_session("s2", working_dir="/x"), expected_revision=current.revision)
        same_views(store, sock, ids)
        sock.prune(0)
        same_views(store, sock, ids)
        assert store.snapshot().revision == sock.revision()


def test_a_manager_out_of_fds_at_the_first_segment_request_shares_one_once_it_has_fds_again(
    sock_dir: Path,
) -> None:
    # segment.supported() kept the False of a failed memfd_create (EMFILE) for the process's
    # lifetime, and a client the manager once told "no segment" never asked again.
    address = sock_dir / "fds.sock"
    with serving(address) as manager, shmstore.Client(address, shared_memory=False) as writer:
        writer.report("s1", "working", "/p")
        open_fds = {int(fd) for fd in os.listdir(f"/proc/{manager.pid}/fd")}
        free = [fd for fd in range(max(open_fds) + 3) if fd not in open_fds]
        limits = resource.prlimit(manager.pid, resource.RLIMIT_NOFILE)
        # One fd free below the limit: the segment connection takes it, memfd_create fails.
        resource.prlimit(manager.pid, resource.RLIMIT_NOFILE, (free[1], limits[1]))
        with shmstore.Client(address) as reader:
            assert reader._shared is not None
            assert reader._shared.list_all() is None  # attached, but the manager had no fd for a segment
            assert reader._shared._conn is not None
            assert not mapped()
            resource.prlimit(manager.pid, resource.RLIMIT_NOFILE, limits)
            time.sleep(shmstore.clients.shared.RETRY_AFTER)
            assert reader.get("s1") is not None
            assert mapped()


def _idle_child(ready: object, done: object) -> None:
    ready.set()  # type: ignore[attr-defined]
    done.wait(30)  # type: ignore[attr-defined]


def test_a_forked_child_that_never_reads_does_not_keep_its_parents_connection_open(
    server: shmstore.ServerProcess,
) -> None:
    with shmstore.Client(server.address, server.authkey, shared_memory=False) as writer:
        writer.report("s1", "working", "/p")
        client = shmstore.Client(server.address, server.authkey)
        assert client.get("s1") is not None
        assert writer.info()["clients"] == 2
        ctx = multiprocess.get_context("fork")
        ready, done = ctx.Event(), ctx.Event()
        child = ctx.Process(target=_idle_child, args=(ready, done))
        child.start()
        try:
            assert ready.wait(30)
            client.close()
            settled_fds(server, writer)  # the manager serves only the writer: the reader's slot is free
            assert child.is_alive()
        finally:
            done.set()
            child.join(10)
        assert child.exitcode == 0


@pytest.mark.parametrize("id", ["\ud800", "a\udcff", "", "x" * 300, "a\x00"])
def test_a_bad_id_gets_the_same_validation_error_from_shared_memory_as_over_the_socket(
    store: shmstore.Client, id: str
) -> None:
    store.report("s1", "working", "/p")
    assert store.get("s1") is not None  # mapped
    with (
        shmstore.Client(store.address, store._authkey, shared_memory=False) as sock,
        pytest.raises(shmstore.ValidationError) as over_socket,
    ):
        sock.get(id)
    with pytest.raises(shmstore.ValidationError) as from_shared:
        store.get(id)
    assert str(from_shared.value) == str(over_socket.value)


def test_threads_reading_while_another_thread_closes_the_client_always_get_the_right_answers(
    store: shmstore.Client,
) -> None:
    written = store.report("s1", "working", "/p")
    failures: list[str] = []
    reads = [0]
    stop = threading.Event()

    def read() -> None:
        while not stop.is_set():
            try:
                assert store.get("s1") == written
                assert store.list_all() == [written]
                assert store.snapshot().revision == written.revision
            except Exception as exc:  # collected, and asserted on below
                failures.append(repr(exc))
                return
            reads[0] += 1

    threads = [threading.Thread(target=read) for _ in range(3)]
    for thread in threads:
        thread.start()
    for _ in range(100):
        store.close()
        time.sleep(0.002)
    stop.set()
    for thread in threads:
        thread.join(30)
    assert failures == []
    assert reads[0] > 100
    store.close()
    assert not mapped()
