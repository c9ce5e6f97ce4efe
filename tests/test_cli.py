"""The shmstore command, run as a user would: a real subprocess against a real manager."""

from __future__ import annotations

import argparse
import os
import select
import shlex
import signal
import subprocess
import time
from pathlib import Path

import orjson
import pytest
from helpers import PYTHON, run

import shmstore

COMMANDS = ["serve", "ls", "get", "set", "transition", "rm", "prune", "watch", "demo"]


@pytest.mark.parametrize("command", ["", *COMMANDS])
def test_every_command_has_help(command: str) -> None:
    result = run(*([command] if command else []), "--help")
    assert result.returncode == 0
    assert "usage: shmstore" in result.stdout
    if not command:
        assert all(name in result.stdout for name in COMMANDS)


def test_set_get_transition_ls_rm(server: shmstore.ServerProcess) -> None:
    created = run("set", "abc", "--dir", "/src/app", "--session-id", "r-1", "--json", address=server.address)
    assert created.returncode == 0, created.stderr
    assert orjson.loads(created.stdout)["session_id"] == "r-1"

    moved = run("transition", "abc", "attention", "--json", address=server.address)
    session = shmstore.Session.from_json(moved.stdout)
    assert session.status is shmstore.Status.ATTENTION
    assert session.revision == 2

    got = run("get", "abc", "--json", address=server.address)
    assert shmstore.Session.from_json(got.stdout) == session

    table = run("ls", address=server.address)
    assert table.returncode == 0
    assert "abc" in table.stdout
    assert "attention" in table.stdout
    filtered = run("ls", "--json", "--status", "working", address=server.address)
    assert orjson.loads(filtered.stdout) == []

    assert run("rm", "abc", address=server.address).stdout.strip() == "removed abc"
    assert orjson.loads(run("ls", "--json", address=server.address).stdout) == []


@pytest.mark.parametrize(
    ("args", "message", "code"),
    [
        (["set", "abc", "--dir", "relative"], "working_dir: must be an absolute path", 2),
        (["transition", "ghost", "working"], "no live session with id 'ghost'", 4),
        (["get", "ghost"], "no session with id 'ghost'", 4),
        (["rm", "ghost"], "no session with id 'ghost'", 4),
        (["set", "abc", "--dir", "/x", "--expect-revision", "5"], "not the expected 5", 1),
    ],
)
def test_errors_are_one_clear_line_and_an_exit_code_that_says_which_kind(
    server: shmstore.ServerProcess, args: list[str], message: str, code: int
) -> None:
    result = run(*args, address=server.address)
    assert result.returncode == code
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith("shmstore: error: ")
    assert message in result.stderr


def test_bad_arguments_exit_2() -> None:
    result = run("transition", "abc", "sleeping")
    assert result.returncode == 2
    assert "invalid choice" in result.stderr


def test_no_manager_is_one_line_and_exit_code_3(sock_dir: object) -> None:
    result = run("ls", address=f"{sock_dir}/none.sock", timeout=10)
    assert result.returncode == 3
    assert result.stderr.startswith("shmstore: error: no manager at")
    assert result.stderr.count("\n") == 1


def test_demo_runs_and_loses_nothing() -> None:
    result = run("demo", "--duration", "1.5", "--workers", "3", timeout=90)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "demo: nothing lost" in result.stdout
    assert "subscriber: rev" in result.stdout


#: The connection flags each command offers: exactly those it uses.
CONNECTION_FLAGS: dict[str, set[str]] = {
    "serve": {"--address"},  # where to serve; it waits for nobody
    "install-hooks": {"--address"},  # written into the hook command
    "demo": set(),  # runs on a private socket of its own
    "uninstall-hooks": set(),  # only edits the settings file
    "install-service": {"--address", "--timeout"},  # the address is passed on to `serve`; a deadline per command
    "uninstall-service": {"--timeout"},  # a deadline per systemctl/launchctl command
}
CONNECTION_FLAGS.update(
    (command, {"--address", "--timeout"})
    for command in ["ls", "get", "set", "transition", "closed", "rm", "prune", "watch", "top", "hook"]
)


@pytest.mark.parametrize(("command", "flags"), CONNECTION_FLAGS.items())
def test_each_command_offers_only_the_connection_flags_it_uses(command: str, flags: set[str]) -> None:
    help = run(command, "--help").stdout
    assert {flag for flag in ("--address", "--timeout") if f"{flag} " in help} == flags


def test_demo_refuses_an_address_it_would_not_use() -> None:
    result = run("demo", "--address", "/tmp/elsewhere.sock", "--duration", "0")
    assert result.returncode == 2
    assert "unrecognized arguments: --address" in result.stderr


def demo_env(tmp_dir: Path, **environ: str) -> dict[str, str]:
    """The environment for a demo whose temporary files go to ``tmp_dir``, on a terminal
    that takes escape codes unless ``environ`` says otherwise."""
    env = {key: value for key, value in os.environ.items() if key not in {"NO_COLOR", "TERM"}}
    return {**env, "TMPDIR": str(tmp_dir), "TERM": "xterm-256color", **environ}


def test_demo_through_a_pipe_prints_plain_lines_and_the_final_table(sock_dir: Path) -> None:
    result = subprocess.run(
        [PYTHON, "-m", "shmstore", "demo", "--duration", "1.2", "--workers", "2"],
        capture_output=True,
        env=demo_env(sock_dir),
        timeout=90,
    )
    assert result.returncode == 0, result.stderr
    assert b"\x1b" not in result.stdout
    lines = result.stdout.decode().splitlines()
    assert any(line.startswith("subscriber: rev") for line in lines)
    table = lines.index(next(line for line in lines if line.startswith("ID  ")))
    assert sorted(line.split()[0] for line in lines[table + 1 : table + 5]) == [
        f"agent-{w}-{a}" for w in "01" for a in "01"
    ]
    assert lines[-1] == "demo: nothing lost"


def read_terminal(argv: list[str], env: dict[str, str], timeout: float = 90) -> tuple[int, bytes]:
    """Run ``argv`` with its stdout on a real pseudo-terminal; its exit status and every
    byte it wrote there."""
    leader, follower = os.openpty()
    with subprocess.Popen(argv, stdout=follower, stderr=subprocess.DEVNULL, env=env) as proc:
        os.close(follower)
        output = bytearray()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if select.select([leader], [], [], 1)[0]:
                try:
                    chunk = os.read(leader, 65536)
                except OSError:  # EIO: every writer has closed the terminal
                    break
                if not chunk:
                    break
                output += chunk
        os.close(leader)
        return proc.wait(timeout=30), bytes(output)


@pytest.mark.parametrize(("environ", "redraws"), [({}, True), ({"TERM": "dumb"}, False), ({"NO_COLOR": "1"}, False)])
def test_demo_on_a_terminal_redraws_unless_plain_output_is_asked_for(
    sock_dir: Path, environ: dict[str, str], redraws: bool
) -> None:
    argv = [PYTHON, "-m", "shmstore", "demo", "--duration", "0.8", "--workers", "1"]
    status, output = read_terminal(argv, demo_env(sock_dir, **environ))
    assert status == 0, output
    assert (b"\x1b[2J" in output) is redraws
    assert (b"\x1b" in output) is redraws
    assert b"demo: nothing lost" in output


@pytest.mark.parametrize(
    ("interrupt", "status"),
    [(None, 0), ("ctrl-c", 130), (signal.SIGTERM, 128 + signal.SIGTERM)],
)
def test_demo_leaves_no_files_or_processes_behind(sock_dir: Path, interrupt: object, status: int) -> None:
    duration = "0.5" if interrupt is None else "60"
    with subprocess.Popen(
        [PYTHON, "-m", "shmstore", "demo", "--duration", duration, "--workers", "2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=demo_env(sock_dir),
        start_new_session=True,  # a process group of its own, as a terminal's foreground job
    ) as proc:
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith("demo: manager pid")
        assert list(sock_dir.iterdir())  # the socket's directory, while it runs
        if interrupt == "ctrl-c":
            os.killpg(proc.pid, signal.SIGINT)  # the terminal sends it to every process of the job
        elif interrupt is not None:
            proc.send_signal(interrupt)  # type: ignore[arg-type]
        _, errors = proc.communicate(timeout=60)
    assert proc.returncode == status
    assert errors == ""
    assert list(sock_dir.iterdir()) == []
    with pytest.raises(ProcessLookupError):
        os.killpg(proc.pid, 0)  # not one process of the demo is left


def test_ls_into_a_pipe_closed_early_exits_quietly(server: shmstore.ServerProcess) -> None:
    with shmstore.connect(server.address, server.authkey) as store:
        for n in range(2000):  # ~140 KB of table: more than a pipe holds (64 KiB)
            store.set(shmstore.Session(id=f"session-{n:04}", working_dir="/home/dev/project"))
    with subprocess.Popen(
        [PYTHON, "-m", "shmstore", "ls", "--address", str(server.address)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        assert proc.stdout is not None
        assert proc.stderr is not None
        assert proc.stdout.readline().startswith("ID  ")
        proc.stdout.close()  # as `head -1` does
        errors = proc.stderr.read()
        assert proc.wait(timeout=60) == 141
    assert errors == ""


def test_demo_into_a_pipe_closed_early_exits_quietly(sock_dir: Path) -> None:
    result = subprocess.run(
        f"{shlex.quote(PYTHON)} -m shmstore demo --duration 1.5 --workers 2 | head -1",
        shell=True,
        executable="/bin/bash",
        capture_output=True,
        text=True,
        env=demo_env(sock_dir),
        timeout=90,
    )
    assert result.stdout.startswith("demo: manager pid")
    assert result.stdout.count("\n") == 1
    assert result.stderr == ""
    assert list(sock_dir.iterdir()) == []


def test_closed_shows_each_resume_id_and_how_to_resume(server: shmstore.ServerProcess) -> None:
    assert run("set", "abc", "--dir", "/src/app", "--session-id", "r-1", address=server.address).returncode == 0
    assert run("transition", "abc", "closed", address=server.address).returncode == 0
    result = run("closed", address=server.address)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["ID", "STATUS", "FOR", "LAST", "SEEN", "CHANGES", "REV", "RESUME", "WORKING", "DIR"]
    assert lines[1].split()[0] == "abc"
    assert "r-1" in lines[1].split()
    assert lines[-1] == "resume the newest: cd /src/app && claude --resume r-1"
    as_ls = run("ls", "--status", "closed", address=server.address).stdout.splitlines()
    assert (as_ls[0], as_ls[-1]) == (lines[0], lines[-1])
    assert "resume: cd /src/app && claude --resume r-1" in run("get", "abc", address=server.address).stdout


def test_serve_never_imports_dill_and_still_serves_every_call(tmp_path: Path) -> None:
    # dill costs a standalone manager ~1 MiB of PSS and nothing in it needs dill; calls,
    # errors included, travel as plain values through the C pickler.
    address = tmp_path / "s.sock"
    argv = [PYTHON, "-X", "importtime", "-m", "shmstore", "serve", "--address", str(address)]
    with subprocess.Popen(argv, stderr=subprocess.PIPE, text=True) as proc:
        try:
            assert proc.stderr is not None
            imported = []
            while "serving at" not in (line := proc.stderr.readline()):
                assert line, "".join(imported)  # it ended without serving
                imported.append(line.rsplit("|", 1)[-1].strip())
            with shmstore.connect(address, timeout=10) as store:
                store.set(shmstore.Session(id="a", working_dir="/src"))
                assert store.transition("a", "attention").status == "attention"
                with pytest.raises(shmstore.NotFoundError):
                    store.transition("missing", "working")
        finally:
            proc.terminate()
    assert "multiprocess.managers" in imported
    # The attempt is timed too ("dill", a few us); its modules are what loading it imports.
    assert [name for name in imported if name.startswith("dill.")] == []


def test_each_commands_timeout_defaults_to_what_its_help_says() -> None:
    """argparse shares a parent parser's actions among its children: a set_defaults() on
    one command once changed every command's --timeout (status waited 30 s, not 5)."""
    from shmstore.clients.client import DEFAULT_TIMEOUT
    from shmstore.commands import cli, service
    from shmstore.hook.run import HOOK_DEADLINE

    parser = cli._parser()
    required = {"get": ["x"], "set": ["x", "--dir", "/x"], "transition": ["x", "working"], "rm": ["x"], "go": ["x"]}
    required["prune"] = ["--older-than", "1"]
    special = {"hook": HOOK_DEADLINE, "install-service": service.COMMAND_TIMEOUT}
    special["uninstall-service"] = service.COMMAND_TIMEOUT
    subcommands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    seen = 0
    for name in subcommands:
        args = parser.parse_args([name, *required.get(name, [])])
        if hasattr(args, "timeout"):
            seen += 1
            assert args.timeout == special.get(name, DEFAULT_TIMEOUT), name
            assert f"(default: {args.timeout})" in " ".join(subcommands[name].format_help().split()), name
    assert seen >= 10
