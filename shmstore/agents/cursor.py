"""Cursor (its editor's agent and its ``agent`` CLI): what its hook events mean for a session,
and its user hooks file (``~/.cursor/hooks.json``), where ``shmstore hook --agent cursor``
is installed.

Cursor runs the commands of ``{"version": 1, "hooks": {"event": [{"command": ...}]}}`` with
a JSON payload on stdin carrying ``hook_event_name``, ``conversation_id`` (the session),
``generation_id``, ``workspace_roots`` and ``cursor_version``, plus the event's own fields
(``status`` for stop, ``reason`` for sessionEnd, ``cwd`` for shell events). Events:
https://cursor.com/docs/agent/hooks; the payloads are those its docs and reference pages
give, and those captured from its CLI 2026.02.13 by others: Cursor could not be run here
(its CLI is not on a registry this machine reaches, and it needs Cursor's own backend).

What it gives no event for: a permission prompt or a question (no hook fires on the wait
itself: a session that waits for an approval shows ``working``); in print mode
(``agent -p``), the prompt and the turn's end (beforeSubmitPrompt and stop do not fire).

On the hook's path: the standard library's light modules only.
"""

from __future__ import annotations

from . import fields
from .base import ATTENTION, CLOSED, WORKING, HookReport

TYPE_CHECKING = False  # as typing's, without importing typing (~4 ms of the hook's start-up)
if TYPE_CHECKING:
    from collections.abc import Mapping
    from pathlib import Path
    from typing import Any

    from .settings import Change

NAME = "cursor"
TITLE = "Cursor"

EVENT_STATUS: Mapping[str, str] = {
    "sessionStart": ATTENTION,  # a new conversation, waiting for its first prompt
    "beforeSubmitPrompt": WORKING,
    "preToolUse": WORKING,
    "postToolUse": WORKING,
    "postToolUseFailure": WORKING,
    "subagentStart": WORKING,
    "subagentStop": WORKING,
    "preCompact": WORKING,
    "stop": ATTENTION,  # the turn is over: completed, aborted (Esc) or error
    "sessionEnd": CLOSED,
}
#: Events the tool events already cover, or that come mid-turn (afterAgentResponse comes
#: before stop), and the Tab hooks (no agent session): not installed.
QUIET_EVENTS = frozenset(
    {
        "beforeShellExecution",
        "afterShellExecution",
        "beforeMCPExecution",
        "afterMCPExecution",
        "beforeReadFile",
        "afterFileEdit",
        "afterAgentResponse",
        "afterAgentThought",
        "beforeTabFileRead",
        "afterTabFileEdit",
    }
)


def read(payload: Mapping[str, Any], environ: Mapping[str, str]) -> HookReport:
    """What a Cursor hook payload says: the session is its ``conversation_id``, its working
    directory the first of its ``workspace_roots`` (a shell event's own ``cwd`` else)."""
    roots = payload.get("workspace_roots")
    cwd = roots[0] if isinstance(roots, list) and roots else payload.get("cwd")
    session, cwd = fields.session_and_cwd(payload, "conversation_id", cwd)
    event = fields.event_name(payload.get("hook_event_name"), "hook_event_name")
    status = EVENT_STATUS.get(event)
    reason = fields.end_reason(payload.get("reason")) if status == CLOSED else None
    return HookReport(event, session, status, cwd, reason)


# -- the hooks file ------------------------------------------------------------------------


def default_settings() -> Path:
    from pathlib import Path

    return Path.home() / ".cursor" / "hooks.json"


def hook_entries(command: str) -> dict[str, list[dict[str, Any]]]:
    return {event: [{"command": command}] for event in EVENT_STATUS}


def install(path: Path, command: str, *, url: str | None = None, dry_run: bool = False) -> Change:
    """Make ``command`` our only hook on every event of :data:`EVENT_STATUS` in the hooks
    file at ``path``. Cursor has command hooks only: ``url`` is not used."""
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

    return (Path.home() / ".cursor").is_dir() or shutil.which("cursor-agent") is not None


if TYPE_CHECKING:
    from . import cursor as _this
    from .base import Agent

    _checked: Agent = _this
