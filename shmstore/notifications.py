"""Telling the user that a session waits for them: what ``shmstore notify`` does with the
change feed.

:class:`Coalescer` turns the feed's events into :class:`Alert` batches: a session that
*enters* one of the chosen statuses (``question``, ``attention``) is held for a short window,
dropped if it leaves that status before the window ends, and sent with every other session
that entered one within the same window, as one batch. A snapshot (the start, a resync)
only tells it where each session is: sessions already waiting then are not news.

The channels deliver a batch: :class:`Desktop` (``notify-send`` on Linux, ``osascript``
on macOS), :class:`TerminalBell` (BEL and an OSC 9 or OSC 777 escape to a tty or stdout),
:class:`Url` (an ntfy-style HTTP POST) and :class:`Command` (a user's command, once per
session, with the session's fields in ``SHMSTORE_*`` variables). Each external call has a
timeout; :class:`Dispatcher` delivers from a thread of its own so that the follower never
waits for a channel, skips the sessions the user is looking at (:func:`shmstore.tmux.looked_at`: the
active pane of an attached tmux session), and logs a channel's first failure to stderr,
never raising it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Protocol, TextIO

from . import tmux
from .feed import Event, EventKind
from .model import Session, Status

#: Seconds each external call (a notifier program, a POST, a user's command, tmux) may take.
CALL_TIMEOUT = 5.0
DEFAULT_ON = (Status.QUESTION, Status.ATTENTION)
DEFAULT_COALESCE = 2.0


@dataclasses.dataclass(frozen=True, slots=True)
class Alert:
    """A session that entered a notifying status: ``old`` is the status it left (None: a
    new session), ``seconds`` how long it was in it."""

    session: Session
    old: Status | None
    seconds: float

    @property
    def status(self) -> Status:
        return self.session.status

    def line(self) -> str:
        """One line saying who waits, for what, and where."""
        s = self.session
        return _clean(f"{s.id} ({s.agent_type}) {_what(self.status)} in {s.working_dir}")

    def environment(self) -> dict[str, str]:
        """The session's fields as a user's command gets them."""
        s = self.session
        terminal = s.terminal
        return {
            "SHMSTORE_ID": s.id,
            "SHMSTORE_AGENT": str(s.agent_type),
            "SHMSTORE_OLD_STATUS": "" if self.old is None else str(self.old),
            "SHMSTORE_STATUS": str(s.status),
            "SHMSTORE_DIR": s.working_dir,
            "SHMSTORE_SECONDS": f"{self.seconds:.1f}",
            "SHMSTORE_SINCE": f"{s.since:.3f}",
            "SHMSTORE_SESSION_ID": s.session_id or "",
            "SHMSTORE_PID": "" if s.pid is None else str(s.pid),
            "SHMSTORE_TMUX_PANE": (terminal and terminal.tmux_pane) or "",
            "SHMSTORE_TMUX_SOCKET": (terminal and terminal.tmux_socket) or "",
            "SHMSTORE_TTY": (terminal and terminal.tty) or "",
        }


def title(alerts: Sequence[Alert]) -> str:
    if len(alerts) == 1:
        return _clean(f"shmstore: {alerts[0].session.agent_type} {_what(alerts[0].status)}")
    return f"shmstore: {len(alerts)} sessions wait for you"


def body(alerts: Sequence[Alert]) -> str:
    return "\n".join(alert.line() for alert in alerts)


def _what(status: Status) -> str:
    return "asks a question" if status is Status.QUESTION else "needs attention"


def _clean(text: str) -> str:
    """``text`` without control characters (an id or a directory may hold any)."""
    return "".join(c if c.isprintable() else "?" for c in text)


def _seconds_in_old(session: Session, old: Status | None, at: float) -> float:
    last = session.history[-1] if session.history else None
    if last is not None and last.to is session.status and last.from_ is old:
        return last.duration
    return max(0.0, at - session.since) if old is None else 0.0


class Coalescer:
    """Which sessions to notify about, from the change feed's events, in batches.

    Feed it every event (:meth:`feed`); :meth:`due` says when the open window ends, and
    :meth:`take` returns the batch once it has. ``window`` 0 makes each event its own batch.
    """

    def __init__(self, on: Iterable[Status] = DEFAULT_ON, window: float = DEFAULT_COALESCE) -> None:
        self.on = frozenset(on)
        self.window = window
        self._status: dict[str, Status] = {}  # each live session's status, as the feed last said
        self._pending: dict[str, Alert] = {}  # in the order they came
        self._opened: float | None = None  # when the open window began

    def feed(self, event: Event, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        if event.kind is EventKind.SNAPSHOT:
            self._status = {s.id: s.status for s in event.sessions or ()}
            # What waited to be told is still told if the session still waits so.
            self._pending = {id: a for id, a in self._pending.items() if self._status.get(id) is a.status}
            self._opened = self._opened if self._pending else None
            return
        if event.id is None:
            return
        session = event.session
        old = self._status.pop(event.id, None)
        if session is None or session.closed:
            self._pending.pop(event.id, None)
            return
        self._status[event.id] = session.status
        if session.status not in self.on:
            self._pending.pop(event.id, None)  # it left before it was told: nothing to tell
        elif session.status is not old:
            earlier = self._pending.get(event.id)
            if earlier is not None:  # question -> attention within the window: one alert, as it is now
                self._pending[event.id] = dataclasses.replace(earlier, session=session)
            else:
                self._pending[event.id] = Alert(session, old, _seconds_in_old(session, old, time.time()))
            if self._opened is None:
                self._opened = now
        if not self._pending:
            self._opened = None

    def due(self) -> float | None:
        """When (time.monotonic) the open window ends; None when nothing waits to be told."""
        return None if self._opened is None else self._opened + self.window

    def take(self, now: float | None = None) -> list[Alert]:
        """The batch, once its window has ended; else nothing."""
        due = self.due()
        now = time.monotonic() if now is None else now
        if due is None or now < due:
            return []
        batch, self._pending, self._opened = list(self._pending.values()), {}, None
        return batch


# -- channels ------------------------------------------------------------------------------


class Channel(Protocol):
    name: str

    def send(self, alerts: Sequence[Alert]) -> None:
        """Deliver ``alerts``; raise (anything) on failure."""


#: The process groups of the programs running now (each one's pid), for :func:`kill_running`.
_running: set[int] = set()


def kill_running() -> None:
    """Kill every program a channel is running now, with its children (on the way out)."""
    for pid in list(_running):
        with contextlib.suppress(OSError):
            os.killpg(pid, signal.SIGKILL)


def _run(argv: Sequence[str], env: Mapping[str, str] | None = None, shell: bool = False) -> None:
    """Run ``argv`` (with ``shell``: ``argv[0]`` through ``sh -c``) for at most
    :data:`CALL_TIMEOUT` seconds, in a process group of its own that is killed whole on a
    timeout (a shell's children too); raise RuntimeError if it fails or takes too long."""
    with subprocess.Popen(
        argv[0] if shell else list(argv),
        shell=shell,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=None if shell else subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    ) as proc:
        _running.add(proc.pid)
        try:
            _, err = proc.communicate(timeout=CALL_TIMEOUT)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(OSError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()  # not its pipe: a process that left the group may hold it open
            raise RuntimeError(f"did not finish within {CALL_TIMEOUT:g} s") from None
        finally:
            _running.discard(proc.pid)
    if proc.returncode != 0:
        said = err.decode(errors="replace").strip()
        raise RuntimeError(f"exit {proc.returncode}{': ' + said[-500:] if said else ''}")


@dataclasses.dataclass
class Desktop:
    """A desktop notification: ``notify-send`` (Linux), or ``osascript`` (macOS)."""

    program: str
    name: str = "desktop"

    @classmethod
    def found(cls, platform: str = sys.platform) -> Desktop | None:
        """The desktop channel this machine has, found on PATH; None if none."""
        program = shutil.which("osascript" if platform == "darwin" else "notify-send")
        return None if program is None else cls(program)

    def send(self, alerts: Sequence[Alert]) -> None:
        if os.path.basename(self.program) == "osascript":
            quoted = [t.replace("\\", "\\\\").replace('"', '\\"') for t in (body(alerts), title(alerts))]
            _run([self.program, "-e", f'display notification "{quoted[0]}" with title "{quoted[1]}"'])
        else:
            _run([self.program, "--app-name=shmstore", "--", title(alerts), body(alerts)])


@dataclasses.dataclass
class TerminalBell:
    """BEL and a terminal notification escape: OSC 9 (iTerm2, WezTerm, Windows Terminal,
    ghostty...) or OSC 777 (rxvt, foot, ghostty...), to ``tty`` or else ``stream``."""

    tty: str | None = None
    osc: int = 9
    stream: TextIO | None = None
    name: str = "bell"

    def send(self, alerts: Sequence[Alert]) -> None:
        text = " | ".join(alert.line() for alert in alerts).replace(";", ",")
        head = title(alerts).replace(";", ",")
        escape = f"\x1b]777;notify;{head};{text}\x07" if self.osc == 777 else f"\x1b]9;{head}: {text}\x07"
        data = "\a" + escape
        if self.tty is None:
            stream = self.stream or sys.stdout
            stream.write(data)
            stream.flush()
            return
        # Non-blocking and never our controlling terminal: a stuck tty must not hang us.
        fd = os.open(self.tty, os.O_WRONLY | os.O_NOCTTY | os.O_NONBLOCK)
        try:
            os.write(fd, data.encode())
        finally:
            os.close(fd)


@dataclasses.dataclass
class Url:
    """An HTTP POST of the batch as text, its title in a ``Title`` header (ntfy's form)."""

    url: str
    name: str = "url"

    def send(self, alerts: Sequence[Alert]) -> None:
        head = title(alerts).encode("ascii", "replace").decode()
        request = urllib.request.Request(
            self.url, data=body(alerts).encode(), method="POST", headers={"Title": head, "Tags": "shmstore"}
        )
        with urllib.request.urlopen(request, timeout=CALL_TIMEOUT) as response:
            response.read(65536)


@dataclasses.dataclass
class Command:
    """The user's command (``sh -c``), once per session, with its ``SHMSTORE_*`` variables."""

    command: str
    name: str = "command"

    def send(self, alerts: Sequence[Alert]) -> None:
        failures = []
        for alert in alerts:
            env = {**os.environ, **alert.environment()}
            env["SHMSTORE_TITLE"], env["SHMSTORE_MESSAGE"] = title([alert]), alert.line()
            try:
                _run([self.command], env=env, shell=True)
            except (OSError, subprocess.SubprocessError, RuntimeError) as exc:
                failures.append(f"{alert.session.id}: {exc}")
        if failures:
            raise RuntimeError("; ".join(failures))


class Dispatcher:
    """Delivers batches through ``channels`` from a thread of its own, in order, skipping
    the sessions ``skip`` says the user looks at. A channel's failure is logged to
    ``log`` the first time (and again the first time after it worked once more), never raised."""

    def __init__(
        self,
        channels: Sequence[Channel],
        skip: Callable[[Session], bool] = tmux.looked_at,
        log: Callable[[str], None] | None = None,
    ) -> None:
        self.channels = list(channels)
        self.skip = skip
        self.log = log or (lambda text: print(f"shmstore: notify: {text}", file=sys.stderr, flush=True))
        self._failing: set[str] = set()
        self._queue: queue.SimpleQueue[list[Alert] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name="shmstore-notify", daemon=True)
        self._thread.start()

    def put(self, alerts: list[Alert]) -> None:
        if alerts:
            self._queue.put(alerts)

    def close(self, timeout: float = 1.0) -> None:
        """Deliver what is queued for up to ``timeout`` seconds, then kill what a channel
        still runs (a user's command and its children) and stop."""
        self._queue.put(None)
        self._thread.join(timeout)
        kill_running()

    def _loop(self) -> None:
        while (alerts := self._queue.get()) is not None:
            self.deliver(alerts)

    def deliver(self, alerts: Sequence[Alert]) -> None:
        shown = [alert for alert in alerts if not self._skipped(alert.session)]
        if not shown:
            return
        for channel in self.channels:
            try:
                channel.send(shown)
            except Exception as exc:  # a failing channel never ends the follower
                if channel.name not in self._failing:
                    self._failing.add(channel.name)
                    self.log(f"the {channel.name} channel failed: {_clean(str(exc)) or type(exc).__name__}")
            else:
                if channel.name in self._failing:
                    self._failing.discard(channel.name)
                    self.log(f"the {channel.name} channel works again")

    def _skipped(self, session: Session) -> bool:
        try:
            return self.skip(session)
        except Exception:  # a skip that fails tells rather than hides
            return False
