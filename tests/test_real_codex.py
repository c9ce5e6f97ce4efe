"""shmstore driven by the real Codex CLI (the version :data:`codex_rig.VERSION`, installed by
.ci/run), against a scripted stand-in for the Responses API (:mod:`responses_stub`): what
a user watching the store sees is checked against the agent itself, in ``codex exec`` and
in the interactive TUI in tmux.

The hooks are the ones ``shmstore install-hooks --agent codex`` writes, trusted by the
entries it writes in ``config.toml``: Codex runs them only if their hashes are the ones it
computes itself (no ``--dangerously-bypass-hook-trust`` here), so these tests check the
install as a user gets it.

Each test reads the store's change feed as a timeline of statuses per session
(:func:`claude_rig.timelines`). Where Codex's own behaviour sets a limit, the test says so.
Without the CLI these tests skip, except in CI (CI=true), where they fail.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from claude_rig import AgentRig, timelines, wait_for
from codex_rig import VERSION, Codex, Tmux, codex_binary, tmux
from helpers import StartServer
from responses_stub import ResponsesStub

import shmstore
from shmstore.agents import codex as adapter

BINARY = codex_binary()
if BINARY is None:
    if os.environ.get("CI") == "true":
        raise RuntimeError("Codex is not installed in .agents/ (.ci/run installs it)")
    pytest.skip("Codex is not installed (.ci/run installs it in .agents/)", allow_module_level=True)

#: The TUI as a user runs it to be asked first: commands run in the sandbox, and one the
#: model wants to run outside it (``escalate:``) puts up the approval prompt.
ASKING = ("-a", "on-request", "-s", "workspace-write")
#: What Codex shows while it waits for an approval.
APPROVAL = "Would you like to run"
#: What the TUI shows at start-up when a hook in hooks.json is not trusted as it is.
REVIEW = "Hooks need review"
#: The rig with hooks.json as install-hooks writes it, and nothing else in it.
INSTALL_ONLY = {"record": False}


class Rig(AgentRig):
    """A manager, the model stand-in, and a Codex home whose hooks report to the manager."""

    term: Tmux | None

    def __init__(self, server: shmstore.ServerProcess, stub: ResponsesStub, codex: Codex, store: shmstore.Client):
        self.server, self.stub, self.codex, self.store = server, stub, codex, store

    def events(self) -> object:
        return self.codex.events()

    def wait_events(self, *events: str, timeout: float = 10) -> None:
        """Wait until the recorder has seen exactly ``events``: it runs beside our hook, so
        the store may show an event before the recorder has written it down."""
        try:
            wait_for(lambda: self.codex.events() == list(events), timeout, f"the events {list(events)}")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; {self.why()}") from None

    def start(self, *flags: str) -> Tmux:
        """The TUI in the test's tmux, once it takes input: its status line names the model
        when it has its session's server (on the background server, ~3 s after start; a
        prompt typed before that loses its Enter). No hook of ours may need review."""
        term = self.term
        assert term is not None
        term.start(self.codex, *ASKING, *flags)
        screen = wait_for(lambda: (s := term.screen()) and ("stub-model" in s or REVIEW in s) and s, 30, "the TUI")
        assert REVIEW not in screen, screen  # it comes up in place of the prompt, ~0.5 s after start
        return term

    def settle_dialog(self, key: str) -> None:
        """Answer the approval prompt on screen with ``key`` (Enter: "Yes, proceed"; Escape:
        "No, and tell Codex what to do differently"). A dialog may ignore keys for a moment
        after it appears, so the key goes again while the dialog is still there."""
        term = self.term
        assert term is not None
        term.wait_for(APPROVAL)
        for _ in range(5):
            term.keys(key)
            with contextlib.suppress(AssertionError):
                wait_for(lambda: APPROVAL not in term.screen(), 2, "the dialog to go")
                return
        raise AssertionError(f"the dialog took no {key}\n{term.screen()}")

    def quit(self) -> None:
        """``/quit`` typed, and the TUI gone (tmux ends with it)."""
        term = self.term
        assert term is not None
        term.type("/quit")
        wait_for(lambda: not term.alive(), 30, "the TUI to exit")

    def expected(self) -> dict[str, list[str]]:
        """The timeline of each session that the recorder's payloads call for, by the
        adapter's table: each event with a status, in the order Codex fired them (a status
        only when it changed), an end of a session that never started left out (Codex
        quits one loaded with no prompt: the store keeps nothing of it)."""
        want: dict[str, list[str]] = {}
        for seen in self.codex.payloads():
            said = adapter.read(seen["payload"], {})
            if said.status is None or (said.status == "closed" and said.session not in want):
                continue
            shown = f"closed:session_end:{said.reason}" if said.status == "closed" else str(said.status)
            line = want.setdefault(said.session, [])
            if not line or line[-1] != shown:
                line.append(shown)
        return want

    def check_every_payload(self) -> None:
        """Every event Codex fired is one the adapter knows; every payload with a status is
        in the store: each session's timeline is the one its payloads call for (the store
        and the recorder may each lag the other by the last hook), and names the session's
        directory and its agent as Codex gave them."""
        try:
            wait_for(lambda: self.codex.payloads() and self.seen() == self.expected(), 10, "every payload in the store")
        except AssertionError as exc:
            raise AssertionError(f"{exc}: payloads call for {self.expected()}; {self.why()}") from None
        for seen in self.codex.payloads():
            payload = seen["payload"]
            event = payload["hook_event_name"]
            assert event in adapter.EVENT_STATUS or event in adapter.QUIET_EVENTS, event
            session = self.store.get(payload["session_id"])
            assert session is not None
            assert session.working_dir == payload["cwd"] == str(self.codex.project)
            assert str(session.agent_type) == "codex"


@pytest.fixture
def rig(start_server: StartServer, sock_dir: Path, request: pytest.FixtureRequest) -> Iterator[Rig]:
    """A test's own manager, stand-in and Codex home (in ``sock_dir``: a short path, since
    Codex's background server listens on a unix socket in its home). With the recorder
    beside our hooks, unless the test asks otherwise (``indirect``: :class:`Codex`'s
    keyword arguments, and the manager's ``reap_interval``)."""
    assert BINARY is not None
    options = dict(getattr(request, "param", {"record": True}))
    server = start_server(max_history=10_000, **{key: options.pop(key) for key in ("reap_interval",) if key in options})
    with ResponsesStub() as stub, shmstore.Client(server.address, server.authkey, timeout=10) as store:
        codex = Codex(BINARY, sock_dir / "codex", stub.url, str(server.address), **options)
        try:
            yield Rig(server, stub, codex, store)
        finally:
            codex.stop_daemon()


@pytest.fixture
def term(sock_dir: Path, rig: Rig) -> Iterator[Tmux]:
    with tmux(sock_dir) as server:
        rig.term = server  # its screen goes with a failure
        yield server


def test_the_version_is_the_one_the_event_table_was_checked_against() -> None:
    assert BINARY is not None
    version = subprocess.run([BINARY, "--version"], capture_output=True, text=True, timeout=30).stdout
    assert version.split() == ["codex-cli", VERSION]


# -- codex exec ------------------------------------------------------------------------------------


def run_exec(rig: Rig, prompt: str = "run: touch made.txt") -> tuple[str, str]:
    """``codex exec PROMPT``, its sandbox writable (its approval policy is "never"), run to
    its end; its output and its log (stderr)."""
    agent = rig.codex.exec(prompt, "-s", "workspace-write")
    out, err = agent.communicate(timeout=60)
    assert agent.returncode == 0, err
    return out, err


def hooks_run(log: str) -> list[str]:
    """The events whose hooks ``codex exec`` says it ran to completion ("hook: Stop
    Completed" on stderr), each once per hook, in order. It names no hook it skipped as
    untrusted: those it skips silently."""
    return [line.split()[1] for line in log.splitlines() if line.startswith("hook: ") and line.endswith(" Completed")]


#: The events of ``codex exec "run: ..."``, in order, and what the store shows of them.
EXEC_EVENTS = ["SessionStart", "UserPromptSubmit", "PreToolUse", "PostToolUse", "Stop", "SessionEnd"]
EXEC_LINE = ["attention", "working", "attention", "closed:session_end:other"]


def test_exec_a_prompt_with_a_tool_call_ends_closed(rig: Rig) -> None:
    """``codex exec`` with its sandbox writable (its approval policy is "never"): the
    command runs; SessionStart comes with the prompt (the first "attention", ~0.1 s before
    UserPromptSubmit: Codex fires it no sooner), the tool's events keep it working, Stop
    gives the turn back, SessionEnd closes it as Codex exits."""
    out, log = run_exec(rig)
    assert out.strip().endswith("done")
    assert hooks_run(log) == [event for event in EXEC_EVENTS[:-1] for _ in range(2)]  # ours and the recorder
    id = rig.only_session()
    assert rig.wait_seen(id, "closed:session_end:other") == EXEC_LINE
    assert (rig.codex.project / "made.txt").exists()
    rig.wait_events(*EXEC_EVENTS)
    rig.check_every_payload()


# -- install-hooks, as Codex takes it -------------------------------------------------------------


@pytest.mark.parametrize("rig", [INSTALL_ONLY], indirect=True, ids=["install-only"])
def test_install_hooks_again_for_another_manager_is_trusted_anew(rig: Rig, start_server: StartServer) -> None:
    """The manager moves (another address): ``install-hooks`` again changes our command on
    every event, and its trust with it, so Codex runs the new one (a changed command is
    "modified" to Codex, and runs only once trusted again). Every report goes to the new
    manager, none to the old."""
    moved = start_server("moved.sock", max_history=10_000)
    rig.codex.shmstore("install-hooks", "--address", str(moved.address))
    assert hooks_run(run_exec(rig)[1]) == EXEC_EVENTS[:-1]
    with shmstore.Client(moved.address, moved.authkey, timeout=10) as store:
        [id] = wait_for(lambda: list(timelines(store)), 30, "a session in the moved manager")
        line = wait_for(lambda: timelines(store)[id][-1].startswith("closed") and timelines(store)[id], 30, "its end")
    assert line == EXEC_LINE
    assert rig.seen() == {}


@pytest.mark.parametrize("rig", [{"record": False, "linked": True}], indirect=True, ids=["linked-home"])
def test_a_codex_home_behind_a_symlink_runs_our_hooks(rig: Rig) -> None:
    """``~/.codex`` a symlink (a dotfiles manager's), named as such in ``CODEX_HOME``, where
    ``install-hooks`` finds hooks.json: Codex trusts a hook by its file's real path."""
    assert rig.codex.home.is_symlink()
    assert hooks_run(run_exec(rig)[1]) == EXEC_EVENTS[:-1]
    id = rig.only_session()
    assert rig.wait_seen(id, "closed:session_end:other") == EXEC_LINE


@pytest.mark.parametrize("setup", ["install-hooks", "uninstall-hooks"])
def test_a_hook_of_the_users_after_ours_stays_trusted(rig: Rig, start_server: StartServer, setup: str) -> None:
    """The recorder is the user's own hook, after ours on every event and trusted (as the
    TUI's "Trust all" would): ``install-hooks`` for another manager, or ``uninstall-hooks``,
    must leave it running (README: the user's own hooks are left as trusted, or not)."""
    args = ("--address", str(start_server("moved.sock").address)) if setup == "install-hooks" else ()
    rig.codex.shmstore(setup, *args)
    ran = hooks_run(run_exec(rig)[1])
    assert ran == [event for event in EXEC_EVENTS[:-1] for _ in range(2 if setup == "install-hooks" else 1)]


# -- the TUI, in tmux ----------------------------------------------------------------------------------


@pytest.mark.parametrize("rig", [INSTALL_ONLY], indirect=True, ids=["install-only"])
@pytest.mark.parametrize("server_mode", ["background", "no-daemon"])
def test_an_approval_asks_the_user_then_the_turn_ends_and_quit(rig: Rig, term: Tmux, server_mode: str) -> None:
    """As a user runs it, hooks.json as install-hooks wrote it (no recorder): no "Hooks
    need review" dialog, nothing before the first prompt, "question" while the approval
    prompt is up, approved: working, then attention at the turn's end.

    On the shared background server (the default: ``background``), the hook's process is
    that server, and ``/quit`` fires no SessionEnd (Codex 0.171.0: the server keeps the
    session loaded after its TUI is gone): the session stays "attention", its process
    alive, until the server ends it (``codex app-server daemon stop`` fires SessionEnd).
    With ``--no-daemon`` ("Run without the shared background server") the session lives in
    the TUI's own process, and ``/quit`` closes it."""
    flags = ("--no-daemon",) if server_mode == "no-daemon" else ()
    rig.start(*flags)
    assert rig.seen() == {}  # Codex fires nothing before the first prompt
    term.type("escalate: touch made.txt")
    id = rig.only_session()
    rig.wait_seen(id, "working", "question")  # PermissionRequest: its hook runs as the dialog goes up
    term.wait_for(APPROVAL)
    assert rig.seen()[id][-1] == "question"
    rig.settle_dialog("Enter")
    rig.wait_seen(id, "question", "working", "attention")
    assert (rig.codex.project / "made.txt").exists()
    session = rig.store.get(id)
    assert session is not None
    assert session.pid is not None
    agent = Path(f"/proc/{session.pid}/cmdline").read_bytes().split(b"\0")
    if server_mode == "background":
        assert b"app-server" in agent  # what the reaper watches: the server, not the TUI
    else:
        assert b"--no-daemon" in agent  # the TUI itself
        assert rig.codex.daemon_pids() == []

    screen = term.screen()
    rig.quit()
    assert REVIEW not in screen
    if server_mode == "no-daemon":
        assert rig.wait_seen(id, "closed:session_end:other") == [
            *("attention", "working", "question", "working", "attention"),
            "closed:session_end:other",
        ]
        return
    time.sleep(1.0)  # room for a SessionEnd that would come: none does on the background server
    assert rig.seen()[id][-1] == "attention"
    assert session.pid in rig.codex.daemon_pids()  # still there, holding the session
    rig.codex.stop_daemon()  # the server ends: it ends the session
    assert rig.wait_seen(id, "closed:session_end:other") == [
        *("attention", "working", "question", "working", "attention"),
        "closed:session_end:other",
    ]


def test_esc_at_the_approval_prompt_or_in_a_turn_gives_the_session_back(rig: Rig, term: Tmux) -> None:
    """Esc at the approval prompt ("No, and tell Codex what to do differently") interrupts
    the turn: Interrupt, and no Stop after it; the command does not run. Esc while the
    model is slow to answer does the same. (In the TUI's own process: the background
    server gives the same events, and takes ~3 s to start, copying Codex into the home.)"""
    rig.start("--no-daemon")
    term.type("escalate: touch refused.txt")
    id = rig.only_session()
    rig.wait_seen(id, "working", "question")
    rig.settle_dialog("Escape")
    rig.wait_seen(id, "question", "attention")
    assert not (rig.codex.project / "refused.txt").exists()

    term.type("slow: 20")
    rig.wait_seen(id, "attention", "working")
    wait_for(lambda: rig.stub.requests and "slow: 20" in str(rig.stub.requests[-1]), 10, "the slow request")
    term.keys("Escape")
    line = rig.wait_seen(id, "working", "attention")
    assert line == ["attention", "working", "question", "attention", "working", "attention"]
    rig.wait_events(
        *("SessionStart", "UserPromptSubmit", "PreToolUse", "PermissionRequest", "Interrupt"),
        *("UserPromptSubmit", "Interrupt"),
    )
    rig.check_every_payload()


@pytest.mark.parametrize("rig", [{"record": True, "reap_interval": 0.5}], indirect=True, ids=["quick-reaper"])
def test_an_api_error_leaves_it_working_and_a_closed_terminal_is_reaped(rig: Rig, term: Tmux) -> None:
    """What Codex gives no event for, in the TUI's own process (``--no-daemon``). An API
    error ends the turn with no hook at all (no Stop, no Interrupt; 0.171.0 has no
    StopFailure): the session shows "working" while Codex waits at its prompt, until the
    next prompt. The terminal closed (SIGHUP): no SessionEnd; the reaper closes the session
    once Codex's process is gone."""
    rig.start("--no-daemon")
    term.type("fail")
    id = rig.only_session()
    term.wait_for("scripted failure")
    assert rig.wait_seen(id, "working") == ["attention", "working"]
    rig.wait_events("SessionStart", "UserPromptSubmit")
    term.type("hello")
    assert rig.wait_seen(id, "attention") == ["attention", "working", "attention"]  # working from the error on
    rig.wait_events("SessionStart", "UserPromptSubmit", "UserPromptSubmit", "Stop")  # nothing between the prompts
    rig.check_every_payload()

    term.kill()
    assert rig.wait_seen(id, "closed:agent_gone") == ["attention", "working", "attention", "closed:agent_gone"]
    assert "SessionEnd" not in rig.codex.events()


def test_every_payload_codex_sends_is_in_the_store(rig: Rig, term: Tmux) -> None:
    """The recorder beside our hooks, trusted as well: a reply, a command in the sandbox,
    ``/clear`` (a new session; the old one is not ended then), a second prompt; the
    background server, stopped, ends both. Each payload with a status is in the store."""
    rig.start()
    term.type("hello")
    first = rig.only_session()
    rig.wait_seen(first, "working", "attention")
    term.type("run: touch made.txt")
    rig.wait_seen(first, "attention", "working", "attention", "working", "attention")
    assert (rig.codex.project / "made.txt").exists()

    term.type("/clear")
    term.type("hello again")
    [second] = wait_for(lambda: [id for id in rig.seen() if id != first], 30, "the session after /clear")
    rig.wait_seen(second, "working", "attention")
    assert rig.seen()[first][-1] == "attention"  # /clear ends nothing

    rig.quit()
    rig.codex.stop_daemon()  # on the background server, /quit ended neither; the server's end ends both
    rig.wait_seen(first, "closed:session_end:other")
    rig.wait_seen(second, "closed:session_end:other")
    assert rig.seen() == {
        first: ["attention", "working", "attention", "working", "attention", "closed:session_end:other"],
        second: ["attention", "working", "attention", "closed:session_end:other"],
    }
    sources = [
        seen["payload"].get("source")
        for seen in rig.codex.payloads()
        if seen["payload"]["hook_event_name"] == "SessionStart"
    ]
    assert sources == ["startup", "clear"]
    rig.check_every_payload()
