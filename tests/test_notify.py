"""sd_notify: ``shmstore serve`` tells a service manager it is ready once clients can
connect, and that it is stopping; a real datagram socket stands where systemd's would be."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import PYTHON, serving

import shmstore
from shmstore.manager import notify


@pytest.fixture
def receiver(sock_dir: Path) -> Iterator[socket.socket]:
    """A datagram socket listening where ``$NOTIFY_SOCKET`` will point."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(sock_dir / "notify"))
        sock.settimeout(60)
        yield sock


def _fields(message: bytes) -> dict[str, str]:
    return dict(line.split("=", 1) for line in message.decode().splitlines())


def test_serve_says_ready_once_clients_can_connect_and_stopping_on_sigterm(
    sock_dir: Path, receiver: socket.socket
) -> None:
    address = sock_dir / "s.sock"
    env = {**os.environ, "NOTIFY_SOCKET": receiver.getsockname()}
    with subprocess.Popen(
        [PYTHON, "-m", "shmstore", "serve", "--address", str(address)], env=env, stderr=subprocess.PIPE, text=True
    ) as proc:
        try:
            ready = _fields(receiver.recv(4096))
            with shmstore.connect(address, timeout=5) as store:  # at once: no wait, no retry
                assert store.revision() == 0
            assert ready == {"READY": "1", "MAINPID": str(proc.pid), "STATUS": f"serving at {address}"}
            proc.send_signal(signal.SIGTERM)
            assert _fields(receiver.recv(4096))["STOPPING"] == "1"
            assert proc.wait(60) == 0
        finally:
            if proc.poll() is None:
                proc.kill()


def test_a_notify_socket_in_the_abstract_namespace_is_reached(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"shmstore-test-{secrets.token_hex(8)}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(10)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert notify.stopping("saving the state") is True
        assert _fields(sock.recv(4096)) == {"STOPPING": "1", "STATUS": "saving the state"}


def test_a_status_of_several_lines_is_sent_as_one(receiver: socket.socket, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", receiver.getsockname())
    assert notify.ready("serving\nat /x") is True
    assert _fields(receiver.recv(4096))["STATUS"] == "serving at /x"


def test_without_notify_socket_nothing_is_sent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert notify.ready("serving") is False
    assert notify.stopping() is False


def test_a_notify_socket_nobody_listens_on_is_warned_about_and_serving_goes_on(sock_dir: Path) -> None:
    env = {**os.environ, "NOTIFY_SOCKET": str(sock_dir / "nobody")}
    address = sock_dir / "s.sock"
    with subprocess.Popen(
        [PYTHON, "-m", "shmstore", "serve", "--address", str(address)], env=env, stderr=subprocess.PIPE, text=True
    ) as proc:
        try:
            assert proc.stderr is not None
            assert "serving at" in proc.stderr.readline()
            assert "could not notify the service manager at" in proc.stderr.readline()
            with shmstore.connect(address, timeout=5) as store:
                assert store.revision() == 0
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(60) == 0
        finally:
            if proc.poll() is None:
                proc.kill()


def test_serve_without_notify_socket_says_nothing_about_it(sock_dir: Path) -> None:
    with serving(sock_dir / "s.sock") as proc:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        assert proc.stderr is not None
        assert "notify" not in proc.stderr.read()
