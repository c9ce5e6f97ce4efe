"""The manager's own memory at the design's scale: under 5 MiB USS with 100 sessions.

A daemon embeds the manager by forking it (``start_server``) early, from a lean process;
the child then owns only what it writes. The test reproduces that: a small launcher
process forks the manager, and USS (memory no other process shares) is read by
memory-profiler's psutil backend.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import LAUNCHER, PYTHON
from memory_profiler import memory_usage

import shmstore
from shmstore import Status


def uss_mib(pid: int) -> float:
    return float(memory_usage(proc=pid, backend="psutil_uss", interval=0.05, timeout=0.2, max_usage=True))


@pytest.fixture
def lean_manager(sock_dir: Path) -> Iterator[tuple[int, Path]]:
    path = sock_dir / "mem.sock"
    # Measured as users run it: a coverage run would trace this process too (and the manager
    # it forks), which costs the manager ~1.3 MiB of its own.
    env = {k: v for k, v in os.environ.items() if not k.startswith("COVERAGE_")}
    with subprocess.Popen(
        [PYTHON, str(LAUNCHER), str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env
    ) as launcher:
        try:
            pid = int(launcher.stdout.readline())  # type: ignore[union-attr]
            yield pid, path
        finally:
            launcher.stdin.close()  # type: ignore[union-attr]  # the launcher stops its manager and exits
            launcher.wait(10)


def fill(store: shmstore.Client, count: int) -> None:
    """``count`` sessions shaped like real ones: a UUID-sized id, a 10-entry history."""
    cycle = [Status.ATTENTION, Status.WORKING] * 5
    for n in range(count):
        id = f"{n:08d}-7c1e-4b6a-9d3f-2a8e5c0b1f47"
        store.set(shmstore.Session(id=id, working_dir=f"/home/dev/src/project-{n}", session_id=id))
        for status in cycle:
            store.transition(id, status)
        store.add_usage(id, 12_000, 3_400)


def test_manager_uss_with_100_sessions(lean_manager: tuple[int, Path], record_property: object) -> None:
    pid, path = lean_manager
    with shmstore.connect(path) as store:
        fill(store, 1)  # warm every code path once, so what follows is the sessions' own cost
        store.remove(f"{0:08d}-7c1e-4b6a-9d3f-2a8e5c0b1f47")
        empty = uss_mib(pid)
        fill(store, 100)
        full = uss_mib(pid)
        assert len(store.list_all()) == 100
    print(f"manager USS: empty {empty:.2f} MiB, 100 sessions {full:.2f} MiB, added {full - empty:.2f} MiB")
    assert full < 5.0
    assert full - empty < 1.0
