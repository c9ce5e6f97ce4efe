"""Each agent's payloads, as its documentation gives them (cited at each table) and as its
real CLI sent them where it could be run here (tests/test_real_agents.py drives those), and
each agent's settings file as install-hooks writes it."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from shmstore import ValidationError, agents
from shmstore.agents import claude, codex, copilot, cursor, gemini, opencode

CMD = "/usr/bin/python3 -m shmstore hook --agent NAME --address /run/s.sock"


def said(adapter: Any, payload: dict[str, Any], environ: dict[str, str] | None = None) -> tuple[Any, ...]:
    report = adapter.read(payload, environ or {})
    return report.event, report.session, report.status, report.cwd, report.reason


# -- Codex ----------------------------------------------------------------------------------
# https://developers.openai.com/codex/hooks: common fields session_id, transcript_path, cwd,
# hook_event_name, model; as Codex 0.171.0 sent them (SessionEnd's reason is always "other").
CODEX_COMMON = {"session_id": "01a24570-b071-7dd0-81ee-fbccce9f4fbf", "cwd": "/src/app", "transcript_path": None}


@pytest.mark.parametrize(
    ("event", "extra", "status"),
    [
        ("SessionStart", {"source": "startup"}, "attention"),
        ("UserPromptSubmit", {"prompt": "fix it"}, "working"),
        ("PreToolUse", {"tool_name": "Bash", "tool_input": {"command": "ls"}}, "working"),
        ("PermissionRequest", {"tool_name": "Bash", "tool_input": {"command": "ls", "description": "?"}}, "question"),
        ("PostToolUse", {"tool_name": "Bash", "tool_response": "hi\n"}, "working"),
        ("Stop", {"stop_hook_active": False, "last_assistant_message": "done"}, "attention"),
        ("Interrupt", {}, "attention"),
        ("SessionEnd", {"reason": "other"}, "closed"),
    ],
)
def test_codex_events_make_these_statuses(event: str, extra: dict[str, Any], status: str) -> None:
    payload = {**CODEX_COMMON, "hook_event_name": event, **extra}
    reason = "other" if status == "closed" else None
    assert said(codex, payload) == (event, CODEX_COMMON["session_id"], status, "/src/app", reason)


def test_codex_trust_hashes_are_those_codex_computes() -> None:
    """Hashes Codex 0.171.0 wrote itself into config.toml ("Trust all and continue") for
    hooks of a recorder, timeout 10: SessionEnd's clamped to 3, as Codex takes it."""
    command = "python3 /work/scratch/codex/recorder.py /work/scratch/codex/run2/payloads.jsonl {}"
    written = {
        "SessionStart": "sha256:2d119b9c34dea93a708ddc168cd789685b2603eaa7b7c9443d57a48bb846c0e3",
        "Stop": "sha256:0f4b8a3e7e4c63b5d783ca316fc75c3e4a6b511ab8962301cf534687bf069bf7",
        "SessionEnd": "sha256:6d248ce6872c25bc869bce8d6a49faf35aab3787382706ed6d6cf83b99d4034c",
    }
    for event, digest in written.items():
        assert codex.trust_hash(event, command.format(event), 10) == digest


def test_codex_install_trusts_our_hooks_only_and_uninstall_takes_only_that_trust_back(tmp_path: Path) -> None:
    hooks, config = tmp_path / "hooks.json", tmp_path / "config.toml"
    theirs = {"type": "command", "command": "notify-me", "timeout": 10}
    hooks.write_text(json.dumps({"hooks": {"Stop": [{"hooks": [theirs]}]}}))
    user_config = 'model = "o9"\n\n[hooks.state."/elsewhere/hooks.json:stop:0:0"]\ntrusted_hash = "sha256:1"\n'
    config.write_text(user_config)
    change = codex.install(hooks, CMD)
    assert change.also is not None
    assert change.also.path == config
    table = json.loads(hooks.read_text())["hooks"]
    assert table["Stop"][0]["hooks"] == [theirs]  # theirs first, untouched, and not trusted by us
    text = config.read_text()
    assert text.startswith(user_config)
    assert f'[hooks.state."{hooks}:stop:1:0"]' in text
    assert f'[hooks.state."{hooks}:stop:0:0"]' not in text
    assert text.count("[hooks.state.") == 1 + len(codex.EVENT_STATUS)
    assert codex.install(hooks, CMD).events == []  # once is enough: nothing rewritten
    codex.install(hooks, CMD.replace("/run/s.sock", "/run/t.sock"))  # another address: trusted anew
    assert config.read_text().count("[hooks.state.") == 1 + len(codex.EVENT_STATUS)
    assert codex.trust_hash("Stop", CMD.replace("/run/s.sock", "/run/t.sock"), 5) in config.read_text()
    codex.uninstall(hooks)
    assert config.read_text() == user_config
    assert json.loads(hooks.read_text()) == {"hooks": {"Stop": [{"hooks": [theirs]}]}}


def trust_tables(config: Path) -> dict[str, str]:
    """Each ``[hooks.state."KEY"]`` table of a config.toml: its key -> its trusted hash."""
    lines = config.read_text().splitlines()
    return {
        line[len('[hooks.state."') : -2]: nxt
        for line, nxt in itertools.pairwise(lines)
        if line.startswith("[hooks.state.")
    }


@pytest.mark.parametrize("then", ["reinstall", "uninstall"])
def test_codex_a_users_hook_after_ours_keeps_its_trust_where_it_moves(tmp_path: Path, then: str) -> None:
    # Codex keys a hook's trust by its group's place in the event; ours come first on Stop
    # here, and a reinstall (ours go after theirs) or an uninstall moves the user's hook.
    hooks, config = tmp_path / "hooks.json", tmp_path / "config.toml"
    codex.install(hooks, CMD)
    table = json.loads(hooks.read_text())
    table["hooks"]["Stop"].append({"hooks": [{"type": "command", "command": "notify-me"}]})
    hooks.write_text(json.dumps(table))
    config.write_text(config.read_text() + f'\n[hooks.state."{hooks}:stop:1:0"]\ntrusted_hash = "sha256:theirs"\n')
    if then == "reinstall":
        codex.install(hooks, CMD.replace("/run/s.sock", "/run/t.sock"))
    else:
        codex.uninstall(hooks)
    tables = trust_tables(config)
    assert tables[f"{hooks}:stop:0:0"] == 'trusted_hash = "sha256:theirs"'
    assert json.loads(hooks.read_text())["hooks"]["Stop"][0]["hooks"][0]["command"] == "notify-me"
    assert len(tables) == (1 + len(codex.EVENT_STATUS) if then == "reinstall" else 1)
    assert config.read_text().count("[hooks.state.") == len(tables)  # no key twice


def test_codex_a_move_onto_a_key_the_user_still_has_leaves_that_hook_untrusted(tmp_path: Path) -> None:
    # Two tables of one key would make config.toml unreadable to Codex; the user's entry at
    # the new key is not ours to drop: the moved hook goes untrusted (Codex asks again).
    config = tmp_path / "config.toml"
    config.write_text('[hooks.state."a"]\ntrusted_hash = "1"\n\n[hooks.state."b"]\ntrusted_hash = "2"\n')
    assert codex.renamed(config.read_text(), {"a": "b"}) == config.read_text()
    assert codex.renamed(config.read_text(), {"a": "b", "b": "c"}).count('"b"]') == 1  # b moves away first


def test_codex_trusts_a_hooks_file_by_its_real_path(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "linked").symlink_to(tmp_path / "real")
    hooks = tmp_path / "linked" / "hooks.json"
    codex.install(hooks, CMD)
    keys = trust_tables(tmp_path / "real" / "config.toml")
    assert len(keys) == len(codex.EVENT_STATUS)
    assert all(key.startswith(f"{tmp_path.resolve()}/real/hooks.json:") for key in keys)
    codex.uninstall(hooks)
    assert trust_tables(tmp_path / "real" / "config.toml") == {}


def test_codex_dry_run_shows_both_files_and_writes_neither(tmp_path: Path) -> None:
    hooks = tmp_path / "hooks.json"
    diff = codex.install(hooks, CMD, dry_run=True).diff()
    assert "hooks.json" in diff
    assert "config.toml" in diff
    assert "trusted_hash" in diff
    assert not hooks.exists()
    assert not (tmp_path / "config.toml").exists()


# -- Gemini CLI -----------------------------------------------------------------------------

#: What Gemini CLI 0.61.0 wrote to its transcript at Esc on its permission dialog (seen in
#: tests/test_real_gemini.py; long fields cut), in order.
GEMINI_ESC_LINES = [
    b'{"id":"4783","timestamp":"2026-12-05T13:03:19.557Z","type":"gemini","content":"","toolCalls":'
    b'[{"id":"run_shell_command_0","name":"run_shell_command","status":"cancelled"}]}',
    b'{"id":"348d","timestamp":"2026-12-05T13:03:19.927Z","type":"info","content":"Request cancelled."}',
    b'{"$set":{"lastUpdated":"2026-12-05T13:03:19.927Z"}}',
    b'{"id":"69f5","timestamp":"2026-12-05T13:03:19.927Z","type":"user","content":[{"text":"<session_context>\\nThis'
    b' is the Gemini CLI."},{"text":"run: echo no > refused.txt"}]}',
    b'{"$set":{"messages":[],"lastUpdated":"2026-12-05T13:03:19.927Z"}}',
]


def test_gemini_esc_at_its_dialog_is_back_at_the_prompt_whatever_it_writes_after() -> None:
    verdicts = [gemini.settled(line) for line in GEMINI_ESC_LINES]
    assert verdicts == [None, True, None, None, None]


@pytest.mark.parametrize(
    "line",
    [
        b'{"type":"gemini","content":"done","toolCalls":[{"name":"run_shell_command","status":"success"}]}',
        b'{"type":"gemini","content":"Here it is."}',
        b'{"type":"user","content":[{"text":"and now the tests"}]}',
    ],
    ids=["the-tool-ran", "a-reply", "the-next-prompt"],
)
def test_gemini_a_tool_run_a_reply_or_a_prompt_says_it_went_on(line: bytes) -> None:
    assert gemini.settled(line) is False


# https://geminicli.com/docs/hooks/reference: base fields session_id, transcript_path, cwd,
# hook_event_name, timestamp; Notification's notification_type ToolPermission, message and
# details; SessionEnd's reason (exit, clear), as Gemini CLI 0.61.0 sent them.
GEMINI_COMMON = {
    "session_id": "9d6b1c1e-3f1a-4f7e-9b0e-1f2d3c4b5a69",
    "transcript_path": "/home/u/.gemini/tmp/app/chats/session-2026-12-05T09-01-9d6b1c1e.jsonl",
    "cwd": "/src/app",
    "timestamp": "2026-12-05T09:01:53.123Z",
}


@pytest.mark.parametrize(
    ("event", "extra", "status"),
    [
        ("SessionStart", {"source": "startup"}, "attention"),
        ("BeforeAgent", {"prompt": "fix it"}, "working"),
        ("BeforeTool", {"tool_name": "run_shell_command", "tool_input": {"command": "ls"}}, "working"),
        (
            "Notification",
            {
                "notification_type": "ToolPermission",
                "message": "Tool Confirm Shell Command requires execution",
                "details": {"type": "exec", "title": "Confirm Shell Command", "command": "ls"},
            },
            "question",
        ),
        ("Notification", {"notification_type": "SomethingNew", "message": "?"}, "attention"),
        ("AfterTool", {"tool_name": "run_shell_command", "tool_response": {"llmContent": "x"}}, "working"),
        ("AfterAgent", {"prompt": "fix it", "prompt_response": "done", "stop_hook_active": False}, "attention"),
        ("SessionEnd", {"reason": "exit"}, "closed"),
        ("PreCompress", {"trigger": "auto"}, None),
        ("AfterModel", {"llm_request": {}, "llm_response": {}}, None),
    ],
)
def test_gemini_events_make_these_statuses(event: str, extra: dict[str, Any], status: str | None) -> None:
    payload = {**GEMINI_COMMON, "hook_event_name": event, **extra}
    reason = "exit" if status == "closed" else None
    assert said(gemini, payload) == (event, GEMINI_COMMON["session_id"], status, "/src/app", reason)


def test_gemini_hooks_are_named_and_timed_in_milliseconds(tmp_path: Path) -> None:
    settings = tmp_path / "settings.json"
    settings.write_text(
        json.dumps({"ui": {"theme": "Default"}, "hooks": {"AfterModel": [{"hooks": [{"command": "x"}]}]}})
    )
    gemini.install(settings, CMD)
    document = json.loads(settings.read_text())
    assert document["ui"] == {"theme": "Default"}
    assert document["hooks"]["AfterModel"] == [{"hooks": [{"command": "x"}]}]  # theirs
    assert set(document["hooks"]) == {"AfterModel", *gemini.EVENT_STATUS}  # none on the per-chunk events
    entry = document["hooks"]["AfterAgent"][0]["hooks"][0]
    assert entry == {"type": "command", "name": "shmstore", "command": CMD, "timeout": 5000}


# -- Copilot CLI ----------------------------------------------------------------------------
# https://docs.github.com/en/copilot/reference/copilot-cli-reference/cli-hooks-reference,
# "Hook event input payloads": sessionId, timestamp (ms), cwd and the event's own fields; a
# camelCase event's payload does not name it (the installed entry's env does).
COPILOT_COMMON = {"sessionId": "df6ffaaa-a777-4c0b-8710-dec18e4948d6", "timestamp": 1796461324723, "cwd": "/src/app"}


@pytest.mark.parametrize(
    ("event", "extra", "status"),
    [
        ("sessionStart", {"source": "new", "initialPrompt": "fix it"}, "working"),
        ("userPromptSubmitted", {"prompt": "fix it"}, "working"),
        ("preToolUse", {"toolName": "bash", "toolArgs": {"command": "ls"}}, "working"),
        ("preToolUse", {"toolName": "ask_user", "toolArgs": {"message": "which colour?"}}, "question"),
        ("notification", {"notification_type": "permission_prompt", "message": "Run command: ls"}, "question"),
        ("notification", {"notification_type": "elicitation_dialog", "message": "Information requested"}, "question"),
        ("notification", {"notification_type": "shell_completed", "message": "done"}, None),
        ("postToolUse", {"toolName": "bash", "toolResult": {"resultType": "success"}}, "working"),
        ("agentStop", {"transcriptPath": "/x/events.jsonl", "stopReason": "end_turn"}, "attention"),
        ("errorOccurred", {"errorContext": "model_call", "recoverable": True, "error": {"message": "x"}}, "attention"),
        ("errorOccurred", {"errorContext": "tool_execution", "recoverable": True, "error": {"message": "x"}}, None),
        ("sessionEnd", {"reason": "user_exit"}, "closed"),
    ],
)
def test_copilot_events_make_these_statuses(event: str, extra: dict[str, Any], status: str | None) -> None:
    payload = {**COPILOT_COMMON, **extra}
    if event == "notification":
        payload["hook_event_name"] = "Notification"  # the one camelCase payload that names its event
    reason = "user_exit" if status == "closed" else None
    assert said(copilot, payload, {"SHMSTORE_EVENT": event}) == (
        event,
        COPILOT_COMMON["sessionId"],
        status,
        "/src/app",
        reason,
    )


def test_copilot_refuses_a_payload_whose_event_nobody_named() -> None:
    with pytest.raises(ValidationError, match="SHMSTORE_EVENT"):
        copilot.read(COPILOT_COMMON, {})


def test_copilot_hooks_file_is_ours_and_names_each_event(tmp_path: Path) -> None:
    path = tmp_path / "hooks" / "shmstore.json"
    path.parent.mkdir()
    copilot.install(path, CMD)
    document = json.loads(path.read_text())
    assert document["version"] == 1
    assert document["hooks"]["agentStop"] == [
        {"type": "command", "bash": CMD, "env": {"SHMSTORE_EVENT": "agentStop"}, "timeoutSec": 5}
    ]
    assert "permissionRequest" not in document["hooks"]  # it fires when every tool is allowed too
    copilot.uninstall(path)
    assert json.loads(path.read_text()) == {"version": 1}


# -- Cursor ---------------------------------------------------------------------------------
# https://cursor.com/docs/agent/hooks: hooks.json version 1; common fields conversation_id,
# generation_id, hook_event_name, workspace_roots, cursor_version; sessionEnd's reason and
# stop's status as captured from its CLI 2026.02.13 (entireio/cli, agent/cursor/AGENT.md).
CURSOR_COMMON = {
    "conversation_id": "4f9b2a1c-7d3e-4a8b-9c0d-1e2f3a4b5c6d",
    "generation_id": "8a7b6c5d-4e3f-2a1b-0c9d-8e7f6a5b4c3d",
    "workspace_roots": ["/src/app"],
    "cursor_version": "2026.02.13-41ac335",
    "transcript_path": None,
}


@pytest.mark.parametrize(
    ("event", "extra", "status"),
    [
        ("sessionStart", {"session_id": "4f9b2a1c", "is_background_agent": False}, "attention"),
        ("beforeSubmitPrompt", {"prompt": "fix it"}, "working"),
        ("preToolUse", {"tool_name": "Write", "tool_input": {"file_path": "/src/app/a"}}, "working"),
        ("stop", {"status": "aborted", "loop_count": 0}, "attention"),
        ("sessionEnd", {"reason": "completed", "final_status": "completed"}, "closed"),
        ("afterAgentResponse", {"text": "done"}, None),
    ],
)
def test_cursor_events_make_these_statuses(event: str, extra: dict[str, Any], status: str | None) -> None:
    payload = {**CURSOR_COMMON, "hook_event_name": event, **extra}
    reason = "completed" if status == "closed" else None
    assert said(cursor, payload) == (event, CURSOR_COMMON["conversation_id"], status, "/src/app", reason)


def test_cursor_hooks_file_holds_flat_entries_beside_the_users(tmp_path: Path) -> None:
    path = tmp_path / "hooks.json"
    theirs = {"command": ".cursor/hooks/on-stop.sh", "loop_limit": 5}
    path.write_text(json.dumps({"version": 1, "hooks": {"stop": [theirs]}}))
    cursor.install(path, CMD)
    document = json.loads(path.read_text())
    assert document["hooks"]["stop"] == [theirs, {"command": CMD}]
    assert cursor.install(path, CMD).events == []
    cursor.uninstall(path)
    assert json.loads(path.read_text()) == {"version": 1, "hooks": {"stop": [theirs]}}


# -- opencode -------------------------------------------------------------------------------
# https://opencode.ai/docs/plugins: the plugin's payload, made of the bus events of its SDK
# (@opencode-ai/sdk 1.18.33, v2 types) as opencode 1.18.33 sent them (tests/test_real_opencode.py).
OPENCODE_COMMON = {"session_id": "ses_2464e241dffeABCDEF0123456789", "cwd": "/src/app", "pid": 4242, "time": 1}


@pytest.mark.parametrize(
    ("event", "extra", "status"),
    [
        ("session.created", {}, "attention"),
        ("session.status", {"status": "busy"}, "working"),
        ("session.status", {"status": "retry"}, "working"),
        ("session.status", {"status": "idle"}, "attention"),
        ("session.idle", {}, "attention"),
        ("session.error", {"error": "MessageAbortedError"}, "attention"),
        ("permission.asked", {}, "question"),
        ("permission.replied", {"reply": "once"}, "working"),
        ("permission.replied", {"reply": "reject"}, "working"),  # session.idle follows
        ("question.asked", {}, "question"),
        ("question.replied", {}, "working"),
        ("question.rejected", {}, "working"),
        ("session.deleted", {}, "closed"),
        ("plugin.dispose", {}, "closed"),  # the plugin's own: opencode exits
        ("session.compacted", {}, None),  # not one the plugin sends
    ],
)
def test_opencode_events_make_these_statuses(event: str, extra: dict[str, Any], status: str | None) -> None:
    payload = {**OPENCODE_COMMON, "hook_event_name": event, **extra}
    reason = {"session.deleted": "deleted", "plugin.dispose": "exit"}.get(event)
    assert said(opencode, payload) == (event, OPENCODE_COMMON["session_id"], status, "/src/app", reason)
    assert opencode.read(payload, {}).subagent is None


@pytest.mark.parametrize(
    ("event", "extra", "status"),
    [
        ("session.created", {}, "working"),  # the parent is in its task tool call
        ("session.status", {"status": "busy"}, "working"),
        ("session.status", {"status": "idle"}, "working"),  # the subagent's end: the parent goes on
        ("session.idle", {}, "working"),
        ("session.error", {"error": "APIError"}, "working"),
        ("permission.asked", {}, "question"),  # the user's to answer, for the subagent
        ("question.asked", {}, "question"),
        ("permission.replied", {"reply": "once"}, "working"),
        ("session.deleted", {}, None),  # may come after its parent closed: it must not reopen it
    ],
)
def test_opencode_a_subagents_events_are_its_parents_and_never_hand_it_to_the_user(
    event: str, extra: dict[str, Any], status: str | None
) -> None:
    payload = {**OPENCODE_COMMON, "hook_event_name": event, "parent_id": "ses_parent", **extra}
    report = opencode.read(payload, {})
    assert (report.event, report.session, report.status, report.reason) == (event, "ses_parent", status, None)
    assert report.subagent == OPENCODE_COMMON["session_id"]


def test_opencode_plugin_is_ours_runs_the_command_and_reports_only_bus_events(tmp_path: Path) -> None:
    path = tmp_path / "plugins" / "shmstore.js"
    opencode.install(path, CMD)
    text = path.read_text()
    assert text.startswith(opencode.MARK)
    assert f"const COMMAND = {json.dumps(CMD)}\n" in text
    assert "const TAKES_PID = true " in text  # shmstore hook is told opencode's pid
    events = json.loads(text.split("const EVENTS = new Set(")[1].split(")\n")[0])
    assert set(events) == set(opencode.EVENT_STATUS) - {"plugin.dispose"}  # that one is the plugin's own
    assert "const TAKES_PID = false " in opencode.plugin("notify-me")  # another command is run as it is
    path.write_text("// the user's plugin\n")
    with pytest.raises(ValidationError, match="not shmstore's plugin"):
        opencode.install(path, CMD)


#: Drives the plugin in node as opencode would (its event hook, then dispose), with a hook
#: command that takes HOOK_SLEEP seconds: what reaches the hook, in order.
PLUGIN_DRIVER = """
const { Shmstore } = await import(process.argv[2])
const hooks = await Shmstore({ directory: "/src/app" })
const fire = (type, properties) => hooks.event({ event: { type, properties } })
const pause = (ms) => new Promise((r) => setTimeout(r, ms))
fire("session.created", { sessionID: "s1", info: { id: "s1", directory: "/src/app" } })
for (let i = 0; i < 5; i++) fire("session.status", { sessionID: "s1", status: { type: "busy" } })
fire("session.created", { sessionID: "c1", info: { id: "c1", parentID: "s1", directory: "/src/app" } })
fire("message.updated", { sessionID: "s1", info: { id: "m2", sessionID: "s1", parentID: "m1" } })
fire("session.status", { sessionID: "c1", status: { type: "busy" } })
fire("permission.asked", { id: "per_1", sessionID: "s1", permission: "bash" })
fire("session.updated", { sessionID: "s1", info: { id: "s1" } })
await pause(1500)
fire("permission.replied", { sessionID: "s1", requestID: "per_1", reply: "once" })
fire("session.status", { sessionID: "s1", status: { type: "idle" } })
fire("session.idle", { sessionID: "s1" })
const started = Date.now()
await hooks.dispose()
console.log(Date.now() - started)
"""


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed (.ci/run installs npm, with it)")
def test_opencode_plugin_coalesces_each_session_and_closes_at_dispose(tmp_path: Path) -> None:
    """One hook at a time; meanwhile a session's later event replaces its waiting one (the
    busy repeats are dropped, the permission.asked arrives); a message's parentID makes no
    subagent; at dispose what waits is dropped and the top-level session is closed, with
    dispose waiting for no hook (they are detached)."""
    record = tmp_path / "record.jsonl"
    hook = tmp_path / "hook.py"
    hook.write_text(
        "import json, sys, time\n"
        "payload = json.load(sys.stdin)\n"
        "time.sleep(0.3)\n"
        f"with open({str(record)!r}, 'a') as out:\n"
        "    out.write(json.dumps({'payload': payload, 'argv': sys.argv[1:]}) + '\\n')\n"
    )
    module = tmp_path / "shmstore.mjs"
    module.write_text(opencode.plugin(f"{sys.executable} {hook} -m shmstore hook"))
    driver = tmp_path / "driver.mjs"
    driver.write_text(PLUGIN_DRIVER)
    done = subprocess.run(["node", str(driver), str(module)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert float(done.stdout) < 2000  # dispose waits for no hook (each takes 0.3 s and more)

    def reports() -> list[dict[str, Any]]:
        return [json.loads(line) for line in record.read_text().splitlines()] if record.exists() else []

    deadline = time.monotonic() + 10
    while len(reports()) < 5 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # and nothing more comes
    got = reports()
    seen = [
        (row["payload"]["hook_event_name"], row["payload"]["session_id"], row["payload"].get("parent_id"))
        for row in got
    ]
    assert seen[:3] == [
        ("session.created", "s1", None),  # started at once
        ("session.status", "c1", "s1"),  # it waited behind s1's, which s1's later events put back last
        ("permission.asked", "s1", None),  # the busy repeats were replaced by it
    ], got
    # Then the reply, started at once, and the close beside it (each hook runs detached): the
    # idle still waiting was dropped, and c1, a subagent, is no session to close.
    assert sorted(seen[3:]) == [("permission.replied", "s1", None), ("plugin.dispose", "s1", None)], got
    assert all(row["argv"] == ["-m", "shmstore", "hook", "--pid", str(got[0]["payload"]["pid"])] for row in got)
    assert {row["payload"]["cwd"] for row in got} == {"/src/app"}


# -- Claude Code's hooks, run by another agent ----------------------------------------------


def test_claude_hooks_run_by_copilot_or_cursor_say_nothing_of_a_claude_session() -> None:
    """Copilot CLI runs a project's .claude/settings.json hooks (with COPILOT_CLI=1), Cursor
    ~/.claude/settings.json's when its third-party hooks are on: their own adapters report."""
    payload = {"session_id": "s1", "cwd": "/src/app", "hook_event_name": "Stop"}
    assert claude.read(payload, {}).status == "attention"
    assert claude.read(payload, {"COPILOT_CLI": "1"}).status is None
    assert claude.read({**payload, "cursor_version": "2.0.77"}, {}).status is None


# -- install-hooks --agent all ----------------------------------------------------------------


def test_install_hooks_for_all_puts_ours_in_each_agent_found_and_no_other(tmp_path: Path) -> None:
    home = tmp_path / "home"
    for found in (".gemini", ".codex"):
        (home / found).mkdir(parents=True)
    env = {"HOME": str(home), "PATH": "/usr/bin:/bin", "PYTHONPATH": os.pathsep.join(sys.path)}
    if any(agents.get(name).found() for name in ("cursor", "copilot_cli")) and os.path.exists("/usr/bin/cursor-agent"):
        pytest.skip("an agent's command is in /usr/bin")
    argv = [sys.executable, "-m", "shmstore", "install-hooks", "--agent", "all", "--address", str(tmp_path / "s.sock")]
    ran = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
    assert ran.returncode == 0, ran.stderr
    assert (home / ".gemini" / "settings.json").exists()
    assert (home / ".codex" / "hooks.json").exists()
    assert (home / ".codex" / "config.toml").exists()
    assert not (home / ".claude").exists()
    assert not (home / ".cursor").exists()
    gemini_hooks = json.loads((home / ".gemini" / "settings.json").read_text())["hooks"]
    assert "--agent gemini_cli" in gemini_hooks["AfterAgent"][0]["hooks"][0]["command"]
    ran = subprocess.run([*argv[:3], "uninstall-hooks", "--agent", "all"], env=env, capture_output=True, text=True)
    assert ran.returncode == 0, ran.stderr
    assert "hooks" not in json.loads((home / ".gemini" / "settings.json").read_text())
    assert "[hooks.state." not in (home / ".codex" / "config.toml").read_text()


def test_install_hooks_for_codex_says_which_file_it_wrote(tmp_path: Path) -> None:
    home = tmp_path / "home"
    (home / ".codex").mkdir(parents=True)
    env = {"HOME": str(home), "PATH": "/usr/bin:/bin", "PYTHONPATH": os.pathsep.join(sys.path)}
    argv = [
        sys.executable,
        "-m",
        "shmstore",
        "install-hooks",
        "--agent",
        "codex",
        "--address",
        str(tmp_path / "s.sock"),
    ]

    def install() -> str:
        ran = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
        assert ran.returncode == 0, ran.stderr
        return ran.stdout

    first = install()
    assert f"events in {home}/.codex/hooks.json" in first
    assert f"rewrote {home}/.codex/config.toml" in first
    assert install() == f"{home}/.codex/hooks.json is as it should be; nothing changed\n"
    (home / ".codex" / "config.toml").write_text("")  # the user took the trust away: only config.toml changes
    assert install() == f"rewrote {home}/.codex/config.toml\n"
