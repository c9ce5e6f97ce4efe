#!/usr/bin/env python3
"""What an agent's event costs, by the way it reaches the manager: a command hook (a
process per event) or an http hook (a POST to ``serve --http``).

    python bench/event_paths.py [--events 2000] [--runs 6]

Two parts, each with its own floor beside it:

* The manager's CPU per event, read from /proc for the manager's process alone while one
  client sends ``--events`` events: over HTTP (one kept connection, as Claude's client
  keeps one) against the command hook's report (one connection and handshake each, as
  ``shmstore hook`` makes), and the floor: ``revision()`` over a kept manager connection.
* With the real Claude Code (``.agents/``, or ``$SHMSTORE_CLAUDE``), a print-mode run with
  one Bash tool call against the scripted model stand-in (tests/model_stub.py), ``--runs``
  times with each way installed by ``install-hooks``: the processes hooks start for the run
  (two a command hook: ``/bin/sh -c`` and the interpreter), those of the tool call's own
  events, Claude's own wait per hook from its debug log (median), and the run's wall time,
  beside the same run with no hooks at all (the floor).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import shmstore
from shmstore.agents.settings import HTTP_PATH
from shmstore.clients.reporter import report

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import claude_rig
import model_stub

#: A command hook of ours run, in Claude's debug log ("Hooks: Stop [COMMAND] finished ...").
COMMAND_HOOK_RAN = r"(?:Hooks: )?(\w+)(?::\S+)? \[[^\]\n]*shmstore hook[^\]\n]*\] (?:finished|completed)"
#: The tool call's own events (one Bash call fires these between its prompt and its Stop).
TOOL_EVENTS = ("PreToolUse", "PostToolUse", "PostToolBatch")


def manager_cpu(pid: int) -> float:
    """CPU seconds of process ``pid``, ended threads included (/proc/PID/stat, 10 ms ticks:
    run enough events). Not bench.py's schedstat reader, which sums the live threads only:
    each command hook's report is served by a thread that has ended by the reading (that
    reader gave -150 us per event)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def manager_cpu_per_event(events: int) -> dict[str, float]:
    """Microseconds of the manager's CPU per event, each way, and the floor."""
    tmp = Path(tempfile.mkdtemp(prefix="paths-"))
    server = shmstore.start_server(str(tmp / "s.sock"), http="auto")
    out: dict[str, float] = {}
    try:
        with shmstore.Client(server.address, server.authkey, shared_memory=False) as store:
            port = store.info()["http"]["port"]
            before = manager_cpu(server.pid)
            for _ in range(events):
                store.revision()
            out["revision_manager_cpu_us"] = (manager_cpu(server.pid) - before) / events * 1e6
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        bodies = [_event(n) for n in range(events)]
        before = manager_cpu(server.pid)
        for body in bodies:
            conn.request("POST", f"{HTTP_PATH}claude_code", body=body)
            conn.getresponse().read()
        out["http_event_manager_cpu_us"] = (manager_cpu(server.pid) - before) / events * 1e6
        conn.close()
        count = max(events // 4, 100)  # a handshake each: slower
        before = manager_cpu(server.pid)
        for n in range(count):
            args = (f"c{n % 50}", ("working", "attention")[n % 2], "/src", None, f"c{n % 50}", "claude_code", None)
            said = (*args, time.time(), None, None, None)
            report(server.address, server.authkey, said, token=os.urandom(16), deadline=time.monotonic() + 10)
        out["command_event_manager_cpu_us"] = (manager_cpu(server.pid) - before) / count * 1e6
    finally:
        server.stop()
    return out


def _event(n: int) -> bytes:
    name = ("UserPromptSubmit", "PreToolUse", "PostToolUse", "Stop")[n % 4]
    payload = {"session_id": f"h{n % 50}", "cwd": "/src", "hook_event_name": name, "tool_name": "Bash"}
    return json.dumps(payload).encode()


def real_claude(runs: int) -> dict[str, Any]:
    """A one-tool print-mode run with each way of delivery, and with no hooks."""
    binary = claude_rig.claude_binary()
    if binary is None:
        return {"skipped": "Claude Code is not installed (.ci/run installs it in .agents/)"}
    out: dict[str, Any] = {}
    saved = dict(os.environ)
    try:
        for via in ("none", "command", "http"):
            out[via] = _one_way(binary, via, runs)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return out


def _one_way(binary: str, via: str, runs: int) -> dict[str, Any]:
    """One way of delivery (``none``: no hooks at all, the floor), ``runs`` one-tool runs
    with the manager up, then a few with it down."""
    tmp = Path(tempfile.mkdtemp(prefix=f"claude-{via}-"))
    os.environ["XDG_RUNTIME_DIR"] = str(tmp / "run")
    os.environ["XDG_STATE_HOME"] = str(tmp / "state")
    server = shmstore.start_server(str(tmp / "s.sock"), http="auto")
    try:
        with model_stub.ModelStub() as stub:
            way = "command" if via == "none" else via
            claude = claude_rig.Claude(binary, tmp, stub.url, str(server.address), via=way)
            if via == "none":
                claude.settings.write_text("{}")
            claude.print_mode("hello")  # warm: the page cache, the CLI's own caches
            walls, processes, tool_processes, waits = [], [], [], []
            for _ in range(runs):
                claude.debug_log.unlink(missing_ok=True)
                started = time.monotonic()
                result = claude.print_mode("run: echo hi", "--allowedTools", "Bash")
                walls.append((time.monotonic() - started) * 1000)
                assert result.returncode == 0, result.stderr
                log = claude.debug_log.read_text(errors="replace")
                ran = re.findall(COMMAND_HOOK_RAN, log)
                processes.append(2 * len(ran))
                tool_processes.append(2 * sum(1 for event in ran if event in TOOL_EVENTS))
                waits += claude_rig.hook_timings(log) + http_waits(log)
            server.stop()  # the manager down, no socket held for it: what a tool call costs then
            down = []
            for _ in range(max(runs // 2, 2)):
                started = time.monotonic()
                claude.print_mode("run: echo hi", "--allowedTools", "Bash")
                down.append((time.monotonic() - started) * 1000)
    finally:
        server.stop()
    return {
        "run_wall_ms_median": statistics.median(walls),
        "run_wall_ms_manager_down_median": statistics.median(down),
        "processes_per_run": statistics.median(processes),
        "processes_per_tool_call": statistics.median(tool_processes),
        "hook_event_wall_ms_median": statistics.median(waits) if waits else None,
        "hook_event_wall_ms_max": max(waits) if waits else None,
    }


def http_waits(log: str) -> list[float]:
    """Milliseconds from each http hook's POST to its response, in Claude's debug log."""
    stamps = re.findall(r"(\d\d):(\d\d):(\d\d\.\d+)Z \[DEBUG\] Hooks: HTTP hook (POST|response)", log)
    waits, sent = [], None
    for hours, minutes, seconds, kind in stamps:
        at = int(hours) * 3600 + int(minutes) * 60 + float(seconds)
        if kind == "POST":
            sent = at
        elif sent is not None:
            waits.append((at - sent) * 1000)
            sent = None
    return waits


def run(events: int = 2000, runs: int = 6) -> dict[str, Any]:
    return {"manager_cpu_us_per_event": manager_cpu_per_event(events), "real_claude": real_claude(runs)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=6)
    args = parser.parse_args()
    print(json.dumps(run(args.events, args.runs), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
