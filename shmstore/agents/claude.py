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

import json
import os

from . import fields
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


def status_for(payload: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> str | None:
    """The status a hook payload reports, or None for one that says nothing of it."""
    event = payload.get("hook_event_name")
    if event == "PreToolUse" and payload.get("tool_name") == ASK_TOOL:
        return QUESTION
    if event == "Notification":
        kind = payload.get("notification_type")
        message = str(payload.get("message", "")).lower()
        if kind in QUESTION_NOTIFICATIONS or (kind is None and "permission" in message):
            return QUESTION
        return ATTENTION
    if event == "SessionStart":
        if payload.get("source") == "compact":
            return WORKING  # compaction happens mid-task (a manual one ends with PostCompact)
        if is_spare(payload, environ or {}):
            return None
    if event == "PostCompact" and payload.get("trigger") == "manual":
        return ATTENTION  # `/compact` typed at the prompt: Claude waits there again, with no Stop
    return EVENT_STATUS.get(event) if isinstance(event, str) else None


def is_spare(payload: Mapping[str, Any], environ: Mapping[str, str]) -> bool:
    """Whether a SessionStart is that of a spare session the agent view (``claude
    agents``) keeps ready, which is no session of the user's until it is given a task
    (its first UserPromptSubmit): its payload names the ``claude`` agent, and its hook runs
    with ``CLAUDE_CODE_AGENT=claude`` (Claude Code 2.1.332; its session file says
    ``"spare": true``). Only a ``startup``: a background session its daemon restarts
    (``resume``) fires SessionStart in the same environment, and is the user's."""
    return (
        payload.get("source") == "startup"
        and payload.get("agent_type") == "claude"
        and environ.get("CLAUDE_CODE_AGENT") == "claude"
    )


def read(payload: Mapping[str, Any], environ: Mapping[str, str]) -> HookReport:
    """What a Claude Code hook payload, and the environment its hook runs in, say;
    ValidationError names a field that is missing or wrong (``session_id``, ``cwd``,
    ``hook_event_name``). Events of subagents carry ``agent_id``; a background session's
    hooks run with ``CLAUDE_JOB_DIR=~/.claude/jobs/SHORT``. Another agent running the hooks
    of Claude's settings (Copilot CLI does, with ``COPILOT_CLI=1``; Cursor, with its
    third-party hooks on, sends ``cursor_version``) says nothing of a Claude session: its
    own adapter reports it."""
    session, cwd = fields.session_and_cwd(payload, "session_id", payload.get("cwd"))
    event = fields.event_name(payload.get("hook_event_name"), "hook_event_name")
    if environ.get("COPILOT_CLI") == "1" or "cursor_version" in payload:
        return HookReport(event, session, None, cwd)
    status = status_for(payload, environ)
    job = environ.get("CLAUDE_JOB_DIR", "")
    background = fields.an_id(job.rstrip("/").rpartition("/")[2]) if job else None
    reason = end_reason(payload, job) if status == CLOSED else None
    return HookReport(event, session, status, cwd, reason, fields.an_id(payload.get("agent_id")), background)


def end_reason(payload: Mapping[str, Any], job: str = "") -> str | None:
    """Claude Code's word for why a session ended (``logout``, ``clear``, ...), when the
    store takes it (:func:`fields.end_reason`). A background session ends with ``other``
    whether it was stopped, removed or respawned; its job's ``state.json`` (``job``: its
    directory) says which, and that is the reason given."""
    reason = payload.get("reason")
    if reason == "other" and job:
        state = _job_state(job)
        reason = state if state in ENDED_JOB_STATES else reason
    return fields.end_reason(reason)


#: The states of a background job's ``state.json`` that say how it ended. Its SessionEnd
#: hook may run before Claude's daemon writes the new state (the suite saw "working" there
#: at a ``claude stop``): any other state says nothing of the end, and "other" stays.
ENDED_JOB_STATES = frozenset({"stopped", "failed", "done", "completed", "removed", "killed"})


def _job_state(job: str) -> str | None:
    """The ``state`` a background job's ``state.json`` gives (``stopped``, ``failed``, ...),
    or None. Read without blocking, and only from a regular file of a sane size."""
    try:
        fd = os.open(os.path.join(job, "state.json"), os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        state = json.loads(os.read(fd, 1 << 20)).get("state")
    except (OSError, ValueError, AttributeError):
        return None
    finally:
        os.close(fd)
    return state if isinstance(state, str) else None


# -- the settings file ---------------------------------------------------------------------

#: Seconds Claude Code gives the hook command (it needs well under one).
HOOK_TIMEOUT = 5


def default_settings() -> Path:
    from pathlib import Path

    return Path.home() / ".claude" / "settings.json"


#: Seconds Claude Code gives an http hook (its least): a manager that is up answers in well
#: under a millisecond; one that hangs then costs the agent at most this per event.
HTTP_TIMEOUT = 1

#: Events whose hook stays a command hook when the others go over HTTP: SessionStart
#: (Claude refuses http hooks there), and every event that can leave the session waiting
#: for the user or end it. A command hook's report is kept in the spool when the manager
#: cannot take it; an http hook's is lost (Claude logs a non-blocking error and goes on).
#: So with the manager restarting, the statuses a user acts on (question, attention,
#: closed) still arrive; only working may come late, with the next event.
COMMAND_EVENTS = frozenset(event for event, status in EVENT_STATUS.items() if status != WORKING) | {
    "SessionStart",
    "PostCompact",  # a manual one is attention (status_for)
}


def hook_groups(command: str, url: str | None) -> dict[str, list[dict[str, Any]]]:
    """Our hooks, per event, as Claude Code's settings hold them: ``command`` on every
    event, or with ``url`` (a manager's HTTP endpoint for this agent) an http hook on every
    event but :data:`COMMAND_EVENTS`, and the command also on PreToolUse of the
    AskUserQuestion tool (a question)."""
    run = {"hooks": [{"type": "command", "command": command, "timeout": HOOK_TIMEOUT}]}
    if url is None:
        return {event: [run] for event in EVENT_STATUS}
    post = {"hooks": [{"type": "http", "url": url, "timeout": HTTP_TIMEOUT}]}
    groups: dict[str, list[dict[str, Any]]] = {
        event: [run if event in COMMAND_EVENTS else post] for event in EVENT_STATUS
    }
    groups["PreToolUse"] = [post, {"matcher": ASK_TOOL, "hooks": run["hooks"]}]
    return groups


def install(path: Path, command: str, *, url: str | None = None, dry_run: bool = False) -> Change:
    """Make shmstore's hooks (:func:`hook_groups`) the only ones of ours on every event of
    :data:`EVENT_STATUS` in the settings at ``path`` (see :mod:`shmstore.agents.settings`
    for what is kept)."""
    from . import settings

    return settings.install_hooks(path, hook_groups(command, url), dry_run=dry_run)


def uninstall(path: Path, *, dry_run: bool = False) -> Change:
    """Remove every shmstore hook from the settings at ``path``, and nothing else."""
    from . import settings

    return settings.uninstall_hooks(path, dry_run=dry_run)


#: Whether the agent takes http hooks that a manager's HTTP endpoint can answer.
TAKES_HTTP = True


def found() -> bool:
    """Whether this machine has the agent: its own directory in the home, or its command."""
    import shutil
    from pathlib import Path

    return (Path.home() / ".claude").is_dir() or shutil.which("claude") is not None


if TYPE_CHECKING:
    from . import claude as _this
    from .base import Agent

    _checked: Agent = _this  # mypy: this module is an agent adapter
