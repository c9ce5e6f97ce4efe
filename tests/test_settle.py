"""A question the agent leaves without an event (Esc at its permission prompt), noticed in
its transcript (shmstore/hook/settle.py): real hook processes, a real manager, and the
transcript lines Gemini CLI 0.61.0 and Copilot CLI 1.0.102 wrote (tests/test_real_gemini.py
and tests/test_real_copilot.py see them come from the real CLIs)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from helpers import hook

import shmstore

CANCELLED = b'{"id":"7","timestamp":"2026-12-05T09:01:58.000Z","type":"info","content":"Request cancelled."}\n'
TOOL_RESULT = b'{"id":"8","timestamp":"2026-12-05T09:01:59.000Z","type":"gemini","toolCalls":[{"id":"c1"}]}\n'


@pytest.fixture
def agent_process() -> Iterator[subprocess.Popen[bytes]]:
    """A process standing for the agent (the watcher ends when it does)."""
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield process
    process.kill()
    process.wait()


def gemini_question(transcript: Path) -> dict[str, object]:
    return {
        "session_id": "g1",
        "transcript_path": str(transcript),
        "cwd": "/src/app",
        "hook_event_name": "Notification",
        "notification_type": "ToolPermission",
        "message": "Tool Confirm Shell Command requires execution",
    }


def watchers(pid: int) -> list[psutil.Process]:
    """The settle watchers started for the agent process ``pid``."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        line = process.info["cmdline"] or []
        if "shmstore.hook.settle" in line and line[-1] == str(pid):
            found.append(process)
    return found


def status_becomes(store: shmstore.Client, id: str, status: str, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        session = store.get(id)
        if session is not None and session.status == status:
            return True
        time.sleep(0.05)
    return False


def test_a_permission_dialog_dismissed_without_an_event_shows_attention(
    server: shmstore.ServerProcess, store: shmstore.Client, tmp_path: Path, agent_process: subprocess.Popen[bytes]
) -> None:
    transcript = tmp_path / "session.jsonl"
    transcript.write_bytes(b'{"type":"user","content":"run: rm x"}\n')
    ran = hook(server.address, gemini_question(transcript), "--agent", "gemini_cli", "--pid", str(agent_process.pid))
    assert ran.returncode == 0, ran.stderr
    assert status_becomes(store, "g1", "question")
    assert len(watchers(agent_process.pid)) == 1
    with transcript.open("ab") as file:  # Esc at the dialog: Gemini writes this line, fires nothing
        file.write(CANCELLED)
    assert status_becomes(store, "g1", "attention")
    session = store.get("g1")
    assert session is not None
    assert [(h.from_, h.to) for h in session.history][-1] == ("question", "attention")
    assert wait_gone(agent_process.pid)


def wait_gone(pid: int, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while watchers(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_a_question_the_agent_went_on_from_is_left_to_its_events(
    server: shmstore.ServerProcess, store: shmstore.Client, tmp_path: Path, agent_process: subprocess.Popen[bytes]
) -> None:
    """Approved: the transcript gains the tool's call, the watch ends, and the status is
    the events' own (AfterTool's working comes from the agent)."""
    transcript = tmp_path / "session.jsonl"
    transcript.write_bytes(b"")
    hook(server.address, gemini_question(transcript), "--agent", "gemini_cli", "--pid", str(agent_process.pid))
    assert status_becomes(store, "g1", "question")
    with transcript.open("ab") as file:
        file.write(TOOL_RESULT)
    assert wait_gone(agent_process.pid)
    with transcript.open("ab") as file:
        file.write(CANCELLED)  # no watcher reads it any more
    time.sleep(0.6)
    session = store.get("g1")
    assert session is not None
    assert session.status == "question"


def test_an_event_after_the_dismissal_is_not_overridden_by_it(
    server: shmstore.ServerProcess, store: shmstore.Client, tmp_path: Path, agent_process: subprocess.Popen[bytes]
) -> None:
    """The dismissal is reported with the transcript's time: a prompt the user sent after
    it (working, reported with its own later time) stays what the session shows."""
    transcript = tmp_path / "session.jsonl"
    transcript.write_bytes(b"")
    pid = ("--pid", str(agent_process.pid))
    hook(server.address, gemini_question(transcript), "--agent", "gemini_cli", *pid)
    assert status_becomes(store, "g1", "question")
    dismissed = time.time() - 2
    after = {**gemini_question(transcript), "hook_event_name": "BeforeAgent", "prompt": "go on"}
    hook(server.address, after, "--agent", "gemini_cli", *pid)
    assert status_becomes(store, "g1", "working")
    with transcript.open("ab") as file:
        file.write(CANCELLED)
    os.utime(transcript, (dismissed, dismissed))
    assert wait_gone(agent_process.pid)
    session = store.get("g1")
    assert session is not None
    assert session.status == "working"


def test_copilot_esc_at_a_permission_prompt_shows_attention(
    server: shmstore.ServerProcess, store: shmstore.Client, tmp_path: Path, agent_process: subprocess.Popen[bytes]
) -> None:
    """Copilot CLI's events.jsonl after Esc at a permission prompt (1.0.102): the turn's end,
    the abort, and the permission cancelled; no hook fires."""
    home = tmp_path / "copilot"
    events = home / "session-state" / "c1" / "events.jsonl"
    events.parent.mkdir(parents=True)
    events.write_bytes(b'{"type":"permission.requested","data":{}}\n')
    payload = {"sessionId": "c1", "timestamp": 1796461326053, "cwd": "/src/app", "hook_event_name": "Notification"}
    payload |= {"message": "Run command: touch made.txt", "notification_type": "permission_prompt"}
    env = {**os.environ, "COPILOT_HOME": str(home), "SHMSTORE_EVENT": "notification"}
    argv = [sys.executable, "-m", "shmstore", "hook", "--agent", "copilot_cli", "--address", str(server.address)]
    argv += ["--pid", str(agent_process.pid)]
    subprocess.run(argv, input=json.dumps(payload).encode(), env=env, timeout=30, check=True)
    assert status_becomes(store, "c1", "question")
    with events.open("ab") as file:
        file.write(b'{"type":"hook.start","data":{}}\n{"type":"assistant.turn_end","data":{"turnId":"0"}}\n')
        file.write(b'{"type":"abort","data":{"reason":"user_initiated"}}\n')
        file.write(
            b'{"type":"permission.completed","data":{"result":{"kind":"cancelled","reason":"Session aborted"}}}\n'
        )
    assert status_becomes(store, "c1", "attention")


def test_the_watch_ends_with_the_agent(
    server: shmstore.ServerProcess, store: shmstore.Client, tmp_path: Path, agent_process: subprocess.Popen[bytes]
) -> None:
    transcript = tmp_path / "session.jsonl"
    transcript.write_bytes(b"")
    hook(server.address, gemini_question(transcript), "--agent", "gemini_cli", "--pid", str(agent_process.pid))
    assert status_becomes(store, "g1", "question")
    assert watchers(agent_process.pid)
    agent_process.kill()
    agent_process.wait()
    assert wait_gone(agent_process.pid)
