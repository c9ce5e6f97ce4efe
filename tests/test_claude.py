"""Claude Code, through its adapter (shmstore/agents/claude.py): every event of its hooks
reference mapped, its payloads through `shmstore hook` into a live manager, and
`install-hooks` / `uninstall-hooks` on its settings file."""

from __future__ import annotations

import itertools
import json
import os
import shlex
import subprocess
from pathlib import Path

from helpers import CWD, SID, hook, payload, run

import shmstore
from shmstore import Status
from shmstore.agents.claude import EVENT_STATUS, QUIET_EVENTS, status_for

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


def test_a_manual_compact_waits_for_the_user_and_an_automatic_one_works_on() -> None:
    # Claude 2.1.332 fires no Stop after `/compact` typed at its prompt (tests/test_real_claude.py).
    assert status_for(payload("PostCompact", trigger="manual")) == Status.ATTENTION
    assert status_for(payload("PostCompact", trigger="auto")) == Status.WORKING


SPARE = {"CLAUDE_CODE_AGENT": "claude", "CLAUDE_JOB_DIR": "/home/dev/.claude/jobs/d7cb55f0"}


def test_a_spares_start_says_nothing_and_a_restarted_background_session_is_the_users() -> None:
    start = payload("SessionStart", source="startup", agent_type="claude")
    assert status_for(start, SPARE) is None  # the agent view's spare, with no task yet
    assert status_for(start, {}) == Status.ATTENTION  # `claude --agent claude` in a terminal
    assert status_for(payload("SessionStart", source="resume", agent_type="claude"), SPARE) == Status.ATTENTION
    assert status_for(payload("UserPromptSubmit", agent_type="claude"), SPARE) == Status.WORKING


def test_a_background_sessions_short_id_and_why_it_ended_come_from_its_job(tmp_path: Path) -> None:
    from shmstore.agents.claude import read

    job = tmp_path / "jobs" / "d7cb55f0"
    job.mkdir(parents=True)
    environ = {"CLAUDE_JOB_DIR": str(job)}
    assert read(payload("Stop"), environ).background == "d7cb55f0"
    assert read(payload("Stop"), {}).background is None
    assert read(payload("SessionEnd", reason="other"), environ).reason == "other"  # no state.json yet
    (job / "state.json").write_text(json.dumps({"state": "stopped", "detail": "stopped"}))
    assert read(payload("SessionEnd", reason="other"), environ).reason == "stopped"
    assert read(payload("SessionEnd", reason="clear"), environ).reason == "clear"  # the payload's own word first
    (job / "state.json").write_text(json.dumps({"state": "working"}))  # not written yet: says nothing
    assert read(payload("SessionEnd", reason="other"), environ).reason == "other"
    (job / "state.json").write_text("{ not json")
    assert read(payload("SessionEnd", reason="other"), environ).reason == "other"


def test_a_subagents_events_name_it() -> None:
    from shmstore.agents.claude import read

    assert (
        read(payload("PreToolUse", tool_name="Bash", agent_id="a2a5ecc2a629a6945"), {}).subagent == "a2a5ecc2a629a6945"
    )
    assert read(payload("PreToolUse", tool_name="Bash"), {}).subagent is None


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


def test_install_hooks_writes_the_address_out_so_hooks_need_no_environment_of_the_shell(sock_dir: Path) -> None:
    # A background session's hooks run in Claude's daemon's environment, which need not have
    # the XDG_RUNTIME_DIR or SHMSTORE_ADDRESS of the shell that installed them.
    settings = sock_dir / "settings.json"
    env = {**os.environ, "XDG_RUNTIME_DIR": str(sock_dir / "run")}
    env.pop("SHMSTORE_ADDRESS", None)
    assert run("install-hooks", "--settings", str(settings), env=env).returncode == 0
    [group] = json.loads(settings.read_text())["hooks"]["Stop"]
    words = shlex.split(group["hooks"][0]["command"])
    assert words[words.index("--address") + 1] == str(sock_dir / "run" / "shmstore" / "store.sock")


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
    from shmstore.agents.settings import is_ours

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
