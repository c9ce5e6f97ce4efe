"""Reads from the manager's shared segment (shmstore.clients.shared) against real manager processes:
the same answers as the socket after every kind of write, a client's own writes, reader
processes against a writer at full speed (and the same readers without the seqlock's check
catching torn reads, so that test can fail), a killed manager, leaks, and who never maps."""

from __future__ import annotations

import gc
import json
import os
import random
import signal
import subprocess
from pathlib import Path
from typing import Any

import dev_shm
import multiprocess
import pytest
from helpers import PYTHON, StartServer, make_session, same_views
from multiprocess import managers

import shmstore
from shmstore.errors import NotFoundError
from shmstore.transport import segment, wire

pytestmark = pytest.mark.skipif(not segment.supported(), reason="shared reads need x86-64 Linux with memfd sealing")

WORKER = str(Path(__file__).with_name("shared_worker.py"))


def mapped() -> bool:
    """Whether this process maps a shmstore segment."""
    return "/memfd:shmstore" in Path("/proc/self/maps").read_text()


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_reads_from_shared_memory_equal_reads_over_the_socket_after_every_write(
    start_server: StartServer, seed: int
) -> None:
    # Few slots, so that churn fills the index with tombstones and the segment grows (moves).
    server = start_server(max_sessions=6, max_closed=3, max_history=5)
    rng = random.Random(seed)
    ids = [f"s{n}" for n in range(12)]
    with (
        shmstore.Client(server.address, server.authkey) as shm,
        shmstore.Client(server.address, server.authkey, shared_memory=False) as sock,
    ):
        for _ in range(150):
            id = rng.choice(ids)
            op = rng.randrange(7)
            try:
                if op == 0:
                    sock.report(id, rng.choice(["working", "attention", "question", "closed"]), "/p")
                elif op == 1:
                    sock.transition(id, rng.choice(["working", "attention"]))
                elif op == 2:
                    sock.add_usage(id, rng.randrange(100), 1)
                elif op == 3:
                    sock.remove(id)
                elif op == 4:  # too big for a slot: read over the socket, still the same answers
                    sock.set(make_session(id, working_dir="/" + "d" * rng.choice([10, 3000])))
                elif op == 5:
                    sock.prune(0)
                else:
                    shm.report(id, "working", "/mine")
            except (NotFoundError, shmstore.StoreFullError):
                pass
            same_views(shm, sock, ids)
        assert shm._shared is not None
        assert shm._shared._reader is not None
    assert not mapped()


def test_readers_follow_the_segment_when_the_manager_grows_it(server: shmstore.ServerProcess) -> None:
    with (
        shmstore.Client(server.address, server.authkey) as client,
        shmstore.Client(server.address, server.authkey, shared_memory=False) as sock,
    ):
        for n in range(150):  # past the first segment's 64 slots; removals leave tombstones
            written = client.report(f"s{n}", "working", "/p")
            assert client.get(f"s{n}") == written
            if n % 3:
                client.remove(f"s{n}")
        assert client._shared is not None
        assert client._shared._reader is not None
        assert client._shared._reader.generation > 0
        assert sorted(client.list_all(), key=lambda s: s.id) == sorted(sock.list_all(), key=lambda s: s.id)
        assert len(client.list_all()) == 50


def test_a_client_reads_its_own_writes_from_shared_memory(store: shmstore.Client) -> None:
    for n in range(50):
        written = store.report("s1", ("working", "attention")[n % 2], "/p")
        assert store.get("s1") == written
        assert store.list_all() == [written]
        assert store.snapshot().revision == written.revision
    assert store._shared is not None
    assert store._shared._reader is not None
    assert mapped()


def race(sock_dir: Path, check: bool, seconds: float = 3.0) -> tuple[dict, list[dict]]:
    """A manager whose own thread writes at full speed, and two reader processes."""
    address, key = str(sock_dir / "race.sock"), os.urandom(32).hex()
    manager = subprocess.Popen([PYTHON, WORKER, "manager", address, key, "0"], stdout=subprocess.PIPE, text=True)
    try:
        assert manager.stdout is not None
        assert manager.stdout.readline() == "ready\n"
        args = [address, key, str(seconds), "1" if check else "0"]
        readers = [subprocess.Popen([PYTHON, WORKER, "reader", *args], stdout=subprocess.PIPE, text=True) for _ in "ab"]
        reports = [json.loads(proc.communicate(timeout=seconds + 60)[0]) for proc in readers]
        manager.terminate()
        reports.insert(0, json.loads(manager.communicate(timeout=30)[0]))
    finally:
        manager.kill()
    assert [proc.returncode for proc in [manager, *readers]] == [0, 0, 0]
    return reports[0], reports[1:]


def test_reader_processes_never_see_a_torn_session_from_a_writer_at_full_speed(sock_dir: Path) -> None:
    writer, readers = race(sock_dir, check=True)
    assert writer["writes"] > 500, writer
    for reader in readers:
        assert reader["attached"], reader
        assert reader["reads"] > 1000, reader
        assert reader["socket"] < reader["reads"] / 10, reader  # nearly all from shared memory
        assert reader["violations"] == 0, reader
        assert reader["fds_after"] == reader["fds_before"], reader
    assert [report["dev_shm"] for report in [writer, *readers]] == [[], [], []]


def test_readers_without_the_sequence_check_do_see_torn_sessions(sock_dir: Path) -> None:
    # A torn read needs a reader on a CPU at the instant the manager writes its slot: with two
    # busy processes beside it on 2 CPUs, one 3 s race saw them in 2 runs of 3 (measured: 42-103
    # violations, or none), so up to four are run; the first that sees any ends the test.
    seen = []
    for _ in range(4):
        _, readers = race(sock_dir, check=False)
        seen.append(sum(reader["violations"] for reader in readers))
        if seen[-1]:
            break
    assert seen[-1] > 0, seen


def test_after_the_manager_is_killed_reads_raise_instead_of_answering_stale_sessions(
    start_server: StartServer,
) -> None:
    server = start_server()
    with shmstore.Client(server.address, server.authkey, timeout=2) as client:
        client.report("s1", "working", "/p")
        assert client.get("s1") is not None
        assert client._shared is not None
        assert client._shared._reader is not None
        os.kill(server.pid, signal.SIGKILL)
        server.process.join(10)
        for read in (lambda: client.get("s1"), client.list_all, client.snapshot):
            with pytest.raises(shmstore.StoreUnavailableError):
                read()
    assert not mapped()


def test_closing_a_client_leaves_no_fd_no_map_and_nothing_in_dev_shm(server: shmstore.ServerProcess) -> None:
    # An earlier test's garbage may still hold a socket, which a collection during this
    # test would close (seen once: 20 fds before, 18 after): collected first. Not after:
    # close() must let go of everything without the collector's help.
    gc.collect()
    names, fds = dev_shm.held(), len(os.listdir("/proc/self/fd"))
    with shmstore.Client(server.address, server.authkey) as client:
        client.report("s1", "working", "/p")
        assert client.get("s1") is not None
        assert client.list_all()
        assert mapped()
    assert len(os.listdir("/proc/self/fd")) == fds
    assert not mapped()
    assert dev_shm.held() == names


def test_a_recently_closed_session_is_read_over_the_socket(store: shmstore.Client) -> None:
    closed = store.report("s1", "closed", "/p")
    assert store.get("s1") == closed
    assert store.list_all() == []


def test_a_client_without_shared_memory_never_maps_the_segment(server: shmstore.ServerProcess) -> None:
    with shmstore.Client(server.address, server.authkey, shared_memory=False) as client:
        client.report("s1", "working", "/p")
        assert client.get("s1") is not None
        assert client.list_all()
        assert client.snapshot().sessions
        assert client._shared is None
        assert not mapped()


def test_a_tcp_client_reads_over_the_socket_and_the_manager_never_sends_the_segment_over_tcp(
    start_server: StartServer,
) -> None:
    server = start_server()
    tcp = shmstore.start_server(("127.0.0.1", 0), server.authkey)
    try:
        with shmstore.Client(tcp.address, tcp.authkey) as client:
            client.report("s1", "working", "/p")
            assert client.get("s1") is not None
            assert client.list_all()
            assert client._shared is None
            assert not mapped()
        conn = wire.Client(tcp.address, authkey=tcp.authkey, timeout=10)
        try:
            assert managers.dispatch(conn, None, "segment", ()) is False
        finally:
            conn.close()
    finally:
        tcp.stop()


def test_shared_memory_must_be_a_bool(server: shmstore.ServerProcess) -> None:
    with pytest.raises(shmstore.ValidationError, match="shared_memory"):
        shmstore.Client(server.address, server.authkey, shared_memory="yes")  # type: ignore[arg-type]


def _in_child(client: shmstore.Client, out: Any) -> None:
    parents = client._shared._reader if client._shared else None
    written = client.report("s1", "attention", "/p")
    read = client.get("s1")
    mine = client._shared._reader if client._shared else None
    out.send((read == written, mine is not None and mine is not parents, os.getpid() == client._shared._pid))
    client.close()


def test_a_forked_child_maps_the_segment_afresh_and_leaves_its_parents_map_alone(
    server: shmstore.ServerProcess,
) -> None:
    with shmstore.Client(server.address, server.authkey) as client:
        client.report("s1", "working", "/p")
        assert client.get("s1") is not None
        ctx = multiprocess.get_context("fork")
        ours, theirs = ctx.Pipe()
        child = ctx.Process(target=_in_child, args=(client, theirs))
        child.start()
        assert ours.poll(30)
        assert ours.recv() == (True, True, True)  # its own write, read from its own map
        child.join(10)
        assert child.exitcode == 0
        session = client.get("s1")  # the parent's map and link still work, and see the child's write
        assert session is not None
        assert session.status is shmstore.Status.ATTENTION
