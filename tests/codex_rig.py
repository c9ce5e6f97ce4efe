"""The real Codex CLI, run for a test: a ``CODEX_HOME`` of its own with shmstore's hooks
installed by ``shmstore install-hooks --agent codex`` (which trusts them in its
``config.toml``, as a user gets them: no ``--dangerously-bypass-hook-trust``), the model
API played by :mod:`responses_stub`, and nothing leaving the machine. ``codex exec`` runs as
a child process; the interactive TUI runs in a tmux server of the test's own (:class:`Tmux`).

The TUI, as a user starts it, runs its sessions in a shared background server (``codex
app-server``) that it starts for the ``CODEX_HOME`` and that outlives it: :meth:`Codex.stop_daemon`
ends it and every process left of the home.

The CLI is the one ``.ci/run`` installs (``.agents/``, pinned to :data:`VERSION`), or the one
``$SHMSTORE_CODEX`` names.
"""

from __future__ import annotations

import contextlib
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

from shmstore.agents import codex as adapter

#: The version the event table in README.md was checked against; .ci/run installs it.
VERSION = "0.171.0"
ROOT = Path(__file__).resolve().parent.parent
API_KEY = "sk-stub-0123456789abcdefghijklmnop"
#: The recorder's handler in hooks.json (its timeout in seconds, as Codex takes it).
RECORDER = Path(__file__).with_name("hook_recorder.py")
RECORDER_TIMEOUT = 5


def codex_binary() -> str | None:
    named = os.environ.get("SHMSTORE_CODEX")
    if named:
        return named
    pinned = ROOT / ".agents" / "node_modules" / ".bin" / "codex"
    return str(pinned) if pinned.exists() else None


class Codex:
    """One home for Codex (``home``, its ``CODEX_HOME``, in a user's home ``root/home``), a
    project directory (``project``, a git repository Codex trusts), shmstore's hooks for the
    manager at ``address`` as ``install-hooks`` writes them, and the environment Codex runs
    in (``env``). With ``record``, :mod:`hook_recorder` is beside ours on every event. With
    ``linked``, ``~/.codex`` is a symlink to a directory elsewhere (as dotfiles managers
    make it), and is named so everywhere: in ``CODEX_HOME`` and to ``install-hooks``."""

    def __init__(
        self, binary: str, root: Path, model_url: str, address: str, record: bool = False, linked: bool = False
    ) -> None:
        self.binary, self.root, self.address = binary, root, address
        self.home = root / "home" / ".codex"
        self.project = root / "project"
        self.record = root / "payloads.jsonl"
        self.project.mkdir(parents=True)
        self.home.parent.mkdir()
        if linked:
            (root / "dotfiles" / "codex").mkdir(parents=True)
            self.home.symlink_to(root / "dotfiles" / "codex", target_is_directory=True)
        else:
            self.home.mkdir()
        subprocess.run(["git", "init", "-q", str(self.project)], check=True, timeout=30)
        self.env = environment(root / "home", self.home)
        self.config.write_text(config_toml(model_url, self.project))
        self.shmstore("install-hooks", "--address", address)
        if record:
            self._add_recorder()

    def shmstore(self, command: str, *args: str) -> subprocess.CompletedProcess[str]:
        """``shmstore COMMAND --agent codex --settings HOOKS_FILE ARGS...`` (``install-hooks``,
        ``uninstall-hooks``), as a user runs it in Codex's environment."""
        argv = [sys.executable, "-m", "shmstore", command, "--agent", "codex"]
        argv += ["--settings", str(self.hooks_file), *args]
        return subprocess.run(argv, check=True, capture_output=True, text=True, env=self.env, timeout=60)

    @property
    def hooks_file(self) -> Path:
        return self.home / "hooks.json"

    @property
    def config(self) -> Path:
        return self.home / "config.toml"

    def _add_recorder(self) -> None:
        """Put :mod:`hook_recorder` beside shmstore's hook on every event (a group after
        ours), trusted as Codex's "Trust all and continue" would: Codex runs no hook of the
        user's without it. Our own hooks keep the trust ``install-hooks`` gave them."""
        document = json.loads(self.hooks_file.read_text())
        command = f"{sys.executable} {RECORDER} {self.record}"
        lines = []
        for event, groups in document["hooks"].items():
            key = f"{self.hooks_file}:{snake_case(event)}:{len(groups)}:0"
            groups.append({"hooks": [{"type": "command", "command": command, "timeout": RECORDER_TIMEOUT}]})
            digest = adapter.trust_hash(event, command, RECORDER_TIMEOUT)
            lines += ["", f"[hooks.state.{json.dumps(key)}]", f"trusted_hash = {json.dumps(digest)}"]
        self.hooks_file.write_text(json.dumps(document, indent=2))
        with self.config.open("a") as config:
            config.write("\n".join(lines) + "\n")

    def payloads(self) -> list[dict[str, Any]]:
        """What the recorder saw: each event's payload, in the order Codex fired them."""
        if not self.record.exists():
            return []
        return [json.loads(line) for line in self.record.read_text().splitlines()]

    def events(self) -> list[str]:
        return [seen["payload"]["hook_event_name"] for seen in self.payloads()]

    def exec(self, prompt: str, *flags: str) -> subprocess.Popen[str]:
        """``codex exec FLAGS PROMPT`` started, as a script runs it (its stdin closed: with
        a pipe there, Codex reads more of the prompt from it)."""
        argv = [self.binary, "exec", *flags, prompt]
        return subprocess.Popen(
            argv, cwd=self.project, env=self.env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True,
        )  # fmt: skip

    def command(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        """``codex ARGS...`` run to its end in the project, in the home's environment."""
        argv = [self.binary, *args]
        return subprocess.run(argv, cwd=self.project, env=self.env, capture_output=True, text=True, timeout=timeout)

    def daemon_pids(self) -> list[int]:
        """The processes of this home's background server: run from the copy of Codex it
        keeps in the home (``packages/app-server-daemon``: the server and its updater loop)."""
        marks = tuple({str(home / "packages" / "app-server-daemon") for home in (self.home, self.home.resolve())})
        return [pid for pid, argv in _processes() if argv and argv[0].startswith(marks)]

    def stop_daemon(self) -> None:
        """Stop this home's background server as a user would (``codex app-server daemon
        stop``: it ends the sessions it holds, SessionEnd), give what it ran last (those
        SessionEnd hooks) a few seconds to end, then kill every process still left of the
        home: the updater loop that ``daemon stop`` leaves, and anything else. Never by a
        name pattern: other tests run Codex at the same time."""
        if self.daemon_pids():
            with contextlib.suppress(subprocess.SubprocessError, OSError):
                self.command("app-server", "daemon", "stop", timeout=20)
        with contextlib.suppress(AssertionError):
            wait_for(lambda: not self._left(updater=False), 5, "the server's last hooks")
        for pid in self._left():
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not self._left(), 10, "the home's processes to end")

    def _left(self, updater: bool = True) -> set[int]:
        """The processes of this home: its server's, and any whose environment names this
        ``CODEX_HOME`` (Codex, its hooks: Codex adds it to theirs); without the ``updater``
        loop, which runs until it is killed."""
        mark = f"CODEX_HOME={self.home}".encode()
        found = set(self.daemon_pids()) | pids_with_environ(mark)
        if not updater:
            found -= {pid for pid, argv in _processes() if "pid-update-loop" in argv}
        return found - {os.getpid()}


class Tmux(claude_rig.Tmux):
    """A tmux server of the test's own (its own socket), holding one interactive Codex."""

    def start(self, codex: Codex, *flags: str, name: str = "agent") -> None:  # type: ignore[override]
        env = [f"{key}={value}" for key, value in codex.env.items()]
        argv = ["env", "-i", *env, codex.binary, *flags]
        self("new-session", "-d", "-s", name, "-x", "160", "-y", "48", "-c", str(codex.project), *argv)

    def alive(self, name: str = "agent") -> bool:
        """Whether the pane still runs: tmux closes it when Codex exits (and, the last one, ends)."""
        argv = ["tmux", "-S", self.socket, "has-session", "-t", name]
        return subprocess.run(argv, capture_output=True, timeout=30).returncode == 0


@contextlib.contextmanager
def tmux(root: Path) -> Iterator[Tmux]:
    if shutil.which("tmux") is None:
        raise RuntimeError("tmux is missing")
    server = Tmux(root)
    try:
        yield server
    finally:
        server.kill()


def environment(home: Path, codex_home: Path) -> dict[str, str]:
    """What Codex runs with: a home of its own, no updates, the key the stub's provider
    names, hooks run by bash (``$SHELL -lc``), and every outbound connection refused (a
    proxy on a closed port) but the loopback's."""
    keep = ("PATH", "LANG", "LC_ALL", "XDG_RUNTIME_DIR", "XDG_STATE_HOME", "PYTHONPATH", "COVERAGE_PROCESS_START")
    env = {name: os.environ[name] for name in keep if name in os.environ}
    env.update(
        HOME=str(home),
        CODEX_HOME=str(codex_home),
        STUB_API_KEY=API_KEY,
        SHELL="/bin/bash",
        TERM="xterm-256color",
        HTTPS_PROXY="http://127.0.0.1:9",
        HTTP_PROXY="http://127.0.0.1:9",
        ALL_PROXY="http://127.0.0.1:9",
        NO_PROXY="127.0.0.1,localhost",
    )
    return env


def config_toml(model_url: str, project: Path) -> str:
    """Codex's ``config.toml`` before the install: the stub as its model provider (no
    login then, and no retries of a failed request), no update check, no analytics, and
    the project trusted (no trust dialog)."""
    return f"""model = "stub-model"
model_provider = "stub"
check_for_update_on_startup = false

[model_providers.stub]
name = "Stub"
base_url = {json.dumps(model_url)}
env_key = "STUB_API_KEY"
wire_api = "responses"
request_max_retries = 0
stream_max_retries = 0

[analytics]
enabled = false

[projects.{json.dumps(str(project))}]
trust_level = "trusted"
"""


def snake_case(event: str) -> str:
    """An event's name as a trust key spells it: ``PreToolUse`` is ``pre_tool_use``."""
    return "".join(f"_{c.lower()}" if c.isupper() and i else c.lower() for i, c in enumerate(event))


def _processes() -> list[tuple[int, list[str]]]:
    """Every process's pid and argv (those that end meanwhile, or are not ours, left out)."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        with contextlib.suppress(OSError), open(f"/proc/{name}/cmdline", "rb") as cmdline:
            found.append((int(name), [arg.decode(errors="replace") for arg in cmdline.read().split(b"\0") if arg]))
    return found
