"""Claude Code hooks: what each hook event means for a session, and how the hook command
gets into Claude Code's settings, and the hook's run itself (:func:`run_hook`).

Claude Code runs the configured hook commands on its events and passes each a JSON payload
on stdin with at least ``session_id``, ``cwd`` and ``hook_event_name``, plus fields of the
event's own (``tool_name`` for tool events, ``notification_type`` and ``message`` for
notifications, ``source`` for session start, ``reason`` for session end). ``shmstore hook``
turns one payload into one atomic ``report`` on the store.
"""

from __future__ import annotations

import datetime
import json
import os
import shlex
import shutil
import signal
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, BinaryIO

from .checks import check_dir, check_id
from .client import Client
from .errors import ValidationError
from .model import Status
from .procs import process_stat

#: The status each hook event puts a session in. :func:`status_for` refines three of them.
EVENT_STATUS: Mapping[str, Status] = {
    "SessionStart": Status.ATTENTION,  # a new or resumed session waits for the first prompt
    "UserPromptSubmit": Status.WORKING,
    "PreToolUse": Status.WORKING,
    "PostToolUse": Status.WORKING,
    "PostToolUseFailure": Status.WORKING,
    "SubagentStop": Status.WORKING,  # the main agent carries on
    "PreCompact": Status.WORKING,
    "PermissionRequest": Status.QUESTION,
    "Notification": Status.ATTENTION,
    "Stop": Status.ATTENTION,  # the turn is over: the user's move
    "SessionEnd": Status.CLOSED,
}

#: Notification types that ask the user something (rather than only wait for them).
QUESTION_NOTIFICATIONS = frozenset({"permission_prompt", "elicitation_dialog"})
#: The tool with which the agent asks the user a question.
ASK_TOOL = "AskUserQuestion"
#: The largest payload read from stdin.
MAX_PAYLOAD = 1 << 20


def status_for(payload: Mapping[str, Any]) -> Status | None:
    """The status a hook payload reports, or None for an event that says nothing of it."""
    event = payload.get("hook_event_name")
    if event == "PreToolUse" and payload.get("tool_name") == ASK_TOOL:
        return Status.QUESTION
    if event == "Notification":
        kind = payload.get("notification_type")
        message = str(payload.get("message", "")).lower()
        if kind in QUESTION_NOTIFICATIONS or (kind is None and "permission" in message):
            return Status.QUESTION
        return Status.ATTENTION
    if event == "SessionStart" and payload.get("source") == "compact":
        return Status.WORKING  # compaction happens mid-task
    return EVENT_STATUS.get(event) if isinstance(event, str) else None


def read_payload(stream: BinaryIO) -> dict[str, Any]:
    """One hook payload from ``stream``, checked for the fields a report needs."""
    raw = stream.read(MAX_PAYLOAD + 1)
    if len(raw) > MAX_PAYLOAD:
        raise ValidationError("payload", f"is larger than {MAX_PAYLOAD} bytes")
    try:
        payload = json.loads(raw)
    except ValueError as exc:
        raise ValidationError("payload", f"is not JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise ValidationError("payload", f"must be a JSON object, not {type(payload).__name__}")
    check_id(payload.get("session_id"), "session_id")
    check_dir(payload.get("cwd"), "cwd")
    if not isinstance(payload.get("hook_event_name"), str):
        raise ValidationError("hook_event_name", "is missing")
    return payload


_SHELLS = frozenset({"sh", "bash", "dash", "zsh", "ksh", "fish"})


def agent_pid() -> int:
    """The agent's process: our parent, or its parent when the parent is the shell the
    agent ran the hook command in."""
    pid = os.getppid()
    for _ in range(3):
        stat = process_stat(pid)
        if stat is None:
            break  # no /proc: the parent is the best we know
        if stat.name not in _SHELLS or stat.parent <= 1:
            break
        pid = stat.parent
    return pid


# -- running -------------------------------------------------------------------------------

#: The longest `shmstore hook` may take: an agent waits for its hooks.
HOOK_DEADLINE = 0.9


class _DeadlineError(Exception):
    pass


def run_hook(stream: BinaryIO, address: str | None, timeout: float, pid: int | None = None) -> int:
    """Report one hook payload read from ``stream``. Whatever goes wrong, return 0 within
    HOOK_DEADLINE seconds and say why on stderr: a status display must never block or fail
    the agent. The deadline is a SIGALRM timer, so it also cuts short a hung read."""

    def expire(signum: int, frame: Any) -> None:
        raise _DeadlineError(f"gave up after {HOOK_DEADLINE} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, HOOK_DEADLINE)
    try:
        payload = read_payload(stream)
        status = status_for(payload)
        if status is None:
            print(f"shmstore hook: ignored event {payload['hook_event_name']!r}", file=sys.stderr)
            return 0
        id = payload["session_id"]
        with Client(address, timeout=min(timeout, HOOK_DEADLINE / 2)) as store:
            store.report(id, status, payload["cwd"], pid=pid or agent_pid(), session_id=id)
    except (Exception, _DeadlineError) as exc:
        print(f"shmstore hook: not reported ({exc}); the agent carries on", file=sys.stderr)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    return 0


# -- installing ------------------------------------------------------------------------------

#: Seconds Claude Code gives the hook command (it needs about one).
HOOK_TIMEOUT = 5


def default_settings() -> Path:
    return Path.home() / ".claude" / "settings.json"


def hook_command(address: str | None = None) -> str:
    """The command to install: this interpreter running ``shmstore hook``, so it works
    whatever PATH the agent has."""
    command = f"{shlex.quote(sys.executable)} -m shmstore hook"
    return command if address is None else f"{command} --address {shlex.quote(address)}"


def merge_hooks(settings: dict[str, Any], command: str) -> list[str]:
    """Add ``command`` to every event of :data:`EVENT_STATUS` in ``settings`` (in place),
    keeping every other key and hook; returns the events it was added to (none when it
    is there already)."""
    hooks = settings.setdefault("hooks", {})
    if not isinstance(hooks, dict):
        raise ValidationError("hooks", f"in the settings must be an object, not {type(hooks).__name__}")
    added = []
    for event in EVENT_STATUS:
        groups = hooks.setdefault(event, [])
        if not isinstance(groups, list):
            raise ValidationError(f"hooks.{event}", f"in the settings must be a list, not {type(groups).__name__}")
        present = any(
            isinstance(group, dict)
            and any(isinstance(h, dict) and h.get("command") == command for h in group.get("hooks", []))
            for group in groups
        )
        if not present:
            groups.append({"hooks": [{"type": "command", "command": command, "timeout": HOOK_TIMEOUT}]})
            added.append(event)
    return added


def install(path: Path, command: str, *, dry_run: bool = False) -> tuple[list[str], str, Path | None]:
    """Merge the hook into the settings file at ``path``.

    Returns the events added, the settings as they are (or would be) written, and the
    backup of the old file (None when nothing was written or there was no old file).
    Writes nothing when nothing changes, or with ``dry_run``.
    """
    try:
        text = path.read_text()
    except FileNotFoundError:
        text = ""
    try:
        settings = json.loads(text) if text.strip() else {}
    except ValueError as exc:
        raise ValidationError("settings", f"{path} is not JSON: {exc}") from None
    if not isinstance(settings, dict):
        raise ValidationError("settings", f"{path} must hold a JSON object")
    added = merge_hooks(settings, command)
    result = json.dumps(settings, indent=2, ensure_ascii=False) + "\n"
    if dry_run or not added:
        return added, result, None
    backup = None
    path.parent.mkdir(parents=True, exist_ok=True)
    if text:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        backup = path.with_name(f"{path.name}.{stamp}.bak")
        shutil.copy2(path, backup)
    temporary = path.with_name(f".{path.name}.shmstore-tmp")
    temporary.write_text(result)
    if text:
        shutil.copymode(path, temporary)
    os.replace(temporary, path)
    return added, result, backup
