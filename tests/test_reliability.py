"""Faults, hostile peers, limits and load: the manager keeps serving and loses nothing."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from itertools import pairwise
from pathlib import Path
from typing import Any

import multiprocess
import orjson
import psutil
import pytest
from helpers import PYTHON, SOAK, StartServer, make_session, serving, snapshot

import shmstore
from shmstore import Status, StoreFullError, ValidationError
from shmstore.manager.claim import check_exposure


def raw_connect(address: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.connect(address)
    except BaseException:
        sock.close()
        raise
    return sock


def closed_by_peer(sock: socket.socket, within: float) -> bool:
    """True if the other end closes ``sock`` within ``within`` seconds."""
    sock.settimeout(within)
    try:
        while sock.recv(4096):
            pass  # the challenge; we never answer it
    except TimeoutError:
        return False
    except OSError:
        return True
    return True


def works(server: shmstore.ServerProcess, within: float = 5.0) -> float:
    """Seconds until a well-behaved client gets an answer (fails the test past ``within``)."""
    started = time.monotonic()
    while True:
        try:
            with shmstore.connect(server.address, server.authkey, timeout=1.0) as store:
                store.revision()
            return time.monotonic() - started
        except shmstore.StoreUnavailableError:
            if time.monotonic() - started > within:
                raise
            time.sleep(0.05)


# -- exposure --------------------------------------------------------------------------------


def test_tcp_beyond_loopback_needs_an_explicit_opt_in() -> None:
    with pytest.raises(ValidationError, match="not a loopback address"):
        shmstore.start_server("10.11.12.13:7000")
    with pytest.warns(UserWarning, match="can run code in the manager"):
        check_exposure(("10.11.12.13", 7000), allow_remote=True)
    check_exposure(("127.0.0.1", 7000), allow_remote=False)  # loopback needs nothing


def test_the_key_is_never_printed(sock_dir: Path) -> None:
    sock = sock_dir / "quiet.sock"
    with serving(sock) as proc:
        key = Path(f"{sock}.key").read_text()
        proc.terminate()
        _, err = proc.communicate(timeout=10)
    assert key not in err


# -- hostile peers ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "garbage",
    [b"\x00\x00\x00\x05hello", b"\x7f\xff\xff\xff" + b"x" * 100, os.urandom(300), b"GET / HTTP/1.1\r\n\r\n"],
)
def test_garbage_is_refused_and_others_are_served(start_server: StartServer, garbage: bytes) -> None:
    server = start_server(handshake_timeout=1.0)
    with raw_connect(str(server.address)) as peer:
        peer.recv(4096)  # the challenge
        peer.sendall(garbage)
        assert closed_by_peer(peer, within=3.0)
        assert works(server) < 1.0


def test_a_silent_peer_is_dropped_after_the_handshake_timeout(
    start_server: StartServer,
) -> None:
    server = start_server(handshake_timeout=0.5)
    with raw_connect(str(server.address)) as silent:
        assert works(server) < 1.0  # served while the silent one waits
        started = time.monotonic()
        assert closed_by_peer(silent, within=5.0)
        assert time.monotonic() - started < 2.0


def test_a_peer_that_stalls_mid_message_is_dropped(start_server: StartServer) -> None:
    server = start_server(handshake_timeout=0.5)
    with raw_connect(str(server.address)) as peer:
        peer.recv(4096)
        peer.sendall(b"\x00\x00\x00\x10abc")  # promises 16 bytes, sends 3
        assert closed_by_peer(peer, within=5.0)
        assert works(server) < 1.0


def test_hundreds_of_idle_connections_do_not_stop_service(sock_dir: Path) -> None:
    with shmstore.start_server(sock_dir / "i.sock", max_connections=32, handshake_timeout=0.5) as server:
        idle: list[socket.socket] = []
        try:
            for _ in range(300):
                idle.append(raw_connect(str(server.address)))
            # Past the limit they are closed on arrival; the rest time out. Service resumes
            # as soon as the handshake timeout frees their slots.
            assert works(server, within=5.0) < 3.0
            assert sum(closed_by_peer(s, within=0.01) for s in idle[100:]) >= 150
        finally:
            for s in idle:
                s.close()


LOW_FD_MANAGER = (
    "import resource, sys, shmstore\n"
    "resource.setrlimit(resource.RLIMIT_NOFILE, (48, 48))\n"
    "shmstore.serve(sys.argv[1], authkey=b'k', max_connections=1000, handshake_timeout=0.5,"
    " on_ready=lambda a: print('ready', flush=True))\n"
)


def test_running_out_of_file_descriptors_does_not_spin_or_stop_service(sock_dir: Path) -> None:
    path = sock_dir / "fd.sock"
    flood: list[socket.socket] = []
    with subprocess.Popen([PYTHON, "-c", LOW_FD_MANAGER, str(path)], stdout=subprocess.PIPE, text=True) as proc:
        try:
            assert proc.stdout.readline().strip() == "ready"  # type: ignore[union-attr]
            for _ in range(100):  # far more than 48 descriptors
                flood.append(raw_connect(str(path)))
            manager = psutil.Process(proc.pid)
            manager.cpu_percent()
            time.sleep(1.0)
            assert manager.cpu_percent() < 60  # backing off, not spinning on EMFILE
            for s in flood:
                s.close()
            deadline = time.monotonic() + 5
            while True:  # the manager frees what it holds within its handshake timeout
                try:
                    with shmstore.connect(path, b"k", timeout=2.0) as store:
                        assert store.set(make_session()).revision == 1
                    break
                except shmstore.StoreUnavailableError:
                    assert time.monotonic() < deadline
                    time.sleep(0.1)
        finally:
            for s in flood:
                s.close()  # again, if the test failed before it did
            proc.terminate()
            proc.wait(10)


# -- faults ----------------------------------------------------------------------------------


def _busy(address: Any, authkey: bytes) -> None:
    with shmstore.connect(address, authkey) as store:
        while True:
            store.transition("shared", Status.ATTENTION)
            store.add_usage("shared", 1, 1)
            store.transition("shared", Status.WORKING)


def test_a_worker_killed_mid_call_changes_nothing_for_the_others(server: shmstore.ServerProcess) -> None:
    with shmstore.connect(server.address, server.authkey) as store:
        store.set(make_session("shared"))
        ctx = multiprocess.get_context("fork")
        workers = [ctx.Process(target=_busy, args=(server.address, server.authkey)) for _ in range(4)]
        for w in workers:
            w.start()
        time.sleep(0.3)
        os.kill(workers[0].pid, signal.SIGKILL)  # mid-call, with high probability
        time.sleep(0.3)
        for w in workers[1:]:
            os.kill(w.pid, signal.SIGKILL)
        for w in workers:
            w.join(5)
        started = time.monotonic()
        session = store.transition("shared", Status.QUESTION)  # no lock was left held
        assert time.monotonic() - started < 1.0
        chain = session.history
        assert all(a.to == b.from_ for a, b in pairwise(chain))
        assert chain[-1].to is Status.QUESTION
        assert session.api_usage is not None
        assert session.api_usage.input_tokens == session.api_usage.output_tokens


# -- limits ----------------------------------------------------------------------------------


def test_a_full_store_refuses_new_sessions_and_keeps_the_old(
    start_server: StartServer,
) -> None:
    server = start_server(max_sessions=3)
    with shmstore.connect(server.address, server.authkey) as store:
        for n in range(3):
            store.set(make_session(f"s{n}"))
        before = snapshot(store)
        with pytest.raises(StoreFullError, match="limit"):
            store.set(make_session("s3"))
        assert snapshot(store) == before
        assert store.set(make_session("s1", working_dir="/replaced")).working_dir == "/replaced"  # replacing is fine
        store.remove("s0")
        store.set(make_session("s3"))


def test_id_length_limit(start_server: StartServer) -> None:
    server = start_server(max_id_length=8)
    with shmstore.connect(server.address, server.authkey) as store:
        store.set(make_session("12345678"))
        with pytest.raises(ValidationError, match="limit is 8"):
            store.set(make_session("123456789"))
        with pytest.raises(ValidationError, match="limit is 8"):
            store.get("123456789")


def test_store_limits_are_validated() -> None:
    for bad in [{"max_sessions": 0}, {"max_history": -1}, {"log_size": "9"}, {"max_id_length": True}]:
        with pytest.raises(ValidationError):
            shmstore.Store(**bad)  # type: ignore[arg-type]


def test_prune_forgets_only_sessions_closed_long_enough_ago(store: shmstore.Client) -> None:
    store.set(make_session("open"))
    store.set(make_session("old"))
    store.transition("old", Status.CLOSED)
    time.sleep(0.3)
    store.set(make_session("fresh"))
    store.transition("fresh", Status.CLOSED)
    revision = store.revision()
    assert store.prune(older_than=0.2) == 1
    assert [s.id for s in store.list_all()] == ["open"]
    assert [s.id for s in store.recently_closed()] == ["fresh"]
    assert [(e.kind, e.id) for e in store.changes(revision).events] == [(shmstore.EventKind.REMOVE, "old")]
    with pytest.raises(ValidationError):
        store.prune(-5)


# -- load ------------------------------------------------------------------------------------


def test_short_soak_holds_every_invariant(sock_dir: Path) -> None:
    out = sock_dir / "soak.json"
    soak = subprocess.run(
        [PYTHON, str(SOAK), "--seconds", "3", "--workers", "4", "--out", str(out)], capture_output=True, timeout=120
    )
    report = orjson.loads(out.read_bytes())
    assert soak.returncode == 0, soak.stdout
    assert report["checks"] == dict.fromkeys(report["checks"], True)
    assert report["ops"] > 1000
    assert report["manager_uss_max_mib"] < 15
