"""The shmstore command, run as a user would: a real subprocess against a real manager."""

from __future__ import annotations

import orjson
import pytest
from helpers import run

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
