"""Fixtures: a real manager process per test, on a socket of its own.

Socket paths are short (a unix socket path is limited to 107 bytes) and unique per test,
so the suite runs in parallel under pytest-xdist without tests sharing a manager. Helpers
that are not fixtures are in helpers.py.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import RawStore

import shmstore

_LIMITS = {field.name for field in dataclasses.fields(shmstore.Limits)}


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
