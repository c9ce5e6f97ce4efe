"""shmstore driven by the real Gemini CLI (the version :data:`gemini_rig.VERSION`, installed by
.ci/run), against a scripted stand-in for the Gemini API (:mod:`gemini_stub`): what a user
watching the store sees is checked against the agent itself, in print mode and in the
interactive CLI in tmux.

The hooks are the ones ``shmstore install-hooks --agent gemini_cli`` writes in the home's
``~/.gemini/settings.json``; a recorder (:mod:`hook_recorder`) runs beside ours on each
event, so that a test knows every payload Gemini sent.

Each test reads the store's change feed as a timeline of statuses per session
(:func:`claude_rig.timelines`). Where Gemini CLI's own behaviour sets a limit, the test
says so. Without the CLI these tests skip, except in CI (CI=true), where they fail.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from claude_rig import AgentRig, wait_for
from gemini_rig import VERSION, Gemini, Tmux, environment, gemini_binary, tmux
from gemini_stub import GeminiStub
from helpers import StartServer

import shmstore
from shmstore import spool
from shmstore.agents import gemini as adapter

BINARY = gemini_binary()
if BINARY is None:
    if os.environ.get("CI") == "true":
        raise RuntimeError("Gemini CLI is not installed in .agents/ (.ci/run installs it)")
    pytest.skip("Gemini CLI is not installed (.ci/run installs it in .agents/)", allow_module_level=True)

#: The interactive CLI as a user runs it to be asked first: a shell command waits for the
#: user's approval.
ASKING = ("--approval-mode", "default")
#: What the CLI shows while it takes a prompt, and while its permission dialog is up.
PROMPT = "Type your message"
DIALOG = "Allow once"
#: How the CLI marks the model's reply on screen.
REPLY = "✦"


class Rig(AgentRig):
    """A manager, the model stand-in, and a Gemini home whose hooks report to the manager."""

    term: Tmux | None

    def __init__(self, server: shmstore.ServerProcess, stub: GeminiStub, gemini: Gemini, store: shmstore.Client):
        self.server, self.stub, self.gemini, self.store = server, stub, gemini, store

    def events(self) -> object:
        return self.gemini.events()

    def start(self) -> str:
        """The interactive CLI in the test's tmux, once it takes a prompt (SessionStart
        comes first: "attention"); its session."""
        assert self.term is not None
        self.term.start(self.gemini, *ASKING)
        id = self.only_session()
        self.wait_seen(id, "attention")
        self.term.wait_for(PROMPT)
        return id

    def settle_dialog(self, key: str) -> None:
        """Answer the permission dialog on screen with ``key`` (Enter: "Allow once"; Escape:
        "No, suggest changes"). A dialog may ignore keys for a moment after it appears, so
        the key goes again while the dialog is still there."""
        assert self.term is not None
        self.term.wait_for(DIALOG)
        for _ in range(5):
            self.term.keys(key)
            with contextlib.suppress(AssertionError):
                wait_for(lambda: DIALOG not in self.term.screen(), 2, "the dialog to go")  # type: ignore[union-attr]
                return
        raise AssertionError(f"the dialog took no {key}\n{self.term.screen()}")

    def quit(self) -> None:
        """``/quit`` typed; the CLI gone, with status 0, and every hook it started done: it
        fires SessionEnd two or three times as it exits, and does not wait for the last,
        which runs on after it (its parent then pid 1)."""
        assert self.term is not None
        self.term.type("/quit")
        try:
            wait_for(lambda: not self.term.alive(), 30, "the CLI to exit")  # type: ignore[union-attr]
        except AssertionError as exc:
            raise AssertionError(f"{exc}; events {self.gemini.events()}\n{self.term.screen()}") from None
        assert self.term.exit_file().read_text().strip() == "0"
        self.wait_delivered()

    def wait_delivered(self) -> None:
        """Wait until every report the CLI's hooks will make is in the store: each hook has
        ended (and the question's transcript watcher), and the manager has delivered what
        they kept in its spool (a manager slow to answer on a loaded machine)."""
        wait_for(lambda: not self.gemini.processes(), 30, "the home's last hooks to end")
        directory = spool.path_for(str(self.server.address))
        wait_for(lambda: spool.counts(directory)["pending"] == 0, 30, "the spool delivered")

    def expected(self) -> dict[str, list[str]]:
        """The timeline of each session that the recorder's payloads call for, by the
        adapter's table: each event with a status, in the order Gemini fired them (a status
        only when it changed), an end of a session the store never held left out."""
        want: dict[str, list[str]] = {}
        for payload in self.gemini.payloads():
            said = adapter.read(payload, {})
            if said.status is None or (said.status == "closed" and said.session not in want):
                continue
            shown = f"closed:session_end:{said.reason}" if said.status == "closed" else str(said.status)
            line = want.setdefault(said.session, [])
            if not line or line[-1] != shown:
                line.append(shown)
        return want

    def check_every_payload(self) -> None:
        """Every event Gemini fired is one the adapter knows; every payload with a status is
        in the store: each session's timeline is the one its payloads call for, and names
        the session's directory and its agent as Gemini gave them."""
        payloads = self.gemini.payloads()
        assert payloads, "the recorder saw nothing: Gemini ran no hook"
        for payload in payloads:
            assert payload["hook_event_name"] in adapter.EVENT_STATUS, payload  # the only events installed
        want = self.expected()
        try:
            wait_for(lambda: self.seen() == want, 10, "the store to show every payload")  # a spooled report may lag
        except AssertionError:
            raise AssertionError(f"seen {self.seen()}, payloads call for {want}") from None
        for payload in payloads:
            session = self.store.get(payload["session_id"])
            assert session is not None
            assert session.working_dir == payload["cwd"] == str(self.gemini.project)
            assert str(session.agent_type) == adapter.NAME

    def closed_reports(self, id: str) -> int:
        """How many reports the store took for session ``id`` once it was closed (each is
        an event in the feed, closed)."""
        events = self.store.changes(0, limit=10_000).events
        return sum(1 for event in events if event.id == id and event.session and event.session.closed)


@pytest.fixture
def rig(start_server: StartServer, sock_dir: Path) -> Iterator[Rig]:
    """A test's own manager, stand-in and Gemini home (in ``sock_dir``), with the recorder
    beside our hooks."""
    assert BINARY is not None
    server = start_server(max_history=10_000)
    with GeminiStub() as stub, shmstore.Client(server.address, server.authkey, timeout=10) as store:
        gemini = Gemini(BINARY, sock_dir / "gemini", stub.url, str(server.address), record=True)
        try:
            yield Rig(server, stub, gemini, store)
        finally:
            gemini.kill_all()


@pytest.fixture
def term(sock_dir: Path, rig: Rig) -> Iterator[Tmux]:
    with tmux(sock_dir) as server:
        rig.term = server  # its screen goes with a failure
        yield server


def test_the_version_is_the_one_the_event_table_was_checked_against(tmp_path: Path) -> None:
    """(In a home of its own: even ``--version`` writes in ``~/.gemini``.)"""
    assert BINARY is not None
    env = environment(tmp_path / "home", "http://127.0.0.1:9", tmp_path)
    done = subprocess.run([BINARY, "--version"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == VERSION == "0.61.0"


def test_install_hooks_puts_ours_on_each_event_of_the_table(rig: Rig) -> None:
    hooks = rig.gemini.hooks()
    assert set(hooks) == set(adapter.EVENT_STATUS)
    for groups in hooks.values():
        [ours] = groups[0]["hooks"]
        assert ours["name"] == "shmstore"
        assert f"hook --agent gemini_cli --address {rig.server.address}" in ours["command"]


# -- print mode --------------------------------------------------------------------------------


def test_print_mode_a_prompt_with_a_tool_call_ends_closed(rig: Rig) -> None:
    """``gemini -p`` with ``--approval-mode yolo`` (without it, print mode offers the model
    no shell tool): the command runs; SessionStart says "attention" before the prompt is
    taken, the tool's events keep it working, AfterAgent gives the turn back, and the one
    SessionEnd of print mode closes it. Our hook says nothing (Gemini would show it)."""
    result = rig.gemini.print_mode("run: echo hi > made.txt", "--approval-mode", "yolo")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "done"
    assert "shmstore" not in result.stdout + result.stderr
    id = rig.only_session()
    assert rig.wait_seen(id, "closed:session_end:exit") == [
        "attention",
        "working",
        "attention",
        "closed:session_end:exit",
    ]
    assert (rig.gemini.project / "made.txt").read_text() == "hi\n"
    assert rig.gemini.events() == ["SessionStart", "BeforeAgent", "BeforeTool", "AfterTool", "AfterAgent", "SessionEnd"]
    rig.check_every_payload()


# -- interactive, in tmux ------------------------------------------------------------------------


def test_a_permission_dialog_is_a_question_until_approved_and_quit_closes_once(rig: Rig, term: Tmux) -> None:
    """BeforeTool comes before the dialog (working), Notification (ToolPermission) with it
    (question). Approving fires no event: the session shows "question" until the tool's
    AfterTool (working), then AfterAgent (attention). ``/quit`` fires SessionEnd two or
    three times, the last after the CLI has exited: the session closes once, and none of
    them makes another session or opens it again. (At least one duplicate must arrive: on
    a loaded machine one duplicate's report was missing once in 45 runs, with nothing in
    the hooks' failure log, which a hook past its budget skips.)"""
    id = rig.start()
    term.type("run: echo hi > made.txt")
    rig.wait_seen(id, "working", "question")
    term.wait_for(DIALOG)
    assert rig.seen()[id][-1] == "question"  # while the dialog is up
    rig.settle_dialog("Enter")
    rig.wait_seen(id, "question", "working", "attention")
    assert (rig.gemini.project / "made.txt").read_text() == "hi\n"

    rig.quit()  # every report made is in the store now
    ends = rig.gemini.events().count("SessionEnd")
    assert ends >= 2, rig.gemini.events()
    assert 2 <= rig.closed_reports(id) <= ends, rig.hook_log()  # the duplicates arrived...
    assert rig.seen() == {  # ...and made no other session, nor opened this one again
        id: [*("attention", "working", "question", "working", "attention"), "closed:session_end:exit"]
    }
    assert rig.store.list_all() == []
    rig.check_every_payload()


#: What the session shows after Esc at the permission dialog, where Gemini CLI 0.61.0 fires
#: no event: shmstore says "attention" from the transcript (shmstore.hook.settle).
AFTER_ESC = "attention"


def test_esc_at_the_permission_dialog_fires_no_event_and_the_transcript_settles_it(rig: Rig, term: Tmux) -> None:
    """Esc at the dialog ("No, suggest changes") cancels the tool and takes the CLI back to
    its prompt ("Request cancelled."), but Gemini CLI 0.61.0 fires no event for it, not
    even AfterAgent: the hooks can say nothing. That is Gemini's limit.

    The transcript is the only signal: the question's hook starts a watcher on it
    (shmstore.hook.settle), which reports "attention" on its ``{"type": "info", "content":
    "Request cancelled."}`` line. At the Esc the CLI also writes, within a few
    milliseconds, the model turn's record again with its tool call "cancelled", ``$set``
    lines and its session context as a user line: ``gemini.settled`` takes those as saying
    nothing (an earlier version took them as "it went on", and the question stayed)."""
    id = rig.start()
    term.type("run: echo no > refused.txt")
    rig.wait_seen(id, "working", "question")
    wait_for(rig.gemini.watchers, 10, "the question's transcript watcher")
    rig.settle_dialog("Escape")
    term.wait_for("Request cancelled.")
    [transcript] = rig.gemini.transcripts()
    wait_for(lambda: '"content":"Request cancelled."' in transcript.read_text(), 10, "the transcript's line")
    wait_for(lambda: not rig.gemini.watchers(), 10, "the watcher to end")  # nothing else can move the session
    assert rig.gemini.events()[-1] == "Notification"  # Gemini fired nothing at the Esc
    assert rig.seen()[id][-1] == AFTER_ESC
    assert not (rig.gemini.project / "refused.txt").exists()

    term.type("hello")  # the next prompt: the session moves on
    rig.wait_seen(id, "working", "attention")
    rig.quit()
    assert rig.wait_seen(id, "closed:session_end:exit") == [
        *("attention", "working", "question"),
        *(["attention"] if AFTER_ESC == "attention" else []),
        *("working", "attention"),
        "closed:session_end:exit",
    ]


def test_every_payload_gemini_sends_is_in_the_store(rig: Rig, term: Tmux) -> None:
    """With the recorder beside our hooks: a reply, an approved command, ``/clear`` (the
    session ends, "clear", and a new one starts, "clear"), a reply in the new session, and
    ``/quit``. Each payload with a status is in the store, in Gemini's order."""
    first = rig.start()
    term.type("hello")
    rig.wait_seen(first, "working", "attention")
    term.type("run: echo hi > made.txt")
    rig.wait_seen(first, "working", "question")
    rig.settle_dialog("Enter")
    rig.wait_seen(first, "question", "working", "attention")

    term.type("/clear")
    rig.wait_seen(first, "closed:session_end:clear")
    [second] = wait_for(lambda: [id for id in rig.seen() if id != first], 30, "the session after /clear")
    rig.wait_seen(second, "attention")
    # /clear clears the screen after SessionStart's hooks, and the prompt with it: a prompt
    # typed before that is lost. The old turns' replies gone, it is done.
    wait_for(lambda: REPLY not in term.screen(), 30, "the screen cleared")
    term.type("hello again")
    rig.wait_seen(second, "attention", "working", "attention")

    rig.quit()
    rig.wait_seen(second, "closed:session_end:exit")
    sources = [p.get("source") for p in rig.gemini.payloads() if p["hook_event_name"] == "SessionStart"]
    assert sources == ["startup", "clear"]
    rig.check_every_payload()
    assert rig.seen() == {
        first: [
            *("attention", "working", "attention"),
            *("working", "question", "working", "attention"),
            "closed:session_end:clear",
        ],
        second: ["attention", "working", "attention", "closed:session_end:exit"],
    }
