"""Sessions and events as text for people: the table, a session with its history, one line
per event. Pure functions; the CLI and the demo print what they return.

Ids and working dirs are the user's (or an agent's) text and may hold control characters:
they are shown escaped, so nothing in the store can put an escape sequence on a terminal.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from .feed import Event, EventKind
from .model import Session


def printable(text: str) -> str:
    """``text`` with every control or unprintable character escaped (``\\x1b``, ``\\n``...)."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def format_table(sessions: Sequence[Session], at: float | None = None) -> str:
    """Sessions as an aligned text table, newest change first."""
    at = time.time() if at is None else at
    rows = [("ID", "STATUS", "FOR", "LAST SEEN", "TOKENS IN/OUT", "CHANGES", "REV", "WORKING DIR")]
    for s in sorted(sessions, key=lambda s: s.since, reverse=True):
        usage = s.api_usage
        tokens = "-" if usage is None else f"{usage.input_tokens}/{usage.output_tokens}"
        status = f"{s.status} (stale)" if s.stale else s.status.value
        if s.closed_reason is not None:
            status = f"{s.status} ({printable(s.closed_reason)})"  # why it closed
        seen = age(at - (s.last_activity or s.since)) + " ago"
        rows.append(
            (
                printable(s.id),
                status,
                age(at - s.since),
                seen,
                tokens,
                str(len(s.history)),
                str(s.revision),
                printable(s.working_dir),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=False)) + "  " + row[-1] for row in rows
    )


def format_session(session: Session) -> str:
    """One session: its table row, then its history, one transition a line."""
    lines = [format_table([session])]
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
        detail = f"{session.history[-1].from_} -> {session.status}"
    elif event.kind is EventKind.ADD_USAGE and session.api_usage is not None:
        detail = f"tokens {session.api_usage.input_tokens}/{session.api_usage.output_tokens}"
    return f"{head} {id}  {detail}"


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
