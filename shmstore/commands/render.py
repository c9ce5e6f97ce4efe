"""Sessions and events as text for people: the table (closed sessions with the command
that resumes them), a session with its agent, pid and history, one line per event, the
short cells of ``shmstore top``; and whether a stream may be sent terminal escape codes at
all. Pure functions (but for reading the environment in :func:`escapes_allowed`); the CLI,
the demo and :mod:`~shmstore.commands.top` print what they return.

Ids and working dirs are the user's (or an agent's) text and may hold control characters:
they are shown escaped, so nothing in the store can put an escape sequence on a terminal.
"""

from __future__ import annotations

import os
import posixpath
import shlex
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TextIO

from ..feed import Event, EventKind
from ..model import AgentType, ApiUsage, Session, Status

#: What an event line puts between a status and the next.
ARROW = "\u2192"


def printable(text: str) -> str:
    """``text`` with every control or unprintable character escaped (``\\x1b``, ``\\n``...)."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def escapes_allowed(stream: TextIO, environ: Mapping[str, str] = os.environ) -> bool:
    """Whether terminal escape codes (clearing the screen, colour) may be written to
    ``stream``: only when it is a terminal, and not when the user asks for plain output with
    ``NO_COLOR`` (set and not empty, as no-color.org defines it) or ``TERM=dumb``. A pipe or
    a file gets plain lines."""
    if environ.get("NO_COLOR") or environ.get("TERM") == "dumb":
        return False
    return stream.isatty()


#: A column of the session table: its header and how a session's cell is made (``at`` is now).
_Column = tuple[str, Callable[[Session, float], str]]

_ID: _Column = ("ID", lambda s, at: printable(s.id))
_STATUS: _Column = ("STATUS", lambda s, at: status_text(s))
_FOR: _Column = ("FOR", lambda s, at: age(at - s.since))
_SEEN: _Column = ("LAST SEEN", lambda s, at: age(at - (s.last_activity or s.since)) + " ago")
_TOKENS: _Column = ("TOKENS IN/OUT", lambda s, at: "-" if s.api_usage is None else _tokens(s.api_usage))
_CHANGES: _Column = ("CHANGES", lambda s, at: str(len(s.history)))
_REV: _Column = ("REV", lambda s, at: str(s.revision))
_AGENT: _Column = ("AGENT", lambda s, at: s.agent_type.value)
_RESUME: _Column = ("RESUME", lambda s, at: "-" if s.session_id is None else printable(s.session_id))
_DIR: _Column = ("WORKING DIR", lambda s, at: printable(s.working_dir))


def status_text(session: Session) -> str:
    """The status as the table shows it: with why a closed session closed, or that a live
    one has gone stale."""
    if session.closed_reason is not None:
        return f"{session.status} ({printable(session.closed_reason)})"
    return f"{session.status} (stale)" if session.stale else session.status.value


def format_table(sessions: Sequence[Session], at: float | None = None, *, resume: bool = False) -> str:
    """Sessions as an aligned text table, newest change first. The agent column is left out
    when every session is Claude Code's, the tokens column when no session has usage;
    ``resume=True`` adds the agent's resume id."""
    at = time.time() if at is None else at
    columns = [_ID, _STATUS, _FOR, _SEEN]
    if any(s.agent_type is not AgentType.CLAUDE_CODE for s in sessions):
        columns.insert(1, _AGENT)  # only Claude Code's: the column says nothing
    if any(s.api_usage is not None for s in sessions):
        columns.append(_TOKENS)
    columns += [_CHANGES, _REV]
    if resume:
        columns.append(_RESUME)
    columns.append(_DIR)  # last and not padded: a long path does not widen the others
    rows = [[header for header, _ in columns]]
    rows += [[cell(s, at) for _, cell in columns] for s in sorted(sessions, key=lambda s: s.since, reverse=True)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(columns) - 1)]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=False)) + "  " + row[-1] for row in rows
    )


def format_closed(sessions: Sequence[Session], at: float | None = None) -> str:
    """Closed sessions as a table with their resume ids, and how to resume the newest."""
    table = format_table(sessions, at, resume=True)
    resumable = [s for s in sessions if resume_command(s)]
    if not resumable:
        return table
    newest = max(resumable, key=lambda s: s.since)
    return f"{table}\n\nresume the newest: {resume_command(newest)}"


def resume_command(session: Session) -> str:
    """The shell command that resumes ``session``'s agent where it ran (Claude Code looks a
    session up by its id among those of the current directory), or "" without a resume id."""
    if session.session_id is None or session.agent_type is not AgentType.CLAUDE_CODE:
        return ""
    directory, id = (shlex.quote(printable(text)) for text in (session.working_dir, session.session_id))
    return f"cd {directory} && claude --resume {id}"


def format_session(session: Session) -> str:
    """One session: its table row; its agent, pid and resume id; then its history, one
    transition a line."""
    pid = "-" if session.pid is None else str(session.pid)
    resume = "-" if session.session_id is None else printable(session.session_id)
    lines = [format_table([session]), f"agent {session.agent_type}  pid {pid}  resume id {resume}"]
    if session.status is Status.CLOSED and resume_command(session):
        lines.append(f"resume: {resume_command(session)}")
    for entry in session.history:
        lines.append(f"  {clock(entry.timestamp)}  {entry.from_:>9} -> {entry.to:<9} after {entry.duration:.1f}s")
    return "\n".join(lines)


def format_event(event: Event) -> str:
    """One human line for an event of the change feed."""
    head = f"rev {event.revision:<6} {event.kind:<10}"
    if event.kind is EventKind.SNAPSHOT:
        return f"{head} {len(event.sessions or ())} sessions"
    id = printable(event.id or "")
    session = event.session
    if session is None:
        return f"{head} {id}"
    detail = session.status.value
    if event.kind is EventKind.TRANSITION and session.history:
        detail = f"{session.history[-1].from_} {ARROW} {session.status}"
    elif event.kind is EventKind.REPORT:
        detail = reported(session)
    elif event.kind is EventKind.ADD_USAGE and session.api_usage is not None:
        detail = f"tokens {session.api_usage.input_tokens}/{session.api_usage.output_tokens}"
    return f"{head} {id}  {detail}"


def reported(session: Session) -> str:
    """What a report did to ``session`` (as the report left it): ``working \u2192 question`` when it
    changed the status, ``new \u2192 working`` when it created the session, else ``still working``.

    A report that changes the status adds a history entry stamped with the new ``since``,
    which is also the session's ``last_activity``; one that only shows life moves
    ``last_activity`` alone."""
    status = session.status.value
    if session.last_activity != session.since:
        return f"still {status}"
    if session.history and session.history[-1].timestamp == session.since and session.history[-1].to is session.status:
        return f"{session.history[-1].from_} {ARROW} {status}"
    if not session.history:
        return f"new {ARROW} {status}"
    return f"still {status}"


def project(session: Session) -> str:
    """The session's project as people name it: the last part of its working directory."""
    return printable(posixpath.basename(session.working_dir.rstrip("/")) or "/")


def short_id(id: str, length: int = 8) -> str:
    """The first ``length`` characters of an id (a Claude Code session id is a UUID, whose
    first eight hex digits tell a user's sessions apart)."""
    return printable(id[:length])


def count(n: int) -> str:
    """A count in a few characters: 999, 1.2k, 34k, 5.6M."""
    if n < 1000:
        return str(n)
    scaled = float(n)
    for unit in "kMGTP":
        scaled /= 1000
        if round(scaled, 1) < 10:
            return f"{scaled:.1f}{unit}"
        if round(scaled) < 1000:
            return f"{scaled:.0f}{unit}"
    return f"{scaled:.0f}P"


def tokens(usage: ApiUsage | None) -> str:
    """Tokens in and out, short: ``12k/3.4k``; ``-`` before the first usage report."""
    return "-" if usage is None else f"{count(usage.input_tokens)}/{count(usage.output_tokens)}"


def _tokens(usage: ApiUsage) -> str:
    return f"{usage.input_tokens}/{usage.output_tokens}"


def age(seconds: float) -> str:
    """A duration as 42s, 3m07s or 2h05m."""
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.0f}s"
    if seconds < 3600:
        return f"{seconds // 60:.0f}m{seconds % 60:02.0f}s"
    return f"{seconds // 3600:.0f}h{seconds % 3600 // 60:02.0f}m"


def clock(timestamp: float) -> str:
    """A timestamp as local wall-clock time to the millisecond."""
    return time.strftime("%H:%M:%S", time.localtime(timestamp)) + f".{int(timestamp * 1000) % 1000:03d}"


def format_status(info: dict[str, Any], at: float | None = None) -> str:
    """The manager's ``info()`` as aligned lines for people."""
    at = time.time() if at is None else at
    uss = info.get("uss")
    if info.get("backend") == "redis":
        rows = [
            ("store", f"Redis at {info.get('address', '?')}"),
            ("epoch", info["epoch"]),
            ("revision", str(info["revision"])),
            ("sessions", f"{info['live']} live, {info['closed']} recently closed"),
        ]
        width = max(len(name) for name, _ in rows)
        return "\n".join(f"{name + ':':<{width + 1}} {printable(str(value))}" for name, value in rows)
    rows = [
        ("manager", f"up at {info.get('address', '?')}"),
        ("pid", str(info["pid"])),
        ("uptime", age(at - info["started"]) if "started" in info else "?"),
        ("epoch", info["epoch"]),
        ("revision", str(info["revision"])),
        ("sessions", f"{info['live']} live, {info['closed']} recently closed"),
        ("clients", f"{info.get('clients', '?')} connected (this one included)"),
        ("memory", "?" if uss is None else f"{uss / 2**20:.1f} MiB USS"),
        ("state file", _format_state(info.get("state"), at)),
        ("http events", _format_http(info.get("http"))),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name + ':':<{width + 1}} {printable(str(value))}" for name, value in rows)


def _format_http(http: dict[str, Any] | None) -> str:
    if not http:
        return "none (serve --http PORT takes agents' events over HTTP)"
    return f"http://127.0.0.1:{http['port']}/shmstore/hook/AGENT, {http['events']} taken"


def format_spool(counts: dict[str, int], path: str) -> str:
    """The hook reports the manager has not taken yet (:mod:`shmstore.spool`), and those a
    full spool dropped."""
    line = f"spool: {counts['pending']} reports waiting, {counts['dropped']} dropped ({path})"
    if counts["pending"]:
        line += "; the manager delivers them when it answers"
    return printable(line)


def _format_state(saved: dict[str, Any] | None, at: float) -> str:
    if saved is None:
        return "none (sessions are not kept across a restart; serve --state FILE keeps them)"
    if saved["error"]:
        last = f"last save failed: {saved['error']}"
    elif saved["saved"] is None:
        last = "not saved since the start (nothing changed)"
    else:
        last = f"saved {age(at - saved['saved'])} ago ({saved['sessions']} sessions, {saved['ms']} ms)"
    return f"{saved['path']}, {last}"
