"""shmstore driven by the real GitHub Copilot CLI (the version :data:`copilot_rig.VERSION`,
installed by .ci/run) in its BYOK mode, against a scripted stand-in for an OpenAI-compatible
Chat Completions API (:mod:`openai_chat_stub`): what a user watching the store sees is
checked against the agent itself, in print mode and in the interactive TUI in tmux.

Each test reads the store's change feed as a timeline of statuses per session
(:func:`claude_rig.timelines`), and checks every payload Copilot sent a hook (a recorder's
hooks file beside ours) against it. Where Copilot's own behaviour sets a limit, the test
says so. Without the CLI these tests skip, except in CI (CI=true), where they fail.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from claude_rig import AgentRig, wait_for
from copilot_rig import EVENTS, VERSION, Copilot, Tmux, copilot_binary, tmux, unpack
from helpers import StartServer
from openai_chat_stub import ChatStub

import shmstore
from shmstore.agents import copilot as adapter
from shmstore.agents.base import CLOSED, HookReport

BINARY = copilot_binary()
if BINARY is None:
    if os.environ.get("CI") == "true":
        raise RuntimeError("Copilot CLI is not installed in .agents/ (.ci/run installs it)")
    pytest.skip("Copilot CLI is not installed (.ci/run installs it in .agents/)", allow_module_level=True)

#: What the session shows once the user pressed Esc at a permission prompt. Copilot CLI
#: 1.0.102 fires no hook for it (no postToolUse, no agentStop: seen with the real CLI, and
#: the recorder checks it below); its events.jsonl gains an ``abort`` line, which the
#: watcher shmstore's hook starts for a question reads (shmstore/hook/settle.py). Without
#: that watcher, the session would show "question" until the user's next prompt.
AFTER_ESC = "attention"


class Rig(AgentRig):
    """A manager, the model stand-in, and a Copilot home whose hooks report to the manager."""

    def __init__(self, server: shmstore.ServerProcess, stub: ChatStub, copilot: Copilot, store: shmstore.Client):
        self.server, self.stub, self.copilot, self.store = server, stub, copilot, store

    def events(self) -> object:
        return self.copilot.events()

    def ready(self) -> None:
        """Wait for the TUI's prompt: keys sent before it are lost (or answer a dialog)."""
        assert self.term is not None
        self.term.wait_for("/ commands")

    def answer(self, id: str, choice: str) -> None:
        """Take the dialog's first choice (Enter) once ``choice`` is on screen; Enter goes
        again while the session still waits (a key that came with the dialog's drawing)."""
        assert self.term is not None
        self.term.wait_for(choice)
        for _ in range(5):
            self.term.keys("Enter")
            with contextlib.suppress(AssertionError):
                wait_for(lambda: self.seen()[id][-1] != "question", 2, "an answer")
                return
        raise AssertionError(f"the dialog took no answer\n{self.term.screen()}")

    def dismiss(self, dialog: str) -> None:
        """Esc at the dialog once ``dialog`` is on screen, again while it stays up (as
        :meth:`answer`), until the TUI's prompt is back."""
        assert self.term is not None
        term = self.term
        term.wait_for(dialog)
        for _ in range(5):
            term.keys("Escape")
            with contextlib.suppress(AssertionError):
                wait_for(lambda: dialog not in term.screen() and "/ commands" in term.screen(), 2, "the prompt")
                return
        raise AssertionError(f"the dialog stayed up\n{term.screen()}")

    def check_every_payload(self) -> None:
        """Every payload Copilot gave a hook (the recorder's, and as many of each event as
        Copilot's own log says it ran) is of an event shmstore knows, and names the session
        and its directory as the store holds them; and what each session showed reflects
        them all (:func:`unreflected`). The recorder's hook may end after ours: this waits
        for it, and fails if the store never reflects what it heard."""
        try:
            wait_for(lambda: not self.unreflected(), 10, "the store to reflect every payload")
        except AssertionError as exc:
            raise AssertionError(f"{exc}: {self.unreflected()}") from None
        for event, payload in self.copilot.payloads():
            said = read(event, payload)
            session = self.store.get(said.session)
            assert session is not None, (event, said.session)
            assert session.working_dir == payload["cwd"] == str(self.copilot.project)
            assert session.session_id == payload["sessionId"]
            assert str(session.agent_type) == adapter.NAME

    def unreflected(self) -> dict[str, tuple[list[str], list[str]]]:
        """What does not agree so far: each session whose timeline is not what the payloads
        make of it (:func:`reflects`), with that timeline and their statuses in the order
        Copilot fired them (an ``abort`` in the session's log standing for the watcher's
        report, :data:`AFTER_ESC`); and, as ``"recorder"``, the events the recorder heard
        if their counts are not those of Copilot's log."""
        heard = collections.Counter(self.copilot.events())
        wrong: dict[str, tuple[list[str], list[str]]] = {}
        if heard != self.copilot.ran():
            wrong["recorder"] = (sorted(heard.elements()), sorted(self.copilot.ran().elements()))
        said: dict[str, list[tuple[float, str]]] = {}
        for event, payload in self.copilot.payloads():
            report = read(event, payload)
            if report.status is not None:
                said.setdefault(report.session, []).append((payload["timestamp"] / 1000, shown(report)))
        seen = self.seen()
        for id in said.keys() | seen.keys():
            line = said.get(id, []) + [(at, AFTER_ESC) for at in self.copilot.aborts(id)]
            statuses = [status for _, status in sorted(line)]
            if not reflects(seen.get(id, []), statuses):
                wrong[id] = (seen.get(id, []), statuses)
        return wrong


def read(event: str, payload: dict[str, Any]) -> HookReport:
    """What shmstore's hook makes of a payload the recorder heard for ``event`` (its hook's
    environment names the event), checked to be of an event shmstore knows."""
    assert event in adapter.EVENT_STATUS or event in adapter.QUIET_EVENTS, event
    said = adapter.read(payload, {adapter.EVENT_VARIABLE: event, "COPILOT_HOME": "/nowhere"})
    assert (said.event, said.session, said.cwd) == (event, payload["sessionId"], payload["cwd"])
    return said


def changes(*statuses: str) -> list[str]:
    """``statuses`` as a timeline shows them: a status only when it changed."""
    return [status for i, status in enumerate(statuses) if i == 0 or statuses[i - 1] != status]


def shown(said: HookReport) -> str:
    """A report's status as :func:`claude_rig.timelines` shows it."""
    if said.status != CLOSED:
        return str(said.status)
    return "closed:session_end" + (f":{said.reason}" if said.reason else "")


def reflects(line: list[str], statuses: list[str]) -> bool:
    """Whether a timeline ``line`` is what ``statuses``, in their order, make of a session:
    each status shown unless a later one superseded it, and the last shown last."""
    changed = changes(*statuses)
    rest = iter(changed)
    return bool(line) and line[-1] == changed[-1] and all(status in rest for status in line)


@pytest.fixture(scope="session")
def dist() -> Iterator[Path]:
    """Copilot's program files, unpacked once per worker (:func:`copilot_rig.unpack`), and
    removed at its end (235 MB: not left for pytest's kept temporary directories)."""
    assert BINARY is not None
    root = Path(tempfile.mkdtemp(prefix="cpd-", dir="/tmp"))
    try:
        yield unpack(BINARY, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def rig(start_server: StartServer, sock_dir: Path, dist: Path) -> Iterator[Rig]:
    assert BINARY is not None
    server = start_server()
    with ChatStub() as stub, shmstore.Client(server.address, server.authkey, timeout=10) as store:
        copilot = Copilot(BINARY, sock_dir / "copilot", stub.url, str(server.address), dist)
        try:
            yield Rig(server, stub, copilot, store)
        finally:
            copilot.stop()


@pytest.fixture
def term(sock_dir: Path, rig: Rig) -> Iterator[Tmux]:
    with tmux(sock_dir) as server:
        rig.term = server  # its screen goes with a failure
        yield server


def test_the_version_is_the_one_the_event_table_was_checked_against(dist: Path) -> None:
    """The package the binary unpacked (and runs) is named by its version."""
    assert dist.name == VERSION
    assert json.loads((dist / "package.json").read_text())["version"] == VERSION


def test_the_hooks_file_names_each_event_and_the_recorder_hears_every_one(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COPILOT_HOME", str(rig.copilot.copilot_home))
    assert adapter.default_settings() == rig.copilot.hooks_file
    hooks = rig.copilot.hooks()
    assert set(hooks) == set(adapter.EVENT_STATUS)
    for event, [entry] in hooks.items():
        assert entry["env"] == {adapter.EVENT_VARIABLE: event}
        assert "shmstore hook --agent copilot_cli" in entry["bash"]
    assert set(EVENTS) == set(adapter.EVENT_STATUS) | adapter.QUIET_EVENTS


# -- print mode --------------------------------------------------------------------------------


def test_print_mode_a_prompt_and_a_tool_call(rig: Rig) -> None:
    agent = rig.copilot.print_mode("run: echo hi", "--allow-all-tools")
    out, err = agent.communicate(timeout=60)
    assert agent.returncode == 0, err
    assert "done" in out
    id = rig.only_session()
    assert rig.wait_seen(id, "closed:session_end:complete") == ["working", "attention", "closed:session_end:complete"]
    assert rig.copilot.events() == [
        "sessionStart",
        "userPromptSubmitted",
        "userPromptTransformed",
        "preToolUse",
        "permissionRequest",  # with every tool allowed too: no question
        "postToolUse",
        "agentStop",
        "sessionEnd",
    ]
    assert rig.stub.prompts() == ["run: echo hi", ""]  # the prompt, then the tool's result
    assert {request["path"] for request in rig.stub.requests} == {"/v1/chat/completions"}  # and nothing else
    rig.check_every_payload()


# -- interactive, in tmux ------------------------------------------------------------------------


def test_a_permission_prompt_is_a_question_until_approved(rig: Rig, term: Tmux) -> None:
    """No session before the first prompt: Copilot fires sessionStart with it."""
    term.start(rig.copilot)
    rig.ready()
    assert rig.seen() == {}
    term.type("run: touch made.txt")  # a command that writes asks first
    id = rig.only_session()
    rig.wait_seen(id, "working", "question")
    term.wait_for("Do you want to run this command?")
    rig.answer(id, "1. Yes")
    rig.wait_seen(id, "question", "working", "attention")
    assert (rig.copilot.project / "made.txt").exists()

    rig.ready()
    term.type("/exit")
    assert rig.wait_seen(id, "closed:session_end:user_exit") == [
        "working",
        "question",
        "working",
        "attention",
        "closed:session_end:user_exit",
    ]
    assert "notification" in rig.copilot.events()
    rig.check_every_payload()


def test_a_question_from_ask_user_until_answered(rig: Rig, term: Tmux) -> None:
    term.start(rig.copilot)
    rig.ready()
    term.type("ask: which colour?")
    id = rig.only_session()
    rig.wait_seen(id, "working", "question")
    term.wait_for("which colour?")
    rig.answer(id, "enter accept")
    assert rig.wait_seen(id, "question", "working", "attention") == ["working", "question", "working", "attention"]
    term.wait_for("Asked user")
    rig.check_every_payload()


def test_esc_at_a_permission_prompt(rig: Rig, term: Tmux) -> None:
    """Esc at Copilot's permission prompt: the tool does not run and Copilot waits at its
    prompt, but it fires no hook for it (1.0.102: no postToolUse, no agentStop; the
    recorder's next payload after the prompt's notification is the next prompt's, checked
    here). That is Copilot's limit: its hooks alone leave the session "question" until the
    user's next prompt. What the session shows meanwhile is :data:`AFTER_ESC`: the only
    trace of the Esc is an ``abort`` line in the session's events.jsonl (checked here),
    which shmstore's watcher of a question reads (shmstore/hook/settle.py)."""
    term.start(rig.copilot)
    rig.ready()
    term.type("run: touch made.txt")
    id = rig.only_session()
    rig.wait_seen(id, "working", "question")
    rig.dismiss("Do you want to run this command?")
    wait_for(lambda: rig.copilot.aborts(id), 10, "the abort in the session's log")
    assert rig.wait_seen(id, *changes("question", AFTER_ESC)) == changes("working", "question", AFTER_ESC)
    assert not (rig.copilot.project / "made.txt").exists()

    rig.ready()
    term.type("hello")
    wait_for(lambda: "agentStop" in rig.copilot.events(), 30, "the next turn's end")
    # Its working shows, unless on a loaded machine that hook gave up and kept its report in
    # the spool, delivered after agentStop's and rightly ignored as the older (seen once).
    rig.check_every_payload()
    assert rig.seen()[id][-1] == "attention"
    events = rig.copilot.events()
    asked = events.index("notification")
    assert events[asked + 1 : asked + 2] == ["userPromptSubmitted"], events  # nothing of the Esc itself


def test_every_payload_of_a_whole_session_is_reflected_in_the_store(rig: Rig, term: Tmux) -> None:
    """A session through both of Copilot's waits on the user and its end, with the recorder
    beside our hooks: every event Copilot fired for it shows in the store as
    :meth:`Rig.check_every_payload` says. Copilot runs the hooks of different events at
    once (sessionStart's still runs when userPromptSubmitted's starts: its own log's
    hook.start and hook.end lines), so their reports may arrive in either order; shmstore
    orders them by when each hook started."""
    term.start(rig.copilot)
    rig.ready()
    term.type("run: touch a.txt")
    id = rig.only_session()
    rig.wait_seen(id, "working", "question")
    rig.answer(id, "1. Yes")
    rig.wait_seen(id, "working", "attention")
    rig.ready()
    term.type("ask: go on?")
    rig.wait_seen(id, "working", "question")
    rig.answer(id, "enter accept")
    rig.wait_seen(id, "working", "attention")
    rig.ready()
    term.type("/exit")
    line = rig.wait_seen(id, "closed:session_end:user_exit")
    assert line == [
        *("working", "question", "working", "attention"),  # the permission prompt, approved
        *("working", "question", "working", "attention"),  # the question, answered
        "closed:session_end:user_exit",
    ]
    rig.check_every_payload()
    assert set(rig.copilot.events()) >= set(adapter.EVENT_STATUS) - {
        "postToolUseFailure",
        "subagentStart",
        "subagentStop",
        "preCompact",
        "errorOccurred",
    }
