"""Fixtures: a real manager process per test, on a socket of its own.

Socket paths are short (a unix socket path is limited to 107 bytes) and unique per test,
so the suite runs in parallel under pytest-xdist without tests sharing a manager. Helpers
that are not fixtures are in helpers.py.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import RawStore

import shmstore

_LIMITS = {field.name for field in dataclasses.fields(shmstore.Limits)}


@pytest.fixture(autouse=True)
def runtime_dir(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A runtime directory of each test's own ($XDG_RUNTIME_DIR, which the processes it
    starts inherit): where a TCP manager's key file and spool, and a manager's rescue
    file, go; and a state directory of its own ($XDG_STATE_HOME: the hook's failure log),
    so that no test sees another's, or the machine user's."""
    path = Path(tempfile.mkdtemp(prefix="rt-", dir="/tmp"))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(path))
    monkeypatch.setenv("XDG_STATE_HOME", str(path / "state"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def state_home(runtime_dir: Path) -> Path:
    """Where every hook of the test (and hooks.failure_log_path in it) logs."""
    return runtime_dir / "state"


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="shm-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def start_server(sock_dir: Path) -> Iterator[Callable[..., shmstore.ServerProcess]]:
    """Start managers in this test's directory, each stopped when the test ends:
    ``start_server(max_sessions=1)`` (store limits and serve options alike), or with a
    ``name`` for its socket, or an ``authkey``."""
    started: list[shmstore.ServerProcess] = []

    def start(name: str = "s.sock", authkey: bytes | None = None, **settings: Any) -> shmstore.ServerProcess:
        limits = {key: settings.pop(key) for key in list(settings) if key in _LIMITS}
        server = shmstore.start_server(sock_dir / name, authkey, store=shmstore.Store(**limits), **settings)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def server(start_server: Callable[..., shmstore.ServerProcess]) -> shmstore.ServerProcess:
    return start_server(max_history=10_000)


@pytest.fixture
def store(server: shmstore.ServerProcess) -> Iterator[shmstore.Client]:
    with shmstore.connect(server.address, server.authkey) as client:
        yield client


@pytest.fixture
def raw(server: shmstore.ServerProcess) -> Iterator[RawStore]:
    """The fixture server's store, called past the Client's own checks."""
    with RawStore(server.address, server.authkey) as client:
        yield client


@pytest.fixture(scope="session")
def redis_socket() -> Iterator[str]:
    """A redis-server of this xdist worker's own, on a unix socket, keeping nothing on
    disk; each test uses a namespace of its own in it (:func:`redis_url`). Without the
    binary the Redis tests skip, and fail where CI=true (.ci/run installs it)."""
    binary = shutil.which("redis-server")
    if binary is None:
        if os.environ.get("CI") == "true":
            pytest.fail("redis-server is not installed (.ci/run installs Debian's redis-server)")
        pytest.skip("redis-server is not installed")
    directory = tempfile.mkdtemp(prefix="rds-", dir="/tmp")
    path = os.path.join(directory, "r.sock")
    options = ["--port", "0", "--unixsocket", path, "--unixsocketperm", "700", "--save", "", "--appendonly", "no"]
    server = subprocess.Popen([binary, *options], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not os.path.exists(path):
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"redis-server did not start (exit {server.poll()})")
            time.sleep(0.02)
        yield path
    finally:
        server.terminate()
        server.wait(10)
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def redis_url(redis_socket: str) -> str:
    """The worker's Redis, in a namespace no other test uses."""
    return f"redis+unix://{redis_socket}?namespace=t-{uuid.uuid4().hex[:12]}"


@pytest.fixture(params=["manager", "redis"])
def any_store(request: pytest.FixtureRequest) -> Iterator[shmstore.Client]:
    """A client of either backend: a manager of this test's own, or the worker's Redis."""
    if request.param == "manager":
        server = request.getfixturevalue("server")
        address, authkey = server.address, server.authkey
    else:
        address, authkey = request.getfixturevalue("redis_url"), None
    with shmstore.connect(address, authkey) as client:
        yield client
