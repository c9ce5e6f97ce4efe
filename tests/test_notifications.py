"""``shmstore notify``: the real command against a real manager, telling a stand-in
``notify-send`` (a script first on PATH that records each call), a ``--command`` that
records its environment, a terminal (stdout) and a real HTTP server; a real tmux server on
a socket of the test's own for the pane the user looks at.

The :class:`~shmstore.notifications.Coalescer` is also checked alone, on events made by
hand: which changes are news, and how they are batched.
"""

from __future__ import annotations

import http.server
import os
import pty
import select
import shutil
import statistics
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import PYTHON

import shmstore
from shmstore import Event, EventKind, Status
from shmstore.model import Terminal
from shmstore.notifications import Coalescer

# Each call: its time (epoch seconds) and its arguments, each ended by \036; the call by \035.
STAND_IN = """#!/bin/sh
printf '%s\\036' "$(date +%s.%N)" "$@" >> "$NOTIFY_LOG"; printf '\\035' >> "$NOTIFY_LOG"
"""


class Notify:
    """``shmstore notify`` running in a process of its own, with the stand-in
    ``notify-send`` first on its PATH; stopped on the way out."""

    def __init__(self, root: Path, address: object, *flags: str, desktop: bool = True) -> None:
        self.bin = root / "bin"
        self.bin.mkdir(exist_ok=True)
        if desktop:
            script = self.bin / "notify-send"
            script.write_text(STAND_IN)
            script.chmod(0o755)
        self.log = root / "notify-send.log"
        env = {**os.environ, "PATH": f"{self.bin}:{os.environ['PATH']}", "NOTIFY_LOG": str(self.log)}
        self.proc = subprocess.Popen(
            [PYTHON, "-m", "shmstore", "notify", "--address", str(address), *flags],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.err = _Output(self.proc.stderr)
        self.out = _Output(self.proc.stdout)
        self.err.wait_for("shmstore: notify: following")  # the first snapshot is taken

    def calls(self) -> list[list[str]]:
        """Each call of the stand-in: its time, then its arguments."""
        try:
            text = self.log.read_text()
        except FileNotFoundError:
            return []
        return [record.split("\x1e")[:-1] for record in text.split("\x1d")[:-1]]

    def wait_for_calls(self, count: int, timeout: float = 20) -> list[list[str]]:
        deadline = time.monotonic() + timeout
        while len(calls := self.calls()) < count:
            assert time.monotonic() < deadline, f"{len(calls)} calls of {count} in {timeout} s: {calls}"
            assert self.proc.poll() is None, self.err.read()
            time.sleep(0.005)
        return calls

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
        self.proc.communicate(timeout=10)


class _Output:
    """A child's pipe, read with a deadline for what is waited for."""

    def __init__(self, pipe: Any) -> None:
        self.fd = pipe.fileno()
        self.text = ""

    def read(self, wait: float = 0.0) -> str:
        while select.select([self.fd], [], [], wait)[0]:
            chunk = os.read(self.fd, 65536)
            if not chunk:
                break
            self.text += chunk.decode(errors="replace")
            wait = 0.0
        return self.text

    def wait_for(self, needle: str, timeout: float = 20) -> str:
        deadline = time.monotonic() + timeout
        while needle not in self.text:
            left = deadline - time.monotonic()
            assert left > 0, f"{needle!r} not printed in {timeout} s; got {self.text!r}"
            self.read(min(left, 0.5))
        return self.text


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[Any]:
    """Start ``shmstore notify`` processes: ``notify(address, *flags)``; stopped at the end."""
    started: list[Notify] = []

    def start(address: object, *flags: str, desktop: bool = True) -> Notify:
        runner = Notify(tmp_path, address, *flags, desktop=desktop)
        started.append(runner)
        return runner

    yield start
    for runner in started:
        runner.stop()


def _body(call: list[str]) -> str:
    return call[-1]


# -- the command, end to end -------------------------------------------------------------------


def test_two_sessions_entering_within_the_window_are_told_in_one_notification(
    server: Any, store: shmstore.Client, notify: Any
) -> None:
    store.report("a", Status.WORKING, "/w/a")
    store.report("b", Status.WORKING, "/w/b")
    runner = notify(server.address, "--coalesce", "1.0")
    store.report("a", Status.QUESTION, "/w/a")
    store.report("b", Status.ATTENTION, "/w/b")
    [call] = runner.wait_for_calls(1)
    assert call[1:4] == ["--app-name=shmstore", "--", "shmstore: 2 sessions wait for you"]
    assert _body(call).splitlines() == [
        "a (claude_code) asks a question in /w/a",
        "b (claude_code) needs attention in /w/b",
    ]
    store.report("a", Status.QUESTION, "/w/a")  # activity while waiting: no news
    time.sleep(1.5)
    assert len(runner.calls()) == 1


def test_a_session_that_enters_and_leaves_within_the_window_is_not_told(
    server: Any, store: shmstore.Client, notify: Any
) -> None:
    store.report("brief", Status.WORKING, "/w")
    runner = notify(server.address, "--coalesce", "1.0")
    store.report("brief", Status.QUESTION, "/w")
    store.report("brief", Status.WORKING, "/w")
    time.sleep(1.5)  # past the window: the next change opens a window of its own
    store.report("marker", Status.ATTENTION, "/w")
    [call] = runner.wait_for_calls(1)
    assert _body(call) == "marker (claude_code) needs attention in /w"
    time.sleep(1.5)
    assert len(runner.calls()) == 1


def test_sessions_waiting_at_the_start_are_not_told_only_changes(
    server: Any, store: shmstore.Client, notify: Any
) -> None:
    store.report("asked", Status.QUESTION, "/w")
    store.report("stuck", Status.ATTENTION, "/w")
    store.report("busy", Status.WORKING, "/w")
    runner = notify(server.address, "--coalesce", "0")
    assert "(3 sessions)" in runner.err.text
    store.report("asked", Status.QUESTION, "/w")  # still asking
    store.report("busy", Status.QUESTION, "/w")
    [call] = runner.wait_for_calls(1)
    assert _body(call) == "busy (claude_code) asks a question in /w"
    assert call[3] == "shmstore: claude_code asks a question"


def test_on_chooses_the_statuses_and_a_new_session_entering_one_is_told(
    server: Any, store: shmstore.Client, notify: Any
) -> None:
    runner = notify(server.address, "--coalesce", "0", "--on", "attention")
    store.report("q", Status.QUESTION, "/w")  # not chosen
    store.report("q", Status.ATTENTION, "/w")  # question -> attention: entered
    store.report("new", Status.ATTENTION, "/w")  # a session created in attention
    calls = runner.wait_for_calls(2)
    assert [_body(c).split()[0] for c in calls] == ["q", "new"]


def test_the_command_runs_for_each_session_with_its_fields(
    server: Any, store: shmstore.Client, notify: Any, tmp_path: Path
) -> None:
    out = tmp_path / "env"
    out.mkdir()
    command = f'env | grep ^SHMSTORE_ | sort > "{out}/$SHMSTORE_ID.env"'
    terminal = Terminal(tmux_pane="%7", tmux_socket=str(tmp_path / "no-tmux"), tty="/dev/pts/9")
    store.report("c1", Status.WORKING, "/w/one", session_id="resume-1", pid=os.getpid(), terminal=terminal)
    store.report("c2", Status.WORKING, "/w/two", agent_type="codex")
    runner = notify(server.address, "--no-desktop", "--command", command, "--coalesce", "0.5")
    time.sleep(0.3)
    store.report("c1", Status.QUESTION, "/w/one", session_id="resume-1", pid=os.getpid(), terminal=terminal)
    store.report("c2", Status.ATTENTION, "/w/two", agent_type="codex")
    deadline = time.monotonic() + 20
    while len(list(out.iterdir())) < 2:
        assert time.monotonic() < deadline, runner.err.read()
        time.sleep(0.01)
    time.sleep(0.2)  # the second file's writer finishes
    one = dict(line.split("=", 1) for line in (out / "c1.env").read_text().splitlines())
    assert {k: v for k, v in one.items() if k != "SHMSTORE_SECONDS" and k != "SHMSTORE_SINCE"} == {
        "SHMSTORE_ID": "c1",
        "SHMSTORE_AGENT": "claude_code",
        "SHMSTORE_OLD_STATUS": "working",
        "SHMSTORE_STATUS": "question",
        "SHMSTORE_DIR": "/w/one",
        "SHMSTORE_SESSION_ID": "resume-1",
        "SHMSTORE_PID": str(os.getpid()),
        "SHMSTORE_TMUX_PANE": "%7",
        "SHMSTORE_TMUX_SOCKET": str(tmp_path / "no-tmux"),  # no tmux server there: told, not skipped
        "SHMSTORE_TTY": "/dev/pts/9",
        "SHMSTORE_TITLE": "shmstore: claude_code asks a question",
        "SHMSTORE_MESSAGE": "c1 (claude_code) asks a question in /w/one",
    }
    assert 0.2 <= float(one["SHMSTORE_SECONDS"]) < 20  # working since before the sleep
    two = dict(line.split("=", 1) for line in (out / "c2.env").read_text().splitlines())
    assert (two["SHMSTORE_AGENT"], two["SHMSTORE_STATUS"], two["SHMSTORE_TMUX_PANE"]) == ("codex", "attention", "")


def test_it_carries_on_through_a_manager_restart_and_tells_only_later_changes(sock_dir: Path, notify: Any) -> None:
    path = sock_dir / "n.sock"
    first = shmstore.start_server(path)
    try:
        runner = notify(path, "--coalesce", "0")
        with shmstore.connect(path) as store:
            store.report("before", Status.QUESTION, "/w")
            runner.wait_for_calls(1)
            first.stop()
            runner.err.wait_for("reconnecting (try 2 in")
            with shmstore.start_server(path):
                store.report("waiting", Status.QUESTION, "/w")  # in the new manager's snapshot: not news
                store.report("after", Status.WORKING, "/w")
                runner.err.wait_for("resynced from a fresh snapshot")
                store.report("after", Status.ATTENTION, "/w")
                calls = runner.wait_for_calls(2)
                assert _body(calls[1]) == "after (claude_code) needs attention in /w"
                time.sleep(0.5)
                assert len(runner.calls()) == 2
        assert runner.proc.poll() is None
        assert runner.err.text.count("reconnecting (try") == 1
    finally:
        first.stop()


def test_a_failing_channel_is_logged_once_and_the_others_still_deliver(
    server: Any, store: shmstore.Client, notify: Any, tmp_path: Path
) -> None:
    with socketserver_port() as closed_port:
        pass  # nothing listens there now
    runner = notify(
        server.address, "--coalesce", "0", "--url", f"http://127.0.0.1:{closed_port}/topic", "--command", "exit 3"
    )
    for n in range(3):
        store.report(f"f{n}", Status.QUESTION, "/w")
        runner.wait_for_calls(n + 1)
    time.sleep(0.3)  # the channels after the desktop one have had their go
    err = runner.err.read()
    assert err.count("the url channel failed") == 1
    assert err.count("the command channel failed") == 1
    assert "exit 3" in err
    assert runner.proc.poll() is None


def test_the_url_channel_posts_the_text_with_a_title_header(server: Any, store: shmstore.Client, notify: Any) -> None:
    received: list[tuple[str, str | None, bytes]] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            size = int(self.headers["Content-Length"])
            received.append((self.path, self.headers["Title"], self.rfile.read(size)))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler) as web:
        threading.Thread(target=web.serve_forever, daemon=True).start()
        try:
            runner = notify(server.address, "--coalesce", "0", "--url", f"http://127.0.0.1:{web.server_port}/agents")
            store.report("u", Status.QUESTION, "/w")
            runner.wait_for_calls(1)
            deadline = time.monotonic() + 10
            while not received:
                assert time.monotonic() < deadline
                time.sleep(0.01)
        finally:
            web.shutdown()
    assert received == [("/agents", "shmstore: claude_code asks a question", b"u (claude_code) asks a question in /w")]


def test_the_bell_rings_with_an_osc_escape_on_stdout(server: Any, store: shmstore.Client, notify: Any) -> None:
    runner = notify(server.address, "--coalesce", "0", "--bell", "--osc", "777", desktop=False)
    store.report("bell", Status.ATTENTION, "/w;x")
    text = runner.out.wait_for("in /w,x\x07")  # a ';' would end a field of the escape
    assert (
        text
        == "\x07\x1b]777;notify;shmstore: claude_code needs attention;bell (claude_code) needs attention in /w,x\x07"
    )


def test_without_any_channel_it_says_so(server: Any, tmp_path: Path) -> None:
    env = {**os.environ, "PATH": str(tmp_path)}  # no notify-send
    result = subprocess.run(
        [PYTHON, "-m", "shmstore", "notify", "--address", str(server.address)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert result.returncode == 2
    assert "none to notify through: no notify-send (or osascript) is on PATH" in result.stderr


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
def test_a_session_in_the_tmux_pane_the_user_looks_at_is_not_told(
    server: Any, store: shmstore.Client, notify: Any, sock_dir: Path
) -> None:
    socket = str(sock_dir / "tmux")
    tmux = ["tmux", "-f", "/dev/null", "-S", socket]
    subprocess.run([*tmux, "new-session", "-d", "-s", "t", "-x", "80", "-y", "24"], check=True, timeout=20)
    try:
        subprocess.run([*tmux, "new-window", "-d", "-t", "t:"], check=True, timeout=20)  # not the active window
        panes = subprocess.run(
            [*tmux, "list-panes", "-s", "-t", "t", "-F", "#{pane_id}"], capture_output=True, text=True, timeout=20
        ).stdout.split()
        shown, hidden = panes
        # A client attached to the session, on a terminal of its own (a pty).
        master, slave = pty.openpty()
        client = subprocess.Popen(
            [*tmux, "attach", "-t", "t"],
            stdin=slave,
            stdout=slave,
            stderr=slave,
            start_new_session=True,
            env={**os.environ, "TERM": "xterm"},
        )
        os.close(slave)
        try:
            deadline = time.monotonic() + 20
            while (
                "1"
                not in subprocess.run(
                    [*tmux, "display", "-p", "-t", "t", "#{session_attached}"],
                    capture_output=True,
                    text=True,
                    timeout=20,
                ).stdout
            ):
                assert time.monotonic() < deadline, "the tmux client did not attach"
                time.sleep(0.05)
                _drain(master)
            runner = notify(server.address, "--coalesce", "0")
            store.report("looked-at", Status.QUESTION, "/w", terminal=Terminal(tmux_pane=shown, tmux_socket=socket))
            store.report("elsewhere", Status.QUESTION, "/w", terminal=Terminal(tmux_pane=hidden, tmux_socket=socket))
            [call] = runner.wait_for_calls(1)
            assert _body(call).startswith("elsewhere ")
            time.sleep(0.5)
            assert len(runner.calls()) == 1
            # Once nobody is attached, the same pane is told.
            subprocess.run([*tmux, "detach-client", "-s", "t"], check=True, timeout=20)
            client.wait(20)
            store.report("looked-at", Status.WORKING, "/w", terminal=Terminal(tmux_pane=shown, tmux_socket=socket))
            store.report("looked-at", Status.QUESTION, "/w", terminal=Terminal(tmux_pane=shown, tmux_socket=socket))
            calls = runner.wait_for_calls(2)
            assert _body(calls[1]).startswith("looked-at ")
        finally:
            if client.poll() is None:
                client.kill()
            client.wait(10)
            os.close(master)
    finally:
        subprocess.run([*tmux, "kill-server"], timeout=20, capture_output=True)


def _drain(fd: int) -> None:
    while select.select([fd], [], [], 0)[0]:
        try:
            if not os.read(fd, 65536):
                return
        except OSError:
            return


def _latencies(runner: Notify, store: shmstore.Client, count: int, gap: float) -> list[float]:
    """Seconds from each status change (the moment before store.report) to the stand-in's
    start, over ``count`` changes ``gap`` seconds apart."""
    found = []
    for n in range(count):
        store.report(f"l{n}", Status.WORKING, "/w")
        before = time.time()
        store.report(f"l{n}", Status.QUESTION, "/w")
        call = runner.wait_for_calls(n + 1)[n]
        found.append(float(call[0]) - before)
        time.sleep(gap)
    return found


def test_latency_from_a_status_change_to_the_notification(server: Any, store: shmstore.Client, notify: Any) -> None:
    runner = notify(server.address, "--coalesce", "0")
    found = _latencies(runner, store, 20, 0.02)
    print(f"\n--coalesce 0: median {statistics.median(found) * 1000:.1f} ms, max {max(found) * 1000:.1f} ms")
    assert statistics.median(found) < 0.5


@pytest.mark.skipif(os.environ.get("SHMSTORE_SLOW") != "1", reason="40 s; SHMSTORE_SLOW=1 runs it")
def test_latency_with_the_default_window(server: Any, store: shmstore.Client, notify: Any) -> None:
    runner = notify(server.address)
    found = _latencies(runner, store, 20, 0.0)
    print(f"\n--coalesce 2.0: median {statistics.median(found) * 1000:.1f} ms, max {max(found) * 1000:.1f} ms")
    assert min(found) >= 2.0
    assert statistics.median(found) < 2.5


# -- the coalescer alone -------------------------------------------------------------------------


def _session(id: str, status: Status) -> shmstore.Session:
    return shmstore.Session(id=id, working_dir="/w", status=status)


def _change(id: str, status: Status | None, revision: int = 1) -> Event:
    session = None if status is None else _session(id, status)
    return Event(revision, EventKind.REPORT if session else EventKind.REMOVE, id, session)


def test_the_coalescer_batches_a_window_and_drops_what_left_it() -> None:
    c = Coalescer(window=2.0)
    c.feed(Event(0, EventKind.SNAPSHOT, None, sessions=(_session("w", Status.QUESTION),)), now=0.0)
    assert c.due() is None  # already waiting: not news
    c.feed(_change("a", Status.QUESTION), now=10.0)
    c.feed(_change("b", Status.ATTENTION), now=11.0)
    c.feed(_change("c", Status.QUESTION), now=11.5)
    c.feed(_change("c", Status.WORKING), now=11.6)  # entered and left
    c.feed(_change("a", Status.ATTENTION), now=11.7)  # still one alert, as it is now
    assert c.due() == 12.0
    assert c.take(now=11.9) == []
    batch = c.take(now=12.0)
    assert [(a.session.id, a.status, a.old) for a in batch] == [
        ("a", Status.ATTENTION, None),
        ("b", Status.ATTENTION, None),
    ]
    assert c.due() is None


def test_the_coalescer_forgets_a_removed_session_and_keeps_news_through_a_resync() -> None:
    c = Coalescer(window=1.0)
    c.feed(_change("gone", Status.QUESTION), now=0.0)
    c.feed(_change("gone", None), now=0.1)
    c.feed(_change("kept", Status.QUESTION), now=0.2)
    c.feed(_change("moved", Status.ATTENTION), now=0.3)
    snapshot = (_session("kept", Status.QUESTION), _session("moved", Status.WORKING))
    c.feed(Event(9, EventKind.SNAPSHOT, None, sessions=snapshot), now=0.4)
    assert [a.session.id for a in c.take(now=5.0)] == ["kept"]


def socketserver_port() -> Any:
    """A port that was free a moment ago (and nothing listens on once the block ends)."""
    import contextlib
    import socket

    @contextlib.contextmanager
    def port() -> Iterator[int]:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            yield probe.getsockname()[1]

    return port()


def test_a_command_that_hangs_is_killed_with_its_children_after_the_timeout_and_at_a_stop(
    server: Any, store: shmstore.Client, notify: Any, tmp_path: Path
) -> None:
    pids = tmp_path / "pids"
    runner = notify(server.address, "--coalesce", "0", "--command", f"sleep 60 & echo $! >> {pids}; wait")
    store.report("h1", Status.QUESTION, "/w")
    runner.wait_for_calls(1)
    store.report("h2", Status.QUESTION, "/w")  # its turn comes once the command gave up
    started = time.monotonic()
    runner.wait_for_calls(2, timeout=30)
    assert time.monotonic() - started < 10
    runner.err.wait_for("the command channel failed: h1: did not finish within 5 s")
    sleeper = int(pids.read_text().split()[0])
    deadline = time.monotonic() + 10
    while _alive(sleeper):
        assert time.monotonic() < deadline, "the command's child outlived it"
        time.sleep(0.05)
    assert runner.proc.poll() is None
    # Stopped (as a service is, with SIGTERM) while h2's command hangs: it ends at once, with 0,
    # and takes that command's children with it.
    while len(pids.read_text().split()) < 2:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    runner.proc.terminate()
    assert runner.proc.wait(10) == 0
    second = int(pids.read_text().split()[1])
    while _alive(second):
        assert time.monotonic() < deadline, "the command's child outlived the notifier"
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ")[1][0] != "Z"
    except FileNotFoundError:
        return False


def test_the_bell_goes_to_a_given_tty(server: Any, store: shmstore.Client, notify: Any) -> None:
    master, slave = pty.openpty()
    try:
        runner = notify(server.address, "--coalesce", "0", "--bell", os.ttyname(slave), desktop=False)
        store.report("t", Status.QUESTION, "/w")
        seen = b""
        deadline = time.monotonic() + 20
        while not seen.endswith(b"\x07") or len(seen) < 2:
            assert time.monotonic() < deadline, seen
            if select.select([master], [], [], 0.5)[0]:
                seen += os.read(master, 4096)
        assert seen == b"\x07\x1b]9;shmstore: claude_code asks a question: t (claude_code) asks a question in /w\x07"
        assert runner.out.read() == ""  # nothing on stdout
    finally:
        os.close(master)
        os.close(slave)


def test_the_desktop_channel_on_macos_runs_osascript(tmp_path: Path) -> None:
    from shmstore.notifications import Alert, Desktop

    script = tmp_path / "osascript"
    script.write_text(STAND_IN)
    script.chmod(0o755)
    log = tmp_path / "calls"
    os.environ["NOTIFY_LOG"] = str(log)
    try:
        alert = Alert(shmstore.Session(id='say "hi" \\', working_dir="/w", status=Status.QUESTION), None, 0.0)
        Desktop(str(script)).send([alert])
    finally:
        del os.environ["NOTIFY_LOG"]
    argv = log.read_text().split("\x1d")[0].split("\x1e")[1:-1]
    assert argv == [
        "-e",
        'display notification "say \\"hi\\" \\\\ (claude_code) asks a question in /w" '
        'with title "shmstore: claude_code asks a question"',
    ]
