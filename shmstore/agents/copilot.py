"""GitHub Copilot CLI: what its hook events mean for a session, and the hooks file shmstore
keeps for it (``~/.copilot/hooks/shmstore.json``, or under ``$COPILOT_HOME``).

Copilot CLI loads every ``*.json`` of its hooks directory (``{"version": 1, "hooks":
{"event": [{"type": "command", "bash": ..., "env": {...}, "timeoutSec": N}]}}``) and runs
each command with a JSON payload on stdin: ``sessionId``, ``timestamp`` (ms), ``cwd`` and
the event's own fields (``initialPrompt``, ``toolName``, ``notification_type``,
``errorContext``, ``reason``). Under the camelCase event names the payload does not name
its event (https://docs.github.com/en/copilot/reference/copilot-cli-reference/cli-hooks-reference;
checked against Copilot CLI 1.0.102), so each installed entry sets ``SHMSTORE_EVENT`` in
its hook's environment.

What it gives no event for (1.0.102, seen with the real CLI): Esc at a permission prompt
(its ``events.jsonl`` gains an ``abort`` line: the signal, :func:`settled`), Ctrl-C in a
turn (the session shows ``working`` until the next event), and the session's start before
its first prompt (sessionStart comes with that prompt).

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

NAME = "copilot_cli"
TITLE = "Copilot CLI"

EVENT_STATUS: Mapping[str, str] = {
    "sessionStart": WORKING,  # it fires with the first prompt (initialPrompt)
    "userPromptSubmitted": WORKING,
    "preToolUse": WORKING,  # ask_user: a question (read)
    "postToolUse": WORKING,  # also when a permission prompt was approved
    "postToolUseFailure": WORKING,
    "subagentStart": WORKING,
    "subagentStop": WORKING,
    "preCompact": WORKING,
    "notification": QUESTION,  # permission_prompt, elicitation_dialog (others: read)
    "agentStop": ATTENTION,  # the turn is over
    "errorOccurred": ATTENTION,  # a model call failed: no agentStop follows; the user's move
    "sessionEnd": CLOSED,  # complete, error, abort, timeout, user_exit
}
#: Events that say nothing of the status: userPromptTransformed runs before every message
#: to the model; permissionRequest fires even when every tool is allowed (before the rules).
QUIET_EVENTS = frozenset({"userPromptTransformed", "permissionRequest"})

#: Notification types that ask the user something; the others (shell_completed,
#: agent_idle, ...) say nothing a report needs.
QUESTION_NOTIFICATIONS = frozenset({"permission_prompt", "elicitation_dialog"})
#: The tool with which the agent asks the user a question.
ASK_TOOL = "ask_user"
#: The variable each installed hook sets to its event's name.
EVENT_VARIABLE = "SHMSTORE_EVENT"


def status_for(event: str, payload: Mapping[str, Any]) -> str | None:
    if event == "notification":
        return QUESTION if payload.get("notification_type") in QUESTION_NOTIFICATIONS else None
    if event == "preToolUse" and payload.get("toolName") == ASK_TOOL:
        return QUESTION
    if event == "errorOccurred" and payload.get("errorContext") != "model_call":
        return None  # a tool's or the system's error: the turn goes on
    return EVENT_STATUS.get(event)


def read(payload: Mapping[str, Any], environ: Mapping[str, str]) -> HookReport:
    """What a Copilot CLI hook payload says, its event named by the hook's environment
    (``SHMSTORE_EVENT``) or, for a notification, by the payload."""
    session, cwd = fields.session_and_cwd(payload, "sessionId", payload.get("cwd"))
    named = environ.get(EVENT_VARIABLE) or payload.get("hook_event_name") or payload.get("hookName")
    event = fields.event_name(named, EVENT_VARIABLE)
    event = "notification" if event == "Notification" else event
    status = status_for(event, payload)
    reason = fields.end_reason(payload.get("reason")) if status == CLOSED else None
    return HookReport(event, session, status, cwd, reason, transcript=_events_file(session, environ, status))


def _events_file(session: str, environ: Mapping[str, str], status: str | None) -> str | None:
    """The session's event log, for a question (:func:`settled` reads it): only agentStop's
    payload names it; it is ``$COPILOT_HOME/session-state/ID/events.jsonl``."""
    import os.path

    if status != QUESTION:
        return None
    home = environ.get("COPILOT_HOME") or os.path.join(environ.get("HOME", "/"), ".copilot")
    return os.path.join(home, "session-state", session, "events.jsonl")


def settled(line: bytes) -> bool | None:
    """What a line the session's event log gained while it waited on the user says: Esc
    at a permission prompt (or Ctrl-C) writes ``{"type": "abort"}`` and fires no hook
    (1.0.102): back at the prompt (True); the tool running, the permission answered, a new
    turn or message: it went on (False); its hooks' own lines: neither (None)."""
    import json

    try:
        entry = json.loads(line)
    except ValueError:
        return None
    kind = entry.get("type") if isinstance(entry, dict) else None
    if kind == "abort":
        return True
    if kind == "permission.completed":  # after the abort, "cancelled"; "approved" when answered
        result = (entry.get("data") or {}).get("result") or {}
        return None if result.get("kind") == "cancelled" else False
    if kind in ("tool.execution_start", "assistant.turn_start", "user.message"):
        return False
    return None


# -- the hooks file ------------------------------------------------------------------------

#: Seconds Copilot CLI gives the hook (a preToolUse hook that fails denies the tool: ours
#: never fails, and ends within its 0.9 s).
HOOK_TIMEOUT = 5


def default_settings() -> Path:
    import os
    from pathlib import Path

    home = os.environ.get("COPILOT_HOME")
    return (Path(home) if home else Path.home() / ".copilot") / "hooks" / "shmstore.json"


def hook_entries(command: str) -> dict[str, list[dict[str, Any]]]:
    return {
        event: [{"type": "command", "bash": command, "env": {EVENT_VARIABLE: event}, "timeoutSec": HOOK_TIMEOUT}]
        for event in EVENT_STATUS
    }


def install(path: Path, command: str, *, url: str | None = None, dry_run: bool = False) -> Change:
    """Make ``command`` our only hook on every event of :data:`EVENT_STATUS` in the hooks
    file at ``path`` (ours by default; another's keeps its own hooks). Its http hooks take
    no loopback address unless the user allows it: ``url`` is not used."""
    from . import settings

    return settings.install_hooks(path, hook_entries(command), dry_run=dry_run, head={"version": 1})


def uninstall(path: Path, *, dry_run: bool = False) -> Change:
    from . import settings

    return settings.uninstall_hooks(path, dry_run=dry_run)


#: Whether the agent takes http hooks that a manager's HTTP endpoint can answer.
TAKES_HTTP = False


def found() -> bool:
    """Whether this machine has the agent: its own directory in the home, or its command."""
    import shutil
    from pathlib import Path

    return (Path.home() / ".copilot").is_dir() or shutil.which("copilot") is not None


if TYPE_CHECKING:
    from . import copilot as _this
    from .base import Agent

    _checked: Agent = _this
