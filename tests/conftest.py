"""Fixtures: a real manager process per test, on a socket of its own.

Socket paths are short (a unix socket path is limited to 107 bytes) and unique per test,
so the suite runs in parallel under pytest-xdist without tests sharing a manager.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

# bench/ holds the soak and the lean launcher that tests share with the benchmarks.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import pytest

import shmstore


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="shm-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def server(sock_dir: Path) -> Iterator[shmstore.ServerProcess]:
    with shmstore.start_server(sock_dir / "s.sock", store=shmstore.Store(max_history=10_000)) as srv:
        yield srv


@pytest.fixture
def store(server: shmstore.ServerProcess) -> Iterator[shmstore.Client]:
    with shmstore.connect(server.address, server.authkey) as client:
        yield client


def snapshot(store: shmstore.Client) -> tuple[int, list[bytes]]:
    """Everything a client can see of the store, for before/after comparisons."""
    return store.revision(), sorted(s.to_json() for s in store.list_all())


def make_session(id: str = "s1", **fields: object) -> shmstore.Session:
    fields.setdefault("working_dir", "/home/dev/project")
    return shmstore.Session(id=id, **fields)  # type: ignore[arg-type]


PYTHON = sys.executable
