"""Limits that keep the store servable: sizes in bytes, bounded times, bounded replies.

Store logic is tested in-process (a Store is a plain object taking and returning orjson
bytes); what depends on the transport goes through a real manager.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
from collections.abc import Callable

import orjson
import pytest
from helpers import RawStore, make_session, run, snapshot

import shmstore
from shmstore import EventKind, Session, StateTransition, Status, StoreFullError, ValidationError
from shmstore.checks import MAX_CLOCK_AHEAD, MAX_DURATION, MAX_ID_LENGTH, MAX_PATH_LENGTH
from shmstore.config import (
    DEFAULT_MAX_RECORD_BYTES,
    DEFAULT_MAX_STORE_BYTES,
    MAX_STORE_BYTES,
    MIN_RECORD_BYTES,
    RECORD_RESERVE,
)
from shmstore.record import pack, session_from_store
from shmstore.transport import wire


def state(store: shmstore.Store) -> tuple[int, list[bytes], list[bytes], bytes]:
    """Everything an in-process store holds, for before/after comparisons."""
    return store.revision(), sorted(store.list_all()), store.recently_closed(), store.changes(0)


def refused(store: shmstore.Store, field: str, method: str, *args: object) -> ValidationError:
    """Call ``method``, expect a ValidationError naming ``field``, and the store unchanged."""
    before = state(store)
    with pytest.raises(ValidationError) as info:
        getattr(store, method)(*args)
    assert info.value.field == field, info.value
    assert state(store) == before
    return info.value


# -- item 9: sizes in bytes --------------------------------------------------------------------


def test_a_working_dir_is_limited_in_bytes_not_characters() -> None:
    assert MAX_PATH_LENGTH == 4096
    assert Session(id="a", working_dir="/" + "a" * 4095).working_dir  # 4,096 bytes
    assert Session(id="a", working_dir="/" + "\U0001f642" * 1023).working_dir  # 4,093 bytes
    for too_long in ["/" + "é" * 2048, "/" + "\U0001f642" * 1024, "/" + "a" * 4096]:  # 4,097 bytes each
        with pytest.raises(ValidationError, match="4097") as info:
            Session(id="a", working_dir=too_long)
        assert info.value.field == "working_dir"
    store = shmstore.Store()
    refused(store, "working_dir", "report", "s", "working", "/" + "\U0001f642" * 1024)


def test_ids_are_limited_in_bytes_not_characters() -> None:
    assert MAX_ID_LENGTH == 256
    assert Session(id="é" * 128, working_dir="/", session_id="é" * 128).id  # 256 bytes
    for field in ["id", "session_id"]:
        with pytest.raises(ValidationError, match="258 bytes") as info:
            Session(**{"id": "a", "working_dir": "/", field: "é" * 129})  # type: ignore[arg-type]
        assert info.value.field == field
    store = shmstore.Store()
    refused(store, "id", "get", "\U0001f642" * 65)
    refused(store, "id", "report", "é" * 129, "working", "/")
    refused(store, "session_id", "report", "s", "working", "/", None, "é" * 129)
    narrow = shmstore.Store(max_id_length=8)
    refused(narrow, "id", "set", Session(id="ééééé", working_dir="/").to_json())  # 5 characters, 10 bytes


def history(count: int) -> tuple[StateTransition, ...]:
    return tuple(StateTransition(1000.0 + k, Status.WORKING, Status.ATTENTION, 1.0) for k in range(count))


def test_set_refuses_a_history_longer_than_max_history() -> None:
    store = shmstore.Store(max_history=3)
    store.set(make_session("s", history=history(3)).to_json())  # exactly the limit: fine
    error = refused(store, "history", "set", make_session("s", history=history(4)).to_json())
    assert "4 entries" in str(error)
    assert "at most 3" in str(error)
    [kept] = store.list_all()
    assert len(session_from_store(kept).history) == 3  # neither replaced nor cut
    default = shmstore.Store()
    refused(default, "history", "set", make_session("big", history=history(21)).to_json())
    assert default.revision() == 0


def test_a_session_too_large_to_keep_is_refused() -> None:
    store = shmstore.Store()
    # Legal fields, but every character of the dir is a six-byte escape in JSON: ~24 KB.
    dir = "/" + "\x01" * 4095
    error = refused(store, "session", "set", Session(id="s", working_dir=dir).to_json())
    assert f"at most {DEFAULT_MAX_RECORD_BYTES - RECORD_RESERVE}" in str(error)
    refused(store, "session", "report", "s", "working", dir)
    # The largest plain session the field limits allow is kept.
    store.set(
        Session(
            id="x" * 256, working_dir="/" + "a" * 4095, session_id="y" * 256, history=history(20), pid=2**31 - 1
        ).to_json()
    )
    assert store.revision() == 1


def largest_settable(store: shmstore.Store) -> Session:
    """A session whose record is exactly as large as ``set`` accepts in ``store``: a resume
    id still to come from a report, its id made of quotes (two bytes of JSON each), its dir
    padded with control characters (six)."""
    room = store.limits.max_record_bytes - RECORD_RESERVE
    base = Session(id='"' * 256, working_dir="/", since=0.0, revision=1)
    escapes, rest = divmod(room - len(pack(base)), 6)  # a control character is six bytes: \u0001
    session = dataclasses.replace(base, working_dir="/" + "\x01" * escapes + "a" * rest)
    assert len(pack(session)) == room
    return session


def test_the_stores_own_changes_never_fail_for_size() -> None:
    store = shmstore.Store(max_history=10_000)
    session = largest_settable(store)
    store.set(pack(session))
    with pytest.raises(ValidationError):  # one byte more is refused
        store.set(pack(dataclasses.replace(session, working_dir=session.working_dir + "a")))
    # Every change the store makes that grows a session, at its widest (a resume id that
    # is not the id, which a record keeps as one byte):
    store.report(session.id, "attention", "/", 2**31 - 1, "\\" * 256)
    store.add_usage(session.id, 2**62, 2**62)
    for k in range(200):
        store.transition(session.id, ["working", "question", "attention"][k % 3])
    store.report(session.id, "closed", "/")
    store.report(session.id, "working", "/")  # revived
    grown = store.get(session.id)
    assert grown is not None
    assert len(grown) <= store.limits.max_record_bytes
    kept = session_from_store(grown).history
    # The oldest entries made room for the newest: a consistent chain ending in the last change.
    assert 0 < len(kept) < 203
    assert kept[-1].to is Status.WORKING
    assert all(a.to == b.from_ for a, b in itertools.pairwise(kept))
    assert all(len(e) <= store.limits.max_record_bytes for e in store.list_all())


def test_history_sheds_its_oldest_entries_to_fit_the_record_limit() -> None:
    store = shmstore.Store(max_history=10_000, max_record_bytes=MIN_RECORD_BYTES)
    store.report("s", "working", "/home/dev/app")
    for k in range(2_000):  # about six bytes of record each
        store.transition("s", ["attention", "working"][k % 2])
    data = store.get("s")
    assert data is not None
    assert MIN_RECORD_BYTES - 200 < len(data) <= MIN_RECORD_BYTES
    kept = session_from_store(data).history
    assert kept[-1].to is Status.WORKING
    assert len(kept) < 2_000


def fill(store: shmstore.Store, prefix: str, dir: str) -> int:
    """Add sessions of one shape until the store refuses one; returns how many it took."""
    added = 0
    while True:
        try:
            store.set(Session(id=f"{prefix}{added:04d}", working_dir=dir).to_json())
        except StoreFullError:
            return added
        added += 1
        assert added < 1000


def test_live_sessions_are_bounded_in_bytes() -> None:
    limit = 64 * 2**10
    store = shmstore.Store(max_store_bytes=limit, max_record_bytes=MIN_RECORD_BYTES, max_closed=8)
    dir = "/" + "a" * 700  # ~1 KB sessions
    added = fill(store, "s", dir)
    live = sum(map(len, store.list_all()))
    assert added > 50
    assert limit - 1100 < live <= limit
    assert len(store.snapshot()) < limit + 200
    before = state(store)
    with pytest.raises(StoreFullError, match="max_store_bytes"):
        store.report("new", "working", dir + "b" * 500)
    with pytest.raises(StoreFullError):  # growing one that is there is refused too
        store.set(Session(id="s0000", working_dir=dir + "b" * 2000).to_json())
    assert state(store) == before
    # Closing or removing sessions makes room.
    store.transition("s0000", "closed")
    store.remove("s0001")
    assert fill(store, "t", dir) >= 1
    before = state(store)
    with pytest.raises(StoreFullError):  # and a closed session cannot come back past the limit
        store.report("s0000", "working", "/")
    assert state(store) == before
    assert store._live_bytes == sum(map(len, store.list_all()))  # the running count stays exact


def test_a_default_store_can_always_send_its_snapshot(sock_dir: object) -> None:
    # Today's limits let 10,000 sessions of ~8.5 KB each (a 4,096-byte dir of characters that
    # JSON escapes) make an 85 MB snapshot, past the wire's 64 MiB: snapshot and watch then
    # failed for everyone. Now the store is full before that.
    dir = "/" + '"' * 4095
    with (
        shmstore.start_server(f"{sock_dir}/big.sock") as server,
        shmstore.connect(server.address, server.authkey, timeout=30) as store,
    ):
        added = 0

        def fill() -> None:
            nonlocal added
            for added in range(10_000):
                store.set(Session(id=f"{added:05d}", working_dir=dir))

        with pytest.raises(StoreFullError):
            fill()
        assert 3_000 < added < 10_000
        snap = store.snapshot()
        assert len(snap.sessions) == added
        assert len(store.list_all()) == added
        with store.watch() as watch:
            assert next(watch).kind is EventKind.SNAPSHOT
    assert DEFAULT_MAX_STORE_BYTES <= MAX_STORE_BYTES == wire.MAX_MESSAGE // 2


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"max_record_bytes": 0}, "max_record_bytes"),
        ({"max_record_bytes": True}, "max_record_bytes"),
        ({"max_record_bytes": "16384"}, "max_record_bytes"),
        ({"max_record_bytes": MIN_RECORD_BYTES - 1}, "max_record_bytes"),
        ({"max_store_bytes": 0}, "max_store_bytes"),
        ({"max_store_bytes": 2.5}, "max_store_bytes"),
        ({"max_store_bytes": MAX_STORE_BYTES + 1}, "max_store_bytes"),
        # recently_closed() must fit a reply: max_closed x max_record_bytes <= max_store_bytes.
        ({"max_closed": 3000}, "max_closed"),
        ({"max_closed": 100, "max_record_bytes": 2**20}, "max_closed"),
        ({"max_store_bytes": 2**20, "max_closed": 65}, "max_closed"),
    ],
)
def test_size_limits_are_validated(options: dict[str, object], field: str) -> None:
    with pytest.raises(ValidationError) as info:
        shmstore.Store(**options)  # type: ignore[arg-type]
    assert info.value.field == field


def test_changes_returns_at_most_limit_events() -> None:
    store = shmstore.Store()
    for k in range(10):
        store.report(f"s{k}", "working", "/a")
    page = orjson.loads(store.changes(0, limit=3))["events"]
    assert [e["revision"] for e in page] == [1, 2, 3]
    assert [e["revision"] for e in orjson.loads(store.changes(3, limit=1000))["events"]] == list(range(4, 11))
    assert len(orjson.loads(store.changes(0))["events"]) == 10
    for bad in [0, -1, True, "5", 2.0, None]:
        refused(store, "limit", "changes", 0, 0.0, None, bad)


def test_one_changes_reply_is_bounded_in_bytes() -> None:
    store = shmstore.Store(max_store_bytes=64 * 2**10, max_record_bytes=MIN_RECORD_BYTES, max_closed=8)
    big = "/" + '"' * 2500  # 5,000 bytes of JSON
    for k in range(30):  # 30 events of ~5.3 KB in the log, while at most one session is live
        store.set(Session(id="s", working_dir=big + str(k)).to_json())
    since, pages = 0, 0
    while since < store.revision():
        reply = store.changes(since)
        assert len(reply) <= 64 * 2**10 + MIN_RECORD_BYTES
        events = orjson.loads(reply)["events"]
        assert events
        assert events[0]["revision"] == since + 1
        since, pages = events[-1]["revision"], pages + 1
    assert pages >= 3


def test_the_client_passes_the_limit(store: shmstore.Client) -> None:
    for k in range(5):
        store.set(make_session(f"s{k}"))
    assert [e.revision for e in store.changes(0, limit=2).events] == [1, 2]
    before = snapshot(store)
    with pytest.raises(ValidationError, match="limit"):
        store.changes(0, limit=0)
    assert snapshot(store) == before


# -- item 11: times are bounded ---------------------------------------------------------------


def far(days: float) -> float:
    return time.time() + days * 86_400


@pytest.mark.parametrize("value", [10**400, 1e300, math.inf, math.nan, -1.0, -(10**400), "now"])
@pytest.mark.parametrize("field", ["since", "last_activity", "history.timestamp", "history.duration"])
def test_times_out_of_range_are_validation_errors(field: str, value: object) -> None:
    def build(v: object) -> Session:
        if field.startswith("history."):
            timestamp, duration = (v, 1.0) if field == "history.timestamp" else (1000.0, v)
            return Session(
                id="a",
                working_dir="/",
                history=(StateTransition(timestamp, "working", "attention", duration),),  # type: ignore[arg-type]
            )
        return Session(id="a", working_dir="/", **{field: v})  # type: ignore[arg-type]

    with pytest.raises(ValidationError) as info:
        build(value)
    assert info.value.field == field
    # And the same through the decoder the manager uses.
    data = orjson.loads(build(1.0).to_json())
    if field.startswith("history."):
        data["history"][0][field.split(".")[1]] = value
    else:
        data[field] = value
    with pytest.raises(ValidationError):
        Session.from_dict(data)


def test_timestamps_may_be_a_day_ahead_of_the_clock_and_no_more() -> None:
    assert MAX_CLOCK_AHEAD == 86_400
    assert Session(id="a", working_dir="/", since=far(0.99)).since > time.time()
    for field in ["since", "last_activity"]:
        with pytest.raises(ValidationError, match="a day past") as info:
            Session(id="a", working_dir="/", **{field: far(1.01)})  # type: ignore[arg-type]
        assert info.value.field == field
    with pytest.raises(ValidationError):
        StateTransition(far(2), Status.WORKING, Status.ATTENTION, 0.0)
    assert Session(id="a", working_dir="/", since=10**9).since == 1e9  # an int is fine, as a float


def test_durations_are_at_most_a_century() -> None:
    assert pytest.approx(100 * 365.25 * 86_400) == MAX_DURATION
    assert StateTransition(1000.0, Status.WORKING, Status.ATTENTION, MAX_DURATION).duration == MAX_DURATION
    with pytest.raises(ValidationError, match="100 years"):
        StateTransition(1000.0, Status.WORKING, Status.ATTENTION, MAX_DURATION * 1.01)


@pytest.mark.parametrize("value", [10**400, 1e300, MAX_DURATION * 2, math.inf, math.nan, -1])
def test_store_ages_and_timeouts_out_of_range_are_validation_errors(value: object) -> None:
    store = shmstore.Store()
    store.report("s", "closed", "/")
    refused(store, "older_than", "prune", value)
    refused(store, "timeout", "changes", 0, value)
    for option in ["stale_after", "reap_interval"]:
        with pytest.raises(ValidationError) as info:
            shmstore.Store(**{option: value})  # type: ignore[arg-type]
        assert info.value.field == option


def test_the_manager_refuses_a_far_future_time_sent_as_raw_json(store: shmstore.Client, raw: RawStore) -> None:
    good = orjson.loads(make_session("s").to_json())
    for field, value in [("since", 1e300), ("last_activity", far(2)), ("since", 1e308)]:
        with pytest.raises(ValidationError, match=field):
            raw.call("set", orjson.dumps({**good, field: value}), None)
    with pytest.raises(ValidationError):  # an int past 64 bits is not even parsed
        raw.call("set", b'{"id":"s","working_dir":"/","since":1' + b"0" * 400 + b"}", None)
    assert store.revision() == 0


_ENTRY = {"timestamp": 100.0, "from": "working", "to": "attention", "duration": 1.0}


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"history": [{**_ENTRY, "to": "asleep"}]}, "history.to"),
        ({"history": [{**_ENTRY, "timestamp": -1.0}]}, "history.timestamp"),
        ({"history": [{**_ENTRY, "duration": float("inf")}]}, "history.duration"),  # orjson writes it as null
        ({"history": [_ENTRY, {"timestamp": 1.0, "from": "working", "to": "closed"}]}, "history[]"),
        ({"history": [_ENTRY] * 11}, "history"),  # past this store's max_history
        ({"pid_start": 5}, "pid_start"),
        ({"pid": 0}, "pid"),
        ({"closed_reason": "why"}, "closed_reason"),
        ({"closed": True}, "closed"),
        ({"api_usage": {"input_tokens": -1, "output_tokens": 0}}, "api_usage.input_tokens"),
        ({"stale": 1}, "stale"),
        ({"revision": True}, "revision"),
        ({"working_dir": "relative"}, "working_dir"),
        ({"agent_type": "vim"}, "agent_type"),
        ({"session_id": ""}, "session_id"),
        ({"id": "x" * 33}, "id"),  # past this store's max_id_length
    ],
)
def test_a_raw_set_with_one_bad_field_is_refused_and_changes_nothing(
    start_server: Callable[..., shmstore.ServerProcess], change: dict[str, object], field: str
) -> None:
    server = start_server(max_history=10, max_id_length=32)
    with shmstore.connect(server.address, server.authkey) as store, RawStore(server.address, server.authkey) as raw:
        good = orjson.loads(
            store.set(make_session("s1", history=(StateTransition(100.0, "working", "attention", 1.0),))).to_json()
        )
        before = snapshot(store)
        with pytest.raises(ValidationError) as info:
            raw.call("set", orjson.dumps({**good, **change}), None)
        assert info.value.field == field, info.value
        assert snapshot(store) == before
        assert store.get("s1") == session_from_store(orjson.dumps(good))


def test_the_command_line_can_neither_store_nor_trip_over_far_times(server: shmstore.ServerProcess) -> None:
    with RawStore(server.address, server.authkey) as raw:
        good = orjson.loads(make_session("far").to_json())
        with pytest.raises(ValidationError):
            raw.call("set", orjson.dumps({**good, "since": 1e300, "last_activity": 1e300}), None)
    got = run("get", "far", address=server.address)
    assert got.returncode == 4  # not found
    assert got.stderr == "shmstore: error: no session with id 'far'\n"
    pruned = run("prune", "--older-than", "1e300", address=server.address)
    assert pruned.returncode == 2  # bad input
    assert pruned.stderr.startswith("shmstore: error: older_than: must be between 0")
    assert pruned.stderr.count("\n") == 1
    created = run("set", "near", "--dir", "/src", address=server.address)
    assert created.returncode == 0, created.stderr
    shown = run("get", "near", address=server.address)
    assert shown.returncode == 0
    assert "near" in shown.stdout
    assert "Traceback" not in shown.stderr


def test_serve_refuses_a_stale_after_past_a_century(sock_dir: object) -> None:
    result = run("serve", "--stale-after", "1e300", address=f"{sock_dir}/x.sock", timeout=30)
    assert result.returncode == 2  # bad input
    assert result.stderr.startswith("shmstore: error: stale_after: must be between 0 and 100 years")


# -- item 14: add_usage on a closed session, ls --status closed ---------------------------------


def test_add_usage_works_on_a_recently_closed_session_and_leaves_it_closed() -> None:
    store = shmstore.Store()
    for id in ["a", "b", "c"]:
        store.report(id, "working", "/w")
        store.report(id, "closed", "/w")
    store.report("live", "working", "/w")
    order = [session_from_store(d).id for d in store.recently_closed()]
    assert order == ["c", "b", "a"]
    revision = store.revision()
    updated = session_from_store(store.add_usage("b", 100, 20))
    assert updated.closed
    assert updated.api_usage == shmstore.ApiUsage(100, 20)
    assert [session_from_store(d).id for d in store.recently_closed()] == order  # kept its place
    assert [session_from_store(d).id for d in store.list_all()] == ["live"]
    assert session_from_store(store.get("b")) == updated
    [event] = orjson.loads(store.changes(revision))["events"]
    assert (event["kind"], event["id"], session_from_store(event["session"]).closed) == ("add_usage", "b", True)
    # A close event still marks the step into closed, and only that.
    store.report("live", "closed", "/w")
    assert orjson.loads(store.changes(revision + 1))["events"][0]["kind"] == "close"


def test_add_usage_on_a_closed_session_through_the_manager(store: shmstore.Client) -> None:
    store.report("s", Status.WORKING, "/w")
    store.transition("s", Status.CLOSED)
    assert store.add_usage("s", 7, 3).api_usage == shmstore.ApiUsage(7, 3)
    assert [s.id for s in store.recently_closed()] == ["s"]
    assert store.list_all() == []
    assert store.changes(2).events[0].kind is EventKind.ADD_USAGE


def test_ls_status_closed_lists_the_recently_closed(server: shmstore.ServerProcess) -> None:
    with shmstore.connect(server.address, server.authkey) as store:
        store.report("done", Status.WORKING, "/w", session_id="resume-1")
        store.transition("done", Status.CLOSED)
        store.report("busy", Status.WORKING, "/w")
    closed = run("ls", "--status", "closed", "--json", address=server.address)
    assert closed.returncode == 0, closed.stderr
    assert [(s["id"], s["session_id"]) for s in orjson.loads(closed.stdout)] == [("done", "resume-1")]
    live = run("ls", "--json", address=server.address)
    assert [s["id"] for s in orjson.loads(live.stdout)] == ["busy"]
    table = run("ls", "--status", "closed", address=server.address)
    assert "done" in table.stdout
    assert "busy" not in table.stdout
