"""Agents' events over HTTP (``serve --http``): a real manager process, real HTTP clients
(the standard library's, and ``curl``-like raw sockets for what a client library would not
send), another local user, and systemd's socket handover played by a parent process."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
from helpers import CWD, PYTHON, SID, StartServer, payload, run, serving

import shmstore
from shmstore.agents import claude
from shmstore.agents.settings import HTTP_PATH
from shmstore.manager.http_events import MAX_BODY, REQUEST_TIMEOUT
from shmstore.transport.peer import peer_uid

PATH = f"{HTTP_PATH}claude_code"


def http_port(server: shmstore.ServerProcess) -> int:
    with shmstore.Client(server.address, server.authkey) as store:
        return int(store.info()["http"]["port"])


def post(port: int, body: bytes, path: str = PATH, method: str = "POST") -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
        answer = conn.getresponse()
        return answer.status, answer.read()
    finally:
        conn.close()


def event(name: str, **fields: object) -> bytes:
    return json.dumps(payload(name, **fields)).encode()


def test_an_event_is_applied_before_its_empty_200_answer(start_server: StartServer) -> None:
    server = start_server(http="auto")
    port = http_port(server)
    with shmstore.Client(server.address, server.authkey) as store:
        assert post(port, event("UserPromptSubmit", prompt="fix it")) == (200, b"")
        session = store.get(SID)  # at once: the answer came after the write
        assert session is not None
        assert (session.status, session.working_dir, session.session_id) == ("working", CWD, SID)
        assert post(port, event("PermissionRequest", tool_name="Bash")) == (200, b"")
        assert store.get(SID).status == "question"  # type: ignore[union-attr]
        assert post(port, event("InstructionsLoaded")) == (200, b"")  # says nothing of a status
        assert store.info()["http"]["events"] == 3  # taken, whether they moved a status or not
    status = run("status", address=server.address)
    assert f"http events: http://127.0.0.1:{port}/shmstore/hook/AGENT, 3 taken\n" in status.stdout, status.stderr


def test_events_on_one_kept_connection_are_applied_in_order(start_server: StartServer) -> None:
    server = start_server(http="auto")
    conn = http.client.HTTPConnection("127.0.0.1", http_port(server), timeout=10)
    names = ["UserPromptSubmit", "PreToolUse", "PermissionRequest", "PostToolUse", "Stop"] * 20
    for name in names:
        conn.request("POST", PATH, body=event(name, tool_name="Bash"))
        answer = conn.getresponse()
        assert (answer.status, answer.read()) == (200, b"")
    conn.close()
    with shmstore.Client(server.address, server.authkey) as store:
        session = store.get(SID)
        assert session is not None
        assert session.status == "attention"
        assert [str(h.to) for h in session.history][-4:] == ["working", "question", "working", "attention"]
        assert session.revision == store.revision()


BAD = [
    (b"not json", 400, "not JSON"),
    (b"[1, 2]", 400, "JSON object"),
    (json.dumps({"cwd": "/src", "hook_event_name": "Stop"}).encode(), 400, "session_id"),
    (json.dumps({"session_id": "s", "cwd": "relative", "hook_event_name": "Stop"}).encode(), 400, "cwd"),
    (json.dumps({"session_id": "s" * 5000, "cwd": "/src", "hook_event_name": "Stop"}).encode(), 400, "session_id"),
    (b"[" * 200_000, 400, "not JSON"),  # nested past the interpreter's depth (it killed the thread)
]


@pytest.mark.parametrize(("body", "code", "said"), BAD)
def test_a_bad_event_gets_a_4xx_that_says_why_and_changes_nothing(
    start_server: StartServer, body: bytes, code: int, said: str
) -> None:
    server = start_server(http="auto")
    with shmstore.Client(server.address, server.authkey) as store:
        before = store.revision()
        status, text = post(http_port(server), body)
        assert (status, said in text.decode()) == (code, True), text
        assert (store.revision(), store.list_all()) == (before, [])


def test_an_event_a_full_store_cannot_take_gets_503_and_changes_nothing(start_server: StartServer) -> None:
    server = start_server(http="auto", max_sessions=1)
    port = http_port(server)
    assert post(port, event("Stop", session_id="first"))[0] == 200
    with shmstore.Client(server.address, server.authkey) as store:
        before = store.revision()
        status, text = post(port, event("Stop", session_id="second"))
        assert status == 503, text  # not the event's fault: as for a stop
        assert store.revision() == before


def test_what_is_not_an_event_is_refused_unread(start_server: StartServer) -> None:
    server = start_server(http="auto")
    port = http_port(server)
    assert post(port, event("Stop"), path="/shmstore/hook/nobody")[0] == 404
    assert post(port, event("Stop"), method="PUT")[0] == 405
    for head, code in [
        (f"POST {PATH} HTTP/1.1\r\nHost: x\r\nContent-Length: {MAX_BODY + 1}\r\n\r\n", 413),
        (f"POST {PATH} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n", 411),
        (f"POST {PATH} HTTP/1.1\r\nHost: x\r\n\r\n", 411),
        (f"POST {PATH} HTTP/1.1\r\nX: {'y' * 20000}\r\n\r\n", 431),
        (f"POST {PATH} HTTP/1.1\r\nContent-Length: \u00b2\r\n\r\n", 400),  # a digit to str.isdigit()
        (f"POST {PATH} HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 50\r\n\r\n{{}}   ", 400),
        ("HELLO\r\n\r\n", 400),
    ]:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            raw.sendall(head.encode("latin-1") if head.isascii() else head.encode("utf-8"))
            answer = raw.recv(4096).decode()
            assert answer.startswith(f"HTTP/1.1 {code} "), (head[:60], answer)
    with shmstore.Client(server.address, server.authkey) as store:
        assert store.list_all() == []


@pytest.mark.skipif(os.getuid() != 0, reason="switching to another user (nobody) needs root")
def test_another_local_users_process_is_refused(start_server: StartServer) -> None:
    server = start_server(http="auto")
    send = (
        "import json, urllib.request, urllib.error\n"
        f"request = urllib.request.Request('http://127.0.0.1:{http_port(server)}{PATH}', data={event('Stop')!r})\n"
        "try:\n    urllib.request.urlopen(request, timeout=10)\nexcept urllib.error.HTTPError as exc:\n"
        "    print(exc.code)\n"
    )
    # The system's interpreter: nobody may not enter the directories of the test's own.
    result = subprocess.run(["/usr/bin/python3", "-c", send], user="nobody", cwd="/", capture_output=True, text=True)
    assert result.stdout.strip() == "403", result.stderr
    with shmstore.Client(server.address, server.authkey) as store:
        assert store.get(SID) is None
    assert post(http_port(server), event("Stop"))[0] == 200  # this user's own is taken


def test_a_request_that_trickles_in_is_answered_408_and_others_are_served_meanwhile(start_server: StartServer) -> None:
    server = start_server(http="auto")
    port = http_port(server)
    with socket.create_connection(("127.0.0.1", port), timeout=30) as slow:
        slow.sendall(f"POST {PATH} HTTP/1.1\r\nContent-Length: 100\r\n\r\n{{".encode())
        started = time.monotonic()
        assert post(port, event("Stop"))[0] == 200  # served while the slow one waits
        for _ in range(3):
            time.sleep(1.5)
            with contextlib.suppress(OSError):
                slow.sendall(b" ")  # a byte now and then: each recv() alone would never time out
        answer = slow.recv(4096)
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    assert time.monotonic() - started < REQUEST_TIMEOUT + 3


@pytest.mark.skipif(os.getuid() != 0, reason="switching to another user (nobody) needs root")
def test_a_peer_that_closed_at_once_is_nobody_we_can_tell(tmp_path: Path) -> None:
    """A socket whose peer closed lingers in TIME_WAIT, which the kernel reports as uid 0's:
    a root manager took events of another user who connected, sent and closed at once."""
    listener = socket.create_server(("127.0.0.1", 0))
    send = f"import socket; s = socket.create_connection(('127.0.0.1', {listener.getsockname()[1]})); s.close()"
    subprocess.run(["/usr/bin/python3", "-c", send], user="nobody", cwd="/", check=True, timeout=30)
    conn, _ = listener.accept()
    with conn, listener:
        time.sleep(0.1)
        assert peer_uid(conn) is None
        with socket.create_connection(listener.getsockname()) as mine:
            ours, _ = listener.accept()
            with ours:
                assert peer_uid(ours) == os.getuid()
                mine.close()
                time.sleep(0.1)
                assert peer_uid(ours) is None  # closed: not ours any more either


def test_events_answered_while_a_manager_stops_are_all_restored(sock_dir: Path) -> None:
    """Clients opening a connection per event, as fast as they can, while the manager gets
    SIGTERM: every event answered 200 is in the restarted store. (A stop that joined a
    connection's thread before it had started failed before its final save: 474 answered
    events gone in one of ten stops.)"""
    state, address = str(sock_dir / "state.json"), sock_dir / "s.sock"
    for round in range(3):
        answered: list[str] = []
        stop = threading.Event()
        with serving(address, "--http", "auto", "--state", state) as manager:
            with shmstore.Client(address) as store:
                port = store.info()["http"]["port"]
            senders = [threading.Thread(target=_send_until, args=(port, n, answered, stop)) for n in range(8)]
            for sender in senders:
                sender.start()
            deadline = time.monotonic() + 30
            while len(answered) < 100 and time.monotonic() < deadline:  # at full speed before the stop
                time.sleep(0.01)
            manager.terminate()
            _, log = manager.communicate(timeout=30)
            stop.set()
            for sender in senders:
                sender.join(30)
        assert (round, manager.returncode) == (round, 0), log
        assert len(answered) >= 100, (round, log[-2000:])
        with serving(address, "--state", state), shmstore.Client(address) as store:
            kept = {session.id for session in store.list_all()}
        assert set(answered) <= kept, (round, len(set(answered) - kept))


def _send_until(port: int, n: int, answered: list[str], stop: threading.Event) -> None:
    """Post events of new sessions, each on a connection of its own, until ``stop`` (or
    300 of them: three rounds of eight senders stay well within the store's 10,000)."""
    for k in range(300):
        if stop.is_set():
            return
        id = f"c{n}-{k}-{os.urandom(3).hex()}"
        with contextlib.suppress(OSError, http.client.HTTPException):
            if post(port, event("UserPromptSubmit", session_id=id))[0] == 200:
                answered.append(id)


def test_a_stopped_manager_lets_go_of_its_port(start_server: StartServer) -> None:
    server = start_server(http="auto")
    port = http_port(server)
    server.stop()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()


def test_a_port_held_by_systemd_is_taken_and_events_sent_while_the_manager_was_down_are_applied(
    sock_dir: Path,
) -> None:
    """As a socket unit does: a parent holds the listening socket and hands it to each
    manager it starts (fd 3, LISTEN_FDS, LISTEN_PID). An agent's event sent while no
    manager runs waits in the socket's backlog and is answered once one starts."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    early = socket.create_connection(("127.0.0.1", port), timeout=30)
    body = event("PermissionRequest", tool_name="Bash")
    early.sendall(f"POST {PATH} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
    address = str(sock_dir / "s.sock")
    start = (
        f"import os, sys; os.dup2({listener.fileno()}, 3); os.environ.update(LISTEN_PID=str(os.getpid()), "
        "LISTEN_FDS='1', LISTEN_FDNAMES='http'); "
        f"os.execv(sys.executable, [sys.executable, '-m', 'shmstore', 'serve', '--address', {address!r}, "
        f"'--http', '{port}'])"
    )
    manager = subprocess.Popen([PYTHON, "-c", start], pass_fds=(listener.fileno(),), stderr=subprocess.PIPE)
    try:
        answer = early.recv(4096)
        assert answer.startswith(b"HTTP/1.1 200 "), answer
        with shmstore.Client(address) as store:
            session = store.get(SID)
            assert session is not None
            assert session.status == "question"
            assert store.info()["http"]["port"] == port
    finally:
        manager.send_signal(signal.SIGTERM)
        manager.communicate(timeout=30)
        early.close()
    # Stopped, the manager left the socket listening (it is the parent's too): an event now
    # waits in its backlog for the next manager, as one does across a service's restart.
    assert manager.returncode == 0
    late = socket.create_connection(("127.0.0.1", port), timeout=30)
    body = event("Stop")
    late.sendall(f"POST {PATH} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
    manager = subprocess.Popen([PYTHON, "-c", start], pass_fds=(listener.fileno(),), stderr=subprocess.PIPE)
    try:
        assert late.recv(4096).startswith(b"HTTP/1.1 200 ")
        with shmstore.Client(address) as store:
            assert store.get(SID).status == "attention"  # type: ignore[union-attr]
    finally:
        manager.send_signal(signal.SIGTERM)
        manager.communicate(timeout=30)
        late.close()
    listener.close()


def test_install_hooks_writes_http_hooks_where_nothing_the_user_acts_on_depends_on_them(
    start_server: StartServer, sock_dir: Path
) -> None:
    server = start_server(http="auto")
    settings = sock_dir / "settings.json"
    result = run("install-hooks", "--settings", str(settings), "--address", str(server.address))
    assert result.returncode == 0, result.stderr
    hooks = json.loads(settings.read_text())["hooks"]
    url = f"http://127.0.0.1:{http_port(server)}{PATH}"
    kinds = {
        event: [(g.get("matcher"), h["type"]) for g in groups for h in g["hooks"]] for event, groups in hooks.items()
    }
    for event, status in claude.EVENT_STATUS.items():
        if event == "PreToolUse":
            assert kinds[event] == [(None, "http"), ("AskUserQuestion", "command")]  # a question: a command too
        elif status == "working" and event != "PostCompact":
            assert kinds[event] == [(None, "http")], event
        else:
            assert kinds[event] == [(None, "command")], event  # question, attention, closed: spooled if need be
    assert hooks["UserPromptSubmit"][0]["hooks"][0]["url"] == url
    assert hooks["SessionStart"][0]["hooks"][0]["type"] == "command"  # Claude refuses http there

    assert run("uninstall-hooks", "--settings", str(settings)).returncode == 0
    assert "hooks" not in json.loads(settings.read_text())


def test_install_hooks_via_http_needs_a_manager_that_takes_http(start_server: StartServer, sock_dir: Path) -> None:
    server = start_server()
    settings = sock_dir / "settings.json"
    result = run("install-hooks", "--settings", str(settings), "--address", str(server.address), "--via", "http")
    assert result.returncode == 3
    assert "does not take events over HTTP" in result.stderr
    assert not settings.exists()
    result = run("install-hooks", "--settings", str(settings), "--address", str(server.address))
    assert result.returncode == 0
    assert "command hooks only" in result.stderr
    assert {
        h["type"] for groups in json.loads(settings.read_text())["hooks"].values() for g in groups for h in g["hooks"]
    } == {"command"}


def test_an_http_event_costs_the_manager_little_cpu(start_server: StartServer) -> None:
    """A loose bound, for a loaded machine running coverage; bench/ measures it."""
    server = start_server(http="auto")
    conn = http.client.HTTPConnection("127.0.0.1", http_port(server), timeout=10)
    cpu = _cpu(server.pid)
    for n in range(200):
        conn.request("POST", PATH, body=event(("UserPromptSubmit", "Stop")[n % 2]))
        conn.getresponse().read()
    conn.close()
    per_event = (_cpu(server.pid) - cpu) / 200
    assert per_event < 0.005, per_event  # 5 ms; a quiet machine measures ~0.1 ms


def _cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
