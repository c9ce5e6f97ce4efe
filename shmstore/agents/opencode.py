"""opencode: what its bus events mean for a session, and the plugin that reports them
(``~/.config/opencode/plugins/shmstore.js``, under ``$XDG_CONFIG_HOME`` when set).

opencode has no hook commands; its plugins receive its bus events
(https://opencode.ai/docs/plugins; the event types are those of its SDK, checked against
opencode 1.18.33). The plugin shmstore installs (:data:`PLUGIN`) keeps the events that say
something of a session, and runs ``shmstore hook --agent opencode`` for each, one after
another (so that they arrive in order), with a payload of its own making on stdin:
``hook_event_name`` (the event's type), ``session_id``, ``cwd`` (the directory opencode
runs in), ``status`` (session.status's type), and ``parent_id`` for a subagent's session
(opencode runs a subagent as a child session).

What it gives no event for: opencode's exit (the reaper closes its sessions when its
process is gone).

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

NAME = "opencode"
TITLE = "opencode"

EVENT_STATUS: Mapping[str, str] = {
    "session.created": ATTENTION,  # a new session, waiting for its first prompt
    "session.status": WORKING,  # busy or retry; idle is attention (read)
    "session.idle": ATTENTION,  # the turn is over
    "permission.asked": QUESTION,  # a tool waits for the user's approval
    "permission.replied": WORKING,
    "question.asked": QUESTION,  # the agent asks the user (its question tool)
    "question.replied": WORKING,
    "question.rejected": WORKING,  # the turn goes on, or ends with session.idle
    "session.error": ATTENTION,  # an API error or an abort: back at the prompt
    "session.deleted": CLOSED,
}
QUIET_EVENTS: frozenset[str] = frozenset()


def read(payload: Mapping[str, Any], environ: Mapping[str, str]) -> HookReport:
    """What the plugin's payload says: a subagent's event (``parent_id``) is its parent
    session's, from that subagent."""
    session, cwd = fields.session_and_cwd(payload, "session_id", payload.get("cwd"))
    event = fields.event_name(payload.get("hook_event_name"), "hook_event_name")
    status = EVENT_STATUS.get(event)
    if event == "session.status" and payload.get("status") == "idle":
        status = ATTENTION
    reason = "deleted" if status == CLOSED else None
    parent = fields.an_id(payload.get("parent_id"))
    if parent is not None:
        return HookReport(event, parent, status, cwd, None, session)
    return HookReport(event, session, status, cwd, reason)


# -- the plugin ----------------------------------------------------------------------------

#: The plugin, with ``__COMMAND__`` for the hook command (as a JavaScript string). Every
#: report runs after the one before it has ended (a chain of promises): two processes
#: started within a clock tick (10 ms) would carry the same event time.
PLUGIN = """\
// shmstore: reports opencode's sessions to shmstore (installed by `shmstore install-hooks
// --agent opencode`; `shmstore uninstall-hooks --agent opencode` removes this file).
import { spawn } from "node:child_process"

const COMMAND = __COMMAND__
const EVENTS = new Set(__EVENTS__)

export const Shmstore = async ({ directory }) => {
  const children = new Map()
  let last = Promise.resolve()
  const send = (payload) => {
    last = last.then(() => new Promise((done) => {
      try {
        const child = spawn(COMMAND, { shell: true, stdio: ["pipe", "ignore", "ignore"] })
        child.on("error", done)
        child.on("exit", done)
        child.stdin.on("error", () => {})
        child.stdin.end(JSON.stringify(payload))
      } catch {
        done()
      }
    }))
  }
  return {
    event: async ({ event }) => {
      if (!EVENTS.has(event.type)) return
      const properties = event.properties || {}
      const info = properties.info || {}
      const id = properties.sessionID || info.id
      if (!id) return
      if (info.parentID) children.set(id, info.parentID)
      send({
        hook_event_name: event.type,
        session_id: id,
        cwd: info.directory || directory,
        status: properties.status && properties.status.type,
        parent_id: children.get(id),
      })
    },
  }
}
"""
#: The first line of the plugin: how a file there is known as ours.
MARK = "// shmstore: reports opencode's sessions"


def plugin(command: str) -> str:
    import json

    return PLUGIN.replace("__COMMAND__", json.dumps(command)).replace("__EVENTS__", json.dumps(list(EVENT_STATUS)))


def default_settings() -> Path:
    import os
    from pathlib import Path

    config = os.environ.get("XDG_CONFIG_HOME")
    return (Path(config) if config else Path.home() / ".config") / "opencode" / "plugins" / "shmstore.js"


def install(path: Path, command: str, *, url: str | None = None, dry_run: bool = False) -> Change:
    """Write the plugin to ``path`` (a file there that is not ours is refused, unwritten).
    The plugin runs ``command``: ``url`` is not used."""
    from . import settings

    def change(text: str) -> str:
        _refuse_if_not_ours(path, text)
        return plugin(command)

    path.parent.mkdir(parents=True, exist_ok=True)
    return settings.rewrite_text(path, change, dry_run=dry_run)


def uninstall(path: Path, *, dry_run: bool = False) -> Change:
    """Remove the plugin at ``path``, if it is ours."""
    from .settings import Change

    try:
        text = path.read_text()
    except FileNotFoundError:
        return Change(path, [], "", "")
    _refuse_if_not_ours(path, text)
    if not dry_run:
        path.unlink()
    return Change(path, [path.name], text, "")


def _refuse_if_not_ours(path: Path, text: str) -> None:
    from ..errors import ValidationError

    if text and not text.startswith(MARK):
        raise ValidationError("settings", f"{path} is not shmstore's plugin; nothing was written")


#: Whether the agent takes http hooks that a manager's HTTP endpoint can answer.
TAKES_HTTP = False


def found() -> bool:
    """Whether this machine has the agent: its own directory in the config, or its command."""
    import shutil

    return default_settings().parent.parent.is_dir() or shutil.which("opencode") is not None


if TYPE_CHECKING:
    from . import opencode as _this
    from .base import Agent

    _checked: Agent = _this
