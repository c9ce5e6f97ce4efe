"""Gemini CLI: what its hook events mean for a session, and its settings file
(``~/.gemini/settings.json``), where ``shmstore hook --agent gemini_cli`` is installed.

Gemini CLI runs command hooks with a JSON payload on stdin carrying ``session_id``,
``transcript_path``, ``cwd``, ``hook_event_name`` and ``timestamp``, plus fields of the
event's own (``notification_type`` for Notification, ``source`` for SessionStart,
``reason`` for SessionEnd). Events and fields: https://geminicli.com/docs/hooks/reference
(checked against Gemini CLI 0.61.0, which has these 11 events and no others).

What it gives no event for (0.61.0, seen with the real CLI in tests/test_real_agents.py):
approving its permission dialog (the session stays ``question`` until the tool's AfterTool),
Esc or "No" at that dialog (no event at all: the transcript's "Request cancelled." line is
the signal, :func:`settled`),
and a terminal closed under it (no SessionEnd: the reaper closes the session when the CLI's
process is gone). Hooks run only in a folder the user trusts.

On the hook's path: the standard library's light modules only.
"""

from __future__ import annotations

from . import fields
from .base import ATTENTION, CLOSED, QUESTION, WORKING, HookReport

TYPE_CHECKING = False  # as typing's, without importing typing (~4 ms of the hook's start-up)
if TYPE_CHECKING:
    from collections.abc import Mapping
    from pathlib import Path
    from typing import Any

    from .settings import Change

NAME = "gemini_cli"
TITLE = "Gemini CLI"

EVENT_STATUS: Mapping[str, str] = {
    "SessionStart": ATTENTION,  # startup, resume, clear: at the prompt
    "BeforeAgent": WORKING,  # a prompt was submitted
    "BeforeTool": WORKING,  # fires before its permission dialog
    "AfterTool": WORKING,
    "Notification": QUESTION,  # ToolPermission, its only type in 0.61.0: the dialog is up
    "AfterAgent": ATTENTION,  # the turn is over (after Esc or an API error too)
    "SessionEnd": CLOSED,  # reason exit or clear
}
#: Events that say nothing new, not installed: they fire on every model call (PreCompress
#: with trigger auto too) or every streamed chunk (AfterModel).
QUIET_EVENTS = frozenset({"BeforeModel", "AfterModel", "BeforeToolSelection", "PreCompress"})


def read(payload: Mapping[str, Any], environ: Mapping[str, str]) -> HookReport:
    """What a Gemini CLI hook payload says; ValidationError names a field that is wrong."""
    session, cwd = fields.session_and_cwd(payload, "session_id", payload.get("cwd"))
    event = fields.event_name(payload.get("hook_event_name"), "hook_event_name")
    status = EVENT_STATUS.get(event)
    if event == "Notification" and payload.get("notification_type") != "ToolPermission":
        status = ATTENTION  # a kind 0.61.0 does not have: waiting, at least
    reason = fields.end_reason(payload.get("reason")) if status == CLOSED else None
    transcript = payload.get("transcript_path") if status == QUESTION else None
    return HookReport(
        event, session, status, cwd, reason, transcript=transcript if isinstance(transcript, str) else None
    )


def settled(line: bytes) -> bool | None:
    """What a line the transcript gained while the permission dialog was up says. Esc or
    "No" there fires no event (0.61.0); in the same few milliseconds the CLI writes the
    model's turn again with its tool call ``cancelled``, ``{"type": "info", "content":
    "Request cancelled."}``, ``$set`` lines (the file's metadata, or every message again)
    and the history again as a ``user`` line (its context, then the earlier prompt): the
    info line says it is back at its prompt (True), the others nothing (None). A tool call
    that ran, a reply, or the user's next prompt: it went on (False)."""
    import json

    try:
        entry = json.loads(line)
    except ValueError:
        return None
    if not isinstance(entry, dict) or "$set" in entry:
        return None
    kind = entry.get("type")
    if kind == "info":
        return True if entry.get("content") == "Request cancelled." else None
    if kind == "gemini":
        calls = entry.get("toolCalls") or []
        cancelled = any(isinstance(call, dict) and call.get("status") == "cancelled" for call in calls)
        return None if cancelled else False
    if kind == "user":
        return None if _is_context(entry.get("content")) else False
    return None


def _is_context(content: object) -> bool:
    """Whether a ``user`` line is the history the CLI writes again after a cancel: its
    session context first, then the earlier prompt (a prompt of the user's has no context)."""
    first = content[0] if isinstance(content, list) and content else None
    text = first.get("text") if isinstance(first, dict) else None
    return isinstance(text, str) and text.startswith("<session_context>")


# -- the settings file ---------------------------------------------------------------------

#: Milliseconds Gemini CLI gives the hook (its hooks' timeouts are in ms).
HOOK_TIMEOUT_MS = 5000


def default_settings() -> Path:
    from pathlib import Path

    return Path.home() / ".gemini" / "settings.json"


def hook_groups(command: str) -> dict[str, list[dict[str, Any]]]:
    """Our hook on every event of :data:`EVENT_STATUS`, named ``shmstore`` (Gemini shows
    "Executing Hook: NAME" while it runs)."""
    entry = {"type": "command", "name": "shmstore", "command": command, "timeout": HOOK_TIMEOUT_MS}
    return {event: [{"hooks": [entry]}] for event in EVENT_STATUS}


def install(path: Path, command: str, *, url: str | None = None, dry_run: bool = False) -> Change:
    """Make ``command`` our only hook on every event of :data:`EVENT_STATUS` in the settings
    at ``path``. Gemini CLI has command hooks only: ``url`` is not used."""
    from . import settings

    return settings.install_hooks(path, hook_groups(command), dry_run=dry_run)


def uninstall(path: Path, *, dry_run: bool = False) -> Change:
    from . import settings

    return settings.uninstall_hooks(path, dry_run=dry_run)


#: Whether the agent takes http hooks that a manager's HTTP endpoint can answer.
TAKES_HTTP = False


def found() -> bool:
    """Whether this machine has the agent: its own directory in the home, or its command."""
    import shutil
    from pathlib import Path

    return (Path.home() / ".gemini").is_dir() or shutil.which("gemini") is not None


if TYPE_CHECKING:
    from . import gemini as _this
    from .base import Agent

    _checked: Agent = _this
