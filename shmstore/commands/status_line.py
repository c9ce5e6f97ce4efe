"""``shmstore status --line``: the live sessions in a few words, for tmux's ``status-right``
or a shell prompt, which run it every few seconds and wait for it.

It answers within :data:`BUDGET` of its start and never hangs: for a manager (a unix
socket or a TCP address) it takes a fast path like the hook's (``python -m shmstore``
passes it here before importing the command line's parser and the package behind it),
one connection with its own deadline (:mod:`shmstore.clients.glance`). A manager that is
down, stopped or too slow gives ``shmstore: no answer`` and exit code 3 in that time. A
Redis store goes through the full client and its ``--timeout``, with no such promise.

The line: how many sessions wait on a question, on attention, and work, and how long the
oldest question has waited, in which directory: ``2 question, 1 attention, 3 working;
oldest question 4m (app)``; ``no sessions`` for none.
"""

from __future__ import annotations

import os
import sys
import time

TYPE_CHECKING = False  # as typing's, without importing typing
if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

#: Seconds from the command's start (after the interpreter's own start-up, ~15 ms) to its
#: answer, whatever the manager does: the line's 50 ms, with the interpreter's share and
#: the exit's kept back.
BUDGET = 0.025
#: The statuses the line counts, in the order shown (the most urgent first).
SHOWN = ("question", "attention", "working")
#: What the line says when the store does not answer in time; its exit code.
NO_ANSWER, EXIT_NO_ANSWER = "shmstore: no answer", 3


def summary(sessions: Iterable[tuple[str, float, str]], now: float) -> str:
    """The line for ``sessions``, each as (status, since, working_dir), at ``now``."""
    counts: dict[str, int] = {}
    oldest: tuple[str, float, str] | None = None
    for session in sessions:
        status, since, _ = session
        counts[status] = counts.get(status, 0) + 1
        if status == "question" and (oldest is None or since < oldest[1]):
            oldest = session
    parts = [f"{counts[status]} {status}" for status in SHOWN if counts.get(status)]
    if not parts:
        return "no sessions"
    line = ", ".join(parts)
    if oldest is not None:
        line += f"; oldest question {_age(now - oldest[1])} ({os.path.basename(oldest[2].rstrip('/')) or '/'})"
    return line


def _age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h"


def fast(argv: Sequence[str], started: float) -> int | None:
    """``status --line [--address A] [--timeout T]`` for a manager, without the command
    line's parser; None for anything else (``--help``, a Redis URL, a bad value), which the
    full parser then handles. ``--timeout`` here is the budget from the command's start
    (default :data:`BUDGET`)."""
    from ..transport import address as addr

    options: dict[str, str] = {}
    args = list(argv)
    while args:
        name, equals, value = args.pop(0).partition("=")
        if name == "--line" and not equals and name not in options:
            options[name] = ""
            continue
        if name not in ("--address", "--timeout") or name in options:
            return None
        if not equals:
            if not args:
                return None
            value = args.pop(0)
        options[name] = value
    try:
        budget = float(options.get("--timeout", BUDGET))
        address = addr.resolve_any(options.get("--address"))
    except (ValueError, OSError):
        return None
    if "--line" not in options or not 0 < budget < 60 or not isinstance(address, str | tuple):
        return None
    return show(address, started + budget)


def show(address: object, deadline: float) -> int:
    """Print the line for the manager at ``address``, or :data:`NO_ANSWER` at ``deadline``."""
    from ..clients import glance
    from ..errors import ShmstoreError

    try:
        records = glance.live_records(address, None, deadline)  # type: ignore[arg-type]
    except (ShmstoreError, OSError):
        print(NO_ANSWER, flush=True)
        return EXIT_NO_ANSWER
    line = summary(((glance.STATUSES[r[glance.STATUS]], r[glance.SINCE], r[glance.DIR]) for r in records), time.time())
    print(line, flush=True)
    return 0


if __name__ == "__main__":  # pragma: no cover - run through python -m shmstore
    sys.exit(fast(sys.argv[1:], time.monotonic()) or 0)
