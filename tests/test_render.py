"""What people read: the session table, one session, and when escape codes may be written.
Pure functions, tested in-process; the CLI prints what they return (see test_cli.py)."""

from __future__ import annotations

import io
import os
import shlex
from collections.abc import Iterator

import pytest
from helpers import make_session

from shmstore import ApiUsage, Session, Status
from shmstore.commands.render import escapes_allowed, format_closed, format_session, format_table

AT = 1_700_000_000.0


def header(table: str) -> list[str]:
    return table.splitlines()[0].split("  ")


def closed(id: str, since: float, session_id: str | None = None, working_dir: str = "/src/app") -> Session:
    return make_session(id, status=Status.CLOSED, since=since, session_id=session_id, working_dir=working_dir)


def test_the_tokens_column_is_left_out_when_no_session_has_usage() -> None:
    table = format_table([make_session("a", since=AT), make_session("b", since=AT)], at=AT)
    assert "TOKENS" not in table
    assert "ID" in header(table)


def test_the_tokens_column_is_shown_when_any_session_has_usage() -> None:
    used = make_session("a", since=AT, api_usage=ApiUsage(1200, 340))
    table = format_table([used, make_session("b", since=AT - 1)], at=AT)
    assert "TOKENS IN/OUT" in table
    rows = table.splitlines()
    assert "1200/340" in rows[1]
    assert " - " in rows[2]


def test_closed_sessions_show_their_resume_ids_and_how_to_resume_the_newest() -> None:
    sessions = [closed("old", AT - 60, "resume-old"), closed("new", AT - 5, "resume-new", "/src/web")]
    text = format_closed(sessions, at=AT)
    assert "RESUME" in header(text)
    assert "resume-old" in text
    assert text.splitlines()[-1] == "resume the newest: cd /src/web && claude --resume resume-new"


def test_closed_sessions_without_resume_ids_get_no_resume_command() -> None:
    text = format_closed([closed("a", AT)], at=AT)
    assert "RESUME" in header(text)
    assert "claude --resume" not in text
    assert format_closed([], at=AT).splitlines() == [format_table([], at=AT, resume=True)]


def test_the_resume_command_survives_the_shell_whatever_the_directory() -> None:
    text = format_closed([closed("a", AT, "r-1; rm -rf ~", "/src/my app; echo hi")], at=AT)
    command = text.splitlines()[-1].removeprefix("resume the newest: ")
    assert shlex.split(command) == ["cd", "/src/my app; echo hi", "&&", "claude", "--resume", "r-1; rm -rf ~"]


def test_a_session_shows_its_agent_pid_and_resume_id() -> None:
    session = make_session("a", since=AT, pid=4242, session_id="r-1")
    lines = format_session(session).splitlines()
    assert lines[2] == "agent claude_code  pid 4242  resume id r-1"
    assert "claude --resume" not in format_session(session)  # live: the agent is still running


def test_a_closed_session_shows_the_command_that_resumes_it() -> None:
    text = format_session(closed("a", AT, "r-1"))
    assert "agent claude_code  pid -  resume id r-1" in text
    assert "resume: cd /src/app && claude --resume r-1" in text


def test_a_session_without_pid_or_resume_id_says_so() -> None:
    assert "agent claude_code  pid -  resume id -" in format_session(make_session("a"))


@pytest.fixture
def terminal() -> Iterator[io.TextIOWrapper]:
    """The writing end of a real pseudo-terminal."""
    leader, follower = os.openpty()
    with open(follower, "w") as stream:
        yield stream
    os.close(leader)


@pytest.mark.parametrize(
    ("environ", "allowed"),
    [
        ({"TERM": "xterm-256color"}, True),
        ({}, True),
        ({"TERM": "dumb"}, False),
        ({"TERM": "xterm", "NO_COLOR": "1"}, False),
        ({"TERM": "xterm", "NO_COLOR": ""}, True),  # set but empty does not count (no-color.org)
    ],
)
def test_escape_codes_go_to_a_terminal_unless_the_user_asks_for_plain_output(
    terminal: io.TextIOWrapper, environ: dict[str, str], allowed: bool
) -> None:
    assert escapes_allowed(terminal, environ) is allowed


def test_escape_codes_never_go_to_a_pipe() -> None:
    reader, writer = os.pipe()
    with open(writer, "w") as stream:
        assert not escapes_allowed(stream, {"TERM": "xterm-256color"})
    os.close(reader)
