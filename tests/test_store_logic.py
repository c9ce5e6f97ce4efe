"""The store's logic, in-process: a Store is a plain object, so its rules are tested here
quickly and in many cases. Transport, concurrency and faults are tested against real
manager processes elsewhere."""

from __future__ import annotations

import orjson
import pytest
from helpers import make_session

from shmstore import (
    ConflictError,
    EventKind,
    NotFoundError,
    ResyncRequiredError,
    Status,
    StoreFullError,
    ValidationError,
)
from shmstore.feed import Snapshot
from shmstore.model import public_json
from shmstore.store import Store


def public(data: bytes | None) -> dict[str, object]:
    """A stored session as its public JSON, decoded."""
    assert data is not None
    decoded: dict[str, object] = orjson.loads(public_json(data))
    return decoded


def kinds(store: Store, after: int = 0) -> list[str]:
    return [event["kind"] for event in orjson.loads(store.changes(after))["events"]]


def state(store: Store) -> tuple[int, list[bytes], list[bytes]]:
    return store.revision(), sorted(store.list_all()), store.recently_closed()


def test_set_get_remove_and_each_is_one_revision_and_one_event() -> None:
    store = Store()
    revision, _ = store.set(make_session("a").to_json())
    assert revision == 1
    assert public(store.get("a"))["revision"] == 1
    assert public(store.remove("a"))["id"] == "a"
    assert store.get("a") is None
    assert store.remove("a") is None  # nothing to remove: no event either
    assert kinds(store) == ["set", "remove"]


def test_a_transition_records_where_it_came_from_and_how_long_it_stayed() -> None:
    store = Store()
    store.set(make_session("a", since=1_795_000_000.0).to_json())
    moved = public(store.transition("a", Status.ATTENTION))
    (entry,) = moved["history"]  # type: ignore[misc]
    assert (entry["from"], entry["to"]) == ("working", "attention")
    assert entry["duration"] == pytest.approx(moved["since"] - 1_795_000_000.0, abs=0.002)
    assert moved["status"] == "attention"


def test_a_report_creates_then_moves_and_a_repeat_only_counts_as_activity() -> None:
    store = Store()
    created = public(store.report("a", "working", "/src/app"))
    assert (created["status"], created["history"]) == ("working", [])
    again = public(store.report("a", "working", "/src/app"))
    assert again["history"] == []
    assert again["last_activity"] >= created["last_activity"]  # type: ignore[operator]
    moved = public(store.report("a", "question", "/src/app"))
    assert [h["to"] for h in moved["history"]] == ["question"]  # type: ignore[union-attr]
    assert kinds(store) == ["report", "report", "report"]


def test_closing_moves_a_session_to_the_recently_closed_and_a_report_resumes_it() -> None:
    store = Store()
    store.report("a", "working", "/src/app", session_id="resume-a")
    store.transition("a", Status.CLOSED)
    assert store.list_all() == []
    assert [public(d)["id"] for d in store.recently_closed()] == ["a"]
    assert public(store.get("a"))["closed"] is True  # get finds it still
    store.report("a", "attention", "/src/app")
    assert [public(d)["id"] for d in store.list_all()] == ["a"]
    assert store.recently_closed() == []
    assert kinds(store) == ["report", "close", "report"]


def test_a_session_silent_past_stale_after_is_marked_once_and_waiting_ones_never() -> None:
    store = Store(stale_after=0.0)
    store.report("busy", "working", "/a")
    store.report("asking", "question", "/b")
    assert store.reap() == 1
    assert public(store.get("busy"))["stale"] is True
    assert public(store.get("asking"))["stale"] is False
    assert store.reap() == 0  # already marked
    store.report("busy", "working", "/a")
    assert public(store.get("busy"))["stale"] is False  # activity clears it


def test_changes_follow_revisions_and_refuse_what_they_cannot_answer() -> None:
    store = Store(log_size=4)
    for n in range(6):
        store.set(make_session(f"s{n}").to_json())
    assert [e["revision"] for e in orjson.loads(store.changes(3))["events"]] == [4, 5, 6]
    with pytest.raises(ResyncRequiredError) as compacted:
        store.changes(1)
    assert compacted.value.reason == "compacted"
    with pytest.raises(ResyncRequiredError) as other:
        store.changes(6, epoch="another-manager")
    assert other.value.reason == "epoch"
    assert orjson.loads(store.changes(6))["events"] == []


def test_a_snapshot_holds_the_live_sessions_at_one_revision() -> None:
    store = Store()
    store.set(make_session("a").to_json())
    store.set(make_session("b").to_json())
    store.transition("b", Status.CLOSED)
    snapshot = Snapshot.from_json(store.snapshot())
    assert (snapshot.revision, [s.id for s in snapshot.sessions]) == (3, ["a"])
    assert snapshot.epoch == store.epoch


def test_prune_forgets_only_the_closed_sessions_old_enough() -> None:
    store = Store()
    store.report("a", "working", "/a")
    store.transition("a", Status.CLOSED)
    assert store.prune(3600.0) == 0
    assert store.prune(0.0) == 1
    assert store.get("a") is None
    assert kinds(store)[-1] == "remove"


def test_a_full_store_refuses_a_new_session_and_changes_nothing() -> None:
    store = Store(max_sessions=2)
    store.set(make_session("a").to_json())
    store.set(make_session("b").to_json())
    before = state(store)
    with pytest.raises(StoreFullError) as full:
        store.report("c", "working", "/c")
    assert full.value.limit == "max_sessions"
    assert state(store) == before
    store.set(make_session("a", working_dir="/elsewhere").to_json())  # replacing one is fine


def test_unknown_ids_and_bad_values_change_nothing() -> None:
    store = Store()
    store.set(make_session("a").to_json())
    before = state(store)
    with pytest.raises(NotFoundError):
        store.transition("nobody", Status.ATTENTION)
    with pytest.raises(ValidationError):
        store.add_usage("a", -1, 0)
    with pytest.raises(ValidationError):
        store.transition("a", "asleep")
    with pytest.raises(ValidationError):
        store.report("a", "working", "relative/dir")
    assert state(store) == before


def test_expected_revision_refuses_a_stale_write() -> None:
    store = Store()
    store.set(make_session("a").to_json(), 0)
    with pytest.raises(ConflictError, match="revision 1, not the expected 0"):
        store.set(make_session("a").to_json(), 0)
    assert store.set(make_session("a").to_json(), 1)[0] == 2


@pytest.mark.parametrize("kind", [EventKind.SET, EventKind.TRANSITION, EventKind.ADD_USAGE])
def test_every_change_carries_the_session_as_it_is_after_it(kind: EventKind) -> None:
    store = Store()
    store.set(make_session("a").to_json())
    if kind is EventKind.TRANSITION:
        store.transition("a", Status.ATTENTION)
    elif kind is EventKind.ADD_USAGE:
        store.add_usage("a", 5, 1)
    last = orjson.loads(store.changes(store.revision() - 1))["events"][-1]
    assert last["kind"] == kind.value
    assert last["session"] == orjson.loads(store.get("a") or b"")


def listed(store: Store) -> tuple[list[str], list[int], list[bytes]]:
    reply = store.list_all(None, 0)
    assert reply is not None
    ids, revisions = orjson.loads(reply[2])
    return ids, revisions, reply[3]


def test_the_cached_listing_follows_every_change() -> None:
    store = Store()
    for id in "abc":
        store.set(make_session(id).to_json())
    assert listed(store) == (["a", "b", "c"], [1, 2, 3], store.list_all())
    store.transition("b", Status.ATTENTION)
    store.remove("c")
    store.set(make_session("d").to_json())
    ids, revisions, datas = listed(store)
    assert (ids, revisions) == (["a", "b", "d"], [1, 4, 6])
    assert [public(data)["revision"] for data in datas] == revisions
    assert datas == store.list_all()
    assert store.list_all(store.epoch, store.revision()) is None


def test_a_restore_that_keeps_the_revision_is_listed() -> None:
    store = Store()
    assert listed(store) == ([], [], [])  # cached at revision 0
    assert store.restore(0, [make_session("a")], []) == []
    assert store.revision() == 0  # the sessions changed; the revision did not
    assert listed(store)[0] == ["a"]
