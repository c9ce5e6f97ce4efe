"""Where a session's agent runs: what the hook reads from the agent's environment and /proc,
how the store keeps it, and what every reader gets back."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from helpers import PYTHON, payload

import shmstore
from shmstore import Session, Terminal, ValidationError, terminal
from shmstore.record import load_record, pack, session_from_store

TMUX = {"TMUX": "/tmp/tmux-1000/default,4242,0", "TMUX_PANE": "%7"}


def test_the_tmux_pane_and_its_servers_socket_come_from_the_environment() -> None:
    found = terminal.of_agent({**TMUX, "WEZTERM_PANE": "3", "KITTY_WINDOW_ID": "12"}, None)
    assert found == ["%7", "/tmp/tmux-1000/default", None, "3", "12", None]


def test_nothing_known_is_none_and_a_pane_without_its_server_is_not_kept() -> None:
    assert terminal.of_agent({}, None) is None
    assert terminal.of_agent({"TMUX_PANE": "%7"}, None) is None  # which server's %7?


def test_a_value_that_would_be_refused_is_left_out_and_the_report_still_made() -> None:
    found = terminal.of_agent({"TMUX": "/tmp/t,1,0", "TMUX_PANE": "%7; rm -rf ~", "KITTY_WINDOW_ID": "\x1b[2J"}, None)
    assert found is None


def test_the_agents_tty_is_what_its_stdin_or_stdout_is() -> None:
    sleep = [PYTHON, "-c", "import time; time.sleep(30)"]
    with subprocess.Popen(sleep, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) as child:
        assert terminal.of_agent({}, child.pid) is None  # pipes and /dev/null: no terminal
        child.kill()
    ptmx, pts = os.openpty()
    try:
        with subprocess.Popen(sleep, stdin=pts, stdout=pts, stderr=pts) as child:
            assert terminal.of_agent({}, child.pid) == [None, None, os.ttyname(pts), None, None, None]
            child.kill()
    finally:
        os.close(ptmx)
        os.close(pts)


def test_a_session_with_a_terminal_round_trips_through_json_and_its_record() -> None:
    where = Terminal(tmux_pane="%7", tmux_socket="/tmp/tmux-1000/default", tty="/dev/pts/3")
    session = Session(id="s1", working_dir="/p", terminal=where)
    assert json.loads(session.to_json())["terminal"]["tmux_pane"] == "%7"
    assert Session.from_json(session.to_json()) == session
    assert session_from_store(pack(session)).terminal == where
    assert load_record(pack(Session(id="s2", working_dir="/p")))[18] is None


def test_a_terminal_that_names_nothing_or_a_bad_pane_is_a_validation_error() -> None:
    with pytest.raises(ValidationError, match="names nothing"):
        Terminal()
    with pytest.raises(ValidationError, match=r"terminal\.tmux_pane"):
        Terminal(tmux_pane="7", tmux_socket="/tmp/s")


def run_hook(address: str, env: dict[str, str]) -> None:
    body = json.dumps(payload("UserPromptSubmit", prompt="hi")).encode()
    argv = [PYTHON, "-m", "shmstore", "hook", "--address", address]
    done = subprocess.run(argv, input=body, capture_output=True, timeout=30, env=env)
    assert done.returncode == 0, done.stderr


def test_the_hook_records_the_agents_tmux_pane_and_a_reader_sees_it(
    server: shmstore.ServerProcess, store: shmstore.Client
) -> None:
    env = {key: value for key, value in os.environ.items() if key not in ("TMUX", "TMUX_PANE")}
    run_hook(str(server.address), {**env, **TMUX})
    [session] = store.list_all()
    assert session.terminal is not None
    assert (session.terminal.tmux_pane, session.terminal.tmux_socket) == ("%7", "/tmp/tmux-1000/default")
    assert store.get(session.id) == session  # shared memory and the socket agree
    run_hook(str(server.address), env)  # a hook that sees no terminal keeps the one known
    assert store.get(session.id).terminal == session.terminal  # type: ignore[union-attr]


def test_a_client_reports_a_terminal_over_the_wire(any_store: shmstore.Client) -> None:
    where = Terminal(wezterm_pane="12")
    said = any_store.report("s1", "working", "/p", terminal=where)
    assert said is not None
    assert said.terminal == where
    assert any_store.get("s1").terminal == where  # type: ignore[union-attr]
