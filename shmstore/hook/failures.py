"""The hook's failure log: one line for each report that did not reach the store at once
(kept in the spool, dropped, or not reported), which ``shmstore status`` shows. Writing it
never waits: not on a FIFO, not through a symlink, not on a hung network home.
"""

from __future__ import annotations

import _thread  # built in: a thread without `threading` (the log's deadline)
import os
import stat  # imported by the interpreter at start-up: free
import time

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
        try:  # as the log is written: never through a symlink, never waiting on a FIFO
            fd = os.open(part, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            if stat.S_ISREG(os.fstat(fd).st_mode):
                lines += os.read(fd, 4 * MAX_LOG_BYTES).decode("utf-8", "replace").splitlines()
        except OSError:
            pass
        finally:
            os.close(fd)
    return lines[-limit:] if limit > 0 else []
