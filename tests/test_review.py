"""An adversarial review of issue #11's additions: a state file that is not a file, a hook
run with odd options or a closed stderr, and a user's hook command that runs ours among
other commands. Each test failed before its fix."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from pathlib import Path

import pytest
from helpers import PYTHON, hook, kept_in_spool, payload, run

import shmstore


def test_a_state_file_that_is_a_fifo_is_kept_aside_and_the_manager_serves(sock_dir: Path) -> None:
    # Opening a FIFO for reading blocks until a writer comes: serve hung before listening,
    # and deaf to SIGTERM (the open is retried after the handler runs).
    fifo = sock_dir / "state.json"
    os.mkfifo(fifo)
    proc = subprocess.Popen(
        [PYTHON, "-m", "shmstore", "serve", "--address", str(sock_dir / "s.sock"), "--state", str(fifo)],
        stderr=subprocess.PIPE,
        text=True,
    )
    watchdog = threading.Timer(20, proc.kill)  # before the fix it never served, nor stopped on SIGTERM
    watchdog.start()
    try:
        assert proc.stderr is not None
        logged = ""
        while "serving at" not in logged:
            line = proc.stderr.readline()
            assert line, f"it ended without serving: {logged}"
            logged += line
        with shmstore.connect(sock_dir / "s.sock", timeout=10) as store:
            assert store.list_all() == []
        proc.terminate()
        proc.communicate(timeout=20)
    finally:
        watchdog.cancel()
        proc.kill()
        proc.wait()
        proc.stderr.close()  # type: ignore[union-attr]
    assert proc.returncode == 0
    assert "is not a regular file" in logged
    kept = [p.name for p in sock_dir.glob("state.json*") if p.name != "state.json.lock"]
    assert [name.startswith("state.json.corrupt-") for name in kept] == [True]


@pytest.mark.parametrize("timeout", ["inf", "1e300", "nan"])
def test_the_hook_exits_zero_whatever_number_its_timeout_is(sock_dir: Path, timeout: str) -> None:
    result = hook(sock_dir / "none.sock", payload("Stop"), "--timeout", timeout)
    assert result.returncode == 0, result.stderr.decode()
    assert kept_in_spool(result)


def test_the_hook_exits_zero_when_its_stderr_is_a_closed_pipe(sock_dir: Path, tmp_path: Path) -> None:
    reader, writer = os.pipe()
    os.close(reader)
    try:
        result = subprocess.run(
            [PYTHON, "-m", "shmstore", "hook", "--address", str(sock_dir / "none.sock"), "--timeout", "30"],
            input=json.dumps(payload("Stop")).encode(),
            stdout=subprocess.PIPE,
            stderr=writer,
            env={**os.environ, "XDG_STATE_HOME": str(tmp_path)},
            timeout=30,
        )
    finally:
        os.close(writer)
    assert result.returncode == 0
    assert "no manager" in (tmp_path / "shmstore" / "hook.log").read_text()  # still logged


@pytest.mark.parametrize(
    "theirs",
    [
        "python3 -m shmstore hook >> /tmp/hook-trace.log; notify-send done",
        "python3 -m shmstore hook && say done",
        "python3 -m shmstore hook | tee /tmp/trace",
    ],
)
def test_a_users_command_that_runs_ours_among_others_is_theirs_and_kept(tmp_path: Path, theirs: str) -> None:
    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps({"hooks": {"Stop": [{"hooks": [{"type": "command", "command": theirs}]}]}}))
    for command in ("install-hooks", "uninstall-hooks"):
        result = run(command, "--settings", str(settings))
        assert result.returncode == 0, result.stderr
    kept = json.loads(settings.read_text())["hooks"]["Stop"]
    assert [h["command"] for g in kept for h in g["hooks"]] == [theirs]


def test_a_symlinked_state_file_stays_a_symlink_and_its_target_gets_the_sessions(sock_dir: Path) -> None:
    (sock_dir / "real").mkdir()
    link = sock_dir / "state.json"
    link.symlink_to(sock_dir / "real" / "state.json")
    proc = subprocess.Popen(
        [PYTHON, "-m", "shmstore", "serve", "--address", str(sock_dir / "s.sock"), "--state", str(link)],
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while not (sock_dir / "s.sock.key").exists():
            assert time.monotonic() < deadline
            assert proc.poll() is None
            time.sleep(0.02)
        with shmstore.connect(sock_dir / "s.sock", timeout=10) as store:
            store.report("abc", "attention", "/tmp")
        proc.terminate()
        assert proc.wait(timeout=20) == 0
    finally:
        proc.kill()
        proc.wait()
    assert link.is_symlink()
    assert b'"abc"' in (sock_dir / "real" / "state.json").read_bytes()
