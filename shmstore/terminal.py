"""Where an agent's session runs: what identifies its terminal, read by the hook from the
agent's environment and /proc, and checked as the store takes it.

A terminal is a list of :data:`FIELDS` (None for each one not known), as a record keeps it
and reports carry it; :class:`shmstore.model.Terminal` is its public value. The hook reads
it (:func:`of_agent`) on every event, so this module imports the standard library's
lightest only.
"""

from __future__ import annotations

import os

from .errors import ValidationError

TYPE_CHECKING = False  # as typing's, without importing typing (~4 ms of the hook's start-up)
if TYPE_CHECKING:
    from collections.abc import Mapping

#: What a terminal is known by: the tmux pane (``TMUX_PANE``, ``%N``) and the socket of its
#: tmux server (the first part of ``TMUX``); the agent's tty; WezTerm's pane
#: (``WEZTERM_PANE``), kitty's window (``KITTY_WINDOW_ID``) and iTerm2's session
#: (``ITERM_SESSION_ID``).
FIELDS = ("tmux_pane", "tmux_socket", "tty", "wezterm_pane", "kitty_window_id", "iterm_session_id")
#: The longest value taken (a socket path, a tty path, an id).
MAX_LENGTH = 256
_VARIABLES = (("wezterm_pane", "WEZTERM_PANE"), ("kitty_window_id", "KITTY_WINDOW_ID"))


def of_agent(environ: Mapping[str, str], pid: int | None) -> list[str | None] | None:
    """The terminal of the agent whose hook runs with ``environ`` (the agent's own, which
    its hooks inherit) and whose process is ``pid``; None when nothing identifies one (a
    background agent, an http hook). A value that would not pass :func:`check_terminal`
    is left out, never failing the report."""
    found: dict[str, str | None] = dict.fromkeys(FIELDS)
    pane, tmux = environ.get("TMUX_PANE", ""), environ.get("TMUX", "")
    if pane and tmux:
        found["tmux_pane"], found["tmux_socket"] = pane, tmux.split(",", 1)[0]
    for name, variable in _VARIABLES:
        found[name] = environ.get(variable) or None
    found["iterm_session_id"] = environ.get("ITERM_SESSION_ID") or None
    found["tty"] = _tty(pid) if pid else None
    terminal = [value if value is not None and _fits(name, value) else None for name, value in found.items()]
    if terminal[0] is None:
        terminal[1] = None  # a tmux server's socket says nothing without the pane
    return terminal if any(terminal) else None


def _tty(pid: int) -> str | None:
    """The terminal the agent's stdin or stdout is (its hooks' are pipes)."""
    for fd in (0, 1, 2):
        try:
            path = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if path.startswith(("/dev/pts/", "/dev/tty")):
            return path
    return None


def _fits(name: str, value: str) -> bool:
    try:
        _check_value(name, value)
    except ValidationError:
        return False
    return True


def check_terminal(value: object, field: str = "terminal") -> list[str | None] | None:
    """A terminal as a record or a report holds it: None, or a list of :data:`FIELDS`'
    values (each a printable string of at most :data:`MAX_LENGTH`, or None), not all None."""
    if value is None:
        return None
    if not isinstance(value, list) or len(value) != len(FIELDS):
        raise ValidationError(field, f"must be a list of {len(FIELDS)} values ({', '.join(FIELDS)}), not {value!r:.80}")
    if not any(item is not None for item in value):
        raise ValidationError(field, "names nothing: give None instead")
    for name, item in zip(FIELDS, value, strict=True):
        if item is not None:
            _check_value(name, item, field)
    return value


def _check_value(name: str, value: object, field: str = "terminal") -> None:
    if not isinstance(value, str) or not 0 < len(value) <= MAX_LENGTH or not value.isprintable():
        raise ValidationError(f"{field}.{name}", f"must be a printable string of 1 to {MAX_LENGTH} characters")
    if name == "tmux_pane" and not (value.startswith("%") and value[1:].isdigit()):
        raise ValidationError(f"{field}.{name}", f"must be a tmux pane id (%N), not {value!r:.80}")
    if name in ("tmux_socket", "tty") and not value.startswith("/"):
        raise ValidationError(f"{field}.{name}", f"must be an absolute path, not {value!r:.80}")
