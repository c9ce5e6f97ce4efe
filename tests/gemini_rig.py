"""The real Gemini CLI, run for a test: a home of its own with shmstore's hooks installed by
``shmstore install-hooks --agent gemini_cli``, the model API played by :mod:`gemini_stub`,
and nothing leaving the machine. Print mode runs as a child process; interactive mode runs
in a tmux server of the test's own (:class:`Tmux`), from a shell, as in a user's terminal.

The CLI is the one ``.ci/run`` installs (``.agents/``, pinned to :data:`VERSION`), or the one
``$SHMSTORE_GEMINI`` names.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import claude_rig

#: The version the event table in shmstore/agents/gemini.py was checked against; .ci/run installs it.
VERSION = "0.61.0"
ROOT = Path(__file__).resolve().parent.parent
API_KEY = "stub-key-0123456789abcdefghijklmnop"
#: The recorder beside ours: its timeout in milliseconds, as Gemini CLI takes it.
RECORDER = Path(__file__).with_name("hook_recorder.py")
RECORDER_TIMEOUT_MS = 5000
#: What the interactive CLI shows while it responds (beside its spinner), and not after.
BUSY = "esc to cancel"
#: Seconds the spinner must stay away before the CLI counts as done with its turn.
IDLE_FOR = 0.3

#: What a first run would ask in dialogs, answered: the auth type (an API key: the stub's
#: base URL applies to it; "gateway" is refused), a theme, no update checks, no telemetry.
BASE_SETTINGS = {
    "general": {"enableAutoUpdate": False, "enableAutoUpdateNotification": False},
    "ui": {"theme": "Default", "hideTips": True, "hideBanner": True},
    "privacy": {"usageStatisticsEnabled": False},
    "telemetry": {"enabled": False},
    "security": {"auth": {"selectedType": "gemini-api-key"}},
}


def gemini_binary() -> str | None:
    named = os.environ.get("SHMSTORE_GEMINI")
    if named:
        return named
    pinned = ROOT / ".agents" / "node_modules" / ".bin" / "gemini"
    return str(pinned) if pinned.exists() else None


class Gemini:
    """One home for Gemini CLI (``home``), a project directory it trusts (``project``), its
    settings with shmstore's hooks for the manager at ``address`` as ``install-hooks``
    writes them, and the environment it runs in (``env``). With ``record``,
    :mod:`hook_recorder` is beside ours on every event of ours."""

    def __init__(self, binary: str, root: Path, model_url: str, address: str, record: bool = False) -> None:
        self.binary, self.root, self.address = binary, root, address
        self.home = root / "home"
        self.project = root / "project"
        self.record = root / "payloads.jsonl"
        self.project.mkdir(parents=True)
        (self.home / ".gemini").mkdir(parents=True)
        self.env = environment(self.home, model_url, root)
        self.settings.write_text(json.dumps(BASE_SETTINGS, indent=2))
        # Folder trust stays on, as a user has it: hooks run only in a trusted folder, and
        # an untrusted one would first ask (interactive) or refuse to run (print mode).
        trusted = {str(self.project): "TRUST_FOLDER"}
        (self.home / ".gemini" / "trustedFolders.json").write_text(json.dumps(trusted))
        install = [sys.executable, "-m", "shmstore", "install-hooks", "--agent", "gemini_cli", "--address", address]
        install += ["--settings", str(self.settings)]
        subprocess.run(install, check=True, capture_output=True, env=self.env, timeout=60)
        if record:
            self._add_recorder()

    @property
    def settings(self) -> Path:
        return self.home / ".gemini" / "settings.json"

    def hooks(self) -> dict[str, Any]:
        hooks: dict[str, Any] = json.loads(self.settings.read_text())["hooks"]
        return hooks

    def _add_recorder(self) -> None:
        """Put :mod:`hook_recorder` beside shmstore's hook on every event ours is on. Gemini
        runs the hooks of one event in parallel, and fires the next event only when they
        are done (SessionEnd excepted): the file's lines are in the events' order."""
        document = json.loads(self.settings.read_text())
        recorder = f"{sys.executable} {RECORDER} {self.record}"
        entry = {"type": "command", "name": "recorder", "command": recorder, "timeout": RECORDER_TIMEOUT_MS}
        for groups in document["hooks"].values():
            groups.append({"hooks": [entry]})
        self.settings.write_text(json.dumps(document, indent=2))

    def payloads(self) -> list[dict[str, Any]]:
        """What the recorder saw: each event's payload, in order."""
        if not self.record.exists():
            return []
        return [json.loads(line)["payload"] for line in self.record.read_text().splitlines()]

    def events(self) -> list[str]:
        return [payload["hook_event_name"] for payload in self.payloads()]

    def print_mode(self, prompt: str, *flags: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """``gemini -p PROMPT``, as a script runs it."""
        argv = [self.binary, "-p", prompt, *flags]
        return subprocess.run(argv, cwd=self.project, env=self.env, capture_output=True, text=True, timeout=timeout)

    def transcripts(self) -> list[Path]:
        """The sessions' transcripts (JSON lines), where the CLI writes what no event tells."""
        return sorted((self.home / ".gemini" / "tmp").glob("*/chats/*.jsonl"))

    def processes(self) -> dict[int, list[str]]:
        """Every process of this home, by pid, with its argv: the CLI, the hooks it runs
        (each inherits its environment), and what those start. Found by the home in their
        environment, never by a name: other tests run Gemini CLI at the same time."""
        mark = f"HOME={self.home}".encode()
        found = {}
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            with contextlib.suppress(OSError):
                with open(f"/proc/{name}/environ", "rb") as environ:
                    if mark not in environ.read().split(b"\0"):
                        continue
                with open(f"/proc/{name}/cmdline", "rb") as cmdline:
                    found[int(name)] = [arg.decode(errors="replace") for arg in cmdline.read().split(b"\0") if arg]
        return found

    def watchers(self) -> list[int]:
        """The transcript watchers a question's hook started (:mod:`shmstore.hook.settle`)."""
        return [pid for pid, argv in self.processes().items() if "shmstore.hook.settle" in argv]

    def kill_all(self) -> None:
        """Kill every process left of this home (a test that failed half-way leaves the CLI)."""
        for pid in set(self.processes()) - {os.getpid()}:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


class Tmux(claude_rig.Tmux):
    """A tmux server of the test's own (its own socket), holding one interactive Gemini CLI."""

    def start(self, gemini: Gemini, *flags: str, name: str = "agent") -> None:  # type: ignore[override]
        """The CLI in a new window, run by a shell that stays when it exits, as in a user's
        terminal. (A window whose own process is the CLI is hung up as the CLI exits: the
        exit of a terminal's controlling process sends SIGHUP to its foreground process
        group, and the hooks still running die, among them the last SessionEnd's, which the
        CLI does not wait for: seen in 2 of 8 runs of the /quit test on a loaded machine.)
        The shell writes the CLI's exit status to :meth:`exit_file`."""
        env = [f"{key}={value}" for key, value in gemini.env.items()]
        script = f'"$@"; echo $? > {shlex.quote(str(self.exit_file(name)))}; exec sleep 3600'
        argv = ["sh", "-c", script, "sh", "env", "-i", *env, gemini.binary, *flags]
        self("new-session", "-d", "-s", name, "-x", "160", "-y", "48", "-c", str(gemini.project), *argv)

    def exit_file(self, name: str = "agent") -> Path:
        return Path(self.socket).with_name(f"{name}.exit")

    def type(self, text: str, name: str = "agent") -> None:
        """``text`` typed into the prompt and submitted, as a user does it: once the CLI is
        done with its turn, and with Enter once the prompt shows the text.

        * While the CLI still responds (its spinner, :data:`BUSY`, is up: AfterAgent's hooks
          run then), it refuses a slash command ("Slash commands cannot be queued") and
          leaves it in the prompt (:meth:`idle`).
        * It takes an Enter read within 30 ms of a typed character as a newline, not as a
          submission (``bufferFastReturn``, ``FAST_RETURN_TIMEOUT = 30`` in 0.61.0's bundle,
          used without the kitty keyboard protocol, which tmux does not speak): a fixed
          pause after the text says nothing of when a busy CLI reads it; text on screen
          has been read."""
        self.idle(name)
        self("send-keys", "-t", name, "-l", text)
        claude_rig.wait_for(lambda: self.prompt(name) == text, 30, f"{text!r} in the prompt")
        time.sleep(0.1)  # past the 30 ms, counted from when the CLI read the last character
        self("send-keys", "-t", name, "Enter")

    def idle(self, name: str = "agent") -> None:
        """Wait until the CLI's spinner has stayed off the screen for :data:`IDLE_FOR`
        seconds. One capture is not enough: it may catch the screen mid-redraw, with the
        spinner's line half written over (seen as "? for shortcuts" on it, the CLI still
        responding); the spinner, animated, is redrawn many times a second while it is up."""
        quiet = [time.monotonic()]

        def settled() -> bool:
            now = time.monotonic()
            if BUSY in self.screen(name):
                quiet[0] = now
            return now - quiet[0] >= IDLE_FOR

        claude_rig.wait_for(settled, 30, "the CLI to finish its turn")

    def prompt(self, name: str = "agent") -> str | None:
        """The text in the CLI's prompt: its last line that begins with ``>`` (those above
        it are the prompts of past turns; a completion list and the footer come below)."""
        lines = [line.strip() for line in self.screen(name).splitlines() if line.strip().startswith(">")]
        return lines[-1][1:].strip() if lines else None

    def alive(self, name: str = "agent") -> bool:
        """Whether the CLI still runs (its shell has not written its exit status)."""
        return not self.exit_file(name).exists()


@contextlib.contextmanager
def tmux(root: Path) -> Iterator[Tmux]:
    if shutil.which("tmux") is None:
        raise RuntimeError("tmux is missing")
    server = Tmux(root)
    try:
        yield server
    finally:
        server.kill()


def environment(home: Path, model_url: str, root: Path) -> dict[str, str]:
    """What Gemini CLI runs with: a home of its own, the stub for its API, no telemetry, and
    every other outbound connection refused (a proxy on a closed port). The CLI relaunches
    itself for a bigger heap, as it does for a user: the hooks' parent is that child."""
    keep = ("PATH", "LANG", "LC_ALL", "XDG_RUNTIME_DIR", "XDG_STATE_HOME", "PYTHONPATH", "COVERAGE_PROCESS_START")
    env = {name: os.environ[name] for name in keep if name in os.environ}
    env.update(
        HOME=str(home),
        GEMINI_API_KEY=API_KEY,
        GOOGLE_GEMINI_BASE_URL=model_url,
        GEMINI_TELEMETRY_ENABLED="false",
        HTTPS_PROXY="http://127.0.0.1:9",
        HTTP_PROXY="http://127.0.0.1:9",
        NO_PROXY="127.0.0.1,localhost",
        TMPDIR=str(root / "tmp"),
        TERM="xterm-256color",
    )
    (root / "tmp").mkdir(exist_ok=True)
    return env
