"""``shmstore go``: switching to the tmux pane a session's agent runs in, against a real
manager and a real tmux server of the test's own (its socket in the test's directory), with
real processes standing in for agents; and every case where it must refuse instead."""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from helpers import PYTHON, run

import shmstore
from shmstore import JumpRefusedError, Session, Status, Terminal, procs
from shmstore import tmux as jumps

#: The stand-in agent: a child of the pane's shell (the shell stays, as a user's does).
AGENT = "sh -c 'sleep 600; sleep 600'"


class Server:
    """A tmux server of the test's own: ``home`` (a shell) and ``work`` (two windows, the
    second split in two, an agent in its second pane)."""

    def __init__(self, socket: Path) -> None:
        self.socket = str(socket)
        self.env = {k: v for k, v in os.environ.items() if k not in ("TMUX", "TMUX_PANE")}
        self.env.setdefault("TERM", "xterm-256color")
        self("new-session", "-d", "-s", "home", "-x", "100", "-y", "30", "sh")
        self("new-session", "-d", "-s", "work", "-x", "100", "-y", "30", "sleep 600")
        self.agent_window = self("new-window", "-d", "-P", "-F", "#{window_id}", "-t", "work:", "sleep 600").strip()
        self.agent_pane = self("split-window", "-d", "-P", "-F", "#{pane_id}", "-t", self.agent_window, AGENT).strip()
        self.agent = child_of(self.pane_pid(self.agent_pane))

    def __call__(self, *args: str) -> str:
        argv = ["tmux", "-S", self.socket, "-f", "/dev/null", *args]
        return subprocess.run(argv, capture_output=True, text=True, check=True, timeout=10, env=self.env).stdout

    def show(self, target: str, format: str) -> str:
        return self("display-message", "-p", "-t", target, format).strip()

    def pane_pid(self, pane: str) -> int:
        return int(self.show(pane, "#{pane_pid}"))

    def current(self, session: str = "work") -> tuple[str, str]:
        """The current window of tmux session ``session`` and that window's active pane."""
        return self.show(f"{session}:", "#{window_id}"), self.show(f"{session}:", "#{pane_id}")

    def terminal(self, pane: str | None = None) -> Terminal:
        return Terminal(tmux_pane=pane or self.agent_pane, tmux_socket=self.socket)

    def kill(self) -> None:
        subprocess.run(["tmux", "-S", self.socket, "kill-server"], capture_output=True, timeout=10)


def child_of(pid: int, timeout: float = 10) -> int:
    """The one child process of ``pid``, once it has started."""
    deadline = time.monotonic() + timeout
    while not (children := psutil.Process(pid).children()):
        assert time.monotonic() < deadline, f"process {pid} started no child"
        time.sleep(0.01)
    return children[0].pid


def wait_for(predicate: object, what: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"waited {timeout} s for {what}"
        time.sleep(0.02)


@pytest.fixture
def tmux(sock_dir: Path) -> Iterator[Server]:
    if shutil.which("tmux") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("tmux is not installed (.ci/run installs it)")
        pytest.skip("tmux is not installed")
    server = Server(sock_dir / "tmux")
    try:
        yield server
    finally:
        server.kill()


def report(store: shmstore.Client, id: str, pid: int, terminal: Terminal | None) -> Session:
    """What the agent's hook reports; the manager reads the pid's start time itself."""
    session = store.report(id, Status.WORKING, "/src/webapp", pid=pid, terminal=terminal)
    assert session is not None
    assert session.pid_start == procs.process_start(pid)
    return session


def outside(server: Server) -> dict[str, str]:
    """The environment of a command run outside any tmux."""
    return dict(server.env)


# -- it switches --------------------------------------------------------------------------------


def test_go_inside_tmux_switches_the_attached_client_across_tmux_sessions_to_the_agents_pane(
    store: shmstore.Client, tmux: Server, sock_dir: Path
) -> None:
    report(store, "3f2a8c1e-agent", tmux.agent, tmux.terminal())
    # A user's terminal: a client of the test's server attached to "home", running in a pane
    # of a second tmux server (which gives it a terminal).
    viewer = Server.__new__(Server)
    viewer.socket, viewer.env = str(sock_dir / "viewer"), tmux.env
    attach = shlex.join(["env", "-u", "TMUX", "tmux", "-S", tmux.socket, "attach-session", "-t", "home"])
    viewer("new-session", "-d", "-s", "screen", "-x", "100", "-y", "30", attach)
    try:
        wait_for(lambda: tmux("list-clients", "-F", "#{client_session}").split() == ["home"], "the client to attach")
        assert tmux.current() != (tmux.agent_window, tmux.agent_pane)
        # The user types `shmstore go PREFIX` in home's shell.
        go = shlex.join([PYTHON, "-m", "shmstore", "go", "3f2a8c1e", "--address", str(store.address)])
        out = sock_dir / "out"
        tmux("send-keys", "-t", "home", f"{go} > {out} 2>&1; echo $? > {out}.rc", "Enter")
        wait_for(lambda: Path(f"{out}.rc").exists() and Path(f"{out}.rc").read_text().endswith("\n"), "go to end")
        assert Path(f"{out}.rc").read_text() == "0\n", out.read_text()
        assert out.read_text().startswith(f"switched to tmux pane {tmux.agent_pane} (window 1 of tmux session 'work')")
        assert tmux("list-clients", "-F", "#{client_session}").split() == ["work"]
        assert tmux.current() == (tmux.agent_window, tmux.agent_pane)
    finally:
        viewer.kill()


def test_go_outside_tmux_makes_the_pane_current_and_says_how_to_attach(store: shmstore.Client, tmux: Server) -> None:
    report(store, "agent-1", tmux.agent, tmux.terminal())
    before = tmux.current()
    assert before != (tmux.agent_window, tmux.agent_pane)
    result = run("go", "agent-1", address=store.address, env=outside(tmux), timeout=30)
    assert result.returncode == 0, result.stderr
    assert tmux.current() == (tmux.agent_window, tmux.agent_pane)
    work = tmux.show("work:", "#{session_id}")
    assert result.stdout.strip().endswith(f"attach with: tmux -S {tmux.socket} attach-session -t '{work}'")


def test_enter_in_top_switches_the_client_top_runs_in_to_the_selected_sessions_pane(
    store: shmstore.Client, tmux: Server, sock_dir: Path
) -> None:
    report(store, "3f2a8c1e-agent", tmux.agent, tmux.terminal())
    store.report("q-other", Status.QUESTION, "/src/other")  # a question: the first row
    viewer = Server.__new__(Server)
    viewer.socket, viewer.env = str(sock_dir / "viewer"), tmux.env
    attach = shlex.join(["env", "-u", "TMUX", "tmux", "-S", tmux.socket, "attach-session", "-t", "home"])
    viewer("new-session", "-d", "-s", "screen", "-x", "120", "-y", "30", attach)
    try:
        wait_for(lambda: tmux("list-clients", "-F", "#{client_session}").split() == ["home"], "the client to attach")
        # The user runs `shmstore top` in home's shell, inside the tmux server the agent is in.
        top = shlex.join([PYTHON, "-m", "shmstore", "top", "--address", str(store.address)])
        tmux("send-keys", "-t", "home", f"exec {top}", "Enter")

        def screen() -> str:
            return tmux("capture-pane", "-p", "-t", "home")

        wait_for(lambda: "webapp" in screen() and "other" in screen(), "top to show both sessions")
        tmux("send-keys", "-t", "home", "j")
        wait_for(lambda: any(line.startswith("> ") and "webapp" in line for line in screen().splitlines()), "a row")
        assert tmux("list-clients", "-F", "#{client_session}").split() == ["home"]
        tmux("send-keys", "-t", "home", "Enter")
        wait_for(lambda: tmux("list-clients", "-F", "#{client_session}").split() == ["work"], "the client to switch")
        assert tmux.current() == (tmux.agent_window, tmux.agent_pane)
        wait_for(lambda: f"switched to tmux pane {tmux.agent_pane}" in screen(), "top to say where it went")
    finally:
        viewer.kill()


def test_the_function_top_calls_jumps_to_the_pane_when_the_agent_is_a_panes_own_process(
    store: shmstore.Client, tmux: Server
) -> None:
    pane = tmux("new-window", "-d", "-P", "-F", "#{pane_id}", "-t", "home:", "sleep 600").strip()
    session = report(store, "exec-agent", tmux.pane_pid(pane), tmux.terminal(pane))  # pane_pid is the agent
    done = jumps.jump(session, outside(tmux))
    assert (done.pane.id, done.switched) == (pane, False)
    assert tmux.show("home:", "#{pane_id}") == pane


# -- it refuses ---------------------------------------------------------------------------------


def refused(result: subprocess.CompletedProcess[str], *words: str) -> str:
    """The refusal's message, once the command exited with 5 and said nothing else."""
    assert result.returncode == 5, (result.returncode, result.stdout, result.stderr)
    assert result.stdout == ""
    assert result.stderr.startswith("shmstore: error: ")
    assert result.stderr.count("\n") == 1
    for word in words:
        assert word in result.stderr, result.stderr
    return result.stderr


def test_a_closed_pane_is_refused(store: shmstore.Client, tmux: Server) -> None:
    # An agent that outlives its pane (it ignores the hangup), so that only the pane is gone.
    survivor = "sh -c \"trap '' HUP; sleep 600; sleep 600\""
    other = tmux("split-window", "-d", "-P", "-F", "#{pane_id}", "-t", tmux.agent_window, survivor).strip()
    shell = psutil.Process(tmux.pane_pid(other))
    agent = psutil.Process(child_of(shell.pid))
    try:
        report(store, "agent-1", agent.pid, tmux.terminal(other))
        tmux("kill-pane", "-t", other)
        wait_for(lambda: other not in tmux("list-panes", "-a", "-F", "#{pane_id}").split(), "the pane to close")
        assert agent.is_running()
        before = tmux.current()
        result = run("go", "agent-1", address=store.address, env=outside(tmux), timeout=30)
        refused(result, f"tmux pane {other} of session 'agent-1' is gone")
        assert tmux.current() == before
    finally:
        for process in (shell, agent):
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()


def test_a_pane_whose_id_now_belongs_to_another_program_is_refused(store: shmstore.Client, tmux: Server) -> None:
    # The agent runs in one pane; the pane id recorded is another pane's, whose process is
    # neither the agent nor an ancestor of it: as if the agent's pane closed and its id was
    # given to a new pane running something else.
    other = tmux("new-window", "-d", "-P", "-F", "#{pane_id}", "-t", "home:", "sleep 600").strip()
    report(store, "agent-1", tmux.agent, tmux.terminal(other))
    before = tmux.current("home"), tmux.current()
    message = refused(run("go", "agent-1", address=store.address, env=outside(tmux), timeout=30), "no longer runs")
    assert f"tmux pane {other} no longer runs the agent" in message
    assert (tmux.current("home"), tmux.current()) == before


def test_an_agent_that_exited_is_refused_though_its_pane_lives_on(start_server: object, tmux: Server) -> None:
    server = start_server(reap_interval=3600)  # type: ignore[operator]
    with shmstore.connect(server.address, server.authkey) as store:
        report(store, "agent-1", tmux.agent, tmux.terminal())
        shell = tmux.pane_pid(tmux.agent_pane)
        psutil.Process(tmux.agent).kill()  # the shell starts its next command: the pane stays
        wait_for(lambda: psutil.Process(shell).children() and child_of(shell) != tmux.agent, "the next command")
        result = run("go", "agent-1", address=store.address, env=outside(tmux), timeout=30)
    refused(result, f"the agent of session 'agent-1' (pid {tmux.agent}) is no longer running")


def test_a_reused_agent_pid_is_refused(tmux: Server) -> None:
    # The pid names a process that started at another time than the agent the store saw.
    start = procs.process_start(tmux.agent)
    assert start is not None
    session = Session(id="a", working_dir="/p", pid=tmux.agent, pid_start=start + 1, terminal=tmux.terminal())
    with pytest.raises(JumpRefusedError) as refusal:
        jumps.jump(session, outside(tmux))
    assert refusal.value.reason == "agent_gone"


def test_a_session_not_in_tmux_is_refused_naming_its_terminal(store: shmstore.Client, tmux: Server) -> None:
    report(store, "wez", tmux.agent, Terminal(wezterm_pane="3", tty="/dev/pts/9"))
    refused(run("go", "wez", address=store.address, timeout=30), "WezTerm pane 3, tty /dev/pts/9", "only a tmux pane")
    report(store, "none", tmux.agent, None)
    refused(run("go", "none", address=store.address, timeout=30), "no terminal recorded")


def test_a_closed_session_a_gone_server_and_an_unchecked_pid_are_refused(store: shmstore.Client, tmux: Server) -> None:
    report(store, "agent-1", tmux.agent, tmux.terminal())
    store.transition("agent-1", Status.CLOSED)
    refused(run("go", "agent-1", address=store.address, timeout=30), "is closed")

    def reason(session: Session) -> str:
        with pytest.raises(JumpRefusedError) as refusal:
            jumps.jump(session, outside(tmux))
        return refusal.value.reason

    live = Session(id="a", working_dir="/p", pid=tmux.agent, pid_start=procs.process_start(tmux.agent))
    assert reason(live) == "no_tmux"
    assert reason(Session(id="a", working_dir="/p", pid=tmux.agent, terminal=tmux.terminal())) == "unverified"
    other_host = Session(id="a", working_dir="/p", host="0123456789abcdef", terminal=tmux.terminal())
    assert reason(other_host) == "other_host"
    live = Session(id="a", working_dir="/p", pid=tmux.agent, pid_start=live.pid_start, terminal=tmux.terminal())
    tmux.kill()
    assert reason(live) in ("server_gone", "agent_gone")  # the agent may have gone with its server


def test_a_gone_server_whose_socket_is_left_is_refused(tmux: Server, sock_dir: Path) -> None:
    socket = sock_dir / "stale"
    socket.touch()  # a path tmux cannot connect to
    start = procs.process_start(tmux.agent)
    session = Session(id="a", working_dir="/p", pid=tmux.agent, pid_start=start, terminal=Terminal("%1", str(socket)))
    with pytest.raises(JumpRefusedError) as refusal:
        jumps.jump(session, outside(tmux))
    assert refusal.value.reason == "server_gone"
    missing = Session(
        id="a", working_dir="/p", pid=tmux.agent, pid_start=start, terminal=Terminal("%1", "/nonexistent")
    )
    with pytest.raises(JumpRefusedError, match="no socket /nonexistent") as refusal:
        jumps.jump(missing, outside(tmux))


def test_an_unknown_or_ambiguous_id_is_no_jump(store: shmstore.Client) -> None:
    store.report("abc-1", Status.WORKING, "/p")
    store.report("abc-2", Status.WORKING, "/p")
    missing = run("go", "zzz", address=store.address, timeout=30)
    assert missing.returncode == 4, missing.stderr
    ambiguous = run("go", "abc", address=store.address, timeout=30)
    assert ambiguous.returncode == 2, ambiguous.stderr
    assert "'abc' starts 2 session ids ('abc-1', 'abc-2')" in ambiguous.stderr
