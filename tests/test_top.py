"""``shmstore top``: what it shows, in-process; and the real thing in a real terminal (tmux),
against a real manager that is killed and started again under it."""

from __future__ import annotations

import io
import os
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
from helpers import PYTHON, StartServer, make_session, run
from rich.console import Console

import shmstore
from shmstore import ApiUsage, Session, Status, Terminal
from shmstore.commands.keyboard import Keyboard, pressed
from shmstore.commands.top import (
    CHROME,
    FOOTER,
    Frame,
    Note,
    cells,
    columns,
    fitting,
    moved,
    ordered,
    room,
    selected,
    view,
    window,
)

AT = 1_000_000.0


def _session(id: str, status: Status, active: float, **fields: object) -> Session:
    """A session in ``status`` since 100 s before ``AT``, last active ``active`` s before it."""
    return make_session(id, status=status, since=AT - 100, last_activity=AT - active, **fields)


def _screen(frame: Frame, width: int = 120, height: int = 30, **options: object) -> str:
    console = Console(file=io.StringIO(), width=width, color_system=None, highlight=False)
    console.print(view(frame, AT, width, height, **options))  # type: ignore[arg-type]
    return console.file.getvalue()  # type: ignore[attr-defined,no-any-return]


# -- what it shows ------------------------------------------------------------------------------


def test_questions_come_first_then_attention_then_working_each_by_last_activity() -> None:
    sessions = [
        _session("w-old", Status.WORKING, 50),
        _session("a", Status.ATTENTION, 90),
        _session("w-new", Status.WORKING, 1),
        _session("q-old", Status.QUESTION, 80),
        _session("q-new", Status.QUESTION, 5),
    ]
    assert [s.id for s in ordered(sessions)] == ["q-new", "q-old", "a", "w-new", "w-old"]


def test_a_row_shows_status_project_short_id_ages_tokens_pid_and_agent() -> None:
    session = _session(
        "3f2a8c1e-5b7d-4e9f-a0c2-6d8b1e4f7a93",
        Status.WORKING,
        75,
        working_dir="/home/dev/projects/webapp/",
        api_usage=ApiUsage(12_345, 678),
        pid=4242,
        stale=True,
    )
    names = columns([session], width=120)
    assert names == ["STATUS", "PROJECT", "ID", "IN STATUS", "LAST ACTIVE", "TOKENS IN/OUT", "PID", "AGENT"]
    assert cells(session, names, AT) == [
        "working (stale)",
        "webapp",
        "3f2a8c1e",
        "1m40s",
        "1m15s ago",
        "12k/678",
        "4242",
        "claude_code",
    ]


def test_tokens_show_only_when_a_session_has_usage_and_pid_only_when_there_is_room() -> None:
    plain = [_session("a", Status.WORKING, 1)]
    assert columns(plain, width=80) == ["STATUS", "PROJECT", "ID", "IN STATUS", "LAST ACTIVE"]
    used = [*plain, _session("b", Status.WORKING, 1, api_usage=ApiUsage(1, 2))]
    assert "TOKENS IN/OUT" in columns(used, width=80)
    assert "PID" not in columns(used, width=99)
    assert "PID" in columns(used, width=100)


def test_the_screen_says_when_it_is_reconnecting_and_when_it_resynced() -> None:
    sessions = (_session("q", Status.QUESTION, 1), _session("w", Status.WORKING, 2))
    live = _screen(Frame("/run/s.sock", sessions, 7, "live"))
    assert "live  rev 7  2 sessions: 1 question, 0 attention, 1 working" in live
    assert live.index(" q ") < live.index(" w ")
    assert "q quit" in live
    lost = _screen(Frame("/run/s.sock", sessions, 7, "reconnecting", message="connection refused (try 3 in 0.4 s)"))
    assert "reconnecting\u2026  (last seen: rev 7, 2 sessions" in lost
    assert "connection refused (try 3 in 0.4 s)" in lost
    assert " q " in lost  # the last table seen stays up meanwhile
    back = _screen(Frame("/run/s.sock", (), 0, "live", resynced_at=AT - 2))
    assert "live (resynced)  rev 0" in back
    assert "no live sessions" in back
    assert "resynced" not in _screen(Frame("/run/s.sock", (), 0, "live", resynced_at=AT - 60))
    assert "connecting\u2026" in _screen(Frame("/run/s.sock"))
    never = _screen(Frame("/run/s.sock", link="reconnecting", message="no manager at /run/s.sock"))
    assert "reconnecting\u2026  (nothing seen yet)" in never


def test_rows_that_do_not_fit_are_counted_not_drawn() -> None:
    sessions = tuple(_session(f"s{n:02}", Status.WORKING, n) for n in range(40))
    screen = _screen(Frame("/s", sessions, 40, "live"), height=20)
    assert len(screen.splitlines()) == 20
    assert "\u2026 and 26 more" in screen
    assert "s00" in screen  # the last active first
    assert "s39" not in screen


def test_text_from_the_store_is_shown_literally() -> None:
    hostile = _session("[bold]x", Status.WORKING, 1, working_dir="/w/[red]proj")
    screen = _screen(Frame("/s[/]", (hostile,), 1, "live"))
    assert "[bold]x" in screen  # not rich markup
    assert "[red]proj" in screen
    assert "/s[/]" in screen


# -- choosing a row, and the jump's keys ----------------------------------------------------------


def test_keys_are_read_from_what_the_terminal_sends_in_either_cursor_mode() -> None:
    assert pressed(b"\x1b[B\x1bOBj\x1b[A\x1bOAk") == ["down", "down", "down", "up", "up", "up"]
    assert pressed(b"\n") == pressed(b"\r") == pressed(b"g") == ["go"]
    assert pressed(b"x\x1b[5~jq") == ["down", "quit"]  # other keys (Page Up here) do nothing
    assert pressed(b"") == []


def test_other_keys_escape_sequences_are_skipped_whole_not_read_as_letters() -> None:
    assert pressed(b"\x1bOQ") == []  # F2, not q
    assert pressed(b"\x1bOq\x1bOj\x1bOk") == []  # keypad 1, 2, 3 in application mode
    assert pressed(b"\x1bq\x1bg") == []  # Alt-q, Alt-g
    assert pressed(b"\x1b[1;5A\x1b[15~j") == ["down"]  # Ctrl-Up, F5, then j
    assert pressed(b"\x1b[<0;12;7Mq") == ["quit"]  # a mouse click, then q
    assert pressed(b"j\x1b") == ["down"]  # a lone Esc does nothing
    assert pressed(b"\x1bO1;2Q\x1bO2Qj") == ["down"]  # Shift-F2 in SS3 form (older VTE, Konsole)


def test_a_key_split_across_reads_is_one_key_and_a_paste_is_not_keys() -> None:
    keyboard = Keyboard()
    assert keyboard.feed(b"j\x1b") == ["down"]
    assert keyboard.holding  # F2's first byte: the rest may follow
    assert keyboard.feed(b"OQ") == []  # F2, not q
    assert keyboard.feed(b"\x1b[") == []
    assert keyboard.holding
    assert keyboard.feed(b"B") == ["down"]
    keyboard.feed(b"\x1b")
    keyboard.drop()  # nothing followed: the Esc key, which does nothing
    assert keyboard.feed(b"q") == ["quit"]
    assert keyboard.feed(b"\x1b[200~the jjj kgk q") == []  # a paste, until its end marker
    assert not keyboard.holding
    assert keyboard.feed(b"ggq\x1b[20") == []  # the end marker split across reads
    assert keyboard.feed(b"1~j") == ["down"]


def test_the_selection_starts_on_the_first_row_moves_and_stops_at_either_end() -> None:
    shown = ordered([_session(id, Status.WORKING, n) for n, id in enumerate(["a", "b", "c"])])
    assert selected(shown, None) is shown[0]
    assert moved(shown, None, 1) == "b"
    assert moved(shown, "b", 1) == "c"
    assert moved(shown, "c", 1) == "c"
    assert moved(shown, "a", -1) == "a"
    assert selected([], "a") is None
    assert moved([], None, 1) is None


def test_the_selection_follows_its_session_as_rows_reorder_and_falls_back_to_the_first() -> None:
    b = _session("b", Status.WORKING, 2)
    before = ordered([_session("a", Status.WORKING, 1), b])
    assert moved(before, None, 1) == "b"
    after = ordered([_session("a", Status.WORKING, 1), _session("b", Status.QUESTION, 2)])  # b now first
    assert selected(after, "b").id == "b"  # type: ignore[union-attr]
    assert selected(after[1:], "b").id == "a"  # type: ignore[union-attr]  # b gone: the first row


def test_the_rows_drawn_scroll_as_little_as_keeps_the_selection_in_view() -> None:
    listed = ordered([_session(f"s{n:02}", Status.WORKING, n) for n in range(40)])
    assert window(listed, 15, None) == (0, listed[:14])  # the other 26 counted on the line below
    assert window(listed, 15, "s13") == (0, listed[:14])
    assert window(listed, 15, "s14") == (1, listed[1:15])  # one past the last row: one down
    assert window(listed, 15, "s20", start=1) == (7, listed[7:21])
    assert window(listed, 15, "s15", start=7) == (7, listed[7:21])  # in view: nothing moves
    assert window(listed, 15, "s03", start=7) == (3, listed[3:17])
    assert window(listed[:10], 15, "s03", start=7) == (0, listed[:10])  # all fit again
    assert window(listed, 15, "gone", start=7) == (0, listed[:14])  # back to the first


def test_a_scrolled_screen_counts_the_rows_above_and_below() -> None:
    frame = Frame("/s", tuple(_session(f"s{n:02}", Status.WORKING, n) for n in range(40)), 40, "live")
    screen = _screen(frame, height=20, choice="s20", start=0)
    assert "\u2026 7 above, 19 below" in screen
    assert next(line for line in screen.splitlines() if "s20" in line).startswith("> ")
    assert "s06" not in screen


def test_a_terminal_with_room_for_one_row_shows_one_not_only_a_count() -> None:
    assert fitting(3, 1) == 1
    assert fitting(3, 0) == 0
    assert fitting(3, 3) == 3
    assert fitting(4, 3) == 2


@pytest.mark.parametrize("link", ["live", "reconnecting"])
def test_every_selectable_row_is_drawn_however_narrow_or_short_the_terminal(link: str) -> None:
    """The header, the message of a reconnect and the footer are one line each, so the
    rows :func:`rows` lets the user select are all on screen: the last one is marked."""
    sessions = tuple(
        _session(f"session-{n}", Status.WORKING, n, working_dir=f"/src/a-long-project-name-{n}") for n in range(6)
    )
    frame = Frame("/run/user/1000/shmstore/" + "x" * 60 + ".sock", sessions, 9, link, message="refused " * 20)
    note = Note("not switching: " + "a long reason " * 10, True, 0)
    for width in (20, 30, 50, 80, 120):
        for height in range(CHROME + 1, 16):
            _, shown = window(sessions, room(frame, height), None)
            assert shown, (width, height)  # one row at least, as soon as there is room for it
            for footer in (None, note):
                screen = _screen(frame, width, height, choice=shown[-1].id, note=footer).splitlines()
                assert len(screen) <= height, (width, height, screen)
                assert sum(line.startswith(">") for line in screen) == 1, (width, height, screen)


def test_the_selected_row_is_marked_and_the_footer_says_the_keys_and_what_a_jump_did() -> None:
    frame = Frame("/s", (_session("alpha", Status.ATTENTION, 1), _session("bravo", Status.WORKING, 2)), 2, "live")
    lines = _screen(frame, choice="bravo").splitlines()
    assert next(line for line in lines if "alpha" in line).startswith("  ")
    assert next(line for line in lines if "bravo" in line).startswith("> ")
    assert lines[-1] == FOOTER
    refused = Note("not switching: session 'bravo' does not run in tmux", True, 0)
    assert _screen(frame, note=refused).splitlines()[-1] == refused.text  # in place of the keys
    assert ">" not in _screen(frame, keys=False)  # top printed once has no selection


def test_top_without_a_terminal_prints_the_table_once_without_escape_codes(store: shmstore.Client) -> None:
    store.set(make_session("plain", working_dir="/src/alpha"))
    store.report("asks", Status.QUESTION, "/src/bravo")
    result = run("top", address=store.address, timeout=30)
    assert result.returncode == 0, result.stderr
    assert "\x1b" not in result.stdout
    assert "rev 2  2 sessions: 1 question, 0 attention, 1 working" in result.stdout
    assert result.stdout.index("bravo") < result.stdout.index("alpha")
    assert "q quit" not in result.stdout


def test_top_without_a_manager_says_so_in_one_line(sock_dir: Path) -> None:
    result = run("top", address=sock_dir / "none.sock", timeout=30)
    assert result.returncode == 3  # the manager is unreachable
    assert result.stderr.startswith("shmstore: error: no manager at")
    assert result.stderr.count("\n") == 1


def test_only_top_imports_rich() -> None:
    code = (
        "import sys, shmstore.commands.cli, shmstore.hook.run, shmstore.manager.lifecycle\n"
        "assert 'rich' not in sys.modules and 'shmstore.commands.top' not in sys.modules\n"
        "import shmstore.commands.top\n"
        "assert 'rich' in sys.modules\n"
    )
    assert subprocess.run([PYTHON, "-c", code], timeout=60).returncode == 0


# -- in a real terminal -------------------------------------------------------------------------


class Pane:
    """One command in a detached tmux session on a server of its own, whose socket is in
    the test's directory (``-S``, rather than ``-L`` in tmux's shared one, so that nothing
    is left behind)."""

    def __init__(self, socket: Path, command: str) -> None:
        self.socket = socket
        env = {k: v for k, v in os.environ.items() if k != "TMUX"}
        env.setdefault("TERM", "xterm-256color")
        self.tmux("new-session", "-d", "-x", "120", "-y", "30", "-s", "top", command, env=env)

    def tmux(self, *args: str, env: dict[str, str] | None = None) -> str:
        argv = ["tmux", "-S", str(self.socket), "-f", "/dev/null", *args]
        return subprocess.run(argv, capture_output=True, text=True, check=True, timeout=10, env=env).stdout

    def text(self) -> str:
        return self.tmux("capture-pane", "-p", "-t", "top")

    def wait_for(self, seen: Callable[[str], bool], what: str, timeout: float = 15) -> str:
        """The screen once ``seen`` says so; fails after ``timeout`` seconds, showing it."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.text()
            if seen(text):
                return text
            assert time.monotonic() < deadline, f"not on screen after {timeout} s: {what}\n{text}"
            time.sleep(0.1)

    def shows(self, *needles: str) -> str:
        return self.wait_for(lambda text: all(n in text for n in needles), " and ".join(needles))

    def keys(self, *keys: str) -> None:
        self.tmux("send-keys", "-t", "top", *keys)

    def close(self) -> None:
        subprocess.run(["tmux", "-S", str(self.socket), "kill-server"], capture_output=True, timeout=10)


@pytest.fixture
def terminal(sock_dir: Path) -> Iterator[Callable[[Path], Pane]]:
    """``shmstore top --address ADDRESS`` in a 120x30 tmux pane; after it exits, the pane
    says with what code, and whether the terminal was left in cbreak mode."""
    if shutil.which("tmux") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("tmux is not installed (.ci/run installs it)")
        pytest.skip("tmux is not installed")
    panes: list[Pane] = []

    def start(address: Path) -> Pane:
        top = shlex.join([PYTHON, "-m", "shmstore", "top", "--address", str(address)])
        after = 'echo "top exited $?"; case "$(stty -a)" in *-icanon*) echo cbreak-left;; *) echo tty-restored;; esac'
        panes.append(Pane(sock_dir / f"tmux{len(panes)}", f"{top}; {after}; sleep 600"))
        return panes[-1]

    yield start
    for pane in panes:
        pane.close()


def _row(text: str, name: str) -> str:
    return next((line for line in text.splitlines() if f" {name} " in line), "")


def test_top_in_a_terminal_follows_the_store_through_a_manager_restart_and_quits_on_q(
    start_server: StartServer, terminal: Callable[[Path], Pane]
) -> None:
    first = start_server("t.sock")
    address = Path(first.address)
    with shmstore.connect(address) as store:
        store.set(make_session("w-1", working_dir="/src/alpha"))
        pane = terminal(address)
        pane.shows("live", "alpha", "1 working")
        store.report("q-1", Status.QUESTION, "/src/bravo")
        screen = pane.shows("bravo", "1 question")
        assert screen.index("bravo") < screen.index("alpha")  # the question comes first
        store.transition("w-1", Status.ATTENTION)
        screen = pane.wait_for(lambda text: "attention" in _row(text, "alpha"), "alpha in attention")
        assert screen.index("bravo") < screen.index("alpha")

        os.kill(first.pid, signal.SIGKILL)
        first.process.join(10)
        screen = pane.shows("reconnecting\u2026", "bravo")  # the last table seen stays up
        start_server("t.sock")
        store.report("c-1", Status.WORKING, "/src/charlie")
        screen = pane.shows("live (resynced)", "charlie", "1 session:")
        assert "bravo" not in screen  # the new manager's sessions, not the old ones

        pane.keys("q")
        screen = pane.shows("top exited 0", "tty-")
        assert "tty-restored" in screen


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_top_in_a_terminal_quits_on_ctrl_c_or_sigterm_and_restores_the_terminal(
    server: shmstore.ServerProcess, terminal: Callable[[Path], Pane], how: str
) -> None:
    pane = terminal(Path(server.address))
    pane.shows("live", "0 sessions", FOOTER)
    if how == "ctrl-c":
        pane.keys("C-c")
    else:
        shell = psutil.Process(int(pane.tmux("display-message", "-p", "-t", "top", "#{pane_pid}")))
        (top,) = shell.children()
        top.terminate()
    screen = pane.shows("top exited", "tty-")
    assert "top exited 0" in screen
    assert "tty-restored" in screen


def test_enter_on_a_session_not_in_tmux_says_why_in_the_footer_and_top_goes_on(
    store: shmstore.Client, terminal: Callable[[Path], Pane]
) -> None:
    store.report("bg-job", Status.ATTENTION, "/src/alpha")  # no terminal: a background agent
    store.report("q-1", Status.QUESTION, "/src/bravo")
    pane = terminal(store.address)
    pane.shows("live", "alpha", "bravo")
    pane.keys("Down")
    pane.wait_for(lambda text: _row(text, "alpha").startswith("> "), "alpha selected")
    pane.keys("Enter")
    screen = pane.shows("not switching: session 'bg-job' does not run in tmux")
    assert "2 sessions" in screen  # still drawing, live
    store.report("w-1", Status.WORKING, "/src/charlie")
    pane.shows("charlie", "3 sessions")
    pane.keys("q")
    assert "top exited 0" in pane.shows("top exited", "tty-")


def test_a_jump_to_a_hung_tmux_server_says_so_while_it_waits_and_drops_keys_typed_meanwhile(
    store: shmstore.Client, terminal: Callable[[Path], Pane], sock_dir: Path
) -> None:
    hung = sock_dir / "hung"
    tmux = ["tmux", "-S", str(hung), "-f", "/dev/null"]
    subprocess.run([*tmux, "new-session", "-d", "sleep 600"], check=True, timeout=10)
    server = int(subprocess.run([*tmux, "display", "-p", "#{pid}"], capture_output=True, timeout=10).stdout)
    agent = subprocess.Popen(["sleep", "600"])
    try:
        on_hung = Terminal(tmux_pane="%0", tmux_socket=str(hung))
        store.report("hung-1", Status.QUESTION, "/src/alpha", pid=agent.pid, terminal=on_hung)
        store.report("w-1", Status.WORKING, "/src/bravo")
        pane = terminal(store.address)
        pane.shows("live", "alpha", "bravo")
        os.kill(server, signal.SIGSTOP)
        pane.keys("Enter")
        pane.shows("switching to hung-1\u2026")  # said before the wait, not after it
        pane.keys("j")  # typed blind while the screen stands still
        screen = pane.shows("not switching: tmux did not answer within 2 s")
        time.sleep(0.5)  # the j, had it been kept, is read by now
        screen = pane.text()
        assert "not switching: tmux did not answer within 2 s" in screen  # not cleared by it
        assert _row(screen, "alpha").startswith("> ")  # nor moved by it
        pane.keys("q")
        assert "top exited 0" in pane.shows("top exited", "tty-")
    finally:
        os.kill(server, signal.SIGCONT)
        subprocess.run([*tmux, "kill-server"], capture_output=True, timeout=10)
        agent.kill()
        agent.wait()


def test_text_the_terminal_counts_wider_than_rich_is_cut_not_wrapped_and_the_screen_stays(
    store: shmstore.Client, terminal: Callable[[Path], Pane]
) -> None:
    """Devanagari's vowel signs are 0 cells to rich and 1 to the terminal (glibc's wcwidth):
    a row rich thought fit was wrapped by the terminal, which scrolled the whole screen up
    (the header gone, rows left twice). Top turns off the terminal's wrap while it runs."""
    store.report("a1", Status.QUESTION, "/src/" + "\u0915\u093e\u0930\u094d\u092f\u093e\u0932\u092f" * 8)
    store.report("b2", Status.WORKING, "/src/beta")
    store.report("c3", Status.WORKING, "/home/me/a-rather-long-project-name")
    pane = terminal(store.address)
    pane.shows("live", "beta")
    assert pane.tmux("display-message", "-p", "-t", "top", "#{wrap_flag}").strip() == "0"
    pane.tmux("resize-window", "-t", "top", "-x", "50", "-y", "10")
    screen = pane.wait_for(lambda text: "a-rather-long" in text and len(text.splitlines()[0]) <= 50, "50 columns")
    time.sleep(1.2)  # a redraw on the next second, were the screen scrolling
    lines = pane.text().splitlines()
    assert lines[0].startswith("shmstore top  live"), screen
    assert sum("beta" in line for line in lines) == 1, lines
    pane.keys("q")
    assert "top exited 0" in pane.shows("top exited", "tty-")
    assert pane.tmux("display-message", "-p", "-t", "top", "#{wrap_flag}").strip() == "1"  # restored


def test_ctrl_z_and_a_paste_are_not_keys_and_top_goes_on(store: shmstore.Client, sock_dir: Path) -> None:
    """Run from an interactive shell (job control: Ctrl-Z would stop top, and ``fg`` gave it
    back a terminal in line mode, deaf until Enter)."""
    if shutil.which("tmux") is None or shutil.which("bash") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("tmux or bash is not installed (.ci/run installs tmux)")
        pytest.skip("tmux or bash is not installed")
    store.report("q-1", Status.QUESTION, "/src/alpha")
    store.report("w-1", Status.WORKING, "/src/bravo")
    pane = Pane(sock_dir / "tmux-shell", "env PS1='$ ' bash --norc --noprofile -i")
    try:
        pane.shows("$")
        top = shlex.join([PYTHON, "-m", "shmstore", "top", "--address", str(store.address)])
        pane.keys(f"{top}; echo top'' exited $?", "Enter")  # the line typed does not say it
        pane.shows("live", "alpha", "bravo")
        pane.keys("C-z")
        pane.keys("j")
        pane.wait_for(lambda text: _row(text, "bravo").startswith("> "), "bravo selected after Ctrl-Z")
        pane.tmux("set-buffer", "-b", "clip", "the kkk g q")
        pane.tmux("paste-buffer", "-p", "-b", "clip", "-t", "top")  # bracketed, as top asked
        time.sleep(0.5)
        screen = pane.text()
        assert _row(screen, "bravo").startswith("> "), screen  # the paste's k, g and q did nothing
        assert "switching" not in screen
        pane.keys("q")
        assert "top exited 0" in pane.shows("top exited")
    finally:
        pane.close()
