"""The reaper closes sessions whose agent is gone, and never one whose agent lives.

An agent is its pid plus its start time (clock ticks since boot, from /proc/<pid>/stat) as
the manager read it when it first saw the pid; no wall clock is involved. A pid reported
from another pid namespace means nothing here and is never used to close a session.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from helpers import PYTHON, SID, StartServer, hook, payload

import shmstore
from shmstore import Status, procs
from shmstore.manager import lifecycle as server_module
from shmstore.record import session_from_store

SLEEPER = [PYTHON, "-c", "import time; time.sleep(60)"]


@pytest.fixture
def child() -> Iterator[subprocess.Popen[bytes]]:
    process = subprocess.Popen(SLEEPER)
    try:
        yield process
    finally:
        process.kill()
        process.wait()


def dead_pid() -> int:
    """The pid of a process that has exited and been waited for."""
    process = subprocess.Popen([PYTHON, "-c", "pass"])
    process.wait()
    return process.pid


# -- (a) identity is pid + start time, and no clock ----------------------------------------


def test_agent_alive_is_pid_and_start_time_whatever_the_clock(
    child: subprocess.Popen[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    start = procs.process_start(child.pid)
    assert start is not None
    assert procs.agent_alive(child.pid, start)
    assert not procs.agent_alive(child.pid, start - 1)  # the same pid, another process: reused
    assert not procs.agent_alive(child.pid, start + 1)
    real_time = time.time
    monkeypatch.setattr(time, "time", lambda: real_time() - 365 * 86_400)  # the clock a year back
    assert procs.agent_alive(child.pid, start)
    assert not procs.agent_alive(child.pid, start - 1)
    monkeypatch.setattr(time, "time", lambda: real_time() + 365 * 86_400)  # and a year ahead
    assert procs.agent_alive(child.pid, start)
    monkeypatch.undo()
    child.kill()
    _wait_for_state(child.pid, "Z")  # killed but not yet waited for: a zombie is dead
    assert not procs.agent_alive(child.pid, start)
    child.wait()
    assert not procs.agent_alive(child.pid, start)
    assert procs.process_start(child.pid) is None


def _wait_for_state(pid: int, state: str) -> None:
    deadline = time.monotonic() + 10
    while (stat := procs.process_stat(pid)) is None or stat.state != state:
        assert time.monotonic() < deadline, stat
        time.sleep(0.01)


def test_proc_stat_is_parsed_after_the_last_parenthesis() -> None:
    # The name field may hold spaces and parentheses; a process can choose its own.
    name = "x) (y z) 1 2"
    script = f"open('/proc/self/comm', 'w').write({name!r}); import time; time.sleep(60)"
    process = subprocess.Popen([PYTHON, "-c", script])
    try:
        deadline = time.monotonic() + 10
        while (stat := procs.process_stat(process.pid)) is None or stat.name != name:
            assert time.monotonic() < deadline, stat
            time.sleep(0.01)
        assert stat.parent == __import__("os").getpid()
        assert stat.state in {"R", "S"}
        assert stat.start == procs.process_start(process.pid)
        assert procs.agent_alive(process.pid, stat.start)
    finally:
        process.kill()
        process.wait()


def test_a_pid_with_no_process_has_no_start() -> None:
    assert procs.process_stat(dead_pid()) is None
    assert procs.process_start(2**31 - 1) is None
    assert not procs.agent_alive(2**31 - 1, 0)


def test_process_alive_is_gone_from_the_server() -> None:
    # The wall-clock comparison that closed live agents when the clock stepped back.
    assert not hasattr(server_module, "process_alive")
    assert not hasattr(server_module, "_boot_time")


# -- the store records the start time and reaps by it ---------------------------------------


def test_report_records_the_agents_start_time(child: subprocess.Popen[bytes]) -> None:
    store = shmstore.Store()
    session = session_from_store(store.report("s", Status.WORKING, "/a", pid=child.pid))
    assert (session.pid, session.pid_start) == (child.pid, procs.process_start(child.pid))
    # A later report naming the same live agent keeps the identity.
    again = session_from_store(store.report("s", Status.ATTENTION, "/a", pid=child.pid))
    assert again.pid_start == session.pid_start


def test_a_clock_stepped_back_does_not_close_a_live_agent(
    child: subprocess.Popen[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    store = shmstore.Store()
    real_time = time.time
    monkeypatch.setattr(time, "time", lambda: real_time() - 365 * 86_400)  # reported under a wrong clock
    store.report("s", Status.WORKING, "/a", pid=child.pid)
    assert store.reap() == 0
    monkeypatch.undo()  # the clock is put right: the agent started "after" it last reported
    store.reap()  # which marks it stale (silent for a year, as far as the clock can tell), no more
    [live] = [session_from_store(data) for data in store.list_all()]
    assert live.status is Status.WORKING
    assert live.stale
    assert [e["kind"] for e in orjson.loads(store.changes(0))["events"]] == ["report", "stale"]


def test_a_reused_pid_closes_the_session_and_a_live_one_stays(child: subprocess.Popen[bytes]) -> None:
    store = shmstore.Store()
    start = procs.process_start(child.pid)
    assert start is not None
    store.set(shmstore.Session(id="gone", working_dir="/g", pid=child.pid, pid_start=start - 5).to_json())
    store.set(shmstore.Session(id="here", working_dir="/h", pid=child.pid).to_json())  # the manager reads /proc
    assert store.reap() == 1
    assert session_from_store(store.get("gone")).closed
    here = session_from_store(store.get("here"))
    assert not here.closed
    assert here.pid_start == start


# -- (b) a real manager closes the session of an agent that died -------------------------------


def test_a_reported_agent_that_dies_is_closed_by_reap(store: shmstore.Client) -> None:
    agent = subprocess.Popen(SLEEPER)
    try:
        reported = store.report("s", Status.WORKING, "/a", pid=agent.pid)
        assert reported.pid_start == procs.process_start(agent.pid) is not None
        assert store.reap() == 0
        assert store.get("s").status is Status.WORKING  # type: ignore[union-attr]
    finally:
        agent.kill()
        agent.wait()
    assert store.reap() == 1
    closed = store.get("s")
    assert closed is not None
    assert closed.closed
    assert store.list_all() == []
    assert [s.id for s in store.recently_closed()] == ["s"]


# -- (c) a pid from another pid namespace is never used ----------------------------------------


@pytest.mark.parametrize("same", [False, None])
def test_a_pid_from_another_namespace_never_closes_the_session(
    same: bool | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = shmstore.Store()
    pid = dead_pid()
    monkeypatch.setattr(procs.caller, "same_pid_namespace", same, raising=False)
    reported = session_from_store(store.report("s", Status.WORKING, "/a", pid=pid))
    assert (reported.pid, reported.pid_start) == (pid, None)  # recorded as given, not checked
    # A start time a client sends is from its namespace too: dropped.
    set_data = shmstore.Session(id="t", working_dir="/t", pid=pid, pid_start=12345).to_json()
    store.set(set_data)
    assert session_from_store(store.get("t")).pid_start is None
    for _ in range(3):
        assert store.reap() == 0
    assert sorted(session_from_store(d).id for d in store.list_all()) == ["s", "t"]
    assert all(not session_from_store(d).closed for d in store.list_all())


def test_an_in_process_caller_counts_as_the_same_namespace(child: subprocess.Popen[bytes]) -> None:
    assert not hasattr(procs.caller, "same_pid_namespace")  # nothing set it in this thread
    store = shmstore.Store()
    assert session_from_store(store.report("s", Status.WORKING, "/a", pid=child.pid)).pid_start is not None


def test_a_report_with_a_pid_that_has_no_process_keeps_what_it_knew(child: subprocess.Popen[bytes]) -> None:
    store = shmstore.Store()
    first = session_from_store(store.report("s", Status.WORKING, "/a", pid=child.pid))
    child.kill()
    child.wait()
    # A late report naming the same pid, now gone, keeps the start time, so the reaper still
    # knows the agent and closes it.
    late = session_from_store(store.report("s", Status.WORKING, "/a", pid=child.pid))
    assert late.pid_start == first.pid_start
    assert store.reap() == 1
    # A pid that never had a process here is recorded with no start: it cannot be checked.
    other = session_from_store(store.report("u", Status.WORKING, "/u", pid=dead_pid()))
    assert other.pid_start is None
    assert store.reap() == 0


# -- (d) through a real pid namespace -------------------------------------------------------------


def _unshare_works() -> bool:
    if shutil.which("unshare") is None:
        return False
    try:
        result = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"], capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0


needs_unshare = pytest.mark.skipif(
    not _unshare_works(), reason="unshare --pid --fork --mount-proc is not permitted here"
)


def test_peer_same_pid_namespace_tells_the_caller_apart(sock_dir: Path) -> None:
    path = str(sock_dir / "peer.sock")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen()
    listener.settimeout(10)
    try:
        with socket.socket(socket.AF_UNIX) as ours:
            ours.connect(path)
            conn, _ = listener.accept()
            with conn:
                assert procs.peer_same_pid_namespace(conn.fileno()) is True
                assert conn.fileno() >= 0  # left open
        with socket.socket(socket.AF_INET) as tcp_listener:
            tcp_listener.bind(("127.0.0.1", 0))
            tcp_listener.listen()
            with socket.create_connection(tcp_listener.getsockname()):
                conn, _ = tcp_listener.accept()
                with conn:
                    assert procs.peer_same_pid_namespace(conn.fileno()) is None  # TCP: cannot tell
        if _unshare_works():
            script = f"import socket, time; s = socket.socket(socket.AF_UNIX); s.connect({path!r}); s.recv(1)"
            contained = subprocess.Popen(["unshare", "--pid", "--fork", "--mount-proc", PYTHON, "-c", script])
            try:
                conn, _ = listener.accept()
                with conn:
                    assert procs.peer_same_pid_namespace(conn.fileno()) is False
                    conn.send(b"x")
            finally:
                contained.wait(10)
    finally:
        listener.close()


@pytest.fixture
def namespace_aware(start_server: StartServer) -> shmstore.ServerProcess:
    """A real manager: its connection threads say whether their client is in its pid namespace."""
    return start_server()


@needs_unshare
def test_a_hook_from_another_pid_namespace_is_never_reaped(
    namespace_aware: shmstore.ServerProcess, child: subprocess.Popen[bytes]
) -> None:
    address = str(namespace_aware.address)
    body = orjson.dumps(payload("UserPromptSubmit", prompt="go")).decode()
    # Inside the namespace an "agent" (a sleeper) runs, and the hook reports its pid, which
    # only means something in there.
    script = (
        "import subprocess, sys\n"
        f"agent = subprocess.Popen({SLEEPER!r})\n"
        f"hook = subprocess.run([{PYTHON!r}, '-m', 'shmstore', 'hook', '--address', {address!r}, "
        f"'--pid', str(agent.pid), '--timeout', '30'], input={body!r}.encode(), capture_output=True)\n"
        "print(agent.pid, hook.returncode, hook.stderr.decode().strip() or '-', flush=True)\n"
        "agent.kill(); agent.wait()\n"
    )
    result = subprocess.run(
        ["unshare", "--pid", "--fork", "--mount-proc", PYTHON, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    pid, returncode, stderr = result.stdout.strip().split(maxsplit=2)
    assert (returncode, stderr) == ("0", "-")
    with shmstore.connect(namespace_aware.address, namespace_aware.authkey) as store:
        session = store.get(SID)
        assert session is not None
        assert session.pid == int(pid)
        assert session.pid_start is None  # not a pid of ours: not used
        # The agent is gone (the namespace has ended) and whatever has that pid here is not it:
        # either way the session is left to the agent's own SessionEnd, or to going stale.
        assert store.reap() == 0
        assert store.get(SID).status is Status.WORKING  # type: ignore[union-attr]
        # The same manager still identifies an agent of its own namespace.
        hook(
            namespace_aware.address,
            payload("UserPromptSubmit", session_id="local"),
            "--pid",
            str(child.pid),
            "--timeout",
            "30",
        )
        local = store.get("local")
        assert local is not None
        assert local.pid_start == procs.process_start(child.pid)
