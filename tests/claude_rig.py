"""The real Claude Code CLI, run for a test: a home of its own with shmstore's hooks
installed by ``shmstore install-hooks``, the model API played by :mod:`model_stub`, and
nothing leaving the machine. Print mode runs as a child process; interactive mode runs in a
tmux server of the test's own.

The CLI is the one ``.ci/run`` installs (``.agents/``, pinned to :data:`VERSION`), or the one
``$SHMSTORE_CLAUDE`` names.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

#: The version the event table in README.md was checked against; .ci/run installs it.
VERSION = "2.1.332"
ROOT = Path(__file__).resolve().parent.parent
API_KEY = "sk-ant-test-0123456789abcdefghijklmnop"


def claude_binary() -> str | None:
    named = os.environ.get("SHMSTORE_CLAUDE")
    if named:
        return named
    pinned = ROOT / ".agents" / "node_modules" / ".bin" / "claude"
    return str(pinned) if pinned.exists() else None


class Claude:
    """One home for Claude Code (``home``), a project directory in it (``project``), its
    settings with shmstore's hooks for the manager at ``address`` (``via``: as
    ``install-hooks --via`` makes them), and the environment it runs in (``env``)."""

    def __init__(
        self, binary: str, root: Path, model_url: str, address: str, record: bool = False, via: str = "command"
    ) -> None:
        self.binary, self.root, self.address = binary, root, address
        self.home = root / "home"
        self.project = root / "project"
        self.debug_log = root / "claude-debug.log"
        self.project.mkdir(parents=True)
        (self.home / ".claude").mkdir(parents=True)
        self.env = environment(self.home, model_url, root)
        install = [sys.executable, "-m", "shmstore", "install-hooks", "--address", address, "--via", via]
        install += ["--settings", str(self.settings)]
        subprocess.run(install, check=True, capture_output=True, env=self.env, timeout=60)
        trust = {
            "hasCompletedOnboarding": True,
            "theme": "dark",
            "customApiKeyResponses": {"approved": [API_KEY[-20:]], "rejected": []},
            "projects": {str(self.project): {"hasTrustDialogAccepted": True, "allowedTools": []}},
        }
        (self.home / ".claude.json").write_text(json.dumps(trust))
        self.record = root / "payloads.jsonl"
        if record:
            self._add_recorder()

    def _add_recorder(self) -> None:
        """Put :mod:`hook_recorder` beside shmstore's hook on every event."""
        document = json.loads(self.settings.read_text())
        recorder = f"{sys.executable} {Path(__file__).with_name('hook_recorder.py')} {self.record}"
        for groups in document["hooks"].values():
            groups.append({"hooks": [{"type": "command", "command": recorder, "timeout": 5}]})
        self.settings.write_text(json.dumps(document, indent=2))

    def payloads(self) -> list[dict[str, Any]]:
        """What the recorder saw: each event's payload and its hook's environment."""
        if not self.record.exists():
            return []
        return [json.loads(line) for line in self.record.read_text().splitlines()]

    def stop_daemon(self) -> None:
        """Stop Claude's background service and every process of this home (it outlives
        the CLI that started it)."""
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            argv = [self.binary, "daemon", "stop", "--any"]
            subprocess.run(argv, env=self.env, capture_output=True, timeout=20, cwd=self.project)
        mark = f"HOME={self.home}".encode()
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                with open(f"/proc/{pid}/environ", "rb") as environ:
                    if mark in environ.read().split(b"\0"):
                        os.kill(int(pid), 9)
            except OSError:
                continue

    @property
    def settings(self) -> Path:
        return self.home / ".claude" / "settings.json"

    def hooks(self) -> dict[str, Any]:
        return json.loads(self.settings.read_text())["hooks"]

    def print_mode(self, prompt: str, *flags: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
        """``claude -p PROMPT``, as a script runs it; its debug log goes to ``debug_log``."""
        argv = [self.binary, "-p", prompt, "--debug-file", str(self.debug_log), *flags]
        return subprocess.run(argv, cwd=self.project, env=self.env, capture_output=True, text=True, timeout=timeout)

    def hook_timings(self) -> list[float]:
        """Milliseconds Claude waited for each hook, from its debug log (its own figures)."""
        return hook_timings(self.debug_log.read_text(errors="replace") if self.debug_log.exists() else "")


def environment(home: Path, model_url: str, root: Path) -> dict[str, str]:
    """What Claude Code runs with: a home of its own, the stub for its API, no telemetry,
    no updates, and every other outbound connection refused (a proxy on a closed port)."""
    keep = (
        "PATH",
        "LANG",
        "LC_ALL",
        "TERM",
        "XDG_RUNTIME_DIR",
        "XDG_STATE_HOME",
        "PYTHONPATH",
        "COVERAGE_PROCESS_START",
    )
    env = {name: os.environ[name] for name in keep if name in os.environ}
    env.update(
        HOME=str(home),
        ANTHROPIC_BASE_URL=model_url,
        ANTHROPIC_API_KEY=API_KEY,
        DISABLE_TELEMETRY="1",
        DISABLE_AUTOUPDATER="1",
        DISABLE_ERROR_REPORTING="1",
        CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC="1",
        CLAUDE_CODE_DISABLE_OFFICIAL_MARKETPLACE_AUTOINSTALL="1",
        HTTPS_PROXY="http://127.0.0.1:9",
        HTTP_PROXY="http://127.0.0.1:9",
        NO_PROXY="127.0.0.1,localhost",
        IS_SANDBOX="1",
        CLAUDE_CODE_TMPDIR=str(root / "tmp"),
        TERM=os.environ.get("TERM", "xterm-256color"),
    )
    (root / "tmp").mkdir(exist_ok=True)
    return env


def hook_timings(log: str) -> list[float]:
    """The milliseconds Claude gives each shmstore hook in its debug log ("Hooks: Stop [COMMAND]
    finished with status 0 (55ms)"; SessionEnd's line gives none)."""
    import re

    found = re.findall(r"\[[^\]\n]*shmstore hook[^\]\n]*\] (?:finished|completed) with status -?\d+ \((\d+)ms\)", log)
    return [float(ms) for ms in found]


class Tmux:
    """A tmux server of the test's own (its own socket), holding one interactive Claude."""

    def __init__(self, root: Path) -> None:
        self.socket = str(root / "tmux.sock")

    def __call__(self, *args: str, check: bool = True) -> str:
        result = subprocess.run(["tmux", "-S", self.socket, *args], capture_output=True, text=True, timeout=30)
        if check and result.returncode:
            raise RuntimeError(f"tmux {' '.join(args)}: {result.stderr.strip()}")
        return result.stdout

    def start(self, claude: Claude, *flags: str, name: str = "agent") -> None:
        env = [f"{key}={value}" for key, value in claude.env.items()]
        # Claude's environment only, but for the pane's own ids, which tmux gives the pane's
        # process: what the hook records as the session's terminal.
        keep = 'exec env -i TMUX="$TMUX" TMUX_PANE="$TMUX_PANE" "$@"'
        argv = ["sh", "-c", keep, "sh", *env, claude.binary, "--debug-file", str(claude.debug_log), *flags]
        self("new-session", "-d", "-s", name, "-x", "160", "-y", "48", "-c", str(claude.project), *argv)

    def screen(self, name: str = "agent") -> str:
        return self("capture-pane", "-p", "-t", name, check=False)

    def type(self, text: str, name: str = "agent") -> None:
        self("send-keys", "-t", name, "-l", text)
        time.sleep(0.3)  # the prompt box takes pasted text in one go; Enter must come after it
        self("send-keys", "-t", name, "Enter")

    def keys(self, *keys: str, name: str = "agent") -> None:
        self("send-keys", "-t", name, *keys)

    def wait_for(self, text: str, timeout: float = 30, name: str = "agent") -> str:
        return wait_for(lambda: text in self.screen(name) and self.screen(name), timeout, f"{text!r} on screen")

    def kill(self) -> None:
        self("kill-server", check=False)


def pids_with_environ(entry: bytes) -> set[int]:
    """The processes whose environment holds ``entry`` (``NAME=VALUE``) exactly."""
    found = set()
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        with contextlib.suppress(OSError), open(f"/proc/{name}/environ", "rb") as environ:
            if entry in environ.read().split(b"\0"):
                found.add(int(name))
    return found


def wait_for(predicate: Callable[[], Any], timeout: float = 30, what: str = "it") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {timeout} s for {what}")
        time.sleep(0.1)


@contextlib.contextmanager
def tmux(root: Path) -> Iterator[Tmux]:
    if shutil.which("tmux") is None:
        raise RuntimeError("tmux is missing")
    server = Tmux(root)
    try:
        yield server
    finally:
        server.kill()


def timelines(store: Any) -> dict[str, list[str]]:
    """For each session the feed names, the statuses it showed, in order (a status only
    when it changed; ``closed:REASON`` for its end): what a user watching saw."""
    seen: dict[str, list[str]] = {}
    for event in store.changes(0, limit=10_000).events:
        if event.session is None or event.id is None:
            continue
        session = event.session
        shown = str(session.status)
        if session.closed_reason:
            shown += f":{session.closed_reason}"
        line = seen.setdefault(event.id, [])
        if not line or line[-1] != shown:
            line.append(shown)
    return seen


class AgentRig:
    """What the rig of every real-agent test shares (a manager's ``store``, the agent's
    terminal ``term`` when it runs in one): the timelines the store shows, and waits that
    say, when they fail, what there was to see. An agent's rig adds its CLI, its model
    stand-in and its own steps, and names the agent's own record of events (:meth:`events`)."""

    store: Any
    term: Tmux | None = None

    def events(self) -> object:
        """The agent's side of a failure: what it fired, as its rig records it."""
        return []

    def seen(self) -> dict[str, list[str]]:
        return timelines(self.store)

    def hook_log(self) -> str:
        """What our hooks logged of reports not taken at once (the test's own state directory)."""
        log = Path(os.environ["XDG_STATE_HOME"]) / "shmstore" / "hook.log"
        return log.read_text() if log.exists() else ""

    def why(self) -> str:
        """What a failure shows: the store's timelines, the agent's events, the hook's log, the screen."""
        screen = self.term.screen() if self.term is not None else ""
        return f"seen {self.seen()}; events {self.events()}; hook.log:\n{self.hook_log()[-2000:]}\n{screen}"

    def wait_seen(self, id: str, *statuses: str, timeout: float = 30) -> list[str]:
        """Wait until session ``id`` has shown ``statuses`` last; its whole timeline."""
        want = list(statuses)
        try:
            return wait_for(
                lambda: self.seen().get(id, [])[-len(want) :] == want and self.seen()[id], timeout, str(want)
            )
        except AssertionError as exc:
            raise AssertionError(f"{exc}; {self.why()}") from None

    def only_session(self) -> str:
        """The id of the one session the store holds, once there is one."""
        try:
            [id] = wait_for(lambda: list(self.seen()), 30, "a session")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; {self.why()}") from None
        return str(id)
