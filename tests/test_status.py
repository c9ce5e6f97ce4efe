"""``shmstore status`` and the manager's ``info()``; the CLI's exit codes and ``--version``;
what the manager logs; and why a closed session closed (``closed_reason``), as the store
records it and the CLI shows it."""

from __future__ import annotations

import importlib.metadata
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import orjson
import pytest
from helpers import PYTHON, RawStore, run, serving

import shmstore
from shmstore import Session, Status
from shmstore.record import session_from_store


def test_status_of_a_running_manager_says_up_with_what_it_holds_and_exits_0(sock_dir: Path) -> None:
    sock = sock_dir / "s.sock"
    state_file = sock_dir / "state.json"
    with serving(sock, "--state", str(state_file), "--save-interval", "0.1") as proc, shmstore.connect(sock) as store:
        store.report("a", Status.WORKING, "/src/a")
        store.report("b", Status.QUESTION, "/src/b")
        store.report("c", Status.WORKING, "/src/c")
        store.report("c", Status.CLOSED, "/src/c")
        epoch = store.snapshot().epoch
        deadline = time.monotonic() + 10
        while store.info()["state"]["saved"] is None:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        result = run("status", address=sock)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert f"up at {sock}" in out
    assert re.search(rf"^pid: +{proc.pid}$", out, re.M)
    assert re.search(rf"^epoch: +{epoch}$", out, re.M)
    assert re.search(r"^revision: +4$", out, re.M)
    assert "2 live, 1 recently closed" in out
    # ours above (its calls, and the link its shared-memory reads check), and status's own
    assert re.search(r"^clients: +3 connected", out, re.M)
    assert re.search(r"^memory: +\d+\.\d MiB USS$", out, re.M)
    assert re.search(rf"^state file: +{state_file}, saved \d+s ago \(3 sessions, [\d.]+ ms\)$", out, re.M)


def test_status_without_a_manager_says_not_running_and_exits_3(sock_dir: Path) -> None:
    result = run("status", "--timeout", "2", address=sock_dir / "none.sock")
    assert result.returncode == 3
    assert result.stdout.startswith(f"manager: not running at {sock_dir}/none.sock")


def test_info_counts_the_clients_connected_now(start_server: object, sock_dir: Path) -> None:
    server = start_server()  # type: ignore[operator]
    clients = [shmstore.connect(server.address, server.authkey) for _ in range(3)]
    try:
        for client in clients:
            client.revision()
        with shmstore.connect(server.address, server.authkey) as store:
            # Each client's short first connection (it asks the manager for the store's id) is
            # let go by its manager thread a moment after the reply: count once that is done.
            deadline = time.monotonic() + 5
            while (info := store.info())["clients"] != 4 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert info["clients"] == 4
            assert info["pid"] == server.pid
            assert info["state"] is None
            assert info["uss"] > 1_000_000
            assert (info["live"], info["closed"]) == (0, 0)
            assert time.time() - 60 < info["started"] <= time.time()
    finally:
        for client in clients:
            client.close()


def test_version_is_the_installed_one() -> None:
    result = run("--version")
    assert (result.returncode, result.stdout.strip()) == (0, f"shmstore {importlib.metadata.version('shmstore')}")


def test_help_documents_the_exit_codes() -> None:
    for args in (["--help"], ["status", "--help"]):
        text = " ".join(run(*args).stdout.split())
        assert "Exit codes: 0 ok; 1 any other error; 2 bad input" in text
        assert "3 the manager is not running or cannot be reached; 4 no such session" in text


def test_a_bad_value_for_serve_exits_2_and_names_it(sock_dir: Path) -> None:
    result = run("serve", "--log-level", "loud", address=sock_dir / "s.sock")
    assert result.returncode == 2
    assert "log_level: must be one of debug, info, warning, error, critical" in result.stderr


# -- logs ------------------------------------------------------------------------------------


def test_the_manager_logs_its_start_a_failed_handshake_and_its_stop(sock_dir: Path) -> None:
    sock = sock_dir / "s.sock"
    with serving(sock) as proc:
        stranger = socket.socket(socket.AF_UNIX)
        stranger.connect(str(sock))
        stranger.sendall(b"\x00\x00\x00\x05hello")
        stranger.close()
        with pytest.raises(shmstore.AuthKeyError):
            shmstore.connect(sock, b"not the key")
        proc.send_signal(signal.SIGTERM)
        _, log = proc.communicate(timeout=30)
    assert proc.returncode == 0
    assert log.count("WARNING: closed a connection that did not complete the handshake") == 2
    assert log.rstrip().endswith(f"INFO: stopped serving at {sock}")


def test_log_level_warning_leaves_out_the_info_lines(sock_dir: Path) -> None:
    sock = sock_dir / "s.sock"
    proc = subprocess.Popen(
        [PYTHON, "-m", "shmstore", "serve", "--address", str(sock), "--log-level", "warning"],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not Path(f"{sock}.key").exists():  # written once it serves
            assert time.monotonic() < deadline
            assert proc.poll() is None
            time.sleep(0.05)
        with shmstore.connect(sock, timeout=10) as store:
            assert store.revision() == 0
    finally:
        proc.send_signal(signal.SIGTERM)
        _, log = proc.communicate(timeout=30)
    assert log == ""


# -- closed_reason -------------------------------------------------------------------------


def test_the_store_records_why_a_session_closed_and_forgets_it_when_resumed(store: shmstore.Client) -> None:
    store.report("ended", Status.WORKING, "/x")
    assert store.report("ended", Status.CLOSED, "/x").closed_reason == "session_end"
    store.report("logged-out", Status.ATTENTION, "/x")
    assert store.report("logged-out", Status.CLOSED, "/x", reason="logout").closed_reason == "session_end:logout"
    # The end of a session the store never held (Claude Code's agent view ends so) makes none.
    assert store.report("never-started", Status.CLOSED, "/x", reason="other") is None
    assert store.get("never-started") is None
    store.report("by-hand", Status.WORKING, "/x")
    assert store.transition("by-hand", Status.CLOSED).closed_reason == "transition"
    assert store.report("ended", Status.CLOSED, "/x", reason="other").closed_reason == "session_end"  # no change
    resumed = store.report("ended", Status.WORKING, "/x")
    assert resumed.closed_reason is None
    assert not resumed.closed


def test_a_bad_reason_is_refused_and_changes_nothing(store: shmstore.Client) -> None:
    store.report("a", Status.WORKING, "/x")
    before = store.revision()
    with pytest.raises(shmstore.ValidationError, match="reason"):
        store.report("a", Status.CLOSED, "/x", reason="\x1b[2J" * 30)
    assert store.revision() == before
    assert store.get("a").status is Status.WORKING


def test_closed_reason_is_only_for_a_closed_session() -> None:
    with pytest.raises(shmstore.ValidationError, match="closed_reason: is only for a closed session"):
        Session(id="a", working_dir="/x", closed_reason="transition")


def test_session_json_from_before_closed_reason_still_decodes() -> None:
    record = orjson.loads(Session(id="a", working_dir="/x", status=Status.CLOSED).to_json())
    del record["closed_reason"]
    old = orjson.dumps(record)
    assert Session.from_json(old).closed_reason is None
    assert session_from_store(old) == Session.from_json(old)
    with_reason = Session(id="a", working_dir="/x", status=Status.CLOSED, closed_reason="agent_gone")
    assert session_from_store(with_reason.to_json()) == with_reason


def test_the_cli_shows_why_a_session_closed(server: shmstore.ServerProcess) -> None:
    with shmstore.connect(server.address, server.authkey) as store:
        store.report("gone", Status.WORKING, "/x")
        store.transition("gone", Status.CLOSED)
    table = run("closed", address=server.address)
    shown = run("get", "gone", address=server.address)
    assert "closed (transition)" in table.stdout
    assert "closed (transition)" in shown.stdout


def test_a_raw_report_with_a_reason_of_the_wrong_type_is_a_validation_error(
    server: shmstore.ServerProcess,
) -> None:
    with shmstore.connect(server.address, server.authkey) as store:
        store.report("a", Status.WORKING, "/x")
    with RawStore(server.address, server.authkey) as raw, pytest.raises(shmstore.ValidationError, match="reason"):
        raw.call("report", "a", "closed", "/x", None, None, "claude_code", 42)
