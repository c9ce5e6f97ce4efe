"""opencode: what its bus events mean for a session, and the plugin that reports them
(``~/.config/opencode/plugins/shmstore.js``, under ``$XDG_CONFIG_HOME`` when set).

opencode has no hook commands; its plugins receive its bus events and a ``dispose()`` call
when the plugin's instance ends (https://opencode.ai/docs/plugins; the event types are those
of its SDK, ``@opencode-ai/sdk`` v2, and ``dispose`` is in ``@opencode-ai/plugin``'s
``Hooks``, both checked against opencode 1.18.33). The plugin shmstore installs
(:data:`PLUGIN`) keeps the events that say something of a session and runs ``shmstore hook
--agent opencode --pid OPENCODE_PID`` for them with a payload of its own making on stdin:
``hook_event_name`` (the event's type), ``session_id``, ``cwd`` (the session's directory),
``status`` (session.status's type), ``parent_id`` for a subagent's session (opencode runs a
subagent, its ``task`` tool, as a child session), and for the record ``reply``, ``error``,
``pid`` and ``time``.

It never blocks opencode: the event handler returns at once, and one hook runs at a time,
detached (a process group and session of its own) and given at most :data:`CAP` seconds
before the next starts. While one runs, a session's later event replaces its waiting one
(opencode sends ``session.status`` busy 4-6 times a turn: a backlog of hooks was still
queued when ``opencode run`` exited, and the turn's end was lost), so each session's latest
event gets through; a ``permission.asked`` is replaced only by a later event of the same
session. opencode awaits ``dispose()`` at every clean exit (the end of ``opencode run``,
ctrl+c in the TUI, a SIGHUP): the plugin then drops what still waits (the close replaces
it) and reports ``plugin.dispose`` (an event of its own) for each top-level session it saw,
which closes it (``session_end:exit``), started at least a clock tick after the last hook so
that this one, if it lands later, is older and cannot reopen the session.

A subagent's events are its parent session's, from that subagent (:func:`read`): its
permission or question is the user's (question), the rest working, its end included (the
parent's turn goes on around its ``task`` call; the parent's own idle ends the turn).

What it gives no event for: opencode killed (SIGKILL: the reaper closes its sessions when
its process is gone); the TUI before its first prompt (no session exists yet); a session
only switched to in the TUI. ``opencode --pure`` (``OPENCODE_PURE=1``) loads no plugin:
nothing is reported. opencode may also dispose a plugin's instance without exiting (a
config reload): its sessions show closed until their next event.

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

#: The event the plugin makes of its ``dispose()``: opencode is exiting.
DISPOSE = "plugin.dispose"

EVENT_STATUS: Mapping[str, str] = {
    "session.created": ATTENTION,  # a new session (busy follows within milliseconds)
    "session.status": WORKING,  # busy or retry; idle is attention (read)
    "session.idle": ATTENTION,  # the turn is over
    "permission.asked": QUESTION,  # a tool waits for the user's approval
    "permission.replied": WORKING,  # once, always or reject (a reject is followed by idle)
    "question.asked": QUESTION,  # the agent asks the user (its question tool)
    "question.replied": WORKING,
    "question.rejected": WORKING,  # the turn goes on, or ends with session.idle
    "session.error": ATTENTION,  # an API error or an abort: back at the prompt (idle follows)
    "session.deleted": CLOSED,
    DISPOSE: CLOSED,  # opencode exits (the plugin's own event)
}
QUIET_EVENTS: frozenset[str] = frozenset()

#: Why a closing event closed its session (``session_end:REASON``).
REASONS: Mapping[str, str] = {"session.deleted": "deleted", DISPOSE: "exit"}
#: A subagent's events that are the user's to act on; its other events are its parent's
#: turn going on (the parent waits in its ``task`` tool call meanwhile).
ASKING = frozenset({"permission.asked", "question.asked"})


def read(payload: Mapping[str, Any], environ: Mapping[str, str]) -> HookReport:
    """What the plugin's payload says. A subagent's event (``parent_id``) is its parent
    session's, from that subagent: a question, or else working (its end, its errors and
    its start included: the parent's turn goes on, and its own idle says when it is over);
    a subagent's session.deleted says nothing (it may come after its parent closed)."""
    session, cwd = fields.session_and_cwd(payload, "session_id", payload.get("cwd"))
    event = fields.event_name(payload.get("hook_event_name"), "hook_event_name")
    status = EVENT_STATUS.get(event)
    if event == "session.status" and payload.get("status") == "idle":
        status = ATTENTION
    parent = fields.an_id(payload.get("parent_id"))
    if parent is not None:
        if status is not None and event not in ASKING:
            status = None if status == CLOSED else WORKING
        return HookReport(event, parent, status, cwd, None, session)
    return HookReport(event, session, status, cwd, REASONS.get(event) if status == CLOSED else None)


# -- the plugin ----------------------------------------------------------------------------

#: The longest a hook holds the next one back, in seconds (it goes on running, detached).
CAP = 5

#: The plugin, with ``__COMMAND__`` for the hook command and ``__PID__`` for whether it
#: takes ``--pid`` (both as JavaScript values), ``__EVENTS__`` for the bus events it reports
#: and ``__CAP_MS__``.
PLUGIN = """\
// shmstore: reports opencode's sessions to shmstore (installed by `shmstore install-hooks
// --agent opencode`; `shmstore uninstall-hooks --agent opencode` removes this file).
//
// For each bus event that says something of a session it runs COMMAND with a JSON payload
// on stdin. It never blocks opencode: the event handler returns at once; one hook runs at a
// time (so that reports arrive in order), detached, and holds the next back CAP_MS at most;
// meanwhile a session's later event replaces its waiting one. At dispose (opencode exits;
// opencode awaits it) what still waits is dropped and each session seen is reported closed.
import { spawn } from "node:child_process"

const COMMAND = __COMMAND__
const TAKES_PID = __PID__ // COMMAND is `shmstore hook`: it is told opencode's pid
const EVENTS = new Set(__EVENTS__)
const CAP_MS = __CAP_MS__
const GAP_MS = 30

export const Shmstore = async ({ directory }) => {
  const parents = new Map() // a subagent's session -> its parent session
  const seen = new Map() // session -> its directory, for the closing report
  const waiting = new Map() // session -> its latest report not started yet
  let running = false
  let disposed = false
  let lastStart = 0 // when the last hook started (ms)

  // Start one hook; `done` when it exits or CAP_MS have passed, whichever comes first;
  // the promise resolves once the payload is written (or could not be).
  const start = (payload, done = () => {}) => new Promise((written) => {
    let over = false
    const end = () => { if (!over) { over = true; clearTimeout(timer); done() } }
    const timer = setTimeout(end, CAP_MS)
    if (timer.unref) timer.unref()
    lastStart = Date.now()
    try {
      const command = TAKES_PID ? `${COMMAND} --pid ${process.pid}` : COMMAND
      // detached: a process group and session of its own, so that neither opencode's exit
      // nor a signal to its group (a closed terminal) ends a report on its way.
      const child = spawn(command, { shell: true, detached: true, stdio: ["pipe", "ignore", "ignore"] })
      child.on("error", () => { end(); written() })
      child.on("exit", end)
      child.stdin.on("error", () => written())
      child.stdin.end(JSON.stringify(payload), () => written())
      child.unref()
    } catch {
      end()
      written()
    }
  })

  const pump = () => {
    if (running || disposed) return
    const next = waiting.entries().next()
    if (next.done) return
    const [id, payload] = next.value
    waiting.delete(id)
    running = true
    start(payload, () => { running = false; pump() })
  }

  return {
    event: async ({ event }) => {
      if (disposed) return
      const properties = event.properties || {}
      const info = properties.info || {}
      const id = properties.sessionID || info.id
      if (!id) return
      // A session's info names its parent session (a message's names another message).
      if (event.type.startsWith("session.") && info.id === id && info.parentID) parents.set(id, info.parentID)
      if (!EVENTS.has(event.type)) return
      const cwd = info.directory || seen.get(id) || directory
      if (event.type === "session.deleted") seen.delete(id)
      else seen.set(id, cwd)
      waiting.delete(id) // put back last: the order of the sessions' reports is kept
      waiting.set(id, {
        hook_event_name: event.type,
        session_id: id,
        cwd,
        status: properties.status ? properties.status.type : undefined,
        parent_id: parents.get(id),
        reply: properties.reply,
        error: properties.error ? properties.error.name : undefined,
        pid: process.pid,
        time: Date.now(),
      })
      pump()
    },
    dispose: async () => {
      // opencode exits: each session ends with it. The close replaces what still waits
      // (sent beside it, an idle could land after it and bring the session back). The
      // hooks outlive opencode; only the writing of their payloads is waited for.
      disposed = true
      waiting.clear()
      // A hook takes the start of its process as its event's time, to 10 ms; a report
      // that arrives after a later one is dropped. The close must start a tick after the
      // hook still running, so that this one, if it lands last, cannot reopen the session.
      const since = Date.now() - lastStart
      if (since < GAP_MS) await new Promise((r) => setTimeout(r, GAP_MS - since))
      const closing = []
      for (const [id, cwd] of seen) {
        if (parents.has(id)) continue
        const payload = { hook_event_name: "plugin.dispose", session_id: id, cwd, pid: process.pid, time: Date.now() }
        closing.push(start(payload))
      }
      await Promise.race([Promise.all(closing), new Promise((r) => setTimeout(r, 1000))])
    },
  }
}
"""
#: The first line of the plugin: how a file there is known as ours.
MARK = "// shmstore: reports opencode's sessions"


def plugin(command: str) -> str:
    """The plugin running ``command`` (told opencode's pid when it is a ``shmstore hook``)."""
    import json

    from .settings import is_ours

    events = [event for event in EVENT_STATUS if event != DISPOSE]  # the bus events
    values = {
        "__COMMAND__": command,
        "__PID__": is_ours(command) and "--pid" not in command,
        "__EVENTS__": events,
        "__CAP_MS__": CAP * 1000,
    }
    text = PLUGIN
    for name, value in values.items():
        text = text.replace(name, json.dumps(value))
    return text


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
