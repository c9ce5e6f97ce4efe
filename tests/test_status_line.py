"""``shmstore status --line``: what it says, and that it answers in time whatever the
manager does (up, stopped with SIGSTOP, gone)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from helpers import PYTHON, StartServer

import shmstore
from shmstore import record
from shmstore.clients import glance
from shmstore.commands.status_line import summary


def line(address: object, *extra: str) -> tuple[subprocess.CompletedProcess[str], float]:
    """The command as tmux runs it, and its wall time from fork to exit."""
    started = time.perf_counter()
    done = subprocess.run(
        [PYTHON, "-m", "shmstore", "status", "--line", "--address", str(address), *extra],
        capture_output=True,
        text=True,
        timeout=30,
    )
    return done, time.perf_counter() - started


def test_the_glance_reads_records_where_the_record_module_puts_them() -> None:
    assert (glance.ID, glance.AGENT, glance.STATUS, glance.DIR, glance.SINCE) == (
        record.ID,
        record.AGENT,
        record.STATUS,
        record.DIR,
        record.SINCE,
    )
    assert tuple(status.value for status in record.STATUSES) == glance.STATUSES


def test_the_line_counts_by_status_and_names_the_oldest_question() -> None:
    sessions = [
        ("working", 0, "/a"),
        ("question", 700, "/src/new"),
        ("question", 400, "/src/app/"),
        ("working", 9, "/b"),
    ]
    assert summary(sessions, 1000) == "2 question, 2 working; oldest question 10m (app)"
    assert summary([("attention", 10, "/x")], 20) == "1 attention"
    assert summary([("question", 0, "/")], 7300) == "1 question; oldest question 2h (/)"
    assert summary([], 0) == "no sessions"


def test_with_the_manager_up_it_says_what_the_store_holds(
    server: shmstore.ServerProcess, store: shmstore.Client
) -> None:
    store.report("s1", "working", "/src/one")
    store.report("s2", "question", "/src/two")
    done, _ = line(server.address, "--timeout", "5")
    assert (done.returncode, done.stdout) == (0, "1 question, 1 working; oldest question 0s (two)\n")


def test_an_empty_store_and_a_redis_store_through_the_full_client(redis_url: str) -> None:
    done, _ = line(redis_url)
    assert (done.returncode, done.stdout) == (0, "no sessions\n")
    with shmstore.connect(redis_url) as store:
        store.report("s1", "attention", "/src/one")
    assert line(redis_url)[0].stdout == "1 attention\n"


def test_it_answers_in_time_with_the_manager_up_stopped_and_gone(start_server: StartServer, sock_dir: Path) -> None:
    server = start_server()
    with shmstore.connect(server.address, server.authkey) as store:
        for n in range(20):
            store.report(f"s{n}", ("working", "attention", "question")[n % 3], f"/src/p{n}")
    timings: dict[str, list[float]] = {"up": [], "stopped": [], "gone": []}
    assert line(server.address, "--timeout", "5")[0].stdout.startswith("6 question, 7 attention, 7 working")
    for _ in range(5):
        # In its 50 ms a manager on a loaded machine may not answer: the line then says so.
        done, took = line(server.address)
        assert done.stdout.startswith(("6 question, 7 attention, 7 working", "shmstore: no answer")), done
        timings["up"].append(took)
    os.kill(server.pid, signal.SIGSTOP)
    try:
        for _ in range(5):
            done, took = line(server.address)
            assert (done.returncode, done.stdout) == (3, "shmstore: no answer\n")
            timings["stopped"].append(took)
    finally:
        os.kill(server.pid, signal.SIGCONT)
    server.stop()
    for _ in range(5):
        done, took = line(server.address)
        assert (done.returncode, done.stdout) == (3, "shmstore: no answer\n")
        timings["gone"].append(took)
    # The budget is 50 ms from fork to exit; bench/ measures it (status_line_*). Here, on
    # a 2-CPU machine running the rest of the suite, an interpreter alone took 86 ms at
    # times: what is held is that no run waits on the manager (a hang would be seconds).
    print(f"status --line wall times (s): {timings}")
    assert all(took < 0.5 for times in timings.values() for took in times), timings
