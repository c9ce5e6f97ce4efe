"""Codex CLI: what its hook events mean for a session, and its hooks file
(``~/.codex/hooks.json``, or under ``$CODEX_HOME``), where ``shmstore hook --agent codex`` is
installed, with the entries of ``config.toml`` that trust it.

Codex runs command hooks with a JSON payload on stdin carrying ``session_id``, ``cwd``,
``hook_event_name`` and ``transcript_path``, plus the event's own fields (``source`` for
SessionStart, ``tool_name`` for tool events, ``reason`` for SessionEnd, ``agent_id`` in a
subagent's). Events: https://developers.openai.com/codex/hooks (checked against Codex
0.171.0, whose 12 events these are; it has no Notification event).

Codex runs a hook of the user's only once ``config.toml`` trusts it: a table
``[hooks.state."HOOKS_JSON:EVENT:GROUP:HANDLER"]`` whose ``trusted_hash`` is the sha256 of
the handler as Codex normalises it (codex-rs/hooks/src/engine/discovery.rs). Installing
writes those entries for our hooks, and for nothing else (a user's hook stays as the user
trusted it, or not); a changed command (another address) is trusted anew. Without them
``codex exec`` skips every hook, silently, and the TUI asks the user to review them.

What it gives no event for (0.171.0, seen with the real CLI): the session before its first
prompt (SessionStart comes with it), approving a permission prompt (PostToolUse follows),
``/clear`` and ``/new`` (the old session ends only at exit), and a closed terminal (no
SessionEnd: the reaper closes the session when Codex's process is gone). When Codex's
shared background server runs the session, the hook's process is that server, which
outlives the terminal, and ``/quit`` fires no SessionEnd either.

On the hook's path: the standard library's light modules only.
"""

from __future__ import annotations

from . import fields
from .base import ATTENTION, CLOSED, QUESTION, WORKING, HookReport

TYPE_CHECKING = False  # as typing's, without importing typing (~4 ms of the hook's start-up)
if TYPE_CHECKING:
    from collections.abc import Iterator, Mapping
    from pathlib import Path
    from typing import Any

    from .settings import Change

NAME = "codex"
TITLE = "Codex"

EVENT_STATUS: Mapping[str, str] = {
    "SessionStart": ATTENTION,  # fires with the first prompt: UserPromptSubmit follows
    "UserPromptSubmit": WORKING,
    "PreToolUse": WORKING,
    "PermissionRequest": QUESTION,  # the approval prompt is up
    "PostToolUse": WORKING,  # also: an approval was given
    "PreCompact": WORKING,
    "PostCompact": WORKING,
    "SubagentStart": WORKING,
    "SubagentStop": WORKING,
    "Stop": ATTENTION,  # the turn is over
    "Interrupt": ATTENTION,  # Esc in a turn or at the approval prompt: no Stop follows
    "SessionEnd": CLOSED,  # reason "other", always
}
QUIET_EVENTS: frozenset[str] = frozenset()


def read(payload: Mapping[str, Any], environ: Mapping[str, str]) -> HookReport:
    """What a Codex hook payload says; ValidationError names a field that is wrong."""
    session, cwd = fields.session_and_cwd(payload, "session_id", payload.get("cwd"))
    event = fields.event_name(payload.get("hook_event_name"), "hook_event_name")
    status = EVENT_STATUS.get(event)
    reason = fields.end_reason(payload.get("reason")) if status == CLOSED else None
    return HookReport(event, session, status, cwd, reason, fields.an_id(payload.get("agent_id")))


# -- the hooks file, and the trust in config.toml ------------------------------------------

#: Seconds Codex gives the hook; it clamps SessionEnd's and Interrupt's to 3 (and says so).
HOOK_TIMEOUT = 5
CLAMPED = {"SessionEnd": 3, "Interrupt": 3}


def default_settings() -> Path:
    import os
    from pathlib import Path

    home = os.environ.get("CODEX_HOME")
    return (Path(home) if home else Path.home() / ".codex") / "hooks.json"


def hook_groups(command: str) -> dict[str, list[dict[str, Any]]]:
    return {
        event: [{"hooks": [{"type": "command", "command": command, "timeout": CLAMPED.get(event, HOOK_TIMEOUT)}]}]
        for event in EVENT_STATUS
    }


def install(path: Path, command: str, *, url: str | None = None, dry_run: bool = False) -> Change:
    """Make ``command`` our only hook on every event of :data:`EVENT_STATUS` in the hooks
    file at ``path``, and trust it in the ``config.toml`` beside it. Codex has command
    hooks only: ``url`` is not used."""
    import dataclasses

    from . import settings

    before = _hooks_of(path.read_text() if path.exists() else "")
    change = settings.install_hooks(path, hook_groups(command), dry_run=dry_run)
    after = _hooks_of(change.after)
    wanted, moved = trust_entries(path, after), moved_keys(path, before, after)
    # Our old entries go first where they changed: a hook of the user's may move to the key.
    stale = {key: digest for key, digest in trust_entries(path, before).items() if wanted.get(key) != digest}

    def rewrite(text: str) -> str:
        return trusted(renamed(untrusted(text, stale), moved), wanted)

    config = settings.rewrite_text(path.with_name("config.toml"), rewrite, dry_run=dry_run)
    return dataclasses.replace(change, events=change.events or config.events, also=config)


def uninstall(path: Path, *, dry_run: bool = False) -> Change:
    """Remove every shmstore hook from the hooks file at ``path``, and their trust entries
    from the ``config.toml`` beside it."""
    import dataclasses

    from . import settings

    before = _hooks_of(path.read_text() if path.exists() else "")
    ours = trust_entries(path, before)
    change = settings.uninstall_hooks(path, dry_run=dry_run)
    moved = moved_keys(path, before, _hooks_of(change.after))
    config = settings.rewrite_text(
        path.with_name("config.toml"), lambda text: renamed(untrusted(text, ours), moved), dry_run=dry_run
    )
    return dataclasses.replace(change, events=change.events or config.events, also=config)


def _hooks_of(text: str) -> Mapping[str, Any]:
    """The ``hooks`` table of a hooks file's text (empty for an empty file)."""
    import json

    document = json.loads(text) if text.strip() else {}
    hooks = document.get("hooks") if isinstance(document, dict) else None
    return hooks if isinstance(hooks, dict) else {}


def _handlers(path: Path, hooks: Mapping[str, Any]) -> Iterator[tuple[str, str, dict[str, Any], bool]]:
    """Each handler of the table ``hooks`` as (event, its ``[hooks.state]`` key, the
    handler, whether its group has a matcher). Codex keys a hook's trust by its file's
    real path (a symlinked ``~/.codex`` is trusted under the path it points to; checked
    with 0.171.0), the event in snake case, and the group's and the handler's places."""
    real = path.resolve()
    for event, groups in hooks.items():
        for g, group in enumerate(groups if isinstance(groups, list) else []):
            handlers = group.get("hooks") if isinstance(group, dict) else None
            for h, handler in enumerate(handlers if isinstance(handlers, list) else []):
                if isinstance(handler, dict):
                    yield event, f"{real}:{_snake(event)}:{g}:{h}", handler, "matcher" in group


def trust_entries(path: Path, hooks: Mapping[str, Any]) -> dict[str, str]:
    """The ``[hooks.state]`` key and trusted hash of each hook of ours (with no matcher) in
    the table ``hooks`` of the hooks file at ``path``: the key names the file, the event in
    snake case, and the group's and the handler's places in it."""
    from .settings import is_our_hook

    return {
        key: trust_hash(event, handler["command"], handler.get("timeout", 600))
        for event, key, handler, matched in _handlers(path, hooks)
        if is_our_hook(handler) and not matched
    }


def moved_keys(path: Path, before: Mapping[str, Any], after: Mapping[str, Any]) -> dict[str, str]:
    """Old key -> new key of each of the user's own hooks that our change to the hooks file
    moved (ours go after theirs, or go): its trust moves with it, since a hook's hash does
    not hold its place. Ours are only added or removed, so the user's keep their order."""
    from .settings import is_our_hook

    def theirs(hooks: Mapping[str, Any]) -> dict[str, list[str]]:
        keys: dict[str, list[str]] = {}
        for event, key, handler, _ in _handlers(path, hooks):
            if not is_our_hook(handler):
                keys.setdefault(event, []).append(key)
        return keys

    old, new = theirs(before), theirs(after)
    return {a: b for event in old for a, b in zip(old[event], new.get(event, []), strict=False) if a != b}


def trust_hash(event: str, command: str, timeout: int) -> str:
    """The hash Codex 0.171.0 trusts a command hook with no matcher by: the sha256 of the
    compact, key-sorted JSON of the handler as it normalises it (its timeout as it takes
    it: at least 1, at most 3 for SessionEnd and Interrupt)."""
    import hashlib
    import json

    effective = min(max(1, int(timeout)), CLAMPED.get(event, 1 << 62))
    hook = {"type": "command", "command": command, "timeout": effective, "async": False}
    identity = {"event_name": _snake(event), "hooks": [hook]}
    text = json.dumps(identity, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return f"sha256:{hashlib.sha256(text.encode()).hexdigest()}"


def _snake(event: str) -> str:
    import re

    return re.sub(r"(?<!^)(?=[A-Z])", "_", event).lower()


def renamed(text: str, moved: Mapping[str, str]) -> str:
    """``config.toml``'s ``text`` with each trust table of a key in ``moved`` under its new
    key (every header is renamed once, so keys that trade places stay apart)."""
    if not moved:
        return text
    lines = text.splitlines(keepends=True)
    keys = {_state_key(line) for line in lines}
    for i, line in enumerate(lines):
        key = _state_key(line)
        # A table already at the new key that is not moving away is not ours to drop, and
        # two tables of one key would make the file unreadable: that hook stays untrusted
        # (Codex asks the user to review it) rather than either.
        if key is not None and key in moved and (moved[key] not in keys or moved[key] in moved):
            lines[i] = f"[hooks.state.{_toml_string(moved[key])}]\n"
    return "".join(lines)


def trusted(text: str, wanted: Mapping[str, str]) -> str:
    """``config.toml``'s ``text`` with a trust table for each of ``wanted`` (key -> hash):
    an existing table of that key has its hash replaced, a missing one is appended."""
    lines = text.splitlines(keepends=True)
    missing = dict(wanted)
    for i, line in enumerate(lines):
        key = _state_key(line)
        if key in missing and i + 1 < len(lines) and lines[i + 1].startswith("trusted_hash"):
            lines[i + 1] = f"trusted_hash = {_toml_string(missing.pop(key))}\n"
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n"
    for key, digest in missing.items():
        lines += ["\n", f"[hooks.state.{_toml_string(key)}]\n", f"trusted_hash = {_toml_string(digest)}\n"]
    return "".join(lines)


def untrusted(text: str, ours: Mapping[str, str]) -> str:
    """``config.toml``'s ``text`` without the trust tables of ``ours`` (key -> hash): only
    a table whose key and hash are both ours, and that holds nothing else, goes."""
    lines = text.splitlines(keepends=True)
    kept: list[str] = []
    i = 0
    while i < len(lines):
        key = _state_key(lines[i])
        hash_line = lines[i + 1].strip() if i + 1 < len(lines) else ""
        alone = i + 2 >= len(lines) or not lines[i + 2].strip() or lines[i + 2].lstrip().startswith("[")
        if key is not None and key in ours and hash_line == f"trusted_hash = {_toml_string(ours[key])}" and alone:
            if kept and not kept[-1].strip():
                kept.pop()  # the blank line we put before it
            i += 2
            continue
        kept.append(lines[i])
        i += 1
    return "".join(kept)


def _state_key(line: str) -> str | None:
    """The key of a ``[hooks.state."KEY"]`` header line, or None."""
    import json

    line = line.strip()
    if not (line.startswith('[hooks.state."') and line.endswith('"]')):
        return None
    try:
        key = json.loads(line[len("[hooks.state.") : -1])
    except ValueError:
        return None
    return key if isinstance(key, str) else None


def _toml_string(value: str) -> str:
    import json

    return json.dumps(value, ensure_ascii=False)  # a TOML basic string for what a path holds


#: Whether the agent takes http hooks that a manager's HTTP endpoint can answer.
TAKES_HTTP = False


def found() -> bool:
    """Whether this machine has the agent: its own directory in the home, or its command."""
    import shutil
    from pathlib import Path

    return (Path.home() / ".codex").is_dir() or shutil.which("codex") is not None


if TYPE_CHECKING:
    from . import codex as _this
    from .base import Agent

    _checked: Agent = _this
