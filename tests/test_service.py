"""``shmstore install-service`` / ``uninstall-service``: the unit file's text, checked by
reading it and by ``systemd-analyze verify``; the commands, run as a user runs them.

This machine has no systemd user manager (``systemctl --user`` cannot reach a bus, and
``systemd --user`` does not start without systemd as PID 1), so the commands meet a
stand-in ``systemctl`` (or ``launchctl``): a real script first on ``PATH`` that records
its arguments and answers as the real one does. Each test has its own HOME and XDG
directories, so nothing of the user's is read or written.
"""

from __future__ import annotations

import os
import plistlib
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from helpers import PYTHON

from shmstore.commands import service
from shmstore.errors import ValidationError

UNIT_LINES = [
    "Type=notify",
    "NotifyAccess=main",
    "Restart=on-failure",
    "StateDirectory=shmstore",
    "WantedBy=default.target",
]
FOREIGN_UNIT = "[Service]\nExecStart=/usr/bin/my-own-store\n"
# A stand-in for systemctl/launchctl: records each call, answers `is-system-running` with
# $FAKE_STATE, fails the subcommand named $FAKE_FAIL with $FAKE_MESSAGE, and sleeps (as
# the process itself, so a timeout's kill ends it) on the one named $FAKE_HANG.
FAKE_TOOL = """#!/bin/sh
echo "$*" >> "$FAKE_LOG"
if [ "$*" = "--user is-system-running" ]; then
  echo "${FAKE_STATE:-running}"; [ "$FAKE_STATE" = offline ] && exit 1; exit 0
fi
if [ -n "$FAKE_HANG" ] && [ "$2" = "$FAKE_HANG" ]; then exec /bin/sleep 60; fi
if [ -n "$FAKE_FAIL" ] && [ "$2" = "$FAKE_FAIL" ]; then echo "$FAKE_MESSAGE" >&2; exit 1; fi
exit 0
"""


class Home:
    """A user's home of this test's own, with a stand-in tool (or none) on PATH."""

    def __init__(self, root: Path, tool: str | None = "systemctl") -> None:
        self.root = root
        self.bin = root / "bin"
        self.bin.mkdir()
        self.log = root / "calls.log"
        if tool is not None:
            script = self.bin / tool
            script.write_text(FAKE_TOOL)
            script.chmod(0o755)
        self.env = {
            **os.environ,
            "HOME": str(root / "home"),
            "XDG_CONFIG_HOME": str(root / "config"),
            "XDG_STATE_HOME": str(root / "state"),
            "PATH": str(self.bin),
            "FAKE_LOG": str(self.log),
        }
        self.unit = root / "config" / "systemd" / "user" / "shmstore.service"

    def run(self, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [PYTHON, "-m", "shmstore", *args], capture_output=True, text=True, timeout=60, env={**self.env, **env}
        )

    def calls(self) -> list[str]:
        return self.log.read_text().splitlines() if self.log.exists() else []

    def files(self) -> list[Path]:
        return sorted(p for p in self.root.rglob("*") if p.is_file() and p.parent != self.bin and p != self.log)


@pytest.fixture
def home(tmp_path: Path) -> Home:
    return Home(tmp_path)


def _keys(unit: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in unit.splitlines() if "=" in line and not line.startswith("#"))


# -- the unit's text -------------------------------------------------------------------------


def test_the_unit_runs_this_python_as_a_notify_service_restarted_on_failure() -> None:
    unit = service.systemd_unit(PYTHON)
    lines = unit.splitlines()
    assert lines[0] == f"# {service.MARKER}"
    for line in UNIT_LINES:
        assert line in lines
    assert [line for line in lines if line.startswith("[")] == ["[Unit]", "[Service]", "[Install]"]
    exec_start = _keys(unit)["ExecStart"]
    assert exec_start == f'"{PYTHON}" -m shmstore serve --state %S/shmstore/state.json'
    assert os.path.isabs(PYTHON)


def test_an_address_is_passed_on_with_spaces_quotes_percent_and_dollar_kept_literal() -> None:
    address = '/tmp/my dir/50%d "a" $HOME\\x.sock'
    exec_start = _keys(service.systemd_unit(PYTHON, address))["ExecStart"]
    assert exec_start.endswith(' --address "/tmp/my dir/50%%d \\"a\\" $$HOME\\\\x.sock"')


def test_the_python_path_is_quoted_with_percent_doubled_and_dollar_left_alone() -> None:
    # systemd expands $VARIABLE in the arguments only (systemd-analyze verify, below, agrees).
    assert service.exec_quote("/opt/my env/50%/$x/python", command=True) == '"/opt/my env/50%%/$x/python"'


@pytest.mark.parametrize("python", ['/opt/a"b/python', "/opt/a'b/python", "/opt/a\\b/python", "/opt/a\nb/python"])
def test_a_python_path_systemd_cannot_run_is_refused_with_a_validation_error(python: str) -> None:
    with pytest.raises(ValidationError) as error:
        service.systemd_unit(python)
    assert error.value.field == "python"


def test_a_relative_python_is_refused() -> None:
    with pytest.raises(ValidationError, match="not an absolute path"):
        service.systemd_unit("python3")


def verify(unit: Path, runtime: Path) -> subprocess.CompletedProcess[str]:
    """``systemd-analyze --user verify UNIT`` (which needs a runtime directory of its own)."""
    return subprocess.run(
        ["systemd-analyze", "--user", "verify", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "XDG_RUNTIME_DIR": str(runtime)},
    )


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_verifies_the_unit_even_for_a_python_under_an_awkward_path(tmp_path: Path) -> None:
    awkward = tmp_path / "my env 100% $HOME"
    awkward.mkdir()
    (awkward / "python").symlink_to(PYTHON)
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    for python in (PYTHON, str(awkward / "python")):
        unit = tmp_path / "units" / "shmstore.service"
        unit.parent.mkdir(exist_ok=True)
        unit.write_text(service.systemd_unit(python, "/tmp/a b/%d $x.sock"))
        result = verify(unit, runtime)
        assert (result.returncode, result.stderr) == (0, ""), python
    # ...and it would say so if the program path were read differently (a `$$` kept).
    unit.write_text(service.systemd_unit(str(awkward / "python")).replace("$HOME", "$$HOME"))
    result = verify(unit, runtime)
    assert result.returncode != 0
    assert "is not executable" in result.stderr


def test_the_launchd_agent_runs_this_python_at_load_and_again_after_a_failure(tmp_path: Path) -> None:
    text = service.launchd_plist(PYTHON, tmp_path / "state dir" / "state.json", tmp_path / "shmstore.log")
    assert f"<!-- {service.MARKER} -->" in text.splitlines()
    agent = plistlib.loads(text.encode())
    assert agent["Label"] == service.LAUNCHD_LABEL
    state = f"{tmp_path}/state dir/state.json"
    assert agent["ProgramArguments"] == [PYTHON, "-m", "shmstore", "serve", "--state", state]
    assert agent["RunAtLoad"] is True
    assert agent["KeepAlive"] == {"SuccessfulExit": False}
    assert agent["StandardErrorPath"] == str(tmp_path / "shmstore.log")


# -- install-service, as a user runs it --------------------------------------------------------


def test_dry_run_prints_the_unit_and_the_commands_and_writes_or_runs_nothing(home: Home) -> None:
    result = home.run("install-service", "--dry-run", "--http", "47999")
    assert result.returncode == 0, result.stderr
    socket_unit = service.socket_path().name
    assert result.stdout == service.systemd_unit(PYTHON, http="47999") + service.systemd_socket("47999")
    assert str(home.unit) in result.stderr
    assert socket_unit in result.stderr
    assert "  systemctl --user enable --now shmstore.socket\n  systemctl --user enable --now shmstore.service" in (
        result.stderr
    )
    assert home.files() == []
    assert home.calls() == []


def test_dry_run_for_launchd_on_linux_prints_the_agent_and_bootstrap_command(home: Home) -> None:
    result = home.run("install-service", "--dry-run", "--init", "launchd")
    assert result.returncode == 0, result.stderr
    agent = plistlib.loads(result.stdout.encode())
    plist = Path(home.env["HOME"]) / "Library" / "LaunchAgents" / "local.shmstore.plist"
    assert agent["ProgramArguments"][0] == PYTHON
    assert f"launchctl bootstrap gui/{os.getuid()} {plist}" in result.stderr
    assert home.files() == []


def test_install_writes_the_unit_then_reloads_and_enables_it_now(home: Home) -> None:
    result = home.run("install-service")
    assert result.returncode == 0, result.stderr
    found = re.search(r'--http "(\d+)"', home.unit.read_text())
    assert found is not None  # a port free at install time, kept in the unit for the http hooks
    port = found[1]
    assert home.unit.read_text() == service.systemd_unit(PYTHON, http=port)
    assert home.calls() == [
        "--user is-system-running",
        "--user daemon-reload",
        "--user stop shmstore.service",  # it lets go of the port...
        "--user enable --now shmstore.socket",  # ...which systemd holds for it from now on
        "--user enable --now shmstore.service",
    ]
    assert f"wrote {home.unit}" in result.stdout
    socket_unit = home.unit.with_name("shmstore.socket").read_text()
    assert f"ListenStream=127.0.0.1:{port}\n" in socket_unit
    assert socket_unit == service.systemd_socket(port)


def test_installing_again_keeps_the_same_unit_and_still_enables_it(home: Home) -> None:
    assert home.run("install-service").returncode == 0
    written = home.unit.stat().st_mtime_ns
    home.log.unlink()
    result = home.run("install-service")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"kept {home.unit};")
    assert home.unit.stat().st_mtime_ns == written
    assert home.calls()[-1] == "--user enable --now shmstore.service"


def test_install_respects_xdg_config_home_and_defaults_to_dot_config(home: Home) -> None:
    env = {k: v for k, v in home.env.items() if k != "XDG_CONFIG_HOME"}
    result = subprocess.run(
        [PYTHON, "-m", "shmstore", "install-service"], capture_output=True, text=True, timeout=60, env=env
    )
    assert result.returncode == 0, result.stderr
    assert (Path(env["HOME"]) / ".config" / "systemd" / "user" / "shmstore.service").is_file()
    assert not home.unit.exists()


def test_install_replaces_our_own_older_unit(home: Home) -> None:
    home.unit.parent.mkdir(parents=True)
    home.unit.write_text(service.systemd_unit("/usr/bin/python3.9", http="47999"))
    result = home.run("install-service")
    assert result.returncode == 0, result.stderr
    assert home.unit.read_text() == service.systemd_unit(PYTHON, http="47999")  # the port the hooks name, kept


def test_install_without_http_gives_the_manager_none(home: Home) -> None:
    assert home.run("install-service", "--http", "none").returncode == 0
    assert home.unit.read_text() == service.systemd_unit(PYTHON)


def test_install_refuses_a_unit_that_is_not_ours_and_leaves_it_alone(home: Home) -> None:
    home.unit.parent.mkdir(parents=True)
    home.unit.write_text(FOREIGN_UNIT)
    for args in (["install-service"], ["install-service", "--dry-run"], ["uninstall-service"]):
        result = home.run(*args)
        assert result.returncode == 1, args
        assert f"{home.unit} was not written by shmstore" in result.stderr
        assert home.unit.read_text() == FOREIGN_UNIT
    assert [call for call in home.calls() if "is-system-running" not in call] == []


def test_a_failing_systemctl_is_reported_with_its_own_message(home: Home) -> None:
    message = "Failed to enable unit: Access denied"
    result = home.run("install-service", FAKE_FAIL="enable", FAKE_MESSAGE=message)
    assert result.returncode == 1
    assert result.stderr == (
        f"shmstore: error: `systemctl --user enable --now shmstore.socket` failed (exit 1): {message}\n"
    )


def test_a_systemctl_that_hangs_is_given_up_on_after_the_timeout(home: Home) -> None:
    started = time.monotonic()
    result = home.run("install-service", "--timeout", "1", FAKE_HANG="daemon-reload")
    assert time.monotonic() - started < 20
    assert result.returncode == 1
    assert "`systemctl --user daemon-reload` did not finish within 1 s" in result.stderr


def test_without_systemctl_it_says_so_and_prints_the_command_to_run_instead(tmp_path: Path) -> None:
    home = Home(tmp_path, tool=None)
    result = home.run("install-service")
    assert result.returncode == 1
    assert "cannot install a service: there is no systemctl here" in result.stderr
    state = Path(home.env["XDG_STATE_HOME"]) / "shmstore" / "state.json"
    assert result.stdout == f"{PYTHON} -m shmstore serve --state {state}\n"
    assert home.files() == []


def test_without_a_user_manager_it_says_so_and_writes_nothing(home: Home) -> None:
    result = home.run("install-service", FAKE_STATE="offline")
    assert result.returncode == 1
    assert "no systemd user manager is running here (systemctl --user is-system-running: offline)" in result.stderr
    assert "-m shmstore serve --state" in result.stdout
    assert home.files() == []
    assert home.calls() == ["--user is-system-running"]


def test_a_degraded_user_manager_is_still_one_to_install_into(home: Home) -> None:
    assert home.run("install-service", FAKE_STATE="degraded").returncode == 0
    assert home.unit.is_file()


# -- uninstall-service ---------------------------------------------------------------------------


def test_uninstall_disables_the_service_removes_our_unit_and_reloads(home: Home) -> None:
    assert home.run("install-service").returncode == 0
    home.log.unlink()
    result = home.run("uninstall-service")
    assert result.returncode == 0, result.stderr
    assert not home.unit.exists()
    assert not home.unit.with_name("shmstore.socket").exists()
    assert home.calls() == [
        "--user is-system-running",
        "--user disable --now shmstore.socket",
        "--user disable --now shmstore.service",
        "--user daemon-reload",
    ]


def test_uninstall_keeps_the_unit_when_disabling_fails(home: Home) -> None:
    assert home.run("install-service").returncode == 0
    result = home.run("uninstall-service", FAKE_FAIL="disable", FAKE_MESSAGE="Access denied")
    assert result.returncode == 1
    assert "Access denied" in result.stderr
    assert home.unit.is_file()


def test_uninstall_without_a_unit_says_there_is_nothing_to_do(home: Home) -> None:
    result = home.run("uninstall-service")
    assert result.returncode == 0
    assert result.stdout == f"there is no service file at {home.unit}; nothing to do\n"
    assert home.calls() == ["--user is-system-running"]


def test_install_and_uninstall_through_launchctl(tmp_path: Path) -> None:
    home = Home(tmp_path, tool="launchctl")
    plist = Path(home.env["HOME"]) / "Library" / "LaunchAgents" / "local.shmstore.plist"
    domain = f"gui/{os.getuid()}"
    assert home.run("install-service", "--init", "launchd").returncode == 0
    assert plistlib.loads(plist.read_bytes())["ProgramArguments"][0] == PYTHON
    assert home.calls() == [f"bootout {domain}/local.shmstore", f"bootstrap {domain} {plist}"]
    home.log.unlink()
    assert home.run("uninstall-service", "--init", "launchd").returncode == 0
    assert not plist.exists()
    assert home.calls() == [f"bootout {domain}/local.shmstore"]


# -- the notifier beside the manager (--notify) ----------------------------------------------------


def test_the_notify_unit_runs_shmstore_notify_with_its_flags_after_the_manager() -> None:
    unit = service.systemd_notify_unit(PYTHON, "/tmp/a b.sock", ["--on", "question", "--command", 'echo "$X" 5%'])
    assert unit.splitlines()[0] == f"# {service.MARKER}"
    keys = _keys(unit)
    assert (keys["Wants"], keys["After"]) == ("shmstore.service", "shmstore.service")
    assert keys["ExecStart"] == (
        f'"{PYTHON}" -m shmstore notify --address "/tmp/a b.sock" "--on" "question" "--command" "echo \\"$$X\\" 5%%"'
    )
    assert (keys["Restart"], keys["RestartPreventExitStatus"]) == ("on-failure", "2")  # bad flags: no restart loop
    assert keys["WantedBy"] == "default.target"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_verifies_the_notify_unit(tmp_path: Path) -> None:
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    unit = tmp_path / "units" / "shmstore-notify.service"
    unit.parent.mkdir()
    unit.write_text(service.systemd_notify_unit(PYTHON, "/tmp/a b/%d $x.sock", ["--url", "https://ntfy.sh/a%20b"]))
    (unit.parent / "shmstore.service").write_text(service.systemd_unit(PYTHON))
    result = verify(unit, runtime)
    assert (result.returncode, result.stderr) == (0, "")


def test_install_with_notify_writes_the_notifier_unit_and_starts_it_after_the_manager(home: Home) -> None:
    result = home.run("install-service", "--http", "none", "--notify=--on attention --bell")
    assert result.returncode == 0, result.stderr
    notify_unit = home.unit.with_name("shmstore-notify.service")
    assert notify_unit.read_text() == service.systemd_notify_unit(PYTHON, None, ["--on", "attention", "--bell"])
    assert home.calls() == [
        "--user is-system-running",
        "--user daemon-reload",
        "--user enable --now shmstore.service",
        "--user enable shmstore-notify.service",
        "--user restart shmstore-notify.service",  # a notifier already running takes its new flags
    ]
    assert f"runs beside it ({notify_unit})" in result.stdout
    # Its flags as the unit gives them are ones `shmstore notify` takes.
    exec_start = _keys(notify_unit.read_text())["ExecStart"]
    assert exec_start.endswith('notify "--on" "attention" "--bell"')


def test_installing_again_without_notify_stops_the_notifier_and_removes_its_unit(home: Home) -> None:
    assert home.run("install-service", "--http", "none", "--notify").returncode == 0
    notify_unit = home.unit.with_name("shmstore-notify.service")
    assert _keys(notify_unit.read_text())["ExecStart"] == f'"{PYTHON}" -m shmstore notify'
    home.log.unlink()
    result = home.run("install-service", "--http", "none")
    assert result.returncode == 0, result.stderr
    assert not notify_unit.exists()
    assert home.unit.is_file()
    assert home.calls() == [
        "--user is-system-running",
        "--user disable --now shmstore-notify.service",  # before its file goes
        "--user daemon-reload",
        "--user enable --now shmstore.service",
    ]


def test_uninstall_stops_and_removes_the_notifier_too(home: Home) -> None:
    assert home.run("install-service", "--http", "none", "--notify").returncode == 0
    home.log.unlink()
    assert home.run("uninstall-service").returncode == 0
    assert not home.unit.with_name("shmstore-notify.service").exists()
    assert home.calls()[:2] == ["--user is-system-running", "--user disable --now shmstore-notify.service"]
    assert home.files() == []


def test_notify_refuses_a_notifier_unit_that_is_not_ours(home: Home) -> None:
    notify_unit = home.unit.with_name("shmstore-notify.service")
    notify_unit.parent.mkdir(parents=True)
    notify_unit.write_text(FOREIGN_UNIT)
    for args in (["install-service", "--notify"], ["install-service", "--notify", "--dry-run"]):
        result = home.run(*args)
        assert result.returncode == 1, args
        assert f"{notify_unit} was not written by shmstore" in result.stderr
    assert notify_unit.read_text() == FOREIGN_UNIT


@pytest.mark.parametrize(
    ("flags", "said"),
    [
        ("--bogus", "shmstore notify does not take --bogus here"),
        ("--address /x", "shmstore notify does not take --address /x here"),  # install-service's own --address
        ("--on working", "'working' is not one of question, attention"),
        ("--coalesce soon", "invalid float value: 'soon'"),
        ("--command 'unclosed", "No closing quotation"),
    ],
)
def test_notify_flags_that_notify_would_refuse_are_refused_at_install(home: Home, flags: str, said: str) -> None:
    result = home.run("install-service", "--dry-run", f"--notify={flags}")
    assert result.returncode == 2
    assert said in result.stderr
    assert home.files() == []


def test_install_and_uninstall_the_notifier_through_launchctl(tmp_path: Path) -> None:
    home = Home(tmp_path, tool="launchctl")
    agents = Path(home.env["HOME"]) / "Library" / "LaunchAgents"
    domain = f"gui/{os.getuid()}"
    assert home.run("install-service", "--init", "launchd", "--notify=--url https://ntfy.sh/t").returncode == 0
    agent = plistlib.loads((agents / "local.shmstore.notify.plist").read_bytes())
    assert agent["ProgramArguments"] == [PYTHON, "-m", "shmstore", "notify", "--url", "https://ntfy.sh/t"]
    assert agent["KeepAlive"] == {"SuccessfulExit": False}
    assert home.calls()[2:] == [
        f"bootout {domain}/local.shmstore.notify",
        f"bootstrap {domain} {agents / 'local.shmstore.notify.plist'}",
    ]
    home.log.unlink()
    assert home.run("uninstall-service", "--init", "launchd").returncode == 0
    assert sorted(agents.iterdir()) == []
    assert home.calls() == [f"bootout {domain}/local.shmstore.notify", f"bootout {domain}/local.shmstore"]
