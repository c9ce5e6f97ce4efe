"""The real GitHub Copilot CLI, run for a test in its BYOK mode: a home of its own
(``HOME``, and a ``COPILOT_HOME`` apart from it) with shmstore's hooks file installed by
``shmstore install-hooks --agent copilot_cli``, the model API played by
:mod:`openai_chat_stub` (``COPILOT_PROVIDER_BASE_URL``: no GitHub login then), and nothing
leaving the machine (``COPILOT_OFFLINE``, and a proxy on a closed port for anything else).
``copilot -p`` runs as a child process; the interactive TUI runs in a tmux server of the
test's own (:class:`claude_rig.Tmux`).

A second hooks file beside ours, of a user's own, records every payload Copilot sends
(:mod:`hook_recorder`, one file per event: camelCase payloads do not name their event).

The CLI is the one ``.ci/run`` installs (``.agents/``, pinned to :data:`VERSION`), or the one
``$SHMSTORE_COPILOT`` names.
"""

from __future__ import annotations

import collections
import contextlib
import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import claude_rig
from claude_rig import pids_with_environ, wait_for

#: The version the event table in README.md was checked against; .ci/run installs it.
VERSION = "1.0.102"
ROOT = Path(__file__).resolve().parent.parent
API_KEY = "sk-stub-0123456789abcdefghijklmnop"
#: The model the stand-in is named as (any name: BYOK sends it as it is).
MODEL = "gpt-4.1"
RECORDER = Path(__file__).with_name("hook_recorder.py")
#: Every hook event of Copilot CLI, under the camelCase names its hooks reference gives
#: (https://docs.github.com/en/copilot/reference/copilot-cli-reference/cli-hooks-reference):
#: the recorder listens to all of them, whether shmstore installs them or not.
EVENTS = (
    "sessionStart",
    "sessionEnd",
    "userPromptSubmitted",
    "userPromptTransformed",
    "preToolUse",
    "postToolUse",
    "postToolUseFailure",
    "permissionRequest",
    "notification",
    "agentStop",
    "subagentStart",
    "subagentStop",
    "errorOccurred",
    "preCompact",
)


def copilot_binary() -> str | None:
    named = os.environ.get("SHMSTORE_COPILOT")
    if named:
        return named
    pinned = ROOT / ".agents" / "node_modules" / ".bin" / "copilot"
    return str(pinned) if pinned.exists() else None


def unpack(binary: str, root: Path) -> Path:
    """Copilot's program files (its JavaScript and assets, 235 MB) unpacked into ``root``, as
    its first run in a home unpacks them into the home's cache (``~/.cache/copilot/pkg``):
    for ``COPILOT_CLI_DIST_DIR``, so that each test's home does not unpack them again (over
    a second of CPU and 235 MB written, each). Copilot only reads them, but for an in-use
    marker file per process."""
    env = {"PATH": os.environ["PATH"], "HOME": str(root), "XDG_CACHE_HOME": str(root / "cache")}
    env.update(COPILOT_OFFLINE="true", COPILOT_AUTO_UPDATE="false")
    subprocess.run([binary, "--version"], env=env, check=True, capture_output=True, timeout=120)
    [dist] = [path.parent for path in (root / "cache" / "copilot" / "pkg").glob("*/*/.extraction-complete")]
    return dist


class Copilot:
    """One home for Copilot CLI (``home``; its configuration and state in ``copilot_home``,
    its ``COPILOT_HOME``), a project directory it trusts (``project``), shmstore's hooks
    file for the manager at ``address`` as ``install-hooks`` writes it, the recorder's
    hooks file beside it, and the environment Copilot runs in (``env``; with its program
    files from ``dist`` when given, see :func:`unpack`)."""

    def __init__(self, binary: str, root: Path, model_url: str, address: str, dist: Path | None = None) -> None:
        self.binary, self.root, self.address = binary, root, address
        self.home = root / "home"
        self.copilot_home = root / "copilot"
        self.project = root / "project"
        self.record = root / "payloads"
        for directory in (self.home, self.copilot_home / "hooks", self.project, self.record):
            directory.mkdir(parents=True)
        self.env = environment(self.home, self.copilot_home, model_url)
        if dist is not None:
            self.env["COPILOT_CLI_DIST_DIR"] = str(dist)
        install = [sys.executable, "-m", "shmstore", "install-hooks", "--agent", "copilot_cli", "--address", address]
        install += ["--settings", str(self.hooks_file)]
        subprocess.run(install, check=True, capture_output=True, env=self.env, timeout=60)
        self._trust(self.project)
        self._add_recorder()

    @property
    def hooks_file(self) -> Path:
        """Ours, where ``install-hooks`` puts it by default under ``COPILOT_HOME`` (the test of
        the hooks file checks it; the install names it, as the other rigs do)."""
        return self.copilot_home / "hooks" / "shmstore.json"

    def hooks(self) -> dict[str, Any]:
        return json.loads(self.hooks_file.read_text())["hooks"]

    def _trust(self, folder: Path) -> None:
        """Trust ``folder`` as the TUI's folder-trust dialog does when told to remember it
        (its "Yes, and remember this folder": ``trustedFolders`` in ``config.json``). Before
        the answer Copilot loads no hooks and takes no prompt; in print mode it never asks."""
        (self.copilot_home / "config.json").write_text(json.dumps({"trustedFolders": [str(folder)]}))

    def _add_recorder(self) -> None:
        """A hooks file of a user's own beside ours: :mod:`hook_recorder` on every event,
        each to a file named after its event."""
        command = f"{sys.executable} {RECORDER} {self.record}/"
        hooks = {event: [{"type": "command", "bash": f"{command}{event}.jsonl", "timeoutSec": 5}] for event in EVENTS}
        document = {"version": 1, "hooks": hooks}
        (self.copilot_home / "hooks" / "recorder.json").write_text(json.dumps(document, indent=2))

    def payloads(self) -> list[tuple[str, dict[str, Any]]]:
        """What the recorder saw: each event's name and payload, in the order Copilot
        fired them (by the payload's ``timestamp``: hooks of different events may run
        at once, so the files' own order says less)."""
        seen = [(path.stem, entry["payload"]) for path in self.record.glob("*.jsonl") for entry in json_lines(path)]
        return sorted(seen, key=lambda item: item[1]["timestamp"])

    def events(self) -> list[str]:
        return [event for event, _ in self.payloads()]

    def ran(self) -> collections.Counter[str]:
        """How many times Copilot ran the hooks of each event, by its own account: a
        ``hook.start`` line in a session's log for each (its ``input`` is the payload, but
        preToolUse's there is of another shape: so counted, not compared)."""
        return collections.Counter(
            entry["data"]["hookType"]
            for path in self.copilot_home.glob("session-state/*/events.jsonl")
            for entry in json_lines(path)
            if entry.get("type") == "hook.start"
        )

    def session_log(self, session: str) -> list[dict[str, Any]]:
        """The session's own event log, ``COPILOT_HOME/session-state/ID/events.jsonl``."""
        return json_lines(self.copilot_home / "session-state" / session / "events.jsonl")

    def aborts(self, session: str) -> list[float]:
        """When the session's log says a turn was aborted (Esc at a permission prompt,
        Ctrl-C), as epoch seconds: no hook fires for it."""
        return [log_time(entry) for entry in self.session_log(session) if entry.get("type") == "abort"]

    def print_mode(self, prompt: str, *flags: str) -> subprocess.Popen[str]:
        """``copilot -p PROMPT FLAGS...`` started, as a script runs it."""
        argv = [self.binary, "-p", prompt, *flags]
        return subprocess.Popen(
            argv, cwd=self.project, env=self.env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True,
        )  # fmt: skip

    def stop(self) -> None:
        """End every process still left of this home, by its id: the CLI, its hooks, and
        the watchers shmstore's hook started for a question (:mod:`shmstore.hook.settle`;
        they end with the CLI, within a quarter of a second), found by the ``COPILOT_HOME``
        in their environment. Never by a name pattern: other tests run Copilot at once."""
        mark = f"COPILOT_HOME={self.copilot_home}".encode()
        for pid in pids_with_environ(mark) - {os.getpid()}:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not pids_with_environ(mark), 10, "the home's processes to end")


def environment(home: Path, copilot_home: Path, model_url: str) -> dict[str, str]:
    """What Copilot runs with: a home of its own, the stand-in as its provider (BYOK: no
    login), offline (no authentication, telemetry, update or web tools), and every other
    outbound connection refused (a proxy on a closed port) but the loopback's. No GitHub
    token is passed on."""
    keep = ("PATH", "LANG", "LC_ALL", "XDG_RUNTIME_DIR", "XDG_STATE_HOME", "PYTHONPATH", "COVERAGE_PROCESS_START")
    env = {name: os.environ[name] for name in keep if name in os.environ}
    env.update(
        HOME=str(home),
        COPILOT_HOME=str(copilot_home),
        COPILOT_OFFLINE="true",
        COPILOT_PROVIDER_BASE_URL=model_url,
        COPILOT_PROVIDER_TYPE="openai",
        COPILOT_PROVIDER_API_KEY=API_KEY,
        COPILOT_MODEL=MODEL,
        COPILOT_AUTO_UPDATE="false",
        TERM="xterm-256color",
        HTTPS_PROXY="http://127.0.0.1:9",
        HTTP_PROXY="http://127.0.0.1:9",
        ALL_PROXY="http://127.0.0.1:9",
        NO_PROXY="127.0.0.1,localhost",
    )
    return env


class Tmux(claude_rig.Tmux):
    """A tmux server of the test's own (its own socket), holding one interactive Copilot."""

    def start(self, copilot: Copilot, *flags: str, name: str = "agent") -> None:  # type: ignore[override]
        env = [f"{key}={value}" for key, value in copilot.env.items()]
        argv = ["env", "-i", *env, copilot.binary, *flags]
        self("new-session", "-d", "-s", name, "-x", "160", "-y", "48", "-c", str(copilot.project), *argv)


@contextlib.contextmanager
def tmux(root: Path) -> Iterator[Tmux]:
    if shutil.which("tmux") is None:
        raise RuntimeError("tmux is missing")
    server = Tmux(root)
    try:
        yield server
    finally:
        server.kill()


def json_lines(path: Path) -> list[dict[str, Any]]:
    """The whole lines of a JSON-lines file another process appends to (none yet: none):
    a last line still being written is left for the next look."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.split("\n")[:-1] if line.strip()]


def log_time(entry: dict[str, Any]) -> float:
    """An event log entry's ``timestamp`` (ISO 8601, UTC) as epoch seconds."""
    return datetime.datetime.fromisoformat(entry["timestamp"].replace("Z", "+00:00")).timestamp()
