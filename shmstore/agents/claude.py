"""Claude Code: what its hook events mean for a session, how a payload names the session,
and its settings file (``~/.claude/settings.json``), where ``shmstore hook`` is installed.

Claude Code runs the configured hook commands on its events and passes each a JSON payload
on stdin with at least ``session_id``, ``cwd`` and ``hook_event_name``, plus fields of the
event's own (``tool_name`` for tool events, ``notification_type`` and ``message`` for
notifications, ``source`` for session start, ``reason`` for session end). The events are
those of Claude Code's hooks reference (https://code.claude.com/docs/en/hooks).

This module is on the hook's path: the standard library's light modules only (installing
imports what it needs when it runs).
"""

from __future__ import annotations

from ..checks import check_closed_reason, check_dir, check_id
from ..errors import ValidationError
from .base import ATTENTION, CLOSED, QUESTION, WORKING, HookReport

TYPE_CHECKING = False  # as typing's, without importing typing (~4 ms of the hook's start-up)
if TYPE_CHECKING:
    from collections.abc import Mapping
    from pathlib import Path
    from typing import Any

    from .settings import Change

NAME = "claude_code"
TITLE = "Claude Code"

#: The status each hook event puts a session in (every event of Claude Code's hooks
#: reference that says something about it); :func:`status_for` refines a few of them.
EVENT_STATUS: Mapping[str, str] = {
    "SessionStart": ATTENTION,  # a new or resumed session waits for the first prompt
    "UserPromptSubmit": WORKING,
    "UserPromptExpansion": WORKING,  # a slash command expands into the prompt
    "PreToolUse": WORKING,
    "PermissionRequest": QUESTION,
    "PermissionDenied": WORKING,  # auto mode refused a call; the agent carries on
    "PostToolUse": WORKING,
    "PostToolUseFailure": WORKING,
    "PostToolBatch": WORKING,
    "SubagentStart": WORKING,
    "SubagentStop": WORKING,  # the main agent carries on
    "TaskCreated": WORKING,
    "TaskCompleted": WORKING,
    "PreCompact": WORKING,
    "PostCompact": WORKING,
    "Elicitation": QUESTION,  # an MCP server asks the user for input
    "ElicitationResult": WORKING,  # the user answered it
    "Notification": ATTENTION,
    "Stop": ATTENTION,  # the turn is over: the user's move
    "StopFailure": ATTENTION,  # the turn ended on an API error: the user's move too
    "SessionEnd": CLOSED,
}
#: Events of the reference that say nothing of the session's status: ignored without a
#: note, and not installed. (WorktreeCreate's hook must print a path: never install there.)
QUIET_EVENTS = frozenset(
    {
        "Setup",
        "InstructionsLoaded",
        "ConfigChange",
        "CwdChanged",
        "FileChanged",
        "WorktreeCreate",
        "WorktreeRemove",
        "TeammateIdle",  # another agent of a team goes idle
    }
)

#: Notification types that ask the user something (rather than only wait for them).
QUESTION_NOTIFICATIONS = frozenset({"permission_prompt", "elicitation_dialog"})
#: The tool with which the agent asks the user a question.
ASK_TOOL = "AskUserQuestion"


def status_for(payload: Mapping[str, Any]) -> str | None:
    """The status a hook payload reports, or None for an event that says nothing of it."""
    event = payload.get("hook_event_name")
    if event == "PreToolUse" and payload.get("tool_name") == ASK_TOOL:
        return QUESTION
    if event == "Notification":
        kind = payload.get("notification_type")
        message = str(payload.get("message", "")).lower()
        if kind in QUESTION_NOTIFICATIONS or (kind is None and "permission" in message):
            return QUESTION
        return ATTENTION
    if event == "SessionStart" and payload.get("source") == "compact":
        return WORKING  # compaction happens mid-task
    return EVENT_STATUS.get(event) if isinstance(event, str) else None


def read(payload: Mapping[str, Any]) -> HookReport:
    """What a Claude Code hook payload says; ValidationError names a field that is missing
    or wrong (``session_id``, ``cwd``, ``hook_event_name``)."""
    session = check_id(payload.get("session_id"), "session_id")
    cwd = check_dir(payload.get("cwd"), "cwd")
    event = payload.get("hook_event_name")
    if not isinstance(event, str):
        raise ValidationError("hook_event_name", "is missing")
    status = status_for(payload)
    return HookReport(event, session, status, cwd, end_reason(payload) if status == CLOSED else None)


def end_reason(payload: Mapping[str, Any]) -> str | None:
    """Claude Code's word for why a session ended (``logout``, ``clear``, ...), when the
    store takes it as ``session_end:REASON`` (its own check, :func:`check_closed_reason`):
    anything else is dropped rather than fail the report, so that the session is closed
    whatever the reason looks like."""
    reason = payload.get("reason")
    if not isinstance(reason, str) or not reason:
        return None
    try:
        check_closed_reason(f"session_end:{reason}", "reason")  # what Store.report makes of it
    except ValidationError:
        return None
    return reason


# -- the settings file ---------------------------------------------------------------------

#: Seconds Claude Code gives the hook command (it needs well under one).
HOOK_TIMEOUT = 5


def default_settings() -> Path:
    from pathlib import Path

    return Path.home() / ".claude" / "settings.json"


def install(path: Path, command: str, *, dry_run: bool = False) -> Change:
    """Make ``command`` the one shmstore hook of every event of :data:`EVENT_STATUS` in the
    settings at ``path`` (see :mod:`shmstore.agents.settings` for what is kept)."""
    from . import settings

    entry = {"type": "command", "command": command, "timeout": HOOK_TIMEOUT}

    def change(document: dict[str, Any]) -> list[str]:
        events = settings.install_in_table(settings.table(document), EVENT_STATUS, entry)
        settings.drop_if_empty(document)
        return events

    return settings.rewrite(path, change, dry_run=dry_run)


def uninstall(path: Path, *, dry_run: bool = False) -> Change:
    """Remove every shmstore hook from the settings at ``path``, and nothing else."""
    from . import settings

    def change(document: dict[str, Any]) -> list[str]:
        events = settings.strip_table(settings.table(document))
        settings.drop_if_empty(document)
        return events

    return settings.rewrite(path, change, dry_run=dry_run)


if TYPE_CHECKING:
    from . import claude as _this
    from .base import Agent

    _checked: Agent = _this  # mypy: this module is an agent adapter
