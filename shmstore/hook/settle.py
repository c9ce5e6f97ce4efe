"""A question the agent leaves without an event, noticed in its transcript.

Some agents fire no event when the user dismisses their permission prompt (Gemini CLI
0.61.0 on Esc or "No", Copilot CLI 1.0.102 on Esc): the session would show ``question``
until the user's next prompt, though the agent waits at its prompt. What they do write is
a line in the session's transcript. So when a hook reports a question of such an agent
(its adapter has ``settled``), it starts this watcher, detached, which reads the lines the
transcript gains from where it was at the hook's run:

* a line the adapter says shows the agent back at its prompt, with nothing after it that
  says it went on: the session is reported ``attention``, with the transcript's time of
  change as the event's time (a later event of the agent, reported with its own later
  time, is never overridden: the store ignores a report older than the session's last);
* a line that says the agent went on (the tool ran, a new turn): the watch ends;
* the agent's process gone, or :data:`LIFETIME` past: the watch ends.

It costs the hook one fork and exec (only for a question of such an agent), and a process
polling one file's size every :data:`POLL` seconds while the question is up.
"""

from __future__ import annotations

import os
import sys
import time

from .. import agents
from ..agents.base import ATTENTION, HookReport
from ..procs import process_start
from .run import HOOK_DEADLINE, _report

#: Seconds between two looks at the transcript's size: how late a dismissal shows.
POLL = 0.25
#: The longest a question is watched (a prompt left up for longer is left as it is).
LIFETIME = 3600.0


def watch(agent: str, address: str | None, session: str, cwd: str, transcript: str, offset: int, pid: int) -> bool:
    """Watch ``transcript`` from ``offset`` (see the module's docstring); True when it
    reported the session back at its prompt."""
    adapter = agents.get(agent)
    started = process_start(pid) if pid else None
    if pid and started is None:
        return False  # the agent is gone already: its question with it
    ends = time.monotonic() + LIFETIME
    pending = b""
    while time.monotonic() < ends and (not pid or process_start(pid) == started):
        time.sleep(POLL)
        try:
            with open(transcript, "rb") as file:
                size = os.fstat(file.fileno()).st_size
                if size < offset:  # rewritten: read it from the start
                    offset, pending = 0, b""
                file.seek(offset)
                pending += file.read(size - offset)
                at = os.fstat(file.fileno()).st_mtime
            offset = size
        except OSError:
            continue
        *lines, pending = pending.split(b"\n")
        # Copilot 1.0.102 may leave its last line (the abort) without its newline until its
        # next event (seen: 1 run in 40, the question then kept): a whole last line counts.
        verdicts = [adapter.settled(line) for line in [*lines, pending] if line.strip()]  # type: ignore[attr-defined]
        said = [verdict for verdict in verdicts if verdict is not None]
        if said and said[-1]:
            _back_at_prompt(agent, address, session, cwd, pid, at)
            return True
        if said:
            return False
    return False


def _back_at_prompt(agent: str, address: str | None, session: str, cwd: str, pid: int, at: float) -> None:
    said = HookReport("settled", session, ATTENTION, cwd)
    _report(said, agent, address, pid or None, time.monotonic() + HOOK_DEADLINE, at)


if __name__ == "__main__":
    agent, address, session, cwd, transcript, offset, pid = sys.argv[1:8]
    watch(agent, address or None, session, cwd, transcript, int(offset), int(pid))
