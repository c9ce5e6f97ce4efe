"""The hook's run (:func:`run_hook`): one agent event, read from stdin, made into one
``report`` on the store, fast, never failing the agent, and never failing silently either
(:mod:`shmstore.hook.failures`). It knows nothing of any agent: the agent's adapter
(:mod:`shmstore.agents`) reads the payload.

This module is on the hook's path, so it imports only the standard library and the light
modules of the package (never ``multiprocess``, ``dill`` or ``orjson``): statuses are the
plain values of :class:`shmstore.model.Status`, a ``StrEnum`` they compare equal to.
"""

from __future__ import annotations

import contextlib  # imported by `python -m` itself (runpy): free
import json
import os
import select  # imported by the protocol anyway
import sys
import time

from .. import agents, spool, terminal
from ..clients.reporter import report
from ..errors import AuthKeyError, StoreUnavailableError, ValidationError
from ..procs import process_start, process_stat
from ..transport import address as addr
from .failures import note_failure

# The type checker's names, not imported at run time: ``typing`` costs the hook ~4 ms of
# start-up (mypy takes any name TYPE_CHECKING as true).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from typing import Any, BinaryIO

    from ..agents.base import HookReport

#: The largest payload read from stdin: a prompt with a pasted log is megabytes.
MAX_PAYLOAD = 64 << 20
_CHUNK = 1 << 20


def read_payload(stream: BinaryIO, deadline: float | None = None) -> dict[str, Any]:
    """One hook payload from ``stream`` (read to its end, up to :data:`MAX_PAYLOAD`, by
    ``deadline``, a ``time.monotonic()`` value, when given): a JSON object, whose fields
    the agent's adapter reads. Raises TimeoutError when the writer keeps the stream open
    past the deadline."""
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


def agent_pid() -> int | None:
    """The agent's process: our parent, or its parent when the parent is the shell the
    agent ran the hook command in; None for a hook whose agent is gone already (its parent
    is init: Gemini CLI 0.61.0 fires SessionEnd three times at exit, and runs the last
    after it has exited)."""
    pid = os.getppid()
    if pid <= 1:
        return None
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
    """When the agent started this hook, as a ``time.monotonic()`` value: this process's
    start from ``/proc/self/stat`` (clock ticks since boot, so to within 10 ms), or its
    parent's when that is the shell the agent ran the hook command in (``/bin/sh -c``; the
    agent times the hook from there: 20-50 ms earlier on a loaded machine), else
    ``fallback``. Never earlier than a second before ``fallback``, whatever the clocks say."""
    stat = process_stat(os.getpid())
    boottime = getattr(time, "CLOCK_BOOTTIME", None)
    if stat is None or boottime is None:
        return fallback
    start, ticks = stat.start, os.sysconf("SC_CLK_TCK")
    shell = process_stat(stat.parent)
    # Only a shell started just before us (sh -c): not the login shell a user ran us from.
    if shell is not None and shell.name in SHELLS and 0 <= start - shell.start <= ticks // 2:
        start = shell.start
    age = time.clock_gettime(boottime) - start / ticks
    return min(fallback, max(time.monotonic() - age, fallback - 1.0))


#: The shells an agent runs a hook command in, by their process names.
SHELLS = frozenset({"sh", "bash", "dash", "zsh"})


def run_hook(
    stream: BinaryIO,
    address: str | None,
    budget: float = HOOK_DEADLINE,
    pid: int | None = None,
    started: float | None = None,
    agent: str = agents.DEFAULT,
) -> int:
    """Report one hook payload of ``agent`` (its adapter reads it) read from ``stream``.
    Whatever goes wrong, return 0 by ``budget`` seconds after the process started
    (``started``, a ``time.monotonic()`` value; default: read from /proc), and say why on
    stderr and in the failure log (:mod:`shmstore.hook.failures`): a status display must
    never block or fail the agent, nor fail without a trace. Every wait has the deadline:
    reading stdin (a writer that never closes it), each call to the store, and the failure
    log. A report the manager did not take in time is kept in its spool
    (:mod:`shmstore.spool`), which it delivers later."""
    # A budget of inf or 1e300 once made the deadline a number no timer took: exit 1.
    budget = min(budget, MAX_BUDGET) if budget == budget else HOOK_DEADLINE  # nan: the default
    began = process_started(time.monotonic() if started is None else started)
    deadline = began + budget
    at = time.time() - (time.monotonic() - began)  # when the agent fired the event, by the wall clock
    event, session, failure = "-", "-", None
    try:
        adapter = agents.get(agent)
        said = adapter.read(read_payload(stream, deadline), os.environ)
        event, session = said.event, said.session
        # Where the transcript is before the question is told: the user may dismiss it the
        # instant a display shows it, before this process runs again (seen under load).
        watched = _size(said.transcript) if said.transcript is not None and hasattr(adapter, "settled") else None
        failure = _report(said, adapter.NAME, address, pid, deadline, at)
        if watched is not None and (failure or KEPT).startswith(KEPT):
            _watch_question(adapter.NAME, address, said, pid or agent_pid(), watched)
    except Exception as exc:
        failure = f"not reported ({exc})"
    if failure is not None:
        failure += f" ({time.monotonic() - began:.2f} s into the hook)"
        if not failure.startswith(KEPT):  # a kept report is delivered later: nothing to tell the agent
            say(f"shmstore hook: {failure}; the agent carries on")
        note_failure(event, session, failure, deadline + LOG_GRACE)
    return 0


def _size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return 0


def _watch_question(agent: str, address: str | None, said: HookReport, pid: int | None, offset: int) -> None:
    """Start :mod:`shmstore.hook.settle` on the transcript of the question ``said``, for an
    agent that may leave it without an event: detached, in a session of its own, so that
    neither the agent's terminal nor the hook's pipes are held (one fork and exec). It
    reads the transcript from ``offset``."""
    import subprocess

    assert said.transcript is not None
    argv = [sys.executable, "-m", "shmstore.hook.settle", agent, address or "", said.session, said.cwd]
    argv += [said.transcript, str(offset), str(pid or 0)]
    null = subprocess.DEVNULL
    subprocess.Popen(argv, stdin=null, stdout=null, stderr=null, start_new_session=True, close_fds=True)


#: Of a hook's budget, what is kept back for writing its report to the spool when the
#: manager does not answer in time (a write to the runtime directory, a tmpfs: ~0.2 ms) and
#: for the interpreter's exit, so that the hook has ended by its budget. Claude Code's own
#: debug log timed hooks that gave up 50 ms before it at 864-1046 ms on a loaded 2-CPU
#: machine (exit and the shell's start on top of the 0.9 s); 150 ms covers both.
SPOOL_RESERVE = 0.15
#: How a failure-log line about a report kept in the spool begins.
KEPT = "kept in the spool"
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


def _report(
    said: HookReport, agent: str, address: str | None, pid: int | None, deadline: float, at: float
) -> str | None:
    """Report what a payload ``said``; None when the store took it, else what happened to
    it (kept in the spool, or not reported and why), for the failure log."""
    adapter = agents.get(agent)
    if said.status is None:
        if said.event not in adapter.EVENT_STATUS and said.event not in adapter.QUIET_EVENTS:
            say(f"shmstore hook: ignored unknown event {said.event!r}")
        return None
    where = addr.resolve_any(address)
    pid = pid or agent_pid()
    if not isinstance(where, str | tuple):  # a Redis URL: the full client and the redis package
        return _report_to_redis(where, said, agent, pid, deadline - SPOOL_RESERVE, at)
    # Store.report's arguments, in its order.
    args: tuple[Any, ...] = (said.session, said.status, said.cwd, pid, said.session, agent, said.reason, at)
    args += (said.subagent, said.background, pid and process_start(pid), terminal.of_agent(os.environ, pid))
    token = os.urandom(16)
    try:
        report(where, None, args, token=token, deadline=deadline - SPOOL_RESERVE)
        return None
    except (StoreUnavailableError, AuthKeyError) as exc:  # the manager is down, busy, stopping, or new
        why = str(exc)
    directory = spool.path_for(where)
    try:
        if spool.keep(directory, token, args, at):
            return f"{KEPT} {directory} for the manager to deliver ({why})"
        return f"dropped: the spool {directory} is full ({spool.MAX_ENTRIES} reports) ({why})"
    except (OSError, StoreUnavailableError) as exc:
        return f"not reported ({why}); nor kept in the spool ({exc})"


def _report_to_redis(
    where: Any, said: HookReport, agent: str, pid: int | None, deadline: float, at: float
) -> str | None:
    """Report to a Redis store by ``deadline``, whatever Redis does: importing the client
    and redis-py (~0.17 s), connecting and every read each took a timeout of their own, and
    against a paused Redis the hook ran 1.12-1.23 s (issue #23). The report runs in a
    thread the hook waits for until the deadline, then leaves behind (it ends with the
    process). There is no spool for Redis: a report not answered in time may or may not
    have been applied (at most once), and the failure log says so."""
    import threading

    status = said.status
    assert status is not None  # _report sends only what moves a session
    failed: list[BaseException | None] = []

    def send() -> None:
        try:
            from ..clients.client import Client
            from ..model import Terminal

            found = terminal.of_agent(os.environ, pid)

            with Client(where, timeout=max(0.001, deadline - time.monotonic())) as client:
                client.report(
                    said.session, status, said.cwd, pid=pid, session_id=said.session, agent_type=agent,
                    reason=said.reason, at=at, subagent=said.subagent, background=said.background,
                    pid_start=pid and process_start(pid), terminal=None if found is None else Terminal(*found),
                )  # fmt: skip
            failed.append(None)
        except BaseException as exc:  # handed to the hook's thread, which says what it was
            failed.append(exc)

    sender = threading.Thread(target=send, name="shmstore-hook-redis", daemon=True)
    sender.start()
    sender.join(max(0.0, deadline - time.monotonic()))
    if not failed:
        _LEFT_BEHIND.append(sender)
        return f"not reported: Redis at {addr.format_address(where)} did not answer in time (it may still apply it)"
    if failed[0] is not None:
        raise failed[0]
    return None


#: The sender threads a report left behind (see :func:`main`).
_LEFT_BEHIND: list[Any] = []


def _exit_now_if_left_behind(code: int) -> int:
    """``code``, or the process ended at once with it, its output flushed, when a sender
    thread was left behind: one in ``import redis`` or a read held the interpreter's exit
    0.05-0.7 s on a loaded machine (measured: the hook's last line at 0.75 s, its exit at
    0.81-1.44 s), past the budget the agent is promised. Nothing else of the hook's is
    left to finish: the failure log is written and closed by then."""
    if _LEFT_BEHIND:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def main(argv: Sequence[str], started: float) -> int | None:
    """``shmstore hook [--agent NAME] [--address A] [--timeout T] [--pid N]`` without the command line's
    parser (which imports the whole package); None for anything else (``--help``, a bad
    value), which the full parser then handles. ``--timeout`` is the hook's budget from
    the start of its process (default :data:`HOOK_DEADLINE`)."""
    options: dict[str, str] = {}
    args = list(argv)
    while args:
        name, equals, value = args.pop(0).partition("=")
        if name not in ("--agent", "--address", "--timeout", "--pid") or name in options:
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
    agent = options.get("--agent", agents.DEFAULT)
    if not budget > 0 or agent not in agents.ADAPTERS:
        return None
    return _exit_now_if_left_behind(run_hook(sys.stdin.buffer, options.get("--address"), budget, pid, started, agent))
