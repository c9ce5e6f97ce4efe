"""Sessions survive a restart: ``serve --state FILE`` saves them atomically while it runs
and when it stops, and restores them when it starts; a state file it cannot restore is
kept aside, never lost, and the manager starts empty.

The restarts are real ``shmstore serve`` processes stopped by SIGTERM or killed by SIGKILL.
"""

from __future__ import annotations

import os
import re
import signal
import stat
import subprocess
import time
from pathlib import Path

import orjson
import pytest
from helpers import PYTHON, serving
from hypothesis import given, settings
from hypothesis import strategies as st

import shmstore
from shmstore import Session, StateTransition, Status
from shmstore.manager import state
from shmstore.record import pack, session_from_store
from shmstore.store import Store

SLEEPER = [PYTHON, "-c", "import time; time.sleep(60)"]


@pytest.fixture
def sock(sock_dir: Path) -> Path:
    return sock_dir / "s.sock"


@pytest.fixture
def state_file(sock_dir: Path) -> Path:
    return sock_dir / "state" / "state.json"


def connect(address: Path) -> shmstore.Client:
    return shmstore.connect(address, timeout=10)


def everything(address: Path) -> tuple[list[bytes], list[bytes]]:
    """Every live and recently closed session's JSON, in a stable order."""
    with connect(address) as store:
        live = sorted(s.to_json() for s in store.list_all())
        closed = [s.to_json() for s in store.recently_closed()]
    return live, closed


def stop(proc: subprocess.Popen[str], code: int = 0) -> str:
    """SIGTERM the manager, check it exits with ``code``, and return what it logged from then on."""
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == code, err
    return err


def fill(address: Path, first: int, count: int, prefix: str = "s") -> None:
    with connect(address) as store:
        for n in range(first, first + count):
            id = f"{prefix}{n}"
            store.report(id, Status.WORKING, f"/src/p{n}", session_id=f"resume-{n}")
            if n % 3 == 0:
                store.report(id, Status.QUESTION, f"/src/p{n}")
            if n % 4 == 0:
                store.add_usage(id, n * 10, n)


def test_a_planned_restart_keeps_every_session_and_gives_a_new_epoch(sock: Path, state_file: Path) -> None:
    flags = ("--state", str(state_file), "--save-interval", "60")  # only the stop saves
    with serving(sock, *flags) as proc:
        fill(sock, 0, 100)
        with connect(sock) as store:
            for n in range(5):
                store.transition(f"s{n}", Status.CLOSED)
            before = everything(sock)
            first = store.snapshot()
        log = stop(proc)
    assert "saved 95 live and 5 closed sessions" in log
    assert stat.S_IMODE(state_file.stat().st_mode) == 0o600
    # No temporary file left; the lock that makes the file one manager's at a time stays.
    assert sorted(p.name for p in state_file.parent.iterdir()) == ["state.json", "state.json.lock"]
    with serving(sock, *flags) as proc:
        assert "restored 95 live and 5 closed sessions" in proc.before  # type: ignore[attr-defined]
        assert everything(sock) == before
        with connect(sock) as store:
            second = store.snapshot()
            assert second.epoch != first.epoch  # followers resync
            assert second.revision == first.revision  # and revisions go on from the saved one
            after = store.report("s50", Status.ATTENTION, "/src/p50")
            assert after.revision == first.revision + 1
            assert store.get("s3").closed_reason == "transition"  # type: ignore[union-attr]


def test_a_killed_manager_loses_at_most_the_last_save_interval(sock: Path, state_file: Path) -> None:
    with serving(sock, "--state", str(state_file), "--save-interval", "0.2") as proc:
        fill(sock, 0, 20, "early")
        time.sleep(1.0)  # five intervals: saved
        fill(sock, 0, 20, "late")
        proc.kill()
        proc.wait(30)
    with serving(sock, "--state", str(state_file)), connect(sock) as store:
        ids = {s.id for s in store.list_all()}
    assert {f"early{n}" for n in range(20)} <= ids
    assert ids <= {f"early{n}" for n in range(20)} | {f"late{n}" for n in range(20)}


def test_an_unchanged_store_is_not_written_again(sock: Path, state_file: Path) -> None:
    with serving(sock, "--state", str(state_file), "--save-interval", "0.1", "--log-level", "debug") as proc:
        fill(sock, 0, 3)
        time.sleep(1.0)
        log = stop(proc)
    assert log.count("saved 3 live") == 1


GOOD = state.encode("e0", 1, [pack(Session(id="x", working_dir="/x", revision=1))], [])


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"\x00\xffnot json at all", "is not JSON"),
        (b"", "is empty"),
        (b'{"hello": "world"}', "is not a shmstore state file"),
        (b'{"format": "shmstore-state", "version": 99}', "is version 99"),
        (GOOD[: len(GOOD) // 2], "is not JSON (truncated?)"),
        (GOOD.replace(b'"/x"', b'"relative"'), "holds a session that is not valid"),
    ],
    ids=["garbage", "empty", "foreign", "future-version", "truncated", "invalid-session"],
)
def test_a_state_file_it_cannot_restore_is_kept_aside_with_a_warning_and_it_starts_empty(
    sock: Path, state_file: Path, content: bytes, problem: str
) -> None:
    state_file.parent.mkdir()
    state_file.write_bytes(content)
    with serving(sock, "--state", str(state_file)) as proc:
        warning = proc.before  # type: ignore[attr-defined]
        assert "WARNING" in warning
        assert problem in warning
        assert "starting empty" in warning
        assert everything(sock) == ([], [])
        log = stop(proc)
    aside = list(state_file.parent.glob("state.json.corrupt-*"))
    assert len(aside) == 1
    assert str(aside[0]) in warning
    assert aside[0].read_bytes() == content  # every byte kept
    assert not state_file.exists()  # nothing changed, so nothing was saved over it
    assert "Traceback" not in log


def test_keeping_aside_never_overwrites_an_earlier_file_and_a_written_file_reads_back(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    path.write_bytes(b"first")
    first = state.keep_aside(path)
    path.write_bytes(b"second")
    second = state.keep_aside(path)
    assert first != second
    assert (first.read_bytes(), second.read_bytes()) == (b"first", b"second")
    state.write(path, GOOD)
    saved = state.read(path)
    assert saved is not None
    assert [s.id for s in saved.live] == ["x"]
    assert saved.revision == 1


def test_the_reaper_closes_a_restored_session_whose_agent_died(sock: Path, state_file: Path) -> None:
    agent = subprocess.Popen(SLEEPER)
    try:
        with serving(sock, "--state", str(state_file)) as proc:
            with connect(sock) as store:
                reported = store.report("a", Status.WORKING, "/src/a", pid=agent.pid)
                assert reported.pid_start is not None
                store.report("alive", Status.WORKING, "/src/b", pid=os.getpid())
            stop(proc)
    finally:
        agent.kill()
        agent.wait()
    with serving(sock, "--state", str(state_file), "--reap-interval", "0.1") as proc:
        deadline = time.monotonic() + 10
        with connect(sock) as store:
            while (session := store.get("a")) is not None and not session.closed:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            assert session is not None
            assert session.closed_reason == "agent_gone"
            assert session.pid_start == reported.pid_start
            assert not store.get("alive").closed  # type: ignore[union-attr]
        log = stop(proc)
    assert "closed session 'a': agent_gone" in log


def test_a_failed_save_is_logged_shown_by_status_and_the_manager_serves_on(sock_dir: Path, sock: Path) -> None:
    blocker = sock_dir / "not-a-dir"
    blocker.write_bytes(b"mine")
    with serving(sock, "--state", str(blocker / "state.json"), "--save-interval", "0.1") as proc:
        fill(sock, 0, 1)
        with connect(sock) as store:
            deadline = time.monotonic() + 10
            while store.info()["state"]["error"] is None:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            assert store.list_all()
        log = stop(proc, code=1)  # a failed final save is a failure for whoever runs serve
    assert "ERROR: could not save the sessions" in log
    assert blocker.read_bytes() == b"mine"
    # It says where the sessions went, and that is where the next manager finds them.
    [rescue] = re.findall(r"the sessions are in (\S+),", log)
    assert log.rstrip().endswith(f"INFO: stopped serving at {sock}")
    with serving(sock, "--state", str(blocker / "state.json"), "--save-interval", "0.1") as proc:
        assert f"restoring from {rescue}" in proc.before
        with connect(sock) as store:
            assert [session.id for session in store.list_all()] == ["s0"]
        blocker.rename(sock_dir / "moved-aside")  # the user makes room: the next save lands, the rescue goes
        deadline = time.monotonic() + 10
        while Path(rescue).exists():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        stop(proc)
    assert [record[0] for record in orjson.loads((blocker / "state.json").read_bytes())["live"]] == ["s0"]


# -- in-process: the store's side ----------------------------------------------------------


def test_restore_continues_the_revision_and_fits_sessions_to_the_stores_limits() -> None:
    source = Store()
    for n in range(5):
        source.report(f"s{n}", "working", "/x")
        for _ in range(4):
            source.report(f"s{n}", "question", "/x")
            source.report(f"s{n}", "working", "/x")
    source.transition("s4", "closed")
    epoch, revision, live, closed = source.dump()
    saved = state.decode(state.encode(epoch, revision, live, closed), Path("mem"))
    target = Store(max_sessions=3, max_history=2)
    left_out = target.restore(saved.revision, saved.live, saved.closed)
    assert len(left_out) == 1
    assert "past max_sessions (3)" in left_out[0]
    assert target.revision() == revision
    assert target.epoch != epoch
    sessions = [session_from_store(data) for data in target.list_all()]
    assert len(sessions) == 3
    assert all(len(s.history) == 2 for s in sessions)
    assert [session_from_store(data).id for data in target.recently_closed()] == ["s4"]


def test_restore_refuses_a_store_that_is_not_empty() -> None:
    store = Store()
    store.report("a", "working", "/x")
    with pytest.raises(shmstore.ValidationError, match="not empty"):
        store.restore(0, [], [])
    assert store.revision() == 1


def test_a_version_1_state_file_of_public_json_is_still_restored(tmp_path: Path) -> None:
    session = Session(id="old", working_dir="/x", session_id="r-old", revision=3)
    doc = orjson.loads(GOOD)
    doc.update(version=1, live=[orjson.loads(session.to_json())], revision=3)
    path = tmp_path / "state.json"
    path.write_bytes(orjson.dumps(doc))
    saved = state.read(path)
    assert saved is not None
    assert (saved.revision, saved.live) == (3, (session,))


def test_a_state_file_with_a_live_session_that_is_closed_is_refused(tmp_path: Path) -> None:
    closed = Session(id="c", working_dir="/x", status=Status.CLOSED, closed_reason="transition")
    path = tmp_path / "state.json"
    path.write_bytes(state.encode("e", 1, [pack(closed)], []))
    with pytest.raises(state.StateFileError, match="'c' is closed among the live"):
        state.read(path)


_GOOD_DOC = orjson.loads(GOOD)
_junk = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=3),
)


@settings(max_examples=300, deadline=None)
@given(key=st.sampled_from([*_GOOD_DOC, "live.0", *(f"live.0.{n}" for n in range(14))]), value=_junk)
def test_any_field_of_a_state_file_changed_to_junk_restores_or_is_a_state_file_error(key: str, value: object) -> None:
    doc = orjson.loads(GOOD)
    if key.startswith("live.0"):
        if key == "live.0":
            doc["live"][0] = value
        else:
            doc["live"][0][int(key.split(".")[2])] = value  # a field of the record
    else:
        doc[key] = value
    try:
        data = orjson.dumps(doc)
    except (TypeError, orjson.JSONEncodeError):
        return  # not JSON at all: covered by the garbage cases
    try:
        saved = state.decode(data, Path("fuzzed"))
    except state.StateFileError:
        return  # the one error a bad file may raise (any other fails the test)
    store = Store()
    store.restore(saved.revision, saved.live, saved.closed)  # what decodes is always restorable


def test_a_state_file_holds_the_stores_records_as_they_are(tmp_path: Path) -> None:
    store = Store()
    for n in range(3):
        store.report(f"s{n}", "working", "/w", session_id=f"r{n}")
    epoch, revision, live, closed = store.dump()
    data = state.encode(epoch, revision, live, closed)
    assert all(record in data for record in live)  # a join of bytes: no re-encoding to grow it
    assert len(data) < sum(map(len, live)) + 200


def test_a_session_restored_into_a_smaller_record_limit_can_still_grow(tmp_path: Path) -> None:
    big = Store(max_record_bytes=16384)
    history = tuple(StateTransition(float(k), "working", "question", 1.0) for k in range(1, 20))
    big.set(pack(Session(id="x", working_dir="/" + '"' * 3900, since=30.0, history=history)))
    saved = state.decode(state.encode(*big.dump()), Path("mem"))
    small = Store(max_record_bytes=8192)
    small.restore(saved.revision, saved.live, saved.closed)
    grown = small.report("x", "attention", "/", session_id='"' * 256)  # a wide resume id: the reserve
    assert len(grown) <= 8192
