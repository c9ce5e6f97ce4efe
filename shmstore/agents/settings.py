"""An agent's settings file, changed with care: what every adapter whose hooks live in a
JSON file uses to put our hook command in and take it out.

* Only our hooks are touched: a hook command of ours is recognised by its shape
  (:func:`is_ours`: ``... -m shmstore hook ...``, or the ``shmstore hook`` script), whichever
  interpreter, ``--address`` or ``--agent`` it names, so that installing again from another
  virtualenv replaces it, and an http hook of ours by its path (:data:`HTTP_PATH`); every
  other key and hook is left as it was.
* A settings file that is a symlink stays one: the file it points to is rewritten
  (atomically, through a temporary file beside it).
* A changed file is first copied to a backup beside it (``NAME.STAMP.bak``), created with
  the file's own mode (settings hold secrets in ``env``), never over an older backup.
* An edit another program makes to the file while we rewrite it is kept: the file is read
  and changed again (:data:`TRIES` times), never overwritten.

The hooks table that Claude Code's settings hold (``{"Event": [{"matcher": ..., "hooks":
[{"type": "command", "command": ...}]}]}``, which Gemini CLI and Codex copied), and the
flat one of Cursor and Copilot CLI (``{"Event": [{"command": ...}]}``), are edited by
:func:`install_in_table` and :func:`strip_table`.
"""

from __future__ import annotations

import dataclasses
import datetime
import difflib
import json
import os
import shlex
import stat
import sys
import urllib.parse
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ..atomic import ChangedMeanwhileError, replace_file
from ..errors import ValidationError


def hook_command(address: str | None = None, agent: str | None = None) -> str:
    """The command to install: this interpreter running ``shmstore hook``, so it works
    whatever PATH the agent has (for an ``agent`` other than the default, with ``--agent``)."""
    command = f"{shlex.quote(sys.executable)} -m shmstore hook"
    if agent is not None:
        command += f" --agent {shlex.quote(agent)}"
    return command if address is None else f"{command} --address {shlex.quote(address)}"


_OPERATOR_CHARS = frozenset("();<>|&")


def is_ours(command: object) -> bool:
    """Is ``command`` a shmstore hook command (any interpreter, any options)?"""
    if not isinstance(command, str):
        return False
    try:
        lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        words = list(lexer)
    except ValueError:
        return False
    if any(word and set(word) <= _OPERATOR_CHARS for word in words):
        return False  # a user's command line that runs ours among others (`;`, `&&`, `|`, `>`) is theirs
    if len(words) >= 2 and os.path.basename(words[0]) == "shmstore" and words[1] == "hook":
        return True
    return any(words[i : i + 3] == ["-m", "shmstore", "hook"] for i in range(len(words) - 2))


@dataclasses.dataclass(frozen=True)
class Change:
    """What installing or uninstalling does (or would do, in a dry run) to a settings file."""

    path: Path
    #: The events whose shmstore hook was added, replaced or removed.
    events: list[str]
    before: str
    after: str
    #: The copy of the old file, when one was written.
    backup: Path | None = None
    #: A second file changed with it (Codex's config.toml, which trusts its hooks).
    also: Change | None = None

    def diff(self) -> str:
        """A unified diff from the file as it was to the file as it is (or would be), and
        of the second file changed with it."""
        lines = difflib.unified_diff(
            self.before.splitlines(keepends=True),
            self.after.splitlines(keepends=True),
            fromfile=str(self.path),
            tofile=str(self.path),
        )
        return "".join(lines) + (self.also.diff() if self.also is not None else "")


def rewrite(path: Path, change: Callable[[dict[str, Any]], list[str]], *, dry_run: bool) -> Change:
    """Read the JSON object in the file at ``path`` (none: ``{}``), ``change`` it in place
    (returning the names of what it changed), and write it back, unless another program
    wrote the file in between: then the whole read and change are made again on what it
    wrote, up to :data:`TRIES` times, so its edit is never lost; a file that keeps changing
    is refused, unwritten. ``dry_run`` writes nothing."""
    for _ in range(TRIES):
        before = _read(path)
        settings = json.loads(before) if before.strip() else {}
        events = change(settings)
        if not events:
            return Change(path, events, before, before)
        after = json.dumps(settings, indent=2, ensure_ascii=False) + "\n"
        if dry_run:
            return Change(path, events, before, after)
        try:
            return Change(path, events, before, after, _write(path, before, after))
        except ChangedMeanwhileError:
            continue
    raise ChangedMeanwhileError(str(path))


def install_hooks(
    path: Path, wanted: Mapping[str, list[dict[str, Any]]], *, dry_run: bool, head: Mapping[str, Any] | None = None
) -> Change:
    """Make ``wanted`` our only hooks in the ``hooks`` table of the JSON file at ``path``
    (:func:`install_in_table`); ``head``: keys the file must have too when it holds hooks
    (Cursor's and Copilot CLI's ``"version": 1``), set only where missing."""

    def change(document: dict[str, Any]) -> list[str]:
        events = install_in_table(table(document), wanted)
        for key, value in (head or {}).items():
            if events and key not in document:
                document[key] = value
        drop_if_empty(document)
        return events

    return rewrite(path, change, dry_run=dry_run)


def uninstall_hooks(path: Path, *, dry_run: bool) -> Change:
    """Remove every hook of ours from the ``hooks`` table of the JSON file at ``path``."""

    def change(document: dict[str, Any]) -> list[str]:
        events = strip_table(table(document))
        drop_if_empty(document)
        return events

    return rewrite(path, change, dry_run=dry_run)


#: How many times a settings file that another program writes meanwhile is read again.
TRIES = 3


def table(settings: dict[str, Any], key: str = "hooks") -> dict[str, Any]:
    """The hooks table under ``key`` of ``settings`` (made empty if there is none)."""
    hooks = settings.setdefault(key, {})
    if not isinstance(hooks, dict):
        raise ValidationError(key, f"in the settings must be an object, not {type(hooks).__name__}")
    return hooks


def drop_if_empty(settings: dict[str, Any], key: str = "hooks") -> None:
    """Remove the hooks table under ``key`` when it holds nothing (it held only ours)."""
    if settings.get(key) == {}:
        del settings[key]


def install_in_table(hooks: dict[str, Any], wanted: Mapping[str, list[dict[str, Any]]]) -> list[str]:
    """Make ``wanted`` (per event, the groups of our hooks, as the table holds them) the
    only hooks of ours in the table ``hooks``: on each event of ``wanted``, after the
    user's own groups, and on no other event. Returns the events changed; an event whose
    hooks are already as wanted is left exactly as it is."""
    order = list(wanted)
    changed = []
    for event in sorted(set(hooks) | set(order), key=lambda name: _order(order, name)):
        old = _groups(hooks, event)
        new = _without_ours(old)[0] + [json.loads(json.dumps(group)) for group in wanted.get(event, [])]
        if new == old:
            continue
        if new:
            hooks[event] = new  # an existing key keeps its place in the file
        else:
            del hooks[event]
        changed.append(event)
    return changed


def strip_table(hooks: dict[str, Any]) -> list[str]:
    """Remove every hook of ours from the table ``hooks``; returns the events it was on."""
    return [event for event in list(hooks) if _strip(hooks, event)]


def is_our_hook(entry: Mapping[str, Any]) -> bool:
    """Is the hook ``entry`` ours: a ``shmstore hook`` command (:func:`is_ours`), or an
    http hook posting to a manager's event path (:data:`HTTP_PATH`)?"""
    if entry.get("type") == "http":
        url = entry.get("url")
        return isinstance(url, str) and urllib.parse.urlsplit(url).path.startswith(HTTP_PATH)
    return is_ours(entry.get("command")) or is_ours(entry.get("bash"))  # Copilot CLI's is "bash"


#: Where a manager takes agents' events over HTTP: ``/shmstore/hook/AGENT``.
HTTP_PATH = "/shmstore/hook/"


def _order(order: list[str], event: str) -> tuple[int, str]:
    return (order.index(event), "") if event in order else (len(order), event)


def _groups(hooks: dict[str, Any], event: str) -> list[Any]:
    groups = hooks.get(event, [])
    if not isinstance(groups, list):
        raise ValidationError(f"hooks.{event}", f"in the settings must be a list, not {type(groups).__name__}")
    return groups


def _entries(group: object) -> list[dict[str, Any]]:
    entries = group.get("hooks") if isinstance(group, dict) else None
    return [h for h in entries if isinstance(h, dict)] if isinstance(entries, list) else []


def _strip(hooks: dict[str, Any], event: str) -> bool:
    """Remove our hooks from ``event`` (a group left empty goes, and then an event left
    empty); returns whether there were any."""
    kept, found = _without_ours(_groups(hooks, event))
    if found:
        if kept:
            hooks[event] = kept
        else:
            del hooks[event]
    return found


def _without_ours(groups: list[Any]) -> tuple[list[Any], bool]:
    """``groups`` without our hooks (a group left empty goes), and whether there were any.
    A table may hold the hooks themselves instead of groups of them (Cursor's and Copilot
    CLI's ``{"Event": [{"command": ...}]}``): one of ours there goes whole."""
    kept, found = [], False
    for group in groups:
        if isinstance(group, dict) and "hooks" not in group and is_our_hook(group):
            found = True
            continue
        mine = [h for h in _entries(group) if is_our_hook(h)]
        if not mine:
            kept.append(group)
            continue
        found = True
        rest = [h for h in group["hooks"] if h not in mine]
        if rest:
            kept.append({**group, "hooks": rest})
    return kept, found


def _read(path: Path) -> str:
    """The settings file's text exactly as it is on disk (no newline translation: the
    check before the rename compares it with the bytes there), or "" for none."""
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        return ""
    except UnicodeDecodeError as exc:
        raise ValidationError("settings", f"{path} is not UTF-8: {exc}") from None
    try:
        settings = json.loads(text) if text.strip() else {}
    except ValueError as exc:
        raise ValidationError("settings", f"{path} is not JSON: {exc}") from None
    if not isinstance(settings, dict):
        raise ValidationError("settings", f"{path} must hold a JSON object")
    return text


def rewrite_text(path: Path, change: Callable[[str], str], *, dry_run: bool) -> Change:
    """Rewrite the text file at ``path`` (none: "") with ``change``, as :func:`rewrite` does
    a JSON one: atomically, backed up, and read again when another program wrote it."""
    for _ in range(TRIES):
        try:
            before = path.read_bytes().decode("utf-8")
        except FileNotFoundError:
            before = ""
        except UnicodeDecodeError as exc:
            raise ValidationError("settings", f"{path} is not UTF-8: {exc}") from None
        after = change(before)
        if after == before or dry_run:
            return Change(path, [path.name] if after != before else [], before, after)
        try:
            return Change(path, [path.name], before, after, _write(path, before, after))
        except ChangedMeanwhileError:
            continue
    raise ChangedMeanwhileError(str(path))


def _write(path: Path, before: str, after: str) -> Path | None:
    """Write ``after`` to the file ``path`` is (through a symlink), atomically, if it still
    holds ``before`` (else ChangedMeanwhileError); returns the backup of ``before``, if
    there was a file."""
    mode = stat.S_IMODE(os.stat(path).st_mode) if before else 0o644  # an existing file keeps its mode
    backup = _backup(path, before, mode) if before else None
    try:
        replace_file(path, after.encode("utf-8"), mode, expect=before.encode("utf-8"))
    except ChangedMeanwhileError:
        if backup is not None:
            backup.unlink(missing_ok=True)  # of a version that is gone: the next try keeps its own
        raise
    return backup


def _backup(path: Path, before: str, mode: int) -> Path:
    """A copy of ``before`` (the settings as read) beside ``path``, created with the
    settings' own ``mode`` (settings may hold secrets in ``env``: a backup made with the
    umask's 0644 and narrowed afterwards could be read by another user in between), and
    never over an older backup."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    for n in range(1000):
        backup = path.with_name(f"{path.name}.{stamp}{f'-{n}' if n else ''}.bak")
        try:
            fd = os.open(backup, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode & 0o600)
        except FileExistsError:
            continue
        with os.fdopen(fd, "wb") as file:
            file.write(before.encode("utf-8"))
            os.fchmod(file.fileno(), mode)  # group and other bits only once the content is in, if the settings had any
        return backup
    raise ValidationError("settings", f"too many backups of {path} this second")
