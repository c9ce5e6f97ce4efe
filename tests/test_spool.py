"""No report lost while the agent waits on its hook: one connection a report, the whole
budget for it, and a private spool for what the manager did not take in time, which the
manager delivers once, by event time. Real hooks, a real manager."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import PYTHON, SID, StartServer, hook, kept_in_spool, payload, wait_until_stopped

import shmstore
from shmstore import Status, spool
from shmstore.clients import reporter
from shmstore.hook import failures as hooks
from shmstore.manager.courier import Courier
from shmstore.record import session_from_store
from shmstore.transport import protocol


def wait_for(check: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


@contextlib.contextmanager
def stopped(server: shmstore.ServerProcess) -> Iterator[None]:
    """The manager SIGSTOPped (hung) for the block."""
    os.kill(server.pid, signal.SIGSTOP)
    try:
        wait_until_stopped(server.pid)
        yield
    finally:
        os.kill(server.pid, signal.SIGCONT)


def test_a_report_makes_one_connection(server: shmstore.ServerProcess, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each connection costs the manager a handshake and a thread; a report made two (a
    Client's `create`, then its call), which under load doubled what queued."""
    opened = []
    real = protocol.connect

    def counting(*args: object, **kwargs: object) -> object:
        opened.append(args[0])
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(protocol, "connect", counting)
    data = reporter.report(server.address, server.authkey, ("s1", "working", "/src/a"), deadline=time.monotonic() + 10)
    assert opened == [server.address]
    assert session_from_store(data).status is Status.WORKING


def test_a_report_to_a_hung_manager_is_spooled_and_delivered_when_it_is_back(
    server: shmstore.ServerProcess, store: shmstore.Client
) -> None:
    """The hook gives up within its budget (the agent goes on), keeps the report, and the
    manager applies it once it answers again. (Before, it was lost: "no reply in time".)"""
    with stopped(server):
        started = time.monotonic()
        result = hook(server.address, payload("Stop"))
        elapsed = time.monotonic() - started
        assert result.returncode == 0
        assert kept_in_spool(result, server.address)
        assert elapsed < 1.5
        [entry] = spool.entries(spool.path_for(server.address))
        assert not isinstance(entry, str)
        assert entry.report[:3] == (SID, "attention", payload("Stop")["cwd"])
    wait_for(lambda: store.get(SID) is not None)
    session = store.get(SID)
    assert session is not None
    assert session.status is Status.ATTENTION
    assert session.last_event is not None
    assert list(spool.entries(spool.path_for(server.address))) == []


def test_a_report_to_no_manager_waits_in_the_spool_for_the_next_one(start_server: StartServer, sock_dir: Path) -> None:
    address = sock_dir / "s.sock"
    for event in ["SessionStart", "UserPromptSubmit", "PermissionRequest"]:
        assert kept_in_spool(hook(address, payload(event)))
    server = start_server("s.sock")
    with shmstore.connect(server.address, server.authkey) as store:
        wait_for(lambda: (s := store.get(SID)) is not None and s.status is Status.QUESTION)
        session = store.get(SID)
        assert session is not None
        # In the order they fired: attention, then working, then question.
        assert [(h.from_, h.to) for h in session.history] == [
            (Status.ATTENTION, Status.WORKING),
            (Status.WORKING, Status.QUESTION),
        ]
        assert store.info()["spool"]["delivered"] == 3


def test_a_spooled_report_older_than_what_the_store_has_only_counts_as_activity(
    server: shmstore.ServerProcess, store: shmstore.Client
) -> None:
    """The report of an event that fired first but arrives last (it waited in the spool
    while the next one went straight through) does not move the status back."""
    with stopped(server):
        assert kept_in_spool(hook(server.address, payload("Stop")))
        directory = spool.path_for(server.address)
        # Hold the spooled report back until a newer event has been applied.
        [entry] = [e for e in spool.entries(directory) if not isinstance(e, str)]
        os.rename(Path(directory) / entry.name, Path(directory) / ("." + entry.name + ".held"))
    assert hook(server.address, payload("UserPromptSubmit")).stderr == b""
    assert store.get(SID).status is Status.WORKING  # type: ignore[union-attr]
    before = store.get(SID)
    os.rename(Path(directory) / ("." + entry.name + ".held"), Path(directory) / entry.name)
    wait_for(lambda: not list(spool.entries(directory)))
    after = store.get(SID)
    assert after is not None
    assert before is not None
    assert after.status is Status.WORKING
    assert after.history == before.history
    assert after.last_activity >= before.last_activity  # type: ignore[operator]


def test_a_full_spool_drops_and_counts_what_it_cannot_keep(sock_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    directory = str(sock_dir / "s.sock.spool")
    for n in range(spool.MAX_ENTRIES):
        assert spool.keep(directory, os.urandom(16), (f"s{n}", "working", "/x"), time.time())
    assert not spool.keep(directory, os.urandom(16), ("one-more", "working", "/x"), time.time())
    assert spool.counts(directory) == {"pending": spool.MAX_ENTRIES, "dropped": 1}
    assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700
    result = hook(sock_dir / "s.sock", payload("Stop"))
    assert b"dropped: the spool" in result.stderr
    assert spool.counts(directory)["dropped"] == 2
    status = subprocess.run(
        [PYTHON, "-m", "shmstore", "status", "--address", str(sock_dir / "s.sock")], capture_output=True, text=True
    )
    assert f"spool: {spool.MAX_ENTRIES} reports waiting, 2 dropped" in status.stdout


def test_a_spool_that_is_not_private_is_never_written_nor_read(sock_dir: Path) -> None:
    directory = sock_dir / "s.sock.spool"
    directory.mkdir(mode=0o755)
    directory.chmod(0o755)
    result = hook(sock_dir / "s.sock", payload("Stop"))
    assert b"nor kept in the spool" in result.stderr
    assert list(directory.iterdir()) == []
    (directory / "00000000000000000001-1-aaaaaaaa.json").write_text("{}")
    assert list(spool.entries(str(directory))) == []


def test_a_fifo_for_a_failure_log_never_holds_the_hook(sock_dir: Path, state_home: Path) -> None:
    """A FIFO (or a hung network home) where hook.log should be: the hook exits within its
    deadline and skips the line. (Before, it waited for a reader until killed.)"""
    log = Path(hooks.failure_log_path())
    log.parent.mkdir(parents=True)
    os.mkfifo(log)
    started = time.monotonic()
    result = hook(sock_dir / "nobody.sock", payload("Stop"))
    assert result.returncode == 0
    assert time.monotonic() - started < 2.0
    assert stat.S_ISFIFO(log.lstat().st_mode)


def test_a_symlink_for_a_failure_log_is_not_followed(sock_dir: Path, state_home: Path) -> None:
    target = sock_dir / "elsewhere"
    target.write_text("not the log\n")
    log = Path(hooks.failure_log_path())
    log.parent.mkdir(parents=True)
    log.symlink_to(target)
    assert hook(sock_dir / "nobody.sock", payload("Stop")).returncode == 0
    assert target.read_text() == "not the log\n"


# -- under load ----------------------------------------------------------------------------


def _busy(count: int) -> list[subprocess.Popen[bytes]]:
    return [subprocess.Popen([PYTHON, "-c", "while True: pass"]) for _ in range(count)]


def test_no_report_is_lost_when_the_machine_is_busy(server: shmstore.ServerProcess, store: shmstore.Client) -> None:
    """Four busy loops, and batches of eight hooks at once every 0.2 s, each a session of
    its own: every report reaches the store, straight or through the spool. (Before, 2 of
    80 were lost with batches of four; 76 of 136 on a machine that was busier still.)"""
    busy = _busy(4)
    ids = []
    try:
        for batch in range(8):
            procs = []
            for n in range(8):
                id = f"load-{batch}-{n}"
                ids.append(id)
                procs.append(
                    subprocess.Popen(
                        [PYTHON, "-m", "shmstore", "hook", "--address", str(server.address)],
                        stdin=subprocess.PIPE,
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                    )
                )
                procs[-1].stdin.write(json.dumps(payload("SessionStart", session_id=id)).encode())  # type: ignore[union-attr]
                procs[-1].stdin.close()  # type: ignore[union-attr]
            time.sleep(0.2)
            for proc in procs:
                assert proc.wait(30) == 0
    finally:
        for proc in busy:
            proc.kill()
            proc.wait()
    wait_for(lambda: {s.id for s in store.list_all()} >= set(ids), timeout=15)


# -- the courier, in-process: what the review found --------------------------------------------


def _courier(tmp_path: Path, **limits: object) -> tuple[Courier, str, shmstore.Store]:
    store = shmstore.Store(**limits)  # type: ignore[arg-type]
    directory = str(tmp_path / "s.sock.spool")
    return Courier(store, directory), directory, store


def test_a_report_spooled_while_a_pass_delivers_is_delivered_by_the_next(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each pass lists the spool afresh. (The courier once skipped a pass when the
    directory's mtime matched what it saw after the last one, which already counted an
    entry written during it: that report waited for the next spooled one.)"""
    courier, directory, store = _courier(tmp_path)
    spool.keep(directory, os.urandom(16), ("first", "working", "/a"), 1.0)
    real = store.once

    def slow_once(*args: object) -> object:
        if args[3] == "first":
            spool.keep(directory, os.urandom(16), ("second", "attention", "/b"), 2.0)  # meanwhile
        return real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(store, "once", slow_once)
    assert courier.deliver() == 1
    assert courier.deliver() == 1
    assert store.get("second") is not None
    assert courier.deliver() == 0


def test_an_entry_the_store_refuses_is_set_aside_and_the_rest_delivered(tmp_path: Path) -> None:
    """A malformed entry (here one more argument than report takes, as a newer hook could
    spool) is set aside once; the entries after it are delivered. (It once stopped the
    whole spool, with a traceback every half second.)"""
    courier, directory, store = _courier(tmp_path)
    spool.keep(directory, os.urandom(16), ("bad", "working", "/a", *[None] * 20), 1.0)
    [bad] = os.listdir(directory)
    (Path(directory) / f"{bad}.bad").mkdir()  # the name it would be set aside as is taken
    spool.keep(directory, os.urandom(16), ("good", "working", "/b"), 2.0)
    assert courier.deliver() == 1
    assert store.get("good") is not None
    assert [p.name for p in Path(directory).iterdir() if p.name.endswith(".bad-1")]
    assert courier.deliver() == 0


def test_a_report_refused_because_the_store_is_full_stays_for_later(tmp_path: Path) -> None:
    courier, directory, store = _courier(tmp_path, max_sessions=1)
    store.report("taking-the-room", "working", "/a")
    spool.keep(directory, os.urandom(16), ("waiting", "working", "/b"), 1.0)
    assert courier.deliver() == 0
    assert spool.counts(directory)["pending"] == 1
    store.remove("taking-the-room")
    assert courier.deliver() == 1
    assert store.get("waiting") is not None


def test_a_killed_hooks_temporary_file_is_cleared_once_old(tmp_path: Path) -> None:
    courier, directory, _ = _courier(tmp_path)
    spool.keep(directory, os.urandom(16), ("a", "working", "/a"), 1.0)
    left = Path(directory) / ".0001-2-abcd.tmp"
    left.write_bytes(b"half")
    courier.deliver()
    assert left.exists()  # a hook may be writing it now
    os.utime(left, (time.time() - 3600, time.time() - 3600))
    courier.deliver()
    assert not left.exists()


def test_a_hook_makes_the_runtime_directory_to_spool_in(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """After a reboot the runtime directory is not there until a manager makes it; a hook
    that runs first keeps its report all the same. (It was lost: no such directory.)"""
    runtime = tmp_path / "run-user"
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    result = subprocess.run(
        [PYTHON, "-m", "shmstore", "hook"], input=json.dumps(payload("Stop")).encode(), capture_output=True, timeout=30
    )
    assert kept_in_spool(result)
    assert stat.S_IMODE((runtime / "shmstore").stat().st_mode) == 0o700
    assert spool.counts(str(runtime / "shmstore" / "store.sock.spool"))["pending"] == 1


def test_a_spooled_agent_that_died_before_delivery_is_reaped(start_server: StartServer, sock_dir: Path) -> None:
    """The hook records the agent's start time with the report: a session delivered from the
    spool after its agent died is closed by the reaper, not kept for good. (The start time
    was read at delivery, from a pid that was gone.)"""
    agent = subprocess.Popen([PYTHON, "-c", "import time; time.sleep(60)"])
    try:
        result = hook(sock_dir / "s.sock", payload("SessionStart"), "--pid", str(agent.pid))
        assert kept_in_spool(result)
    finally:
        agent.kill()
        agent.wait()
    server = start_server("s.sock", reap_interval=0.1)
    with shmstore.connect(server.address, server.authkey) as store:
        wait_for(lambda: (s := store.get(SID)) is not None and s.closed)
        assert store.get(SID).closed_reason == "agent_gone"  # type: ignore[union-attr]
