"""Claude Code hooks: what each hook event means for a session, and the hook's run itself
(:func:`run_hook`), which must be fast and must never fail the agent, but never fail silently
either (:func:`recent_failures`). Putting the hook into Claude Code's settings is
:mod:`shmstore.claude_settings`.

Claude Code runs the configured hook commands on its events and passes each a JSON payload
on stdin with at least ``session_id``, ``cwd`` and ``hook_event_name``, plus fields of the
event's own (``tool_name`` for tool events, ``notification_type`` and ``message`` for
notifications, ``source`` for session start, ``reason`` for session end). ``shmstore hook``
turns one payload into one atomic ``report`` on the store.

This module is on the hook's path, so it imports only the standard library and the light
modules of the package (never ``multiprocess``, ``dill`` or ``orjson``): its statuses are
the plain values of :class:`shmstore.model.Status`, a ``StrEnum`` they compare equal to.
"""

from __future__ import annotations

import _thread  # built in: a thread without `threading` (the failure log's deadline)
import contextlib  # imported by `python -m` itself (runpy): free
import json
import os
import select  # imported by .protocol anyway
import stat  # imported by the interpreter at start-up: free
import sys
import time

from . import address as addr
from . import spool
from .checks import check_closed_reason, check_dir, check_id
from .errors import AuthKeyError, StoreUnavailableError, ValidationError
from .procs import process_stat
from .reporter import report

# The type checker's names, not imported at run time: ``typing`` costs the hook ~4 ms of
# start-up (mypy takes any name TYPE_CHECKING as true).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence
    from typing import Any, BinaryIO

# The values of shmstore.model.Status (importing that module would import orjson).
WORKING, ATTENTION, QUESTION, CLOSED = "working", "attention", "question", "closed"

#: The status each hook event puts a session in (every event of Claude Code's hooks
#: reference that says something about it); :func:`status_for` refines a few of them.
EVENT_STATUS: Mapping[str, str] = {
    "SessionStart": ATTENTION,  # a new or resumed session waits for the first prompt
    "UserPromptSubmit": WORKING,
    "UserPromptExpansion": WORKING,  # a slash command expands into the prompt
    "PreToolUse": WORKING,
    "PermissionRequest": QUESTION,
    "PermissionDenied": WORKING,  # auto mode refused a call; the agent carries on
    "PostToolUse": WORKING,
    "PostToolUseFailure": WORKING,
    "PostToolBatch": WORKING,
    "SubagentStart": WORKING,
    "SubagentStop": WORKING,  # the main agent carries on
    "TaskCreated": WORKING,
    "TaskCompleted": WORKING,
    "PreCompact": WORKING,
    "PostCompact": WORKING,
    "Elicitation": QUESTION,  # an MCP server asks the user for input
    "ElicitationResult": WORKING,  # the user answered it
    "Notification": ATTENTION,
    "Stop": ATTENTION,  # the turn is over: the user's move
    "StopFailure": ATTENTION,  # the turn ended on an API error: the user's move too
    "SessionEnd": CLOSED,
}
#: Events of the reference that say nothing of the session's status: ignored without a
#: note, and not installed. (WorktreeCreate's hook must print a path: never install there.)
QUIET_EVENTS = frozenset(
    {
        "Setup",
        "InstructionsLoaded",
        "ConfigChange",
        "CwdChanged",
        "FileChanged",
        "WorktreeCreate",
        "WorktreeRemove",
        "TeammateIdle",  # another agent of a team goes idle
    }
)

#: Notification types that ask the user something (rather than only wait for them).
QUESTION_NOTIFICATIONS = frozenset({"permission_prompt", "elicitation_dialog"})
#: The tool with which the agent asks the user a question.
ASK_TOOL = "AskUserQuestion"
#: The largest payload read from stdin: a prompt with a pasted log is megabytes.
MAX_PAYLOAD = 64 << 20
_CHUNK = 1 << 20


def status_for(payload: Mapping[str, Any]) -> str | None:
    """The status a hook payload reports, or None for an event that says nothing of it."""
    event = payload.get("hook_event_name")
    if event == "PreToolUse" and payload.get("tool_name") == ASK_TOOL:
        return QUESTION
    if event == "Notification":
        kind = payload.get("notification_type")
        message = str(payload.get("message", "")).lower()
        if kind in QUESTION_NOTIFICATIONS or (kind is None and "permission" in message):
            return QUESTION
        return ATTENTION
    if event == "SessionStart" and payload.get("source") == "compact":
        return WORKING  # compaction happens mid-task
    return EVENT_STATUS.get(event) if isinstance(event, str) else None


def read_payload(stream: BinaryIO, deadline: float | None = None) -> dict[str, Any]:
    """One hook payload from ``stream`` (read to its end, up to :data:`MAX_PAYLOAD`, by
    ``deadline``, a ``time.monotonic()`` value, when given), checked for the fields a report
    needs. Raises TimeoutError when the writer keeps the stream open past the deadline."""
    read = stream.read if deadline is None else _reader_by(stream, deadline)
    chunks, size = [], 0
    while size <= MAX_PAYLOAD:
        chunk = read(_CHUNK)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    if size > MAX_PAYLOAD:
        raise ValidationError("payload", f"is larger than {MAX_PAYLOAD} bytes")
    try:
        payload = json.loads(b"".join(chunks))
    except ValueError as exc:
        raise ValidationError("payload", f"is not JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise ValidationError("payload", f"must be a JSON object, not {type(payload).__name__}")
    check_id(payload.get("session_id"), "session_id")
    check_dir(payload.get("cwd"), "cwd")
    if not isinstance(payload.get("hook_event_name"), str):
        raise ValidationError("hook_event_name", "is missing")
    return payload


def _reader_by(stream: BinaryIO, deadline: float) -> Callable[[int], bytes]:
    """``stream.read`` that waits for data until ``deadline`` at the latest: a poll of its
    descriptor, then one read, which a poll that said "ready" keeps from blocking. (A SIGALRM
    timer did this before, and its exception could land anywhere: in a tracer holding its
    lock, under coverage on Python 3.13, it hung ~3% of hooks for good.) A stream without a
    descriptor (in tests) is read as it is."""
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is both of the last two
        return stream.read
    poller = select.poll()
    poller.register(fd, select.POLLIN)

    def read(size: int) -> bytes:
        if not poller.poll(max(0, round((deadline - time.monotonic()) * 1000))):
            raise TimeoutError("gave up: the hook's time since its process started is over")
        return os.read(fd, size)

    return read


_SHELLS = frozenset({"sh", "bash", "dash", "zsh", "ksh", "fish"})


def agent_pid() -> int:
    """The agent's process: our parent, or its parent when the parent is the shell the
    agent ran the hook command in."""
    pid = os.getppid()
    for _ in range(3):
        stat = process_stat(pid)
        if stat is None:
            break  # no /proc: the parent is the best we know
        if stat.name not in _SHELLS or stat.parent <= 1:
            break
        pid = stat.parent
    return pid


# -- running -------------------------------------------------------------------------------

#: The longest `shmstore hook` may take, counted from the start of its process (the
#: interpreter's start-up included): an agent waits for its hooks.
HOOK_DEADLINE = 0.9
#: The longest ``--timeout`` honoured (an hour: far more than any agent waits for a hook),
#: so that ``inf`` or ``1e300`` still make a deadline ``poll`` takes.
MAX_BUDGET = 3600.0


def process_started(fallback: float) -> float:
    """When this process started, as a ``time.monotonic()`` value: from ``/proc/self/stat``
    (clock ticks since boot, so to within 10 ms), else ``fallback``. Never earlier than a
    second before ``fallback``, whatever the clocks say."""
    stat = process_stat(os.getpid())
    boottime = getattr(time, "CLOCK_BOOTTIME", None)
    if stat is None or boottime is None:
        return fallback
    age = time.clock_gettime(boottime) - stat.start / os.sysconf("SC_CLK_TCK")
    return min(fallback, max(time.monotonic() - age, fallback - 1.0))


def run_hook(
    stream: BinaryIO,
    address: str | None,
    budget: float = HOOK_DEADLINE,
    pid: int | None = None,
    started: float | None = None,
) -> int:
    """Report one hook payload read from ``stream``. Whatever goes wrong, return 0 by
    ``budget`` seconds after the process started (``started``, a ``time.monotonic()``
    value; default: read from /proc), and say why on stderr and in the failure log
    (:func:`failure_log_path`): a status display must never block or fail the agent, nor
    fail without a trace. Every wait has the deadline: reading stdin (a writer that never
    closes it), each call to the store, and the failure log. A report the manager did not
    take in time is kept in its spool (:mod:`shmstore.spool`), which it delivers later."""
    # A budget of inf or 1e300 once made the deadline a number no timer took: exit 1.
    budget = min(budget, MAX_BUDGET) if budget == budget else HOOK_DEADLINE  # nan: the default
    began = process_started(time.monotonic() if started is None else started)
    deadline = began + budget
    at = time.time() - (time.monotonic() - began)  # when the agent fired the event, by the wall clock
    event, session, failure = "-", "-", None
    try:
        payload = read_payload(stream, deadline)
        event, session = payload["hook_event_name"], payload["session_id"]
        failure = _report_payload(payload, address, pid, deadline, at)
    except Exception as exc:
        failure = f"not reported ({exc})"
    if failure is not None:
        say(f"shmstore hook: {failure}; the agent carries on")
        note_failure(event, session, failure, deadline + LOG_GRACE)
    return 0


#: Of a hook's budget, what is kept back for writing its report to the spool when the
#: manager does not answer in time (a write to the runtime directory, a tmpfs: ~0.2 ms).
SPOOL_RESERVE = 0.05
#: How long past its deadline a hook may still spend writing a line to its failure log,
#: which may be on a slow (network) home; past it the line is skipped.
LOG_GRACE = 0.05


def say(line: str) -> None:
    """One line on stderr, for whoever reads the agent's hook output. A stderr nobody reads
    any more (a closed pipe) is pointed at the null device instead, so that neither this
    write nor the interpreter's flush at exit fails the hook (exit code 1, or 120)."""
    try:
        print(line, file=sys.stderr, flush=True)
    except OSError:
        with contextlib.suppress(OSError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stderr.fileno())
            os.close(devnull)


def _report_payload(
    payload: Mapping[str, Any], address: str | None, pid: int | None, deadline: float, at: float
) -> str | None:
    """Report ``payload``; None when the store took it, else what happened to it (kept in
    the spool, or not reported and why), for the failure log."""
    status = status_for(payload)
    event, session = payload["hook_event_name"], payload["session_id"]
    if status is None:
        if event not in QUIET_EVENTS:
            say(f"shmstore hook: ignored unknown event {event!r}")
        return None
    where = addr.resolve_any(address)
    reason = end_reason(payload) if status == "closed" else None
    pid = pid or agent_pid()
    if not isinstance(where, str | tuple):  # a Redis URL: the full client and the redis package
        from .client import Client

        with Client(where, timeout=max(0.001, deadline - time.monotonic())) as client:
            client.report(session, status, payload["cwd"], pid=pid, session_id=session, reason=reason, at=at)
        return None
    token = os.urandom(16)
    try:
        report(
            where,
            None,
            session,
            status,
            payload["cwd"],
            pid=pid,
            session_id=session,
            reason=reason,
            at=at,
            token=token,
            deadline=deadline - SPOOL_RESERVE,
        )
        return None
    except (StoreUnavailableError, AuthKeyError) as exc:  # the manager is down, busy, stopping, or new
        why = str(exc)
    args = (session, status, payload["cwd"], pid, session, "claude_code", reason, at)
    directory = spool.path_for(where)
    try:
        if spool.keep(directory, token, args, at):
            return f"kept in the spool {directory} for the manager to deliver ({why})"
        return f"dropped: the spool {directory} is full ({spool.MAX_ENTRIES} reports) ({why})"
    except (OSError, StoreUnavailableError) as exc:
        return f"not reported ({why}); nor kept in the spool ({exc})"


def end_reason(payload: Mapping[str, Any]) -> str | None:
    """Claude Code's word for why a session ended (``logout``, ``clear``, ...), when the
    store takes it as ``session_end:REASON`` (its own check, :func:`check_closed_reason`):
    anything else is dropped rather than fail the report, so that the session is closed
    whatever the reason looks like."""
    reason = payload.get("reason")
    if not isinstance(reason, str) or not reason:
        return None
    try:
        check_closed_reason(f"session_end:{reason}", "reason")  # what Store.report makes of it
    except ValidationError:
        return None
    return reason


def main(argv: Sequence[str], started: float) -> int | None:
    """``shmstore hook [--address A] [--timeout T] [--pid N]`` without the command line's
    parser (which imports the whole package); None for anything else (``--help``, a bad
    value), which the full parser then handles. ``--timeout`` is the hook's budget from
    the start of its process (default :data:`HOOK_DEADLINE`)."""
    options: dict[str, str] = {}
    args = list(argv)
    while args:
        name, equals, value = args.pop(0).partition("=")
        if name not in ("--address", "--timeout", "--pid") or name in options:
            return None
        if not equals:
            if not args:
                return None
            value = args.pop(0)
        options[name] = value
    try:
        budget = float(options.get("--timeout", HOOK_DEADLINE))
        pid = int(options["--pid"]) if "--pid" in options else None
    except ValueError:
        return None
    if not budget > 0:
        return None
    return run_hook(sys.stdin.buffer, options.get("--address"), budget, pid, started)


# -- the failure log ---------------------------------------------------------------------------

#: The failure log is rotated when it reaches this size (one older file, ``.1``, is kept).
MAX_LOG_BYTES = 64 * 1024


def failure_log_path() -> str:
    """Where failed reports are logged: ``$XDG_STATE_HOME/shmstore/hook.log`` (default
    ``~/.local/state/shmstore/hook.log``)."""
    state = os.environ.get("XDG_STATE_HOME", "")
    base = state if os.path.isabs(state) else os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "shmstore", "hook.log")


def note_failure(event: str, session: str, why: str, deadline: float | None = None) -> None:
    """Append one line (UTC time, event, session id, why) to the failure log, rotating it
    at :data:`MAX_LOG_BYTES`. Best effort, and never a wait: the log is opened without
    following a symlink and without blocking (a FIFO there would wait for a reader), is
    written only if it is a regular file, and with ``deadline`` (``time.monotonic()``) all
    of it happens in a thread of its own that is left behind at the deadline (a hung
    network home); a log that cannot be written is skipped."""
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    line = " ".join(_one_line(part) for part in (stamp, event, session, why)) + "\n"
    if deadline is None:
        _append_line(failure_log_path(), line)
        return
    done = _thread.allocate_lock()
    done.acquire()

    def write() -> None:
        try:
            _append_line(failure_log_path(), line)
        finally:
            done.release()

    _thread.start_new_thread(write, ())
    done.acquire(timeout=max(0.0, deadline - time.monotonic()))


def _append_line(path: str, line: str) -> None:
    try:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        fd = _open_log(path)
        if fd is None:
            return
        try:
            if os.fstat(fd).st_size >= MAX_LOG_BYTES:
                os.close(fd)
                os.replace(path, path + ".1")
                fd = _open_log(path)
                if fd is None:
                    return
            os.write(fd, line.encode("utf-8", "replace"))
        finally:
            if fd is not None:
                os.close(fd)
    except OSError:
        pass  # never fail the agent for its log


def _open_log(path: str) -> int | None:
    """The failure log, opened to append, if it is a regular file (never through a symlink,
    never waiting on a FIFO); else None."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    fd = os.open(path, flags, 0o600)
    if stat.S_ISREG(os.fstat(fd).st_mode):
        return fd
    os.close(fd)
    return None


def _one_line(text: str) -> str:
    return "".join(c if c.isprintable() else "?" for c in text[:500]) or "-"


def recent_failures(limit: int = 5) -> list[str]:
    """The last ``limit`` lines of the failure log, oldest first (none when there is no log)."""
    path = failure_log_path()
    lines: list[str] = []
    for part in (path + ".1", path):
        try:
            with open(part, encoding="utf-8", errors="replace") as file:
                lines += file.read().splitlines()
        except OSError:
            pass
    return lines[-limit:] if limit > 0 else []
