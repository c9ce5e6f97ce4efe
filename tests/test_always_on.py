"""Issue #11's "done means", end to end with real processes: a user installs the service and
the hooks, agents report through the installed hook, the machine "reboots" (the service's
own command stopped with SIGTERM and started again), and ``shmstore top`` shows the
sessions, the one waiting for an answer first."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import PYTHON, SID, payload, run

OTHER = "7d2c9a10-5e4b-4c1d-9a8e-000000000002"


@pytest.fixture
def home(sock_dir: Path, tmp_path: Path) -> dict[str, str]:
    """A user's environment of their own: runtime dir (hence the default address), state
    and config dirs, so that the default address and files of this test are private."""
    runtime = sock_dir / "run"
    runtime.mkdir(mode=0o700)
    return {
        **os.environ,
        "XDG_RUNTIME_DIR": str(runtime),
        "XDG_STATE_HOME": str(tmp_path / "state"),
        "XDG_CONFIG_HOME": str(tmp_path / "config"),
        "HOME": str(tmp_path),
    }


def service_command(env: dict[str, str]) -> list[str]:
    """The ExecStart of the unit `install-service` writes, with %S as systemd expands it for
    a user service ($XDG_STATE_HOME)."""
    unit = run("install-service", "--init", "systemd", "--dry-run", env=env).stdout
    [line] = [line for line in unit.splitlines() if line.startswith("ExecStart=")]
    argv = shlex.split(line.removeprefix("ExecStart="))
    return [arg.replace("%S", env["XDG_STATE_HOME"]).replace("%%", "%") for arg in argv]


@pytest.fixture
def service(home: dict[str, str]) -> Iterator[list[subprocess.Popen[str]]]:
    """The service's command, started as systemd would start it (and again after a
    "reboot"): each process ends with the test."""
    started: list[subprocess.Popen[str]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        assert proc.stderr is not None
        proc.stderr.close()


def start(command: list[str], env: dict[str, str], started: list[subprocess.Popen[str]]) -> None:
    os.makedirs(os.path.join(env["XDG_STATE_HOME"], "shmstore"), exist_ok=True)  # StateDirectory=
    proc = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
    started.append(proc)
    assert proc.stderr is not None
    while "serving at" not in (line := proc.stderr.readline()):
        assert line, "the service's command ended without serving"


def installed_hook(settings: Path, event: str) -> str:
    [group] = json.loads(settings.read_text())["hooks"][event]
    [entry] = group["hooks"]
    return str(entry["command"])


def report(command: str, env: dict[str, str], body: dict[str, object]) -> None:
    """Run an installed hook command as Claude Code does, with a budget a loaded machine
    running coverage in every child cannot overrun (its 0.9 s count from process start)."""
    result = subprocess.run(
        f"{command} --timeout 30", shell=True, input=json.dumps(body), env=env, capture_output=True, text=True
    )
    assert (result.returncode, result.stderr) == (0, "")


def test_installed_service_and_hooks_keep_and_show_sessions_across_a_reboot(
    home: dict[str, str], service: list[subprocess.Popen[str]]
) -> None:
    command = service_command(home)
    assert command[:3] == [sys.executable, "-m", "shmstore"] or command[1:3] == ["-m", "shmstore"]
    settings = Path(home["HOME"]) / ".claude" / "settings.json"
    assert run("install-hooks", "--settings", str(settings), env=home).returncode == 0

    start(command, home, service)
    prompt, permission = installed_hook(settings, "UserPromptSubmit"), installed_hook(settings, "PermissionRequest")
    report(prompt, home, payload("UserPromptSubmit", prompt="fix the tests"))
    report(prompt, home, payload("UserPromptSubmit", prompt="ship it", session_id=OTHER, cwd="/src/other"))
    report(permission, home, payload("PermissionRequest", session_id=OTHER, cwd="/src/other", tool_name="Bash"))

    service[-1].terminate()  # the reboot: systemd stops the unit with SIGTERM...
    assert service[-1].wait(timeout=10) == 0
    start(command, home, service)  # ...and starts it again at login

    top = subprocess.run([PYTHON, "-m", "shmstore", "top"], env=home, capture_output=True, text=True, timeout=30)
    assert top.returncode == 0, top.stderr
    rows = [line for line in top.stdout.splitlines() if SID[:8] in line or OTHER[:8] in line]
    assert len(rows) == 2, top.stdout
    first, second = (row.split() for row in rows)
    assert {"question", OTHER[:8], "other"} <= set(first)  # waiting for you: first
    assert {"working", SID[:8]} <= set(second)
