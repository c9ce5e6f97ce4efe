"""What the tests share: sessions to store, a way to see the whole store, the command line
and the hook run as a user runs them, and raw calls to a manager past the Client's checks.

Fixtures are in conftest.py; test files import from here and never from one another.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
from multiprocess import managers

import shmstore
from shmstore.checks import MAX_TOKENS
from shmstore.transport import wire

PYTHON = sys.executable
#: A script that forks a manager from a lean process, as a daemon embeds one: its pid on
#: stdout, and it stops the manager when stdin closes. The benchmarks measure it too.
LAUNCHER = Path(__file__).resolve().parent.parent / "bench" / "launch_manager.py"
#: The soak: worker processes and a subscriber against one manager, checking every invariant.
SOAK = LAUNCHER.with_name("soak.py")

#: The type of the ``start_server`` fixture: starts a manager, stopped when the test ends.
StartServer = Callable[..., shmstore.ServerProcess]

SID = "3f2a8c1e-5b7d-4e9f-a0c2-6d8b1e4f7a93"
CWD = "/home/dev/projects/webapp"


def make_session(id: str = "s1", **fields: object) -> shmstore.Session:
    fields.setdefault("working_dir", "/home/dev/project")
    return shmstore.Session(id=id, **fields)  # type: ignore[arg-type]


def snapshot(store: shmstore.Client) -> tuple[int, list[bytes]]:
    """Everything a client can see of the store, for before/after comparisons."""
    return store.revision(), sorted(s.to_json() for s in store.list_all())


def wait_until_stopped(pid: int) -> None:
    """SIGSTOP takes effect asynchronously: wait until every thread of ``pid`` has stopped."""
    deadline = time.monotonic() + 5
    while psutil.Process(pid).status() != psutil.STATUS_STOPPED:
        assert time.monotonic() < deadline
        time.sleep(0.01)


def run(
    *args: str, address: object = None, timeout: float = 60, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``shmstore ARGS...`` in a process of its own, as a user runs it (in ``env``, else
    this process's environment)."""
    argv = [PYTHON, "-m", "shmstore", *args]
    if address is not None:
        argv += ["--address", str(address)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env)


@contextlib.contextmanager
def serving(address: object, *flags: str) -> Iterator[subprocess.Popen[str]]:
    """``shmstore serve --address ADDRESS FLAGS...`` in a process of its own, once it says
    it serves (the lines it logged before that are in ``proc.before``); terminated (and its
    pipe closed) on the way out unless the test ended it already."""
    with subprocess.Popen(
        [PYTHON, "-m", "shmstore", "serve", "--address", str(address), *flags], stderr=subprocess.PIPE, text=True
    ) as proc:
        try:
            assert proc.stderr is not None
            before = []
            while "serving at" not in (line := proc.stderr.readline()):
                assert line, "".join(before)  # it ended without serving
                before.append(line)
            proc.before = "".join(before)  # type: ignore[attr-defined]
            yield proc
        finally:
            if proc.poll() is None:
                proc.terminate()


def payload(event: str, **fields: Any) -> dict[str, Any]:
    """A hook payload shaped like Claude Code's: the common fields plus the event's own."""
    return {
        "session_id": fields.pop("session_id", SID),
        "transcript_path": f"/home/dev/.claude/projects/webapp/{SID}.jsonl",
        "cwd": fields.pop("cwd", CWD),
        "permission_mode": "default",
        "hook_event_name": event,
        **fields,
    }


def hook(address: object, data: dict[str, Any] | bytes, *extra: str) -> subprocess.CompletedProcess[bytes]:
    """``shmstore hook`` fed one payload on stdin, as Claude Code runs it."""
    body = data if isinstance(data, bytes) else json.dumps(data).encode()
    return subprocess.run(
        [PYTHON, "-m", "shmstore", "hook", "--address", str(address), *extra],
        input=body,
        capture_output=True,
        timeout=30,
    )


class RawStore:
    """The manager's store called with exactly the arguments given, past every check the
    Client makes first: what a buggy or hostile client could send."""

    def __init__(self, address: wire.Address, authkey: bytes) -> None:
        setup = wire.Client(address, authkey=authkey, timeout=10)
        try:
            self._ident, _ = managers.dispatch(setup, None, "create", ("store",))
        finally:
            setup.close()
        self._conn = wire.Client(address, authkey=authkey, timeout=10)
        managers.dispatch(self._conn, None, "accept_connection", ("raw",))

    def call(self, method: str, *args: Any) -> Any:
        self._conn.deadline = time.monotonic() + 30
        return managers.dispatch(self._conn, self._ident, method, args)

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> RawStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def same_views(shm: shmstore.Client, sock: shmstore.Client, ids: list[str]) -> None:
    """A client reading shared memory sees what one reading the socket sees: each session,
    the live list (in no set order), and the snapshot with its epoch and revision."""
    for id in ids:
        assert shm.get(id) == sock.get(id), id
    assert sorted(shm.list_all(), key=lambda s: s.id) == sorted(sock.list_all(), key=lambda s: s.id)
    a, b = shm.snapshot(), sock.snapshot()
    assert (a.epoch, a.revision, sorted(a.sessions, key=lambda s: s.id)) == (
        b.epoch,
        b.revision,
        sorted(b.sessions, key=lambda s: s.id),
    )


#: Calls each backend must refuse with ValidationError, leaving the store as it was (made
#: past the Client's own checks; the store holds "s1" with some token usage).
BAD_CALLS: list[tuple[str, tuple[object, ...]]] = [
    ("get", ("",)),
    ("get", (42,)),
    ("remove", ("bad\x07id",)),
    ("transition", ("s1", "sleeping")),
    ("transition", ("s1", None)),
    ("transition", ("x" * 1000, "working")),
    ("add_usage", ("s1", -1, 0)),
    ("add_usage", ("s1", 0, 1.5)),
    ("add_usage", ("s1", MAX_TOKENS, 0)),
    ("add_usage", ("s1", "10", 0)),
    ("set", (b"not json", None)),
    ("set", (b'{"id": "s2", "working_dir": "relative"}', None)),
    ("set", (b'{"id": "s1", "working_dir": "/", "status": "nope"}', None)),
    ("set", ({"id": "s1"}, None)),
    ("set", (make_session("s1").to_json(), -3)),
]


def kept_in_spool(result: subprocess.CompletedProcess[bytes], address: object = None) -> bool:
    """Did a hook keep its report in the spool, and say nothing on stderr (a report
    delivered later is no error to show the agent's user)? Told by its failure log's last
    line; or, given the ``address`` of a manager that cannot have taken it yet (a hook that
    waited to its deadline may skip the log line), by the spool itself."""
    from shmstore import spool
    from shmstore.hook.failures import failure_log_path

    if address is not None:
        kept = spool.counts(spool.path_for(str(address)))["pending"] > 0
    else:
        with open(failure_log_path(), encoding="utf-8") as log:
            kept = "kept in the spool" in log.read().splitlines()[-1]
    return result.stderr == b"" and kept
