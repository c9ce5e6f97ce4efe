"""shmstore driven by the real opencode CLI (the version :data:`VERSION`, installed by
.ci/run), against a scripted stand-in for its model API (:mod:`model_stub`, spoken to through
opencode's bundled ``@ai-sdk/anthropic`` provider): shmstore's own plugin, written by
``shmstore install-hooks --agent opencode``, runs the real ``shmstore hook`` for a manager of
the test's own, and each test reads the store's change feed as a timeline of statuses per
session (:func:`claude_rig.timelines`).

Beside our plugin a recorder of the test's own (:data:`RECORDER`) writes every bus event
opencode gave, so that a failure shows what opencode did. Without the CLI these tests skip,
except in CI (CI=true), where they fail.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from claude_rig import ROOT, AgentRig, Tmux, tmux, wait_for
from helpers import StartServer
from model_stub import ModelStub, last_user_text, text_block, tool_block

import shmstore
from shmstore.agents import opencode as adapter

#: The version the event table in README.md was checked against; .ci/run installs it.
VERSION = "1.18.33"
API_KEY = "sk-ant-test-0123456789abcdefghijklmnop"


def opencode_binary() -> str | None:
    named = os.environ.get("SHMSTORE_OPENCODE")
    if named:
        return named
    pinned = ROOT / ".agents" / "node_modules" / ".bin" / "opencode"
    return str(pinned) if pinned.exists() else None


BINARY = opencode_binary()
if BINARY is None:
    if os.environ.get("CI") == "true":
        raise RuntimeError("opencode is not installed in .agents/ (.ci/run installs it)")
    pytest.skip("opencode is not installed (.ci/run installs it in .agents/)", allow_module_level=True)

#: A plugin of the test's own: every bus event's type, session and parent, one JSON line
#: each, appended at once (a small synchronous write: the order is the bus's).
RECORDER = """\
import { appendFileSync } from "node:fs"

export const Recorder = async () => ({
  event: async ({ event }) => {
    const p = event.properties || {}
    const info = p.info || {}
    const session = p.sessionID || info.id
    const parent = event.type.startsWith("session.") ? info.parentID : undefined
    const row = { type: event.type, session, parent, status: p.status && p.status.type }
    appendFileSync(process.env.SHMSTORE_TEST_BUS, JSON.stringify(row) + "\\n")
  },
})
"""

#: What opencode's session-level events are (the rest, message parts and the like, is noise here).
BUS_EVENTS = {*adapter.EVENT_STATUS, "session.updated"}


class OpencodeStub(ModelStub):
    """The model stand-in, with opencode's tool names (``bash``, ``task``: lower case).
    ``opencode run "a b"`` sends its prompt quoted, so quotes around it are taken off."""

    def answer(self, handler: Any, request: dict[str, Any]) -> None:
        text, after_tool = last_user_text(request.get("messages", []))
        tools = {tool.get("name") for tool in request.get("tools", []) if isinstance(tool, dict)}
        verb, _, rest = text.strip('"').partition(":")
        verb, rest = verb.strip().lower(), rest.strip()
        if after_tool or not text:
            return self._stream(handler, request, [text_block("done")])
        if verb == "run" and "bash" in tools:
            return self._stream(handler, request, [tool_block("bash", {"command": rest, "description": "run it"})])
        if verb == "delegate" and "task" in tools:
            task = {"description": "a subtask", "prompt": rest, "subagent_type": "general"}
            return self._stream(handler, request, [tool_block("task", task)])
        return super().answer(handler, request)


class Opencode:
    """A home for opencode (HOME and XDG_CONFIG/DATA/CACHE_HOME under ``root``), a project
    directory in it, shmstore's plugin installed there by ``shmstore install-hooks`` for the
    manager at ``address``, the stand-in model in its config, and nothing leaving the machine."""

    def __init__(self, binary: str, root: Path, model_url: str, address: str, permission: dict[str, str] | None = None):
        self.binary, self.root = binary, root
        self.home, self.project, self.bus = root / "home", root / "project", root / "bus.jsonl"
        self.config = self.home / ".config" / "opencode"
        self.project.mkdir(parents=True)
        self.config.mkdir(parents=True)
        keep = ("PATH", "LANG", "LC_ALL", "XDG_RUNTIME_DIR", "XDG_STATE_HOME", "PYTHONPATH", "COVERAGE_PROCESS_START")
        self.env = {name: os.environ[name] for name in keep if name in os.environ}
        self.env.update(
            HOME=str(self.home),
            XDG_CONFIG_HOME=str(self.home / ".config"),
            XDG_DATA_HOME=str(self.home / ".local" / "share"),
            XDG_CACHE_HOME=str(self.home / ".cache"),
            OPENCODE_DISABLE_AUTOUPDATE="1",
            OPENCODE_DISABLE_MODELS_FETCH="1",  # no models.dev catalogue: the config names the model
            OPENCODE_DISABLE_LSP_DOWNLOAD="1",
            OPENCODE_DISABLE_SHARE="1",
            OPENCODE_DISABLE_DEFAULT_PLUGINS="1",
            OPENCODE_DISABLE_CLAUDE_CODE="1",
            OPENCODE_DISABLE_EXTERNAL_SKILLS="1",
            HTTPS_PROXY="http://127.0.0.1:9",
            HTTP_PROXY="http://127.0.0.1:9",
            NO_PROXY="127.0.0.1,localhost",
            SHMSTORE_TEST_BUS=str(self.bus),
            TERM=os.environ.get("TERM", "xterm-256color"),
        )
        install = [sys.executable, "-m", "shmstore", "install-hooks", "--agent", "opencode", "--address", address]
        subprocess.run(install, check=True, capture_output=True, env=self.env, timeout=60)
        assert (self.config / "plugins" / "shmstore.js").read_text().startswith(adapter.MARK)
        (self.config / "plugins" / "recorder.js").write_text(RECORDER)
        provider = {
            "npm": "@ai-sdk/anthropic",  # bundled in opencode's binary: nothing is fetched
            "name": "Stub",
            "options": {"baseURL": model_url + "/v1", "apiKey": API_KEY},
            "models": {
                "claude-stub": {"name": "Claude Stub", "tool_call": True, "limit": {"context": 200000, "output": 8192}}
            },
        }
        config: dict[str, Any] = {
            "autoupdate": False,
            "share": "disabled",
            "model": "stub/claude-stub",
            "small_model": "stub/claude-stub",
            "enabled_providers": ["stub"],
            "provider": {"stub": provider},
            "lsp": False,
            "formatter": False,
        }
        if permission is not None:
            config["permission"] = permission
        (self.config / "opencode.json").write_text(json.dumps(config))
        # At start opencode installs @opencode-ai/plugin into each config directory with
        # npm (in-process), unless node_modules/ is there and package-lock.json lists every
        # dependency of package.json. Our plugin imports nothing: the state of a done
        # install spares the ~70 s that install takes to fail with no registry.
        dependencies = {"@opencode-ai/plugin": VERSION}
        (self.config / "node_modules").mkdir()
        (self.config / "package.json").write_text(json.dumps({"dependencies": dependencies}))
        lock = {"lockfileVersion": 3, "packages": {"": {"dependencies": dependencies}}}
        (self.config / "package-lock.json").write_text(json.dumps(lock))

    def run(self, prompt: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """``opencode run PROMPT``, as a script runs it."""
        argv = [self.binary, "run", prompt]
        return subprocess.run(argv, cwd=self.project, env=self.env, capture_output=True, text=True, timeout=timeout)

    def events(self) -> list[dict[str, Any]]:
        """The bus events the recorder saw, session-level ones only."""
        if not self.bus.exists():
            return []
        rows = [json.loads(line) for line in self.bus.read_text().splitlines()]
        return [row for row in rows if row["type"] in BUS_EVENTS]


class Rig(AgentRig):
    """A manager, the model stand-in, and an opencode home whose plugin reports to the manager."""

    def __init__(self, server: shmstore.ServerProcess, opencode: Opencode, store: shmstore.Client) -> None:
        self.server, self.opencode, self.store = server, opencode, store

    def events(self) -> object:
        """opencode's bus, as the plugin saw it."""
        return [(row["type"], row["session"], row.get("parent"), row.get("status")) for row in self.opencode.events()]

    def top_sessions(self) -> list[str]:
        """The top-level sessions of opencode's bus, in order."""
        found = [row["session"] for row in self.opencode.events() if row["type"] == "session.created"]
        return [
            id for id in found if not any(row.get("parent") for row in self.opencode.events() if row["session"] == id)
        ]


@pytest.fixture
def rig(start_server: StartServer, sock_dir: Path, request: pytest.FixtureRequest) -> Iterator[Rig]:
    assert BINARY is not None
    permission = getattr(request, "param", None)  # opencode.json's "permission", when a test gives one
    server = start_server()
    with OpencodeStub() as stub, shmstore.Client(server.address, server.authkey, timeout=10) as store:
        opencode = Opencode(BINARY, sock_dir / "oc", stub.url, str(server.address), permission)
        made = Rig(server, opencode, store)
        try:
            yield made
        finally:
            kill_home(opencode.home)


def kill_home(home: Path) -> None:
    """Kill what is left of opencode in this home (by its environment: a TUI whose tmux
    server is gone, or a hook still running), never anything else."""
    mark = f"HOME={home}".encode()
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as environ:
                if mark in environ.read().split(b"\0"):
                    os.kill(int(pid), signal.SIGKILL)
        except OSError:
            continue


def the_session(rig: Rig) -> str:
    """The one top-level session opencode's bus named, once the store has it."""
    [id] = wait_for(rig.top_sessions, 30, "a session on the bus")
    wait_for(lambda: id in rig.seen(), 30, "the session in the store")
    return str(id)


#: A turn's timelines: a new session (attention), the turn (working), maybe its end
#: (idle: attention; at exit it may be replaced by the close, which goes in its place), closed.
A_TURN = (
    ["attention", "working", "closed:session_end:exit"],
    ["attention", "working", "attention", "closed:session_end:exit"],
)


def test_the_version_is_the_one_the_event_table_was_checked_against() -> None:
    assert BINARY is not None
    version = subprocess.run([BINARY, "--version"], capture_output=True, text=True, timeout=30).stdout
    assert version.split()[0] == VERSION


def test_a_run_with_a_tool_call_ends_closed_not_working(rig: Rig) -> None:
    result = rig.opencode.run("run: touch made.txt")
    assert result.returncode == 0, result.stderr[-2000:]
    assert (rig.opencode.project / "made.txt").exists()
    id = the_session(rig)
    line = rig.wait_seen(id, "closed:session_end:exit")
    assert line in A_TURN, rig.why()
    assert list(rig.seen()) == [id]
    types = [row["type"] for row in rig.opencode.events() if row["session"] == id and row["type"] != "session.updated"]
    assert types[0] == "session.created"
    assert types[-2:] == ["session.status", "session.idle"]  # the bus's end: idle (attention)...
    session = rig.store.get(id)
    assert session is not None
    assert session.working_dir == str(rig.opencode.project)
    assert str(session.agent_type) == "opencode"
    time.sleep(1)  # ...and nothing comes after the close to bring the session back
    assert rig.seen()[id] == line


def test_a_subagent_does_not_put_its_parent_at_the_users_turn(rig: Rig) -> None:
    """opencode runs the task tool's subagent as a child session; the parent's turn goes
    on around it. The child's events (its idle included) are reported as the parent's, from
    that subagent, as working: the parent shows no attention until its own turn ends."""
    result = rig.opencode.run("delegate: run: touch sub.txt")
    assert result.returncode == 0, result.stderr[-2000:]
    assert (rig.opencode.project / "sub.txt").exists()
    id = the_session(rig)
    line = rig.wait_seen(id, "closed:session_end:exit")
    assert line in A_TURN, rig.why()
    assert list(rig.seen()) == [id]  # the child session is no session of the store's
    events = rig.opencode.events()
    children = {row["session"] for row in events if row.get("parent") == id}
    assert len(children) == 1, rig.why()
    [child] = children
    types = [(row["type"], row["session"]) for row in events]
    assert types.index(("session.idle", child)) < types.index(("session.idle", id))  # the child ended mid-turn


def start_tui(rig: Rig, term: Tmux) -> None:
    """opencode's TUI in ``term``, once it waits for a prompt (no session exists before)."""
    rig.term = term
    env = [f"{key}={value}" for key, value in rig.opencode.env.items()]
    argv = ["env", "-i", *env, rig.opencode.binary]
    term("new-session", "-d", "-s", "agent", "-x", "160", "-y", "48", "-c", str(rig.opencode.project), *argv)
    term.wait_for("Ask anything", timeout=60)


@pytest.mark.parametrize("rig", [{"bash": "ask"}], indirect=True, ids=["bash-ask"])
def test_a_permission_prompt_in_the_tui_is_a_question_until_answered(rig: Rig, sock_dir: Path) -> None:
    with tmux(sock_dir) as term:
        start_tui(rig, term)
        term.type("run: touch made.txt")
        id = the_session(rig)
        rig.wait_seen(id, "question")
        term.wait_for("Allow once")
        assert not (rig.opencode.project / "made.txt").exists()
        for _ in range(5):  # Enter takes "Allow once", the dialog's first choice
            term.keys("Enter")
            try:
                wait_for(lambda: rig.seen()[id][-1] != "question", 2, "an answer")
                break
            except AssertionError:
                continue
        rig.wait_seen(id, "question", "working", "attention")
        assert (rig.opencode.project / "made.txt").exists()
        term.keys("C-c")  # at an empty prompt: opencode exits
        line = rig.wait_seen(id, "closed:session_end:exit")
    assert line == ["attention", "working", "question", "working", "attention", "closed:session_end:exit"], rig.why()


def test_an_api_error_waits_for_the_user_then_the_exit_closes_the_session(rig: Rig) -> None:
    result = rig.opencode.run("fail")  # the stand-in answers 400, which opencode does not retry
    assert result.returncode == 1
    id = the_session(rig)
    line = rig.wait_seen(id, "closed:session_end:exit")
    assert line in A_TURN, rig.why()
    types = [row["type"] for row in rig.opencode.events() if row["session"] == id]
    assert "session.error" in types


def test_with_the_manager_stopped_opencode_goes_on_and_the_reports_arrive_later(rig: Rig) -> None:
    """The hooks run detached, one at a time, each giving up by its budget (0.9 s) and
    keeping its report in the spool: opencode neither waits for them nor loses the close."""
    os.kill(rig.server.pid, signal.SIGSTOP)
    try:
        result = rig.opencode.run("run: touch made.txt")
    finally:
        os.kill(rig.server.pid, signal.SIGCONT)
    assert result.returncode == 0, result.stderr[-2000:]
    id = the_session(rig)
    line = wait_for(lambda: rig.seen()[id][-1].startswith("closed") and rig.seen()[id], 30, "its end")
    # What arrives is the turn's statuses in order, each shown unless a later report took
    # its place, and a close: every hook waits out its budget and keeps its report in the
    # spool, delivered after the manager runs again, where a report older than the
    # session's last changes nothing (seen: session.created's attention overtaken by a
    # busy delivered first; the close replacing a waiting idle). And the close, sent as
    # opencode exits, races the manager's reaper: the reaper may close the session first
    # (agent_gone), and the late reports of an agent that is gone never bring it back.
    *shown, end = line
    turn = iter(["attention", "working", "attention"])
    assert end in ("closed:session_end:exit", "closed:agent_gone"), rig.why()
    assert all(status in turn for status in shown), rig.why()  # in order, none made up
    log = (Path(os.environ["XDG_STATE_HOME"]) / "shmstore" / "hook.log").read_text()
    assert "kept in the spool" in log


def test_a_terminal_closed_mid_turn_closes_the_session(rig: Rig, sock_dir: Path) -> None:
    """SIGHUP (the tmux server killed while the model is slow to answer): opencode ends
    the turn and disposes its plugins before it exits, so the session closes (exit), with
    no wait for the reaper."""
    with tmux(sock_dir) as term:
        start_tui(rig, term)
        term.type("slow: 20")
        id = the_session(rig)
        rig.wait_seen(id, "working")
        term.kill()
        line = rig.wait_seen(id, "closed:session_end:exit")
    assert line in A_TURN, rig.why()
