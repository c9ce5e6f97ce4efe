"""A stop is a drain: every write a client saw succeed is in the state file the next
manager restores, a final save that fails is a failure that says where the sessions went,
and what interrupted saves left behind is cleared at the next start.

Every manager here is a real ``shmstore serve`` process stopped by SIGTERM.
"""

from __future__ import annotations

import contextlib
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import orjson
import pytest
from helpers import PYTHON, serving

import shmstore
from shmstore import Status, StoreUnavailableError


def connect(address: Path) -> shmstore.Client:
    return shmstore.connect(address, timeout=10)


def test_every_write_acknowledged_before_a_sigterm_is_in_the_restarted_store(sock_dir: Path) -> None:
    """Four threads add one token at a time while the manager is told to stop; the restart
    holds exactly as many tokens as calls succeeded. (Before the drain, the final save was
    taken while connections were still served: 1,327 of 1,330 acknowledged increments came
    back.) 2,000 other sessions make the final save take long enough to be raced."""
    sock, state = sock_dir / "s.sock", sock_dir / "state.json"
    acknowledged = [0] * 4
    refused: list[BaseException] = []
    with serving(sock, "--state", str(state), "--save-interval", "60") as proc:
        with connect(sock) as store:
            for n in range(2000):
                store.report(f"other-{n}", Status.WORKING, f"/src/p{n}")
            store.report("counted", Status.WORKING, "/src/counted")

        def add(worker: int) -> None:
            with connect(sock) as client:
                while True:
                    try:
                        client.add_usage("counted", 1, 0)
                    except StoreUnavailableError as exc:
                        refused.append(exc)
                        return
                    acknowledged[worker] += 1

        threads = [threading.Thread(target=add, args=(n,)) for n in range(4)]
        for thread in threads:
            thread.start()
        while sum(acknowledged) < 400:
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        for thread in threads:
            thread.join(30)
        _, log = proc.communicate(timeout=30)
    assert proc.returncode == 0, log
    assert len(refused) == 4  # each thread's last call failed: none was told a lie
    with serving(sock, "--state", str(state)), connect(sock) as store:
        usage = store.get("counted").api_usage  # type: ignore[union-attr]
        assert usage is not None
        assert usage.input_tokens == sum(acknowledged)
        assert len(store.list_all()) == 2001


def test_every_handshake_under_way_at_a_stop_is_ended_and_logged_before_stopped_serving(sock_dir: Path) -> None:
    """Fifty peers send garbage in place of a handshake and twenty say nothing, right
    before the stop. Each garbage peer the manager took up (it was sent the challenge)
    gets its warning, and every line comes before the last one, 'stopped serving': the
    drain joins every connection's thread first. (Before, those threads were still running
    when it was logged, and their warnings came after it or not at all.) The silent ones
    are the manager's own to end, and say nothing."""
    import socket

    sock = sock_dir / "s.sock"
    with serving(sock, "--handshake-timeout", "60") as proc:  # the silent ones wait for the stop, however loaded
        silent, garbage = [], []
        for _ in range(20):
            peer = socket.socket(socket.AF_UNIX)
            peer.connect(str(sock))
            silent.append(peer)
        for _ in range(50):
            peer = socket.socket(socket.AF_UNIX)
            peer.connect(str(sock))
            peer.sendall(b"\x00\x00\x00\x05hello")
            garbage.append(peer)
        proc.send_signal(signal.SIGTERM)
        _, log = proc.communicate(timeout=30)
        challenged = 0
        for peer in garbage:
            peer.settimeout(5)
            with contextlib.suppress(OSError):  # reset: never accepted
                challenged += len(peer.recv(4096)) > 0  # taken up: the manager spoke first
        for peer in [*silent, *garbage]:
            peer.close()
    assert proc.returncode == 0
    assert log.count("did not complete the handshake") == challenged
    assert log.rstrip().endswith(f"INFO: stopped serving at {sock}")


def test_leftovers_of_interrupted_saves_are_removed_at_start_and_nothing_else(sock_dir: Path) -> None:
    """Only files that are ours by name, owner and mode go: a SIGKILL during a save leaves
    one such temporary file each time, and a crash-looping service would fill the disk."""
    sock, state = sock_dir / "s.sock", sock_dir / "state.json"
    ours = [sock_dir / f".state.json.{suffix}.tmp" for suffix in ("abcd1234", "x_y_z_00", "q9q9q9q9")]
    for path in ours:
        path.write_bytes(b"half a save")
        path.chmod(0o600)
    kept = [
        sock_dir / ".state.json.abcd1234.tmp.keep",  # another name
        sock_dir / ".other.json.abcd1234.tmp",  # another file's
        sock_dir / ".state.json.readable.tmp",  # another mode
    ]
    for path in kept:
        path.write_bytes(b"not ours")
        path.chmod(0o600)
    kept[2].chmod(0o644)
    link = sock_dir / ".state.json.linklink.tmp"
    link.symlink_to(kept[0])
    with serving(sock, "--state", str(state)) as proc:
        pass
    assert all(not path.exists() for path in ours)
    assert all(path.read_bytes() == b"not ours" for path in kept)
    assert link.is_symlink()
    assert all(f"removed {path}, left by an interrupted save" in proc.before for path in ours)


def _unshare() -> list[str]:
    """A command prefix that runs its command in a mount namespace of its own, where it may
    mount a small tmpfs: a full disk that touches nothing else."""
    unshare = shutil.which("unshare")
    probe = subprocess.run(
        [unshare or "unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=8k tmpfs /mnt"], capture_output=True
    )
    if unshare is None or probe.returncode != 0:
        if os.environ.get("CI") == "true":
            pytest.fail(f"cannot mount a tmpfs in a namespace of our own: {probe.stderr!r}")
        pytest.skip("unshare cannot make a mount namespace here")
    return [unshare, "-rm"]


def test_a_final_save_on_a_full_disk_fails_the_stop_and_the_restart_loses_nothing(sock_dir: Path) -> None:
    """The state file is on a 256 KiB disk, which a filler leaves ~40 KiB of: the first
    sessions save, 400 more do not fit. SIGTERM: the manager exits 1 (not 0, as before) and
    says the file holds the last good save and where the sessions went; once the filler is
    gone, the next manager restores all 405 from there (before, 5 of 405 came back), saves
    them where they belong, and removes the rescue."""
    disk, sock = sock_dir / "disk", sock_dir / "s.sock"
    disk.mkdir()
    state, filler = disk / "state.json", disk / "filler"
    serve = f"{PYTHON} -m shmstore serve --address {sock} --state {state} --save-interval 0.1 --log-level debug"
    script = (
        f"mount -t tmpfs -o size=256k tmpfs {disk} && head -c 216000 /dev/zero > {filler} && "
        f"{serve}; echo exit=$? >&2; rm {filler}; exec {serve}"
    )
    proc = subprocess.Popen([*_unshare(), "sh", "-c", script], stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    lines: list[str] = []
    read: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [read.put(line) for line in proc.stderr], daemon=True).start()  # type: ignore[union-attr]

    def until(text: str) -> str:
        deadline = time.monotonic() + 60
        while True:
            try:
                line = read.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no {text!r} (exit {proc.poll()}):\n" + "".join(lines)) from None
            lines.append(line)
            if text in line:
                return line

    try:
        until("serving at")
        with connect(sock) as store:
            for n in range(5):
                store.report(f"first-{n}", Status.WORKING, "/src/first")
            until("saved")  # the periodic save is at debug level: wait for its effect instead
        with connect(sock) as store:
            pid = store.info()["pid"]
            for n in range(400):
                store.report(f"more-{n}", Status.ATTENTION, "/src/" + "deep/" * 20 + str(n))
        until("ERROR: could not save the sessions")
        os.kill(pid, signal.SIGTERM)
        exited = until("exit=")
        assert exited.strip() == "exit=1"
        log = "".join(lines)
        assert "No space left on device" in log
        # The last periodic save that fitted: the first five sessions, or a few more.
        [saved] = re.findall(r"the file holds the last good save \(revision (\d+)\)", log)
        assert 5 <= int(saved) < 405
        [rescue] = re.findall(r"the sessions are in (\S+),", log)
        until("serving at")
        assert f"restoring from {rescue}" in "".join(lines)
        with connect(sock) as store:
            assert len(store.list_all()) == 405
        until(f"removed {rescue}")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
    assert not Path(rescue).exists()


@pytest.mark.skipif(sys.platform != "linux", reason="/proc")
def test_a_stopping_manager_refuses_writes_with_a_typed_error_and_keeps_answering_reads() -> None:
    """In-process: once stop_writes() has run, every write raises StoreUnavailableError
    and changes nothing; reads and a waiting changes() return."""
    store = shmstore.Store()
    store.report("s1", "working", "/x")
    revision = store.revision()
    woke = []
    waiter = threading.Thread(target=lambda: woke.append(store.changes(revision, timeout=30)))
    waiter.start()
    store.stop_writes()
    waiter.join(5)
    assert woke  # a long poll does not hold the stop for its whole timeout
    for write, args in [
        ("report", ("s1", "attention", "/x")),
        ("transition", ("s1", "question")),
        ("add_usage", ("s1", 1, 1)),
        ("remove", ("s1",)),
        ("prune", (0,)),
        ("once", (b"t" * 16, 1, "report", "s2", "working", "/x")),
    ]:
        with pytest.raises(StoreUnavailableError, match="stopping"):
            getattr(store, write)(*args)
    assert store.revision() == revision
    assert store.get("s1") is not None


def test_a_manager_started_on_a_state_file_another_holds_waits_for_its_final_save(sock_dir: Path) -> None:
    """The state file is one manager's at a time: a second one on it (another socket, or
    the same one once the first has let it go) waits for the first's final save, then
    restores what it saved. (It once restored the file as it was, and its saves then wiped
    the first's sessions.)"""
    state = sock_dir / "state.json"
    with serving(sock_dir / "a.sock", "--state", str(state), "--save-interval", "60") as first:
        with connect(sock_dir / "a.sock") as store:
            for n in range(50):
                store.report(f"s{n}", Status.WORKING, "/src")
        second = subprocess.Popen(
            [PYTHON, "-m", "shmstore", "serve", "--address", str(sock_dir / "b.sock"), "--state", str(state)],
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert second.stderr is not None
            assert "waiting for the manager that holds" in second.stderr.readline()
            first.send_signal(signal.SIGTERM)
            first.communicate(timeout=30)
            seen = []
            while "serving at" not in (line := second.stderr.readline()):
                seen.append(line)
                assert line, (second.wait(), seen)
            with connect(sock_dir / "b.sock") as store:
                assert len(store.list_all()) == 50
        finally:
            second.terminate()
            second.communicate(timeout=30)


def test_a_store_is_served_again_after_a_stop(sock_dir: Path) -> None:
    store = shmstore.Store()
    for round in range(2):
        stop = threading.Event()
        ready = threading.Event()
        thread = threading.Thread(
            target=shmstore.serve,
            args=(sock_dir / "s.sock",),
            kwargs={"store": store, "stop_event": stop, "on_ready": lambda _bound, event=ready: event.set()},
        )
        thread.start()
        assert ready.wait(10)
        with connect(sock_dir / "s.sock") as client:
            client.report(f"round-{round}", Status.WORKING, "/src")  # refused as "stopping" before
        stop.set()
        thread.join(30)
    assert sorted(orjson.loads(data)[0] for data in store.list_all()) == ["round-0", "round-1"]


def test_stopping_a_started_manager_waits_for_a_whole_drain_and_save() -> None:
    from shmstore.manager import keeper, launch, lifecycle

    assert launch.STOP_TIMEOUT > lifecycle.DRAIN_TIMEOUT + 1.0 + keeper.SAVE_JOIN_TIMEOUT


def test_a_rescue_file_that_cannot_be_used_is_said_and_kept_aside(sock_dir: Path, runtime_dir: Path) -> None:
    from shmstore.manager import state as state_file

    state = sock_dir / "state.json"
    rescue = state_file.rescue_path(state, str(runtime_dir / "shmstore"))
    rescue.parent.mkdir(mode=0o700)
    rescue.write_bytes(b"{not a state file")
    rescue.chmod(0o600)
    with serving(sock_dir / "s.sock", "--state", str(state)) as proc:
        pass
    assert f"state file {rescue}: is not JSON" in proc.before
    assert not rescue.exists()
    assert [p.name.startswith(rescue.name + ".corrupt-") for p in rescue.parent.glob(rescue.name + "*")] == [True]
