"""``shmstore top``: a live, full-screen table of the sessions, kept up to date from the
change feed.

Sessions waiting for the user come first (a question, then attention), then working ones,
each group by last activity, newest first. The screen is drawn with ``rich``, which only
this module imports, and only ``shmstore top`` imports this module, so the hook and the
manager never load it.

Two threads: a :class:`~shmstore.clients.follow.Follower` runs on one and keeps a :class:`Board`
up to date (it reconnects on its own when the manager restarts or hangs, and the board
shows "reconnecting…" meanwhile); the main thread owns the terminal. It waits in
``select()`` on the keyboard (read in cbreak mode), on a pipe the follower's thread writes
a byte to when something changed, and on a one-second tick that ages the times shown,
and redraws. Nothing polls the store. ``q`` or Ctrl-C quits (SIGTERM and SIGHUP too),
and the terminal is restored on every way out.

One row is selected (marked ``>``; the arrow keys or ``j``/``k`` move it), and Enter or
``g`` switches to that session's tmux pane with :func:`shmstore.tmux.jump`, the check and
switch ``shmstore go`` makes: a pane that is no longer the agent's is refused, and the
footer says why. The selection follows the session, not the line, as rows reorder, and the
rows scroll to keep it in view. Every line is kept to one line (and the terminal's wrap is
off), so the row selected is always a row drawn. The keys are read by
:mod:`shmstore.commands.keyboard`.

Without a terminal on stdin and stdout, ``top`` prints the table once, without escape
codes, and exits, like ``top -b -n 1``: a script or a pipe gets the same view.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import select
import signal
import sys
import termios
import threading
import time
import tty
from collections.abc import Iterable, Iterator, Mapping, Sequence
from types import FrameType
from typing import IO

from rich import box
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from .. import tmux
from ..clients.client import Client
from ..clients.follow import Follower, Link, Notice
from ..errors import JumpRefusedError
from ..feed import Event
from ..model import Session, Status
from ..transport import address as addr
from .keyboard import REST_OF_SEQUENCE, Keyboard
from .render import age, printable, project, short_id, tokens

#: The order of the groups: what needs the user first.
RANK = {Status.QUESTION: 0, Status.ATTENTION: 1, Status.WORKING: 2, Status.CLOSED: 3}
#: How each status is coloured.
STYLE = {
    Status.QUESTION: "bold magenta",
    Status.ATTENTION: "bold yellow",
    Status.WORKING: "green",
    Status.CLOSED: "dim",
}
#: A terminal at least this wide also shows each session's pid and agent.
WIDE = 100
#: Seconds the header says "resynced" after the follower started again from a snapshot.
RESYNCED_FOR = 10.0
#: Lines of the screen that are not session rows, at most: the header (a second line while
#: reconnecting), a blank, the column names, the rule under them, and the footer (the keys,
#: or what the last jump did). Each is kept to one line, cut short with "…" on a narrow
#: terminal, so that this count holds and every row that is selectable is drawn.
CHROME = 6
#: Seconds the footer shows what the last jump did, unless a key clears it sooner.
NOTE_FOR = 10.0
#: Seconds top waits for each tmux call of a jump (``shmstore go`` waits 5): the screen
#: stands still meanwhile, and a tmux server that answers at all answers in milliseconds.
JUMP_TIMEOUT = 2.0
#: Columns a narrow screen may not squeeze below these widths.
MIN_WIDTH = {"STATUS": 9, "ID": 8}
#: What the footer says the keys do.
FOOTER = "\u2191\u2193/jk select  enter/g go to its tmux pane  q quit"


# -- what is shown: pure functions ------------------------------------------------------------


def ordered(sessions: Iterable[Session]) -> list[Session]:
    """Questions first, then attention, then working; in each, the last active first."""
    return sorted(sessions, key=lambda s: (RANK[s.status], -(s.last_activity or s.since), s.id))


def columns(sessions: Sequence[Session], width: int) -> list[str]:
    """The columns for ``sessions`` on a screen ``width`` wide: the host only when the
    sessions come from more than one (a store several hosts share), tokens only when some
    session has reported usage, pid and agent only when there is room."""
    names = ["STATUS", "PROJECT", "ID", "IN STATUS", "LAST ACTIVE"]
    if len({s.host for s in sessions}) > 1:
        names.insert(1, "HOST")
    if any(s.api_usage is not None for s in sessions):
        names.append("TOKENS IN/OUT")
    if width >= WIDE:
        names += ["PID", "AGENT"]
    return names


def cells(session: Session, names: Sequence[str], at: float) -> list[str]:
    """One row of text for ``session``, in the columns ``names``, at time ``at``."""
    every = {
        "STATUS": f"{session.status} (stale)" if session.stale else session.status.value,
        "HOST": session.host or "-",
        "PROJECT": project(session),
        "ID": short_id(session.id),
        "IN STATUS": age(at - session.since),
        "LAST ACTIVE": age(at - (session.last_activity or session.since)) + " ago",
        "TOKENS IN/OUT": tokens(session.api_usage),
        "PID": "-" if session.pid is None else str(session.pid),
        "AGENT": session.agent_type.value,
    }
    return [every[name] for name in names]


def summary(sessions: Sequence[Session]) -> str:
    """``3 sessions: 1 question, 0 attention, 2 working``."""
    counts = ", ".join(f"{sum(s.status is status for s in sessions)} {status}" for status in list(RANK)[:3])
    return f"{len(sessions)} session{'' if len(sessions) == 1 else 's'}: {counts}"


@dataclasses.dataclass(frozen=True, slots=True)
class Frame:
    """Everything one screen shows: the sessions and the state of the connection.

    ``link`` is ``connecting`` until the first snapshot, then ``live`` or ``reconnecting``;
    ``message`` says why it is reconnecting; ``resynced_at`` is when (``time.time()``) the
    follower last started again from a snapshot after reconnecting."""

    address: str
    sessions: tuple[Session, ...] = ()
    revision: int | None = None
    link: str = "connecting"
    message: str = ""
    resynced_at: float | None = None


def header(frame: Frame, at: float, *, live: bool = True) -> Text:
    """The first line: the state of the connection (if ``live``), how many of each, and
    where (last: a narrow screen cuts it first). While reconnecting, a second line says
    what failed; the table below is then the last one seen."""
    text = Text("shmstore top  ", no_wrap=True, overflow="ellipsis")
    where = f"  {printable(frame.address)}"
    if frame.link == Link.RECONNECTING:
        text.append("reconnecting\u2026", style="bold red")
        if frame.revision is None:
            text.append(f"  (nothing seen yet){where}\n")
        else:
            text.append(f"  (last seen: rev {frame.revision}, {summary(frame.sessions)}){where}\n")
        text.append(printable(frame.message), style="red")
        return text
    if frame.link != Link.LIVE:
        return text.append("connecting\u2026", style="yellow").append(where)
    if live:
        text.append("live", style="green")
        if frame.resynced_at is not None and at - frame.resynced_at < RESYNCED_FOR:
            text.append(" (resynced)", style="cyan")
        text.append("  ")
    return text.append(f"rev {frame.revision}  {summary(frame.sessions)}{where}")


def room(frame: Frame, height: int) -> int:
    """The lines left for rows on a screen ``height`` lines high showing ``frame``."""
    return height - CHROME + (frame.link != Link.RECONNECTING)


def fitting(count: int, lines: int) -> int:
    """How many of ``count`` rows are drawn in ``lines`` lines (see :func:`room`): all when
    they fit; else one line fewer, which counts the others, unless there is room for one
    row only: that row is drawn rather than none."""
    return count if count <= lines else max(lines - 1, min(lines, 1))


def selected(listed: Sequence[Session], choice: str | None) -> Session | None:
    """The selected session: the one ``choice`` names while it is listed, else the first
    (None when there is none)."""
    return next((s for s in listed if s.id == choice), listed[0] if listed else None)


def moved(listed: Sequence[Session], choice: str | None, by: int) -> str | None:
    """The id the selection names after moving ``by`` rows, stopping at the first and last."""
    current = selected(listed, choice)
    if current is None:
        return None
    index = min(max(listed.index(current) + by, 0), len(listed) - 1)
    return listed[index].id


def window(listed: Sequence[Session], lines: int, choice: str | None, start: int = 0) -> tuple[int, list[Session]]:
    """The rows drawn in ``lines`` lines, and the index of the first: from ``start`` (the
    first drawn before), moved as little as keeps the selected session in view."""
    size = fitting(len(listed), lines)
    current = selected(listed, choice)
    if current is None or size == 0:
        return 0, []
    index = listed.index(current)
    start = min(start, index, max(len(listed) - size, 0))
    start = max(start, index - size + 1, 0)
    return start, list(listed[start : start + size])


@dataclasses.dataclass(frozen=True, slots=True)
class Note:
    """What the footer says after a jump: ``text``, a refusal if ``refused``, until ``until``
    (``time.monotonic()``)."""

    text: str
    refused: bool
    until: float


def view(
    frame: Frame,
    at: float,
    width: int,
    height: int,
    *,
    keys: bool = True,
    choice: str | None = None,
    start: int = 0,
    note: Note | None = None,
) -> RenderableType:
    """The whole screen for ``frame`` at time ``at`` on a ``width`` x ``height`` terminal:
    with ``keys``, the selected row (``choice``, see :func:`selected`) marked and in view
    (the rows from ``start``, see :func:`window`), and at the foot ``note`` (what the last
    jump did) or, without one, the keys to press."""
    sessions = ordered(frame.sessions)
    names = columns(sessions, width)
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, expand=False, header_style="bold")
    for name in names:
        first = keys and name == names[0]  # its cells begin with the mark: "> "
        table.add_column(
            f"  {name}" if first else name,
            no_wrap=True,
            overflow="ellipsis",
            # A narrow screen squeezes every column alike: these keep their words readable
            # ("attention", an 8-character id); PROJECT, cut at the end, gives way.
            min_width=MIN_WIDTH.get(name, 0) + (2 if first else 0) or None,
            max_width=32 if name == "PROJECT" else None,
        )
    lines = room(frame, height)
    start, shown = window(sessions, lines, choice, start if keys else 0)
    mark = selected(shown, choice) if keys else None
    for session in shown:
        style = "dim" if session.stale or frame.link == Link.RECONNECTING else STYLE[session.status]
        row = [Text(cell) for cell in cells(session, names, at)]
        row[0].stylize(style)
        if keys:  # the mark leads the first cell, which a narrow screen cuts at its end
            row[0] = Text.assemble((">" if session is mark else " ", "bold"), " ", row[0])
        table.add_row(*row, style="reverse" if session is mark else None)
    parts: list[RenderableType] = [header(frame, at, live=keys), Text(""), table]
    below = len(sessions) - start - len(shown)
    if (start or below) and len(shown) < lines:
        parts.append(_line(f"\u2026 {start} above, {below} below" if start else f"\u2026 and {below} more", "dim"))
    elif not sessions and frame.link == Link.LIVE:
        parts.append(_line("no live sessions", "dim"))
    if keys and note is None:
        parts.append(_line(FOOTER, "dim"))
    elif keys and note is not None:
        parts.append(_line(printable(note.text), "bold red" if note.refused else "bold"))
    return Group(*parts)


def _line(text: str, style: str) -> Text:
    """``text`` on one line, cut short with "…" where the screen is narrower."""
    return Text(text, style=style, no_wrap=True, overflow="ellipsis")


# -- the board: what the follower's thread has seen --------------------------------------------


class Board:
    """The state the screen shows, written by the follower's thread and read by the
    drawing one. A lock guards the frame (swapped whole, so a reader never sees half an
    update); each update writes a byte to a pipe, which wakes the drawing thread's
    ``select()`` at once instead of at its next tick."""

    def __init__(self, address: str) -> None:
        self._lock = threading.Lock()
        self._frame = Frame(address)
        self._error: BaseException | None = None
        self.wake, self._poke = os.pipe()
        os.set_blocking(self._poke, False)

    def frame(self) -> Frame:
        with self._lock:
            return self._frame

    def error(self) -> BaseException | None:
        with self._lock:
            return self._error

    def take(self, item: Event | Notice, sessions: Mapping[str, Session], revision: int | None) -> None:
        """Show what the follower yielded, with the sessions and revision it has now."""
        with self._lock:
            frame = dataclasses.replace(self._frame, sessions=tuple(sessions.values()), revision=revision)
            if isinstance(item, Notice):
                frame = dataclasses.replace(frame, link=item.link, message=_problem(item))
                if item.resynced:
                    frame = dataclasses.replace(frame, resynced_at=time.time())
            elif frame.link == "connecting":
                frame = dataclasses.replace(frame, link=Link.LIVE)
            self._frame = frame
        self.poke()

    def fail(self, error: BaseException) -> None:
        with self._lock:
            self._error = error
        self.poke()

    def poke(self) -> None:
        """Wake the drawing thread (a full pipe already will)."""
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._poke, b"!")

    def drain(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            os.read(self.wake, 4096)

    def close(self) -> None:
        os.close(self.wake)
        os.close(self._poke)


def _problem(notice: Notice) -> str:
    """What failed and when the next try is, in a line."""
    if notice.problem is None:
        return notice.message
    return f"{notice.problem} (try {notice.attempt + 1} in {notice.retry_in:.1f} s)"


def _follow(follower: Follower, board: Board) -> None:
    """The follower's thread: every event and notice onto the board, until closed."""
    try:
        for item in follower:
            board.take(item, follower.sessions, follower.revision)
    except BaseException as exc:  # shown by the drawing thread, which raises it
        board.fail(exc)


# -- the terminal -------------------------------------------------------------------------------


@contextlib.contextmanager
def _cbreak(fd: int) -> Iterator[None]:
    """Keys arrive one by one, unechoed, and Ctrl-Z is an ignored key rather than a suspend
    (the shell that would take the terminal back leaves it in line mode, and top's keys
    would wait for Enter after ``fg``); the settings are restored on the way out."""
    saved = termios.tcgetattr(fd)
    try:
        tty.setcbreak(fd)
        mode = termios.tcgetattr(fd)
        mode[tty.CC][termios.VSUSP] = os.fpathconf(fd, "PC_VDISABLE")
        termios.tcsetattr(fd, termios.TCSANOW, mode)
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


#: Terminal modes top sets while it runs, and their resets: no automatic wrap at the right
#: margin (rich and the terminal may count a character's width differently, as for the
#: vowel signs of Indic scripts, and a line the terminal wrapped would scroll the whole
#: screen), and bracketed paste (pasted text is not taken for keys).
MODES = ("\x1b[?7l\x1b[?2004h", "\x1b[?2004l\x1b[?7h")


@contextlib.contextmanager
def _modes(stream: IO[str]) -> Iterator[None]:
    """:data:`MODES` set, then reset on every way out."""
    stream.write(MODES[0])
    stream.flush()
    try:
        yield
    finally:
        stream.write(MODES[1])
        stream.flush()


@contextlib.contextmanager
def _signals(board: Board) -> Iterator[None]:
    """SIGTERM and SIGHUP quit as Ctrl-C does (restoring the terminal, which their default
    action would leave in cbreak mode on the alternate screen); SIGWINCH redraws at the
    new size at once."""

    def quit(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    def resized(signum: int, frame: FrameType | None) -> None:
        board.poke()

    handlers = {signal.SIGTERM: quit, signal.SIGHUP: quit, signal.SIGWINCH: resized}
    saved = {signum: signal.signal(signum, handler) for signum, handler in handlers.items()}
    try:
        yield
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)


def run(client: Client) -> int:
    """``shmstore top`` for the manager ``client`` speaks to, until ``q``; returns the exit code."""
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        return print_once(client)
    board = Board(addr.format_address(client.address))
    follower = Follower(client)
    thread = threading.Thread(target=_follow, args=(follower, board), name="shmstore-top-follower", daemon=True)
    try:
        with _signals(board):
            _show(board, thread, sys.stdin.fileno())
    except KeyboardInterrupt:  # Ctrl-C, SIGTERM, SIGHUP
        pass
    finally:
        follower.close()
        if thread.ident is not None:  # started: close() ends a call in flight at once, so
            thread.join(client.timeout)  # this bound is only a safety net
        board.close()
    return 0


def _show(board: Board, thread: threading.Thread, keys: int) -> None:
    """Draw until ``q``: on every change, key press and second."""
    console = Console(highlight=False)
    keyboard = Keyboard()
    choice: str | None = None  # the id of the selected session
    start = 0  # the index of the first row drawn
    note: Note | None = None
    live = Live(console=console, screen=True, auto_refresh=False, redirect_stderr=False)
    with _cbreak(keys), _modes(console.file), live:

        def draw() -> None:
            nonlocal start
            start, _ = window(ordered(frame.sessions), room(frame, height), choice, start)
            live.update(view(frame, time.time(), width, height, choice=choice, start=start, note=note), refresh=True)

        thread.start()
        while True:
            error = board.error()
            if error is not None:
                raise error
            # The terminal's own size, not $COLUMNS and $LINES, which rich prefers and which a
            # shell or a test runner may export: stale after a resize, they scrolled the screen.
            console.size = width, height = os.get_terminal_size(console.file.fileno())
            frame = board.frame()
            if note is not None and time.monotonic() >= note.until:
                note = None
            draw()
            tick = 1.0 - time.time() % 1.0  # ages change on the second
            ready, _, _ = select.select([keys, board.wake], [], [], tick)
            if board.wake in ready:
                board.drain()
            if keys not in ready:
                continue
            actions = _read(keys, keyboard)
            if actions is None:
                return
            note = None
            listed = ordered(frame.sessions)
            for action in actions:
                if action == "quit":
                    return
                if action != "go":
                    choice = moved(listed, choice, -1 if action == "up" else 1)
                    continue
                _, shown = window(listed, room(frame, height), choice, start)
                target = selected(shown, choice)
                if target is None:  # no row drawn: nothing the user could see to go to
                    continue
                note = Note(f"switching to {short_id(target.id)}\u2026", False, math.inf)
                draw()  # the screen stands still while tmux answers: say why
                note = _go(target)
                termios.tcflush(keys, termios.TCIFLUSH)  # keys typed blind meanwhile are dropped
                break


def _read(keys: int, keyboard: Keyboard) -> list[str] | None:
    """The actions of what the keyboard sent (None when it is closed), with the rest of an
    escape sequence a read ended inside of, if it follows at once."""
    typed = os.read(keys, 1024)
    if not typed:
        return None
    actions = keyboard.feed(typed)
    while keyboard.holding:
        ready, _, _ = select.select([keys], [], [], REST_OF_SEQUENCE)
        typed = os.read(keys, 1024) if ready else b""
        if not typed:
            keyboard.drop()  # the Esc key alone
            break
        actions += keyboard.feed(typed)
    return actions


def _go(session: Session) -> Note:
    """Switch to ``session``'s tmux pane (top's own ``$TMUX`` names the client to switch);
    what the footer says of it."""
    try:
        done = tmux.jump(session, os.environ, JUMP_TIMEOUT)
    except JumpRefusedError as refused:
        return Note(f"not switching: {refused}", True, time.monotonic() + NOTE_FOR)
    return Note(done.message(), False, time.monotonic() + NOTE_FOR)


def print_once(client: Client) -> int:
    """The table once, for a pipe or a script: no colours, no escape codes."""
    snapshot = client.snapshot()
    frame = Frame(addr.format_address(client.address), snapshot.sessions, snapshot.revision, Link.LIVE)
    console = Console(highlight=False)
    # A pipe has no width: rich assumes 80 columns (or $COLUMNS); lines are not wrapped.
    screen = view(frame, time.time(), console.width, CHROME + len(frame.sessions), keys=False)
    console.print(screen, soft_wrap=True)
    return 0
