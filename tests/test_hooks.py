"""Fed by real agents: Claude Code hook payloads through `shmstore hook` into a live manager."""

from __future__ import annotations

import contextlib
import itertools
import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from helpers import CWD, PYTHON, SID, StartServer, hook, payload, wait_until_stopped

import shmstore
from shmstore import EventKind, Status
from shmstore.hooks import EVENT_STATUS, status_for

SAMPLES = [
    (payload("SessionStart", source="startup"), Status.ATTENTION),
    (payload("UserPromptSubmit", prompt="add a login page"), Status.WORKING),
    (payload("PreToolUse", tool_name="Bash", tool_input={"command": "npm test"}), Status.WORKING),
    (payload("PostToolUse", tool_name="Bash", tool_input={}, tool_response={"exit_code": 0}), Status.WORKING),
    (payload("PostToolUseFailure", tool_name="Edit", tool_input={}, error="no match"), Status.WORKING),
    (payload("PreToolUse", tool_name="AskUserQuestion", tool_input={"questions": []}), Status.QUESTION),
    (payload("SubagentStop", stop_hook_active=False), Status.WORKING),
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
    (payload("SessionEnd", reason="prompt_input_exit"), Status.CLOSED),
]


def test_every_mapped_event_has_a_sample() -> None:
    assert {p["hook_event_name"] for p, _ in SAMPLES} == set(EVENT_STATUS)
    for sample, status in SAMPLES:
        assert status_for(sample) is status, sample["hook_event_name"]


def test_a_whole_session_through_the_hook(store: shmstore.Client, server: shmstore.ServerProcess) -> None:
    seen: list[tuple[Status, float, float]] = []
    for sample, status in SAMPLES:
        result = hook(server.address, sample)
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
    hook(server.address, payload("UserPromptSubmit", prompt="x"))
    hook(server.address, payload("SessionEnd", reason="logout"))
    assert store.list_all() == []
    hook(server.address, payload("SessionStart", source="resume"))
    [session] = store.list_all()
    assert session.status is Status.ATTENTION
    assert [h.to for h in session.history] == [Status.CLOSED, Status.ATTENTION]
    assert store.recently_closed() == []


def test_unknown_events_and_bad_payloads_are_ignored_with_a_note(
    server: shmstore.ServerProcess, store: shmstore.Client
) -> None:
    for body, note in [
        (payload("TeammateIdle"), b"ignored event 'TeammateIdle'"),
        (b"{not json", b"not JSON"),
        (payload("Stop", cwd="relative/dir"), b"cwd: must be an absolute path"),
        (payload("Stop", session_id=""), b"session_id: must not be empty"),
        (b"[1, 2]", b"must be a JSON object"),
    ]:
        result = hook(server.address, body)
        assert result.returncode == 0
        assert note in result.stderr
    assert store.revision() == 0


def test_with_the_store_down_the_hook_exits_0_within_a_second(sock_dir: Path) -> None:
    for address in [sock_dir / "nobody.sock", "127.0.0.1:9"]:
        started = time.monotonic()
        result = hook(address, payload("Stop"))
        assert result.returncode == 0
        assert time.monotonic() - started < 1.0
        assert b"not reported" in result.stderr


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
    assert b"not reported" in result.stderr
    assert elapsed < 1.5  # the interpreter's start-up plus the hook's own 0.9 s deadline


def _spawn_hooks(address: object, bodies: list[dict[str, Any]]) -> None:
    with contextlib.ExitStack() as stack:  # each Popen's exit closes its pipes and reaps it
        procs = [
            stack.enter_context(
                subprocess.Popen(
                    [PYTHON, "-m", "shmstore", "hook", "--address", str(address)],
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
        hook(reaping.address, payload("UserPromptSubmit", prompt="go"), "--pid", str(agent.pid))
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
    return subprocess.run(
        [PYTHON, "-m", "shmstore", "install-hooks", "--settings", str(settings), *extra],
        capture_output=True,
        text=True,
        timeout=30,
    )


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
    result = subprocess.run(command, shell=True, input=json.dumps(payload("UserPromptSubmit")), text=True, timeout=30)
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
