"""The manager process: addresses, keys, permissions, and what clients see when it fails."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import time
from pathlib import Path

import pytest
from helpers import PYTHON, make_session, serving, wait_until_stopped

import shmstore
from shmstore import AddressInUseError, AuthKeyError, StoreUnavailableError


def mode(path: Path | str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_socket_and_key_file_are_private(server: shmstore.ServerProcess) -> None:
    key_file = Path(f"{server.address}.key")
    assert mode(server.address) == 0o600
    assert mode(key_file) == 0o600
    assert key_file.read_bytes() == server.authkey
    assert len(server.authkey) == 64


def test_client_finds_the_key_file_by_itself(server: shmstore.ServerProcess) -> None:
    with shmstore.connect(server.address) as store:
        assert store.set(make_session()).revision == 1


def test_default_address_is_a_private_per_user_directory(sock_dir: Path) -> None:
    env = {**os.environ, "XDG_RUNTIME_DIR": str(sock_dir)}
    with subprocess.Popen([PYTHON, "-m", "shmstore", "serve"], env=env, stderr=subprocess.PIPE, text=True) as proc:
        try:
            line = proc.stderr.readline()  # type: ignore[union-attr]
            sock = sock_dir / "shmstore" / "store.sock"
            assert f"serving at {sock}" in line
            assert mode(sock_dir / "shmstore") == 0o700
            assert mode(sock) == 0o600
            assert mode(Path(f"{sock}.key")) == 0o600
            ls = subprocess.run([PYTHON, "-m", "shmstore", "ls", "--json"], env=env, capture_output=True, text=True)
            assert (ls.returncode, ls.stdout.strip()) == (0, "[]")
        finally:
            proc.terminate()
            assert proc.wait(10) == 0
    assert not (sock_dir / "shmstore" / "store.sock").exists()
    assert not (sock_dir / "shmstore" / "store.sock.key").exists()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_serve_exits_cleanly_on_signals(sock_dir: Path, signum: int) -> None:
    sock = sock_dir / "cli.sock"
    with serving(sock) as proc:
        with shmstore.connect(sock) as store:
            store.set(make_session())
        proc.send_signal(signum)
        assert proc.wait(10) == 0
    assert not sock.exists()
    assert not Path(f"{sock}.key").exists()


def test_a_stale_socket_is_cleaned_up(sock_dir: Path) -> None:
    path = sock_dir / "stale.sock"
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(str(path))
    dead.close()  # the file stays, nobody listens: what a SIGKILLed manager leaves
    with shmstore.start_server(path) as server, shmstore.connect(server.address, server.authkey) as store:
        assert store.revision() == 0


def test_starting_where_a_manager_answers_fails_clearly(server: shmstore.ServerProcess) -> None:
    with pytest.raises(AddressInUseError, match="already serving"):
        shmstore.start_server(server.address)
    with shmstore.connect(server.address, server.authkey) as store:  # the first one is untouched
        assert store.revision() == 0


def test_wrong_authkey_is_refused_and_others_keep_working(server: shmstore.ServerProcess) -> None:
    with shmstore.connect(server.address, server.authkey) as good:
        with pytest.raises(AuthKeyError, match="refused our authkey"):
            shmstore.connect(server.address, b"0" * 64)
        assert good.set(make_session()).revision == 1


def test_no_manager_fails_fast(sock_dir: Path) -> None:
    started = time.monotonic()
    with pytest.raises(StoreUnavailableError, match="no manager"):
        shmstore.connect(sock_dir / "nobody.sock")
    with pytest.raises(StoreUnavailableError, match="cannot reach"):
        shmstore.connect(sock_dir / "nobody.sock", authkey=b"k" * 64)
    assert time.monotonic() - started < 1.0


def test_killed_manager_is_an_error_not_a_hang_and_a_new_one_is_found(sock_dir: Path) -> None:
    path = sock_dir / "k.sock"
    server = shmstore.start_server(path, authkey=b"fixed-key")
    with shmstore.connect(path, b"fixed-key") as store:
        store.set(make_session())
        os.kill(server.pid, signal.SIGKILL)
        server.process.join(5)
        started = time.monotonic()
        with pytest.raises(StoreUnavailableError, match=str(path)):
            store.get("s1")
        assert time.monotonic() - started < 1.0
        with shmstore.start_server(path, authkey=b"fixed-key"):  # the dead one's socket is stale now
            assert store.get("s1") is None  # the same client, reconnected to the new, empty store
            assert store.set(make_session()).revision == 1


def test_a_hung_manager_times_out(server: shmstore.ServerProcess) -> None:
    with shmstore.connect(server.address, server.authkey, timeout=0.5) as store:
        store.set(make_session())
        os.kill(server.pid, signal.SIGSTOP)
        try:
            wait_until_stopped(server.pid)
            started = time.monotonic()
            with pytest.raises(StoreUnavailableError, match=r"no reply within 0\.5 s"):
                store.get("s1")
            assert 0.4 < time.monotonic() - started < 2.0
        finally:
            os.kill(server.pid, signal.SIGCONT)
        assert store.get("s1") is not None  # a fresh connection once the manager answers again


def test_tcp_on_loopback(sock_dir: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with (
        shmstore.start_server(f"127.0.0.1:{port}") as server,
        shmstore.connect(("127.0.0.1", port), server.authkey) as store,
    ):
        assert server.address == ("127.0.0.1", port)
        assert store.set(make_session()).revision == 1


def test_embedded_server_reports_a_bad_address() -> None:
    with pytest.raises(shmstore.ValidationError, match="address"):
        shmstore.start_server("no-slash-no-port")
    with pytest.raises(StoreUnavailableError, match="cannot listen"):
        shmstore.start_server("/proc/forbidden/here.sock")
