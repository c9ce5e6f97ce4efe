"""Fed by real agents: Claude Code hook payloads through `shmstore hook` into a live manager."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from helpers import CWD, PYTHON, SID, StartServer, hook, payload, run, wait_until_stopped

import shmstore
from shmstore import EventKind, Status
from shmstore.hooks import EVENT_STATUS, QUIET_EVENTS, status_for

#: Every event Claude Code's hooks reference lists (code.claude.com/docs/en/hooks, read
#: 2026-11): each must be mapped to a status or deliberately quiet.
REFERENCE_EVENTS = {
    "Setup",
    "SessionStart",
    "InstructionsLoaded",
    "UserPromptSubmit",
    "UserPromptExpansion",
    "PreToolUse",
    "PermissionRequest",
    "PermissionDenied",
    "PostToolUse",
    "PostToolUseFailure",
    "PostToolBatch",
    "Notification",
    "SubagentStart",
    "SubagentStop",
    "TaskCreated",
    "TaskCompleted",
    "Stop",
    "StopFailure",
    "TeammateIdle",
    "ConfigChange",
    "CwdChanged",
    "FileChanged",
    "WorktreeCreate",
    "WorktreeRemove",
    "PreCompact",
    "PostCompact",
    "Elicitation",
    "ElicitationResult",
    "SessionEnd",
}
#: Reports in tests that are not about the hook's deadline get a generous one: a loaded
#: machine can take most of the default 0.9 s just to start an interpreter.
SLOW_OK = ("--timeout", "30")


SAMPLES = [
    (payload("SessionStart", source="startup"), Status.ATTENTION),
    (payload("UserPromptSubmit", prompt="add a login page"), Status.WORKING),
    (payload("PreToolUse", tool_name="Bash", tool_input={"command": "npm test"}), Status.WORKING),
    (payload("PostToolUse", tool_name="Bash", tool_input={}, tool_response={"exit_code": 0}), Status.WORKING),
    (payload("PostToolUseFailure", tool_name="Edit", tool_input={}, error="no match"), Status.WORKING),
    (payload("PreToolUse", tool_name="AskUserQuestion", tool_input={"questions": []}), Status.QUESTION),
    (payload("UserPromptExpansion", command_name="review"), Status.WORKING),
    (payload("SubagentStart", agent_type="Explore"), Status.WORKING),
    (payload("SubagentStop", stop_hook_active=False), Status.WORKING),
    (payload("PermissionDenied", tool_name="Bash", tool_input={}, reason="auto mode"), Status.WORKING),
    (payload("PostToolBatch", tool_calls=[]), Status.WORKING),
    (payload("TaskCreated", task_id="t1"), Status.WORKING),
    (payload("TaskCompleted", task_id="t1"), Status.WORKING),
    (payload("PostCompact", trigger="auto"), Status.WORKING),
    (payload("Elicitation", mcp_server_name="db", message="Which schema?"), Status.QUESTION),
    (payload("ElicitationResult", mcp_server_name="db", action="accept"), Status.WORKING),
    (payload("PermissionRequest", tool_name="Bash", tool_input={"command": "rm -rf build"}), Status.QUESTION),
    (payload("PreCompact", trigger="auto"), Status.WORKING),
    (payload("SessionStart", source="compact"), Status.WORKING),
    (
        payload(
            "Notification", notification_type="permission_prompt", message="Claude needs your permission to use Bash"
        ),
        Status.QUESTION,
    ),
    (payload("Notification", message="Claude needs your permission to use Write"), Status.QUESTION),
    (
        payload("Notification", notification_type="idle_prompt", message="Claude is waiting for your input"),
        Status.ATTENTION,
    ),
    (payload("Stop", stop_hook_active=False), Status.ATTENTION),
    (payload("UserPromptSubmit", prompt="again"), Status.WORKING),
    (payload("StopFailure", error="rate_limit", error_details="429"), Status.ATTENTION),
    (payload("SessionEnd", reason="prompt_input_exit"), Status.CLOSED),
]


def test_every_mapped_event_has_a_sample() -> None:
    assert {p["hook_event_name"] for p, _ in SAMPLES} == set(EVENT_STATUS)
    for sample, status in SAMPLES:
        assert status_for(sample) == status, sample["hook_event_name"]


def test_every_event_of_the_hooks_reference_is_mapped_to_a_status_or_deliberately_quiet() -> None:
    assert set(EVENT_STATUS) | QUIET_EVENTS == REFERENCE_EVENTS
    assert not set(EVENT_STATUS) & QUIET_EVENTS
    assert set(EVENT_STATUS.values()) <= {s.value for s in Status}  # plain values of the real enum


def test_a_whole_session_through_the_hook(store: shmstore.Client, server: shmstore.ServerProcess) -> None:
    seen: list[tuple[Status, float, float]] = []
    for sample, status in SAMPLES:
        result = hook(server.address, sample, *SLOW_OK)
        assert result.returncode == 0, result.stderr
        assert result.stderr == b"", result.stderr
        session = store.get(SID)
        assert session is not None, sample["hook_event_name"]
        assert session.status is status, sample["hook_event_name"]
        seen.append((status, session.since, session.last_activity or 0.0))
    session = store.get(SID)
    assert session is not None
    assert session.closed
    assert session.session_id == SID
    assert session.working_dir == CWD
    assert session.pid is not None
    # One history entry per change of status, none for a repeat; a consistent chain.
    changes = [b for a, b in zip([s for s, _, _ in seen], [s for s, _, _ in seen][1:], strict=False) if a != b]
    assert [h.to for h in session.history] == changes
    assert all(a.to == b.from_ for a, b in zip(session.history, session.history[1:], strict=False))
    # last_activity moves on every report; since only when the status changes.
    assert all(later[2] >= earlier[2] for earlier, later in itertools.pairwise(seen))
    repeats = [(a, b) for a, b in itertools.pairwise(seen) if a[0] == b[0]]
    assert repeats
    assert all(b[1] == a[1] for a, b in repeats)
    # Closed: gone from the live sessions, kept among the recently closed with its resume id.
    assert store.list_all() == []
    assert [(s.id, s.session_id) for s in store.recently_closed()] == [(SID, SID)]


def test_a_closed_session_comes_back_when_resumed(store: shmstore.Client, server: shmstore.ServerProcess) -> None:
    hook(server.address, payload("UserPromptSubmit", prompt="x"), *SLOW_OK)
    hook(server.address, payload("SessionEnd", reason="logout"), *SLOW_OK)
    assert store.list_all() == []
    hook(server.address, payload("SessionStart", source="resume"), *SLOW_OK)
    [session] = store.list_all()
    assert session.status is Status.ATTENTION
    assert [h.to for h in session.history] == [Status.CLOSED, Status.ATTENTION]
    assert store.recently_closed() == []


def test_a_session_ended_by_the_agent_records_claudes_reason(
    store: shmstore.Client, server: shmstore.ServerProcess
) -> None:
    hook(server.address, payload("UserPromptSubmit", prompt="x"), *SLOW_OK)
    hook(server.address, payload("SessionEnd", reason="logout"), *SLOW_OK)
    assert [s.closed_reason for s in store.recently_closed()] == ["session_end:logout"]


def test_a_session_end_reason_the_store_would_refuse_still_closes_the_session(
    store: shmstore.Client, server: shmstore.ServerProcess
) -> None:
    hook(server.address, payload("UserPromptSubmit", prompt="x"), *SLOW_OK)
    result = hook(server.address, payload("SessionEnd", reason="x" * 500), *SLOW_OK)
    assert result.stderr == b""
    assert [s.closed_reason for s in store.recently_closed()] == ["session_end"]


def test_unknown_events_and_bad_payloads_are_ignored_with_a_note(
    server: shmstore.ServerProcess, store: shmstore.Client
) -> None:
    for body, note in [
        (payload("SomeFutureEvent"), b"ignored unknown event 'SomeFutureEvent'"),
        (b"{not json", b"not JSON"),
        (payload("Stop", cwd="relative/dir"), b"cwd: must be an absolute path"),
        (payload("Stop", session_id=""), b"session_id: must not be empty"),
        (b"[1, 2]", b"must be a JSON object"),
    ]:
        result = hook(server.address, body, *SLOW_OK)
        assert result.returncode == 0
        assert note in result.stderr
    for event in sorted(QUIET_EVENTS):
        result = hook(server.address, payload(event), *SLOW_OK)
        assert (result.returncode, result.stderr) == (0, b""), event
    assert store.revision() == 0


def test_with_the_store_down_the_hook_exits_0_within_its_deadline(sock_dir: Path) -> None:
    for address in [sock_dir / "nobody.sock", "127.0.0.1:9"]:
        started = time.monotonic()
        result = hook(address, payload("Stop"))
        assert result.returncode == 0
        # The hook's 0.9 s count from its process's start, so only exiting comes on top; a
        # machine with a load average of 20 on 2 CPUs took 1.1 s for the whole run.
        assert time.monotonic() - started < 1.5
        assert b"kept in the spool" in result.stderr


def test_a_hung_store_does_not_hold_the_hook(server: shmstore.ServerProcess) -> None:
    import os
    import signal

    os.kill(server.pid, signal.SIGSTOP)
    try:
        wait_until_stopped(server.pid)
        started = time.monotonic()
        result = hook(server.address, payload("Stop"))
        elapsed = time.monotonic() - started
    finally:
        os.kill(server.pid, signal.SIGCONT)
    assert result.returncode == 0
    assert b"kept in the spool" in result.stderr
    assert elapsed < 1.5  # the interpreter's start-up plus the hook's own 0.9 s deadline


def test_the_deadline_counts_from_the_start_of_the_hooks_process(server: shmstore.ServerProcess) -> None:
    """A hook whose process spent its whole 0.9 s before the hook code ran gives up at once
    against a hung store; counted from after imports, it would wait another 0.9 s."""
    import os
    import signal

    late = (
        "import sys, time; time.sleep(1.0); from shmstore import hooks; now = time.monotonic(); "
        f"code = hooks.main(['--address', {str(server.address)!r}], now); "
        "print(time.monotonic() - now); sys.exit(code)"
    )
    os.kill(server.pid, signal.SIGSTOP)
    try:
        wait_until_stopped(server.pid)
        result = subprocess.run(
            [PYTHON, "-c", late], input=json.dumps(payload("Stop")).encode(), capture_output=True, timeout=30
        )
    finally:
        os.kill(server.pid, signal.SIGCONT)
    assert result.returncode == 0
    assert b"kept in the spool" in result.stderr
    assert float(result.stdout) < 0.45


def test_a_prompt_with_a_pasted_two_mib_log_is_reported(server: shmstore.ServerProcess, store: shmstore.Client) -> None:
    log = "".join(f"2026-11-26T02:00:{n % 60:02d} INFO line {n} of a long build log\n" for n in range(40_000))
    assert len(log) > 2 << 20
    result = hook(server.address, payload("UserPromptSubmit", prompt="why does this fail?\n" + log), *SLOW_OK)
    assert (result.returncode, result.stderr) == (0, b"")
    session = store.get(SID)
    assert session is not None
    assert session.status is Status.WORKING


def test_a_payload_over_64_mib_is_refused_with_a_note(server: shmstore.ServerProcess, store: shmstore.Client) -> None:
    body = json.dumps(payload("UserPromptSubmit", prompt="x" * (64 << 20))).encode()
    result = hook(server.address, body, *SLOW_OK)
    assert result.returncode == 0
    assert b"payload: is larger than 67108864 bytes" in result.stderr
    assert store.revision() == 0


def test_the_hook_imports_neither_multiprocess_nor_dill_nor_orjson(server: shmstore.ServerProcess) -> None:
    result = subprocess.run(
        [PYTHON, "-X", "importtime", "-m", "shmstore", "hook", "--address", str(server.address), *SLOW_OK],
        input=json.dumps(payload("Stop")).encode(),
        capture_output=True,
        timeout=30,
    )
    assert result.returncode == 0
    imported = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.decode().splitlines() if "|" in line}
    assert "shmstore.reporter" in imported  # the hook ran, through the light client
    assert not {name.split(".")[0] for name in imported} & {"multiprocess", "dill", "orjson", "argparse"}
    with shmstore.connect(server.address, server.authkey) as store:
        assert store.get(SID) is not None


def test_the_hook_imports_none_of_the_stdlib_modules_it_was_measured_without(server: shmstore.ServerProcess) -> None:
    """What brought the hook from 124M to 92M instructions (callgrind; `python -c pass`:
    40M) stays done: no typing, pathlib or threading, and the C modules under pickle, socket
    and signal, and the built-in SHA-256, rather than their Python wrappers and OpenSSL.
    (Measured without coverage, which imports half the standard library itself.)"""
    env = {key: value for key, value in os.environ.items() if not key.startswith("COV")}
    result = subprocess.run(
        [PYTHON, "-X", "importtime", "-m", "shmstore", "hook", "--address", str(server.address), *SLOW_OK],
        input=json.dumps(payload("Stop")).encode(),
        capture_output=True,
        timeout=30,
        env=env,
    )
    assert result.returncode == 0
    imported = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.decode().splitlines() if "|" in line}
    assert "shmstore.reporter" in imported
    heavy = {"typing", "pathlib", "threading", "socket", "pickle", "signal", "hashlib", "hmac"}
    assert not imported & heavy


# -- the failure log -----------------------------------------------------------------------------


def test_a_failed_report_leaves_one_line_in_the_failure_log(sock_dir: Path, state_home: Path) -> None:
    from shmstore import hooks

    assert Path(hooks.failure_log_path()) == state_home / "shmstore" / "hook.log"
    assert hooks.recent_failures() == []
    result = hook(sock_dir / "nobody.sock", payload("Stop"), *SLOW_OK)
    assert b"kept in the spool" in result.stderr
    [line] = hooks.recent_failures()
    stamp, event, session, why = line.split(" ", 3)
    assert time.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ")
    assert (event, session) == ("Stop", SID)
    assert "nobody.sock" in why
    assert (state_home / "shmstore").stat().st_mode & 0o777 == 0o700
    hook(sock_dir / "nobody.sock", b"{not json")
    assert hooks.recent_failures()[-1].split(" ", 3)[1:3] == ["-", "-"]
    assert len(hooks.recent_failures(limit=1)) == 1


def test_the_failure_log_is_rotated_and_stays_small(state_home: Path) -> None:
    from shmstore import hooks

    for n in range(2000):
        hooks.note_failure("Stop", f"s{n}", "the manager is down " + "x" * 60)
    log = Path(hooks.failure_log_path())
    assert log.stat().st_size <= hooks.MAX_LOG_BYTES + 200
    assert log.with_name("hook.log.1").stat().st_size <= hooks.MAX_LOG_BYTES + 200
    assert sorted(p.name for p in log.parent.iterdir()) == ["hook.log", "hook.log.1"]
    assert hooks.recent_failures(3)[-1].split(" ")[2] == "s1999"


def test_a_failure_log_that_cannot_be_written_never_fails_the_hook(sock_dir: Path, state_home: Path) -> None:
    state_home.parent.mkdir(parents=True, exist_ok=True)
    state_home.write_text("a file where the state directory should be")
    result = hook(sock_dir / "nobody.sock", payload("Stop"))
    assert result.returncode == 0
    assert b"kept in the spool" in result.stderr
    assert state_home.read_text() == "a file where the state directory should be"


def _spawn_hooks(address: object, bodies: list[dict[str, Any]]) -> None:
    with contextlib.ExitStack() as stack:  # each Popen's exit closes its pipes and reaps it
        procs = [
            stack.enter_context(
                subprocess.Popen(
                    [PYTHON, "-m", "shmstore", "hook", "--address", str(address), *SLOW_OK],
                    stdin=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                )
            )
            for _ in bodies
        ]
        try:
            for proc, body in zip(procs, bodies, strict=True):
                proc.stdin.write(json.dumps(body).encode())  # type: ignore[union-attr]
                proc.stdin.close()  # type: ignore[union-attr]
            for proc in procs:
                assert proc.wait(60) == 0
                assert proc.stderr.read() == b""  # type: ignore[union-attr]
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()


def test_twenty_concurrent_hooks_for_new_ids_create_twenty_sessions_once(
    store: shmstore.Client, server: shmstore.ServerProcess
) -> None:
    ids = [f"{n:08d}-0000-4000-8000-000000000000" for n in range(20)]
    _spawn_hooks(server.address, [payload("SessionStart", session_id=id, source="startup") for id in ids])
    sessions = store.list_all()
    assert sorted(s.id for s in sessions) == ids
    assert all(s.history == () and s.status is Status.ATTENTION for s in sessions)
    events = store.changes(0).events
    assert sorted(e.id for e in events if e.kind is EventKind.REPORT) == ids  # each created by one report


def test_concurrent_reports_on_one_id_lose_no_transition(
    store: shmstore.Client, server: shmstore.ServerProcess
) -> None:
    events = ["UserPromptSubmit", "Stop", "PermissionRequest", "PreToolUse", "Notification"] * 4
    _spawn_hooks(server.address, [payload(e, tool_name="Bash", tool_input={}) for e in events])
    reports = [e for e in store.changes(0).events if e.kind is EventKind.REPORT]
    assert len(reports) == len(events)  # every hook's report was applied
    statuses = [e.session.status for e in reports if e.session is not None]
    expected_changes = sum(1 for a, b in itertools.pairwise(statuses) if a != b)
    session = store.get(SID)
    assert session is not None
    assert len(session.history) == expected_changes
    assert all(a.to == b.from_ for a, b in zip(session.history, session.history[1:], strict=False))


# -- dead agents, stale sessions -------------------------------------------------------------


@pytest.fixture
def reaping(start_server: StartServer) -> shmstore.ServerProcess:
    return start_server(stale_after=0.4, reap_interval=0.1)


def test_a_session_whose_agent_died_is_closed_and_the_subscriber_sees_it(reaping: shmstore.ServerProcess) -> None:
    agent = subprocess.Popen([PYTHON, "-c", "import time; time.sleep(30)"])
    with shmstore.connect(reaping.address, reaping.authkey) as store, store.watch(poll=0.2) as watch:
        assert next(watch).kind is EventKind.SNAPSHOT
        hook(reaping.address, payload("UserPromptSubmit", prompt="go"), "--pid", str(agent.pid), *SLOW_OK)
        assert next(watch).kind is EventKind.REPORT
        time.sleep(0.3)
        assert store.get(SID).status is Status.WORKING  # type: ignore[union-attr]  # alive: left alone
        agent.kill()
        agent.wait()
        started = time.monotonic()
        event = next(watch)
        if event.kind is EventKind.STALE:  # silent past stale_after (0.4 s) on a loaded machine: also right
            event = next(watch)
        assert (event.kind, event.id) == (EventKind.CLOSE, SID)
        assert time.monotonic() - started < 2.0
        assert event.session is not None
        assert event.session.closed
        assert SID not in watch.sessions
        assert [s.id for s in store.recently_closed()] == [SID]


def test_a_silent_working_session_is_marked_stale_and_waiting_ones_never(reaping: shmstore.ServerProcess) -> None:
    with shmstore.connect(reaping.address, reaping.authkey) as store:
        store.report("busy", Status.WORKING, "/a")
        store.report("waiting", Status.ATTENTION, "/b")
        store.report("asking", Status.QUESTION, "/c")
        time.sleep(1.0)
        sessions = {s.id: s for s in store.list_all()}
        assert sessions["busy"].stale
        assert sessions["busy"].status is Status.WORKING
        assert not sessions["waiting"].stale
        assert not sessions["asking"].stale
        stale_events = [e.id for e in store.changes(0).events if e.kind is EventKind.STALE]
        assert stale_events == ["busy"]  # marked once, not on every pass
        assert not store.report("busy", Status.WORKING, "/a").stale  # any activity clears it
        assert not store.add_usage("waiting", 1, 1).stale


def test_a_reused_pid_does_not_keep_a_ghost_alive(reaping: shmstore.ServerProcess) -> None:
    import os

    from shmstore import procs

    with shmstore.connect(reaping.address, reaping.authkey) as store:
        store.set(shmstore.Session(id="alive", working_dir="/a", pid=os.getpid()))  # this test's own process
        # An agent identified by a pid and a start time, whose pid now belongs to a process that
        # started at another time: the pid was reused, so the agent is gone.
        newer = subprocess.Popen([PYTHON, "-c", "import time; time.sleep(30)"])
        try:
            start = procs.process_start(newer.pid)
            assert start is not None
            store.set(shmstore.Session(id="reused", working_dir="/r", pid=newer.pid, pid_start=start - 1))
            store.reap()
            assert store.get("reused").closed  # type: ignore[union-attr]
            assert store.get("alive").status is Status.WORKING  # type: ignore[union-attr]
        finally:
            newer.kill()
            newer.wait()


# -- install-hooks ---------------------------------------------------------------------------


EXISTING = {
    "model": "opus",
    "permissions": {"allow": ["Bash(npm test)"]},
    "hooks": {
        "PreToolUse": [{"matcher": "Bash", "hooks": [{"type": "command", "command": "audit.sh"}]}],
        "Stop": [{"hooks": [{"type": "command", "command": "notify-send done"}]}],
    },
}


def install(settings: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return run("install-hooks", "--settings", str(settings), *extra)


def test_install_hooks_merges_keeps_everything_and_is_idempotent(sock_dir: Path) -> None:
    settings = sock_dir / "claude" / "settings.json"
    settings.parent.mkdir()
    settings.write_text(json.dumps(EXISTING, indent=2))

    dry = install(settings, "--dry-run")
    assert dry.returncode == 0
    assert json.loads(settings.read_text()) == EXISTING
    assert "shmstore hook" in dry.stdout

    first = install(settings)
    assert first.returncode == 0, first.stderr
    merged = json.loads(settings.read_text())
    assert merged["model"] == "opus"
    assert merged["permissions"] == EXISTING["permissions"]
    assert merged["hooks"]["PreToolUse"][0] == EXISTING["hooks"]["PreToolUse"][0]
    assert merged["hooks"]["Stop"][0] == EXISTING["hooks"]["Stop"][0]
    assert set(merged["hooks"]) == set(EVENT_STATUS)
    for groups in merged["hooks"].values():
        assert sum("shmstore hook" in h["command"] for g in groups for h in g["hooks"]) == 1
    [backup] = list(settings.parent.glob("settings.json.*.bak"))
    assert json.loads(backup.read_text()) == EXISTING

    content = settings.read_bytes()
    second = install(settings)
    assert second.returncode == 0
    assert "nothing changed" in second.stdout
    assert settings.read_bytes() == content
    assert len(list(settings.parent.glob("*.bak"))) == 1


def test_installed_command_works_as_claude_code_would_run_it(sock_dir: Path, server: shmstore.ServerProcess) -> None:
    settings = sock_dir / "settings.json"
    assert install(settings, "--address", str(server.address)).returncode == 0
    [group] = json.loads(settings.read_text())["hooks"]["UserPromptSubmit"]
    command = group["hooks"][0]["command"]
    # The installed command, with a budget that a loaded machine running coverage in every
    # child cannot overrun (the 0.9 s default counts from process start).
    slow_ok = f"{command} {' '.join(SLOW_OK)}"
    result = subprocess.run(slow_ok, shell=True, input=json.dumps(payload("UserPromptSubmit")), text=True, timeout=30)
    assert result.returncode == 0
    with shmstore.connect(server.address, server.authkey) as store:
        session = store.get(SID)
        assert session is not None
        assert session.status is Status.WORKING


def test_install_hooks_refuses_a_broken_settings_file(sock_dir: Path) -> None:
    settings = sock_dir / "settings.json"
    settings.write_text("{ not json")
    result = install(settings)
    assert result.returncode == 2  # bad input: the settings file is not JSON
    assert "is not JSON" in result.stderr
    assert settings.read_text() == "{ not json"


def uninstall(settings: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return run("uninstall-hooks", "--settings", str(settings), *extra)


def ours_per_event(settings: Path) -> dict[str, list[str]]:
    from shmstore.claude_settings import is_ours

    hooks = json.loads(settings.read_text()).get("hooks", {})
    return {
        event: [h["command"] for g in groups for h in g["hooks"] if is_ours(h["command"])]
        for event, groups in hooks.items()
    }


def test_installing_from_another_venv_or_with_another_address_leaves_one_hook_per_event(sock_dir: Path) -> None:
    settings = sock_dir / "settings.json"
    stale = dict(
        EXISTING, hooks={**EXISTING["hooks"], "TeammateIdle": [{"hooks": [{"command": "py -m shmstore hook"}]}]}
    )
    settings.write_text(json.dumps(stale))
    for extra in [
        ("--command", "/home/dev/old-venv/bin/python -m shmstore hook"),
        (),
        ("--address", "/run/user/1000/shmstore/other.sock"),
    ]:
        assert install(settings, *extra).returncode == 0
        commands = ours_per_event(settings)
        assert set(commands) == set(EVENT_STATUS) | set(EXISTING["hooks"])  # TeammateIdle's went: quiet event
        assert all(len(commands[event]) == 1 for event in EVENT_STATUS)
    assert all(c[0].endswith("--address /run/user/1000/shmstore/other.sock") for c in ours_per_event(settings).values())
    merged = json.loads(settings.read_text())
    assert merged["hooks"]["PreToolUse"][0] == EXISTING["hooks"]["PreToolUse"][0]
    assert merged["hooks"]["Stop"][0] == EXISTING["hooks"]["Stop"][0]


def test_dry_runs_print_a_unified_diff_and_write_nothing(sock_dir: Path) -> None:
    settings = sock_dir / "settings.json"
    settings.write_text(json.dumps(EXISTING, indent=2) + "\n")
    before = settings.read_bytes()
    dry = install(settings, "--dry-run")
    assert dry.returncode == 0
    assert dry.stdout.startswith(f"--- {settings}\n+++ {settings}\n@@ ")
    added = [line for line in dry.stdout.splitlines() if line.startswith("+") and "shmstore hook" in line]
    assert len(added) == len(EVENT_STATUS)
    assert settings.read_bytes() == before
    assert list(sock_dir.iterdir()) == [settings]  # no backup either
    install(settings)
    dry = uninstall(settings, "--dry-run")
    removed = [line for line in dry.stdout.splitlines() if line.startswith("-") and "shmstore hook" in line]
    assert len(removed) == len(EVENT_STATUS)
    assert ours_per_event(settings)["Stop"]  # still installed


def test_uninstall_removes_only_ours_and_leaves_the_rest_as_it_was(sock_dir: Path) -> None:
    settings = sock_dir / "settings.json"
    settings.write_text(json.dumps(EXISTING, indent=2))
    assert install(settings).returncode == 0
    result = uninstall(settings)
    assert result.returncode == 0, result.stderr
    assert f"removed the shmstore hook from {len(EVENT_STATUS)} events" in result.stdout
    assert json.loads(settings.read_text()) == EXISTING
    assert len(list(sock_dir.glob("settings.json.*.bak"))) == 2  # one per write, none overwritten
    again = uninstall(settings)
    assert "nothing changed" in again.stdout
    assert json.loads(settings.read_text()) == EXISTING


def test_uninstall_after_installing_into_no_file_leaves_an_empty_object(sock_dir: Path) -> None:
    settings = sock_dir / "new" / "settings.json"
    assert install(settings).returncode == 0
    assert set(ours_per_event(settings)) == set(EVENT_STATUS)
    assert uninstall(settings).returncode == 0
    assert json.loads(settings.read_text()) == {}


def test_a_symlinked_settings_file_stays_a_symlink(sock_dir: Path) -> None:
    dotfiles = sock_dir / "dotfiles"
    dotfiles.mkdir()
    target = dotfiles / "claude-settings.json"
    target.write_text(json.dumps(EXISTING))
    target.chmod(0o640)
    settings = sock_dir / "settings.json"
    settings.symlink_to(target)
    assert install(settings).returncode == 0
    assert settings.is_symlink()
    assert settings.readlink() == target
    assert set(ours_per_event(target)) == set(EVENT_STATUS) | set(EXISTING["hooks"])
    assert target.stat().st_mode & 0o777 == 0o640
    assert sorted(p.name for p in dotfiles.iterdir()) == ["claude-settings.json"]  # no temporary left
    assert uninstall(settings).returncode == 0
    assert settings.is_symlink()
    assert json.loads(target.read_text()) == EXISTING


def test_anything_but_a_plain_hook_call_goes_to_the_full_command_line(sock_dir: Path) -> None:
    helped = run("hook", "--help")
    assert helped.returncode == 0
    assert "gives up --timeout seconds (default 0.9) after its process started" in " ".join(helped.stdout.split())
    bad = run("hook", "--pid", "not-a-pid")
    assert bad.returncode == 2
    assert "invalid int value: 'not-a-pid'" in bad.stderr


def test_a_writer_that_never_closes_stdin_does_not_hold_the_hook(server: shmstore.ServerProcess) -> None:
    """stdin is read by the deadline too: an agent that left the pipe open costs the hook
    its 0.9 s and no more."""
    with subprocess.Popen(
        [PYTHON, "-m", "shmstore", "hook", "--address", str(server.address)],
        stdin=subprocess.PIPE,
        stderr=subprocess.PIPE,
    ) as proc:
        assert proc.stdin is not None
        proc.stdin.write(b'{"session_id": "s1"')  # half a payload, and the pipe stays open
        proc.stdin.flush()
        started = time.monotonic()
        try:
            assert proc.wait(20) == 0
        finally:
            proc.kill()
        elapsed = time.monotonic() - started
        assert proc.stderr is not None
        assert b"gave up" in proc.stderr.read()
    assert elapsed < 5  # its 0.9 s from the process's start, on a loaded machine
