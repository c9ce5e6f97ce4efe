"""Switching to a session's tmux pane (``shmstore go``, and Enter in ``shmstore top``), only
when the pane is still that agent's.

A session records the tmux pane (``%N``) and tmux server socket its agent ran in, as its
hook read them, and the agent's pid and start time. Before switching, :func:`jump` checks
that all of it still holds, and refuses with :class:`~shmstore.errors.JumpRefusedError`
otherwise, never switching:

- the session is open, has a tmux pane, and its agent runs on this host;
- the agent's pid still names the agent: the process lives and started when the manager
  first saw it (a reused pid has another start time);
- the tmux server answers at the recorded socket and still has the pane, alive;
- the pane's own process (``#{pane_pid}``, the shell or program tmux started in it) is the
  agent or one of its ancestors (read from ``/proc/PID/stat``'s parent links), so a pane
  closed and its id given to another pane, or a pane now running another program, is
  never taken for the agent's.

Then it makes the pane the active pane of its window and that window the current one of
its tmux session (``select-window``, ``select-pane``), and, when called inside a client of
the same tmux server, switches that client to it (``switch-client``), across tmux sessions.
Outside tmux (or inside another tmux server) there is no client of ours to switch: the
pane is left current for the next attach, and the result says how to attach. Every tmux
call is bounded by a timeout.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import subprocess
from collections.abc import Mapping

from . import procs
from .errors import JumpRefusedError
from .model import Session, Terminal

#: Seconds each tmux command may take before the jump is given up.
TMUX_TIMEOUT = 5.0
#: The most parent links followed from the agent's process up to the pane's.
MAX_ANCESTORS = 1024
#: What ``list-panes`` prints for each pane: tab-separated; the session's name (which may
#: hold anything, tabs too) last.
_PANE_FORMAT = "\t".join(
    ("#{pane_id}", "#{pane_pid}", "#{pane_dead}", "#{window_id}", "#{window_index}", "#{session_id}", "#{session_name}")
)


@dataclasses.dataclass(frozen=True, slots=True)
class Pane:
    """A tmux pane as its server lists it."""

    id: str  # %N
    pid: int  # the process tmux started in it
    dead: bool  # its process exited and the pane stays (remain-on-exit)
    window_id: str  # @N
    window_index: str
    session_id: str  # $N
    session_name: str


@dataclasses.dataclass(frozen=True, slots=True)
class Jump:
    """What :func:`jump` did: ``switched`` is True when a tmux client (the caller's) now
    shows the pane; else the pane was only made current in its tmux session, for the next
    attach (``attach`` is the command that does it)."""

    session_id: str
    socket: str
    pane: Pane
    switched: bool

    @property
    def attach(self) -> str:
        return shlex.join(["tmux", "-S", self.socket, "attach-session", "-t", self.pane.session_id])

    def message(self) -> str:
        """One line for the user: where they are now, or how to get there."""
        where = f"tmux pane {self.pane.id} (window {self.pane.window_index} of tmux session {self.pane.session_name!r})"
        if self.switched:
            return f"switched to {where}"
        return f"made {where} current; not inside a client of that tmux server, so attach with: {self.attach}"


def jump(session: Session, environ: Mapping[str, str] = os.environ, timeout: float = TMUX_TIMEOUT) -> Jump:
    """Switch to the tmux pane of ``session``'s agent, after checking it is still the
    agent's (see the module's docstring); raises :class:`JumpRefusedError` without
    switching when it is not, or cannot be told. ``environ`` is the caller's environment:
    its ``$TMUX`` says whether it runs inside a client of the pane's tmux server (the tmux
    commands run with it, so tmux finds that client as it does for a command typed in a
    pane)."""
    socket, pane_id = _target(session)
    agent_pid = _agent(session)
    pane = _find_pane(session.id, socket, pane_id, environ, timeout)
    _check_owner(session.id, pane, agent_pid, session.pid_start)
    _tmux(
        session.id, socket, environ, timeout, "select-window", "-t", pane.window_id, ";", "select-pane", "-t", pane.id
    )
    switched = inside(socket, environ)
    if switched:
        _tmux(session.id, socket, environ, timeout, "switch-client", "-t", pane.id)
    return Jump(session.id, socket, pane, switched)


def inside(socket: str, environ: Mapping[str, str]) -> bool:
    """Does ``environ`` (``$TMUX``) say we run inside a client of the tmux server at ``socket``?"""
    ours = environ.get("TMUX", "").split(",", 1)[0]
    if not ours:
        return False
    try:
        return os.path.samefile(ours, socket)
    except OSError:
        return ours == socket


def describe(terminal: Terminal | None) -> str:
    """The terminal a session has, in words: ``WezTerm pane 3``, ``no terminal``..."""
    if terminal is None:
        return "no terminal recorded (a background agent, or one whose hook saw none)"
    parts = []
    if terminal.wezterm_pane is not None:
        parts.append(f"WezTerm pane {terminal.wezterm_pane}")
    if terminal.kitty_window_id is not None:
        parts.append(f"kitty window {terminal.kitty_window_id}")
    if terminal.iterm_session_id is not None:
        parts.append(f"iTerm2 session {terminal.iterm_session_id}")
    if terminal.tty is not None:
        parts.append(f"tty {terminal.tty}")
    return "terminal " + ", ".join(parts) if parts else "no terminal recorded"


# -- the checks ---------------------------------------------------------------------------------


def _target(session: Session) -> tuple[str, str]:
    """The tmux socket and pane of an open session; refused for a closed one or one not in tmux."""
    if session.closed:
        raise JumpRefusedError(session.id, "closed", f"session {session.id!r} is closed ({session.closed_reason})")
    terminal = session.terminal
    if terminal is None or terminal.tmux_pane is None or terminal.tmux_socket is None:
        raise JumpRefusedError(
            session.id,
            "no_tmux",
            f"session {session.id!r} does not run in tmux ({describe(terminal)}); only a tmux pane can be switched to",
        )
    return terminal.tmux_socket, terminal.tmux_pane


def _agent(session: Session) -> int:
    """The agent's pid, once it is known to be this host's and still the agent."""
    if session.host is not None and session.host != procs.host_id():
        raise JumpRefusedError(
            session.id, "other_host", f"session {session.id!r} runs on another host ({session.host})"
        )
    if session.pid is None or session.pid_start is None:
        raise JumpRefusedError(
            session.id,
            "unverified",
            f"session {session.id!r} has no agent pid the store could check: its pane cannot be told to be the agent's",
        )
    if not procs.agent_alive(session.pid, session.pid_start):
        raise JumpRefusedError(
            session.id, "agent_gone", f"the agent of session {session.id!r} (pid {session.pid}) is no longer running"
        )
    return session.pid


def _find_pane(id: str, socket: str, pane_id: str, environ: Mapping[str, str], timeout: float) -> Pane:
    """The pane ``pane_id`` as the tmux server at ``socket`` lists it now."""
    if not os.path.exists(socket):
        raise JumpRefusedError(id, "server_gone", f"the tmux server of session {id!r} is gone (no socket {socket})")
    listed = _tmux(id, socket, environ, timeout, "list-panes", "-a", "-F", _PANE_FORMAT)
    for line in listed.splitlines():
        fields = line.split("\t", 6)
        if len(fields) == 7 and fields[0] == pane_id and fields[1].isdigit():
            pane = Pane(fields[0], int(fields[1]), fields[2] == "1", *fields[3:])
            if pane.dead:
                break
            return pane
    raise JumpRefusedError(
        id, "pane_gone", f"tmux pane {pane_id} of session {id!r} is gone (closed, or its program exited)"
    )


def _check_owner(id: str, pane: Pane, agent: int, agent_start: int | None) -> None:
    """Refuse unless the pane's process is ``agent`` or one of its ancestors, and ``agent``
    is still the process that started at ``agent_start``."""
    pid, hops = agent, 0
    while pid > 0 and hops <= MAX_ANCESTORS:
        stat = procs.process_stat(pid)
        if stat is None:
            break
        if pid == agent and stat.start != agent_start:
            raise JumpRefusedError(id, "agent_gone", f"the agent of session {id!r} (pid {agent}) is no longer running")
        if pid == pane.pid:
            return
        pid, hops = stat.parent, hops + 1
    raise JumpRefusedError(
        id,
        "pane_reused",
        f"tmux pane {pane.id} no longer runs the agent of session {id!r} (pane process {pane.pid} is not "
        f"agent pid {agent} nor an ancestor of it): not switching",
    )


def _run(socket: str, environ: Mapping[str, str], timeout: float, *args: str) -> subprocess.CompletedProcess[str]:
    """``tmux -S SOCKET ARGS...`` in ``environ``, its output captured, killed at ``timeout``
    (``subprocess.TimeoutExpired``); OSError when tmux cannot be run."""
    argv = ["tmux", "-S", socket, *args]
    return subprocess.run(
        argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout, env=dict(environ), check=False
    )


def _tmux(id: str, socket: str, environ: Mapping[str, str], timeout: float, *args: str) -> str:
    """Run ``tmux -S SOCKET ARGS...``; its stdout. A server that cannot be reached is
    ``server_gone``; any other failure, or no answer within ``timeout``, ``tmux_failed``."""
    try:
        done = _run(socket, environ, timeout, *args)
    except FileNotFoundError:
        raise JumpRefusedError(id, "tmux_failed", "tmux is not installed (not on $PATH)") from None
    except OSError as exc:
        raise JumpRefusedError(id, "tmux_failed", f"tmux could not be run: {exc}") from None
    except subprocess.TimeoutExpired:
        raise JumpRefusedError(
            id, "tmux_failed", f"tmux did not answer within {timeout:g} s: {shlex.join(args)}"
        ) from None
    if done.returncode != 0:
        problem = done.stderr.strip() or f"exit status {done.returncode}"
        # The last two: a server that exits while it takes the call (right after kill-server).
        gone = ("no server running", "error connecting to", "server exited unexpectedly", "lost server")
        if any(words in problem for words in gone):
            raise JumpRefusedError(id, "server_gone", f"the tmux server of session {id!r} is gone ({problem})")
        raise JumpRefusedError(id, "tmux_failed", f"tmux {args[0]} failed: {problem}")
    return done.stdout


#: Seconds ``tmux display`` may take to say whether a pane is looked at (shmstore notify).
LOOK_TIMEOUT = 2.0


def looked_at(session: Session, timeout: float = LOOK_TIMEOUT) -> bool:
    """Whether the user is looking at ``session``'s agent: its tmux pane is the active pane
    of the active window of a tmux session with a client attached. False when that cannot
    be known (no tmux pane, no tmux, the server does not answer in ``timeout`` seconds)."""
    terminal = session.terminal
    if terminal is None or not terminal.tmux_pane or not terminal.tmux_socket:
        return False
    shown = "#{pane_active} #{window_active} #{session_attached}"
    try:
        result = _run(terminal.tmux_socket, os.environ, timeout, "display", "-p", "-t", terminal.tmux_pane, shown)
    except (OSError, subprocess.SubprocessError):
        return False
    fields = result.stdout.split()
    return result.returncode == 0 and len(fields) == 3 and fields[:2] == ["1", "1"] and fields[2] not in ("", "0")
