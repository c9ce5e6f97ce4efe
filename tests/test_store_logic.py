"""The store's logic, called directly through the written protocol (:class:`Backend`): the
manager's Store in-process, and the Redis backend on the worker's redis-server, each test
on both, so that the two cannot drift apart. Transport, concurrency and faults are tested
against real manager processes elsewhere."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

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
from shmstore.backend import Backend
from shmstore.config import Limits
from shmstore.feed import Snapshot
from shmstore.record import public_json
from shmstore.rules import LATE_WINDOW
from shmstore.store import Store

MakeBackend = Callable[..., Backend]


@pytest.fixture(params=["manager", "redis"])
def make(request: pytest.FixtureRequest) -> Iterator[MakeBackend]:
    """Makes a backend with the limits given (each a store of its own): the manager's Store,
    in this process, or a RedisStore on a namespace of its own in the worker's Redis."""
    made: list[Any] = []

    def backend(**limits: Any) -> Backend:
        if request.param == "manager":
            return Store(**limits)
        from shmstore.redis.address import parse_redis
        from shmstore.redis.store import RedisStore

        url = request.getfixturevalue("redis_socket")
        store = RedisStore(
            parse_redis(f"redis+unix://{url}?namespace=t-{uuid.uuid4().hex[:12]}"), 10.0, Limits(**limits)
        )
        made.append(store)
        return store

    yield backend
    for store in made:
        store.close()


def public(data: bytes | None) -> dict[str, object]:
    """A stored session as its public JSON, decoded."""
    assert data is not None
    decoded: dict[str, object] = orjson.loads(public_json(data))
    return decoded


def kinds(store: Backend, after: int = 0) -> list[str]:
    return [event["kind"] for event in orjson.loads(store.changes(after))["events"]]


def state(store: Backend) -> tuple[int, list[bytes], list[bytes]]:
    return store.revision(), sorted(store.list_all()), store.recently_closed()


def test_set_get_remove_and_each_is_one_revision_and_one_event(make: MakeBackend) -> None:
    store = make()
    revision, _ = store.set(make_session("a").to_json())
    assert revision == 1
    assert public(store.get("a"))["revision"] == 1
    assert public(store.remove("a"))["id"] == "a"
    assert store.get("a") is None
    assert store.remove("a") is None  # nothing to remove: no event either
    assert kinds(store) == ["set", "remove"]


def test_a_transition_records_where_it_came_from_and_how_long_it_stayed(make: MakeBackend) -> None:
    store = make()
    store.set(make_session("a", since=1_795_000_000.0).to_json())
    moved = public(store.transition("a", Status.ATTENTION))
    (entry,) = moved["history"]  # type: ignore[misc]
    assert (entry["from"], entry["to"]) == ("working", "attention")
    assert entry["duration"] == pytest.approx(moved["since"] - 1_795_000_000.0, abs=0.002)
    assert moved["status"] == "attention"


def test_a_report_creates_then_moves_and_a_repeat_only_counts_as_activity(make: MakeBackend) -> None:
    store = make()
    created = public(store.report("a", "working", "/src/app"))
    assert (created["status"], created["history"]) == ("working", [])
    again = public(store.report("a", "working", "/src/app"))
    assert again["history"] == []
    assert again["last_activity"] >= created["last_activity"]  # type: ignore[operator]
    moved = public(store.report("a", "question", "/src/app"))
    assert [h["to"] for h in moved["history"]] == ["question"]  # type: ignore[union-attr]
    assert kinds(store) == ["report", "report", "report"]


def test_closing_moves_a_session_to_the_recently_closed_and_a_report_resumes_it(make: MakeBackend) -> None:
    store = make()
    store.report("a", "working", "/src/app", session_id="resume-a")
    store.transition("a", Status.CLOSED)
    assert store.list_all() == []
    assert [public(d)["id"] for d in store.recently_closed()] == ["a"]
    assert public(store.get("a"))["closed"] is True  # get finds it still
    store.report("a", "attention", "/src/app")
    assert [public(d)["id"] for d in store.list_all()] == ["a"]
    assert store.recently_closed() == []
    assert kinds(store) == ["report", "close", "report"]


def test_a_session_silent_past_stale_after_is_marked_once_and_waiting_ones_never(make: MakeBackend) -> None:
    store = make(stale_after=0.0)
    store.report("busy", "working", "/a")
    store.report("asking", "question", "/b")
    assert store.reap() == 1
    assert public(store.get("busy"))["stale"] is True
    assert public(store.get("asking"))["stale"] is False
    assert store.reap() == 0  # already marked
    store.report("busy", "working", "/a")
    assert public(store.get("busy"))["stale"] is False  # activity clears it


def test_changes_follow_revisions_and_refuse_what_they_cannot_answer(make: MakeBackend) -> None:
    store = make(log_size=4)
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


def test_a_snapshot_holds_the_live_sessions_at_one_revision(make: MakeBackend) -> None:
    store = make()
    store.set(make_session("a").to_json())
    store.set(make_session("b").to_json())
    store.transition("b", Status.CLOSED)
    snapshot = Snapshot.from_json(store.snapshot())
    assert (snapshot.revision, [s.id for s in snapshot.sessions]) == (3, ["a"])
    assert snapshot.epoch.partition(".")[0] == store.info()["epoch"]  # Redis adds its place: EPOCH.MARK


def test_prune_forgets_only_the_closed_sessions_old_enough(make: MakeBackend) -> None:
    store = make()
    store.report("a", "working", "/a")
    store.transition("a", Status.CLOSED)
    assert store.prune(3600.0) == 0
    assert store.prune(0.0) == 1
    assert store.get("a") is None
    assert kinds(store)[-1] == "remove"


def test_a_full_store_refuses_a_new_session_and_changes_nothing(make: MakeBackend) -> None:
    store = make(max_sessions=2)
    store.set(make_session("a").to_json())
    store.set(make_session("b").to_json())
    before = state(store)
    with pytest.raises(StoreFullError) as full:
        store.report("c", "working", "/c")
    assert full.value.limit == "max_sessions"
    assert state(store) == before
    store.set(make_session("a", working_dir="/elsewhere").to_json())  # replacing one is fine


def test_unknown_ids_and_bad_values_change_nothing(make: MakeBackend) -> None:
    store = make()
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


def test_expected_revision_refuses_a_stale_write(make: MakeBackend) -> None:
    store = make()
    store.set(make_session("a").to_json(), 0)
    with pytest.raises(ConflictError, match="revision 1, not the expected 0"):
        store.set(make_session("a").to_json(), 0)
    assert store.set(make_session("a").to_json(), 1)[0] == 2


@pytest.mark.parametrize("kind", [EventKind.SET, EventKind.TRANSITION, EventKind.ADD_USAGE])
def test_every_change_carries_the_session_as_it_is_after_it(make: MakeBackend, kind: EventKind) -> None:
    store = make()
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


# -- late reports: events applied in any order leave the status of the newest ----------------


def test_a_report_of_an_older_event_only_counts_as_activity(make: MakeBackend) -> None:
    store = make()
    store.report("a", "working", "/a", at=100.0)  # the prompt
    store.report("a", "attention", "/a", at=102.0)  # the turn's end
    late = public(store.report("a", "working", "/a", at=101.0))  # a tool call's, overtaken
    assert late["status"] == "attention"
    assert [h["to"] for h in late["history"]] == ["attention"]  # type: ignore[union-attr]
    assert late["last_event"] == 102.0
    assert public(store.report("a", "question", "/a", at=103.0))["status"] == "question"


# The end comes after its session's first event: an end the store meets before any event of
# its session is taken for one that never started (as Claude Code's agent view ends), and
# makes nothing.
@pytest.mark.parametrize("order", [(0, 1, 2, 3), (2, 1, 0, 3), (1, 3, 0, 2), (2, 0, 3, 1), (0, 3, 2, 1)])
def test_the_same_events_in_any_order_end_in_the_status_of_the_newest(
    make: MakeBackend, order: tuple[int, ...]
) -> None:
    events = [("attention", 10.0), ("working", 11.0), ("question", 12.0), ("closed", 13.0)]
    store = make()
    for k in order:
        status, at = events[k]
        store.report("a", status, "/a", at=at, reason="prompt_input_exit" if status == "closed" else None)
    final = public(store.get("a"))
    assert (final["status"], final["last_event"], final["closed_reason"]) == (
        "closed",
        13.0,
        "session_end:prompt_input_exit",
    )


def test_a_late_report_never_reopens_a_closed_session(make: MakeBackend) -> None:
    store = make()
    store.report("a", "working", "/a", at=10.0)
    store.report("a", "closed", "/a", at=12.0)
    assert public(store.report("a", "working", "/a", at=11.0))["status"] == "closed"
    assert store.list_all() == []
    assert public(store.report("a", "attention", "/a", at=13.0))["status"] == "attention"  # resumed, truly later


def test_a_report_without_an_event_time_is_applied_as_it_comes(make: MakeBackend) -> None:
    store = make()
    store.report("a", "attention", "/a", at=50.0)
    assert public(store.report("a", "working", "/a"))["status"] == "working"
    assert public(store.get("a"))["last_event"] == 50.0


def test_an_event_far_older_than_the_last_is_a_clock_that_stepped_back_and_is_applied(make: MakeBackend) -> None:
    """A report older than the last event by more than LATE_WINDOW is taken as the agent's
    clock having stepped back (NTP): applied, so the status does not freeze until the clock
    catches up; and an event time far in the future does not freeze it for good."""
    store = make()
    store.report("a", "working", "/a", at=10_000.0)
    assert public(store.report("a", "attention", "/a", at=10_000.0 - 2 * LATE_WINDOW))["status"] == "attention"
    store.report("b", "working", "/b", at=time.time() + 80_000)  # a day ahead, at most
    assert public(store.report("b", "question", "/b", at=time.time()))["status"] == "question"


def test_a_subagents_work_never_takes_a_session_from_the_user(make: MakeBackend) -> None:
    """Claude's Stop comes while a background subagent still works: the user has the prompt
    (attention), and the subagent's events (working) leave it so; the main agent's own
    next event moves it as ever."""
    store = make()
    store.report("a", "working", "/a")
    store.report("a", "attention", "/a")  # the main agent's Stop
    for _ in range(3):
        store.report("a", "working", "/a", subagent="sub1")
    assert public(store.get("a"))["status"] == "attention"
    assert public(store.report("a", "working", "/a"))["status"] == "working"  # the main agent's turn
    assert [h["to"] for h in public(store.get("a"))["history"]] == ["attention", "working"]  # type: ignore[union-attr]


def test_a_subagents_question_is_ended_only_by_that_subagent(make: MakeBackend) -> None:
    store = make()
    store.report("a", "working", "/a")
    asked = public(store.report("a", "question", "/a", subagent="sub1"))
    assert (asked["status"], asked["asked_by"]) == ("question", "sub1")
    assert public(store.report("a", "working", "/a", subagent="sub2"))["status"] == "question"  # another's work
    answered = public(store.report("a", "working", "/a", subagent="sub1"))
    assert (answered["status"], answered["asked_by"]) == ("working", None)
    store.report("a", "question", "/a")  # the main agent asks
    assert public(store.report("a", "working", "/a", subagent="sub1"))["status"] == "question"


def test_the_end_of_a_session_the_store_does_not_hold_makes_nothing(make: MakeBackend) -> None:
    store = make()
    revision = store.revision()
    assert store.report("ghost", "closed", "/a", reason="other") is None
    assert (store.get("ghost"), store.revision(), store.list_all()) == (None, revision, [])


def test_a_background_sessions_short_id_is_kept(make: MakeBackend) -> None:
    store = make()
    store.report("abc12345-0000", "working", "/a", background="abc12345")
    assert public(store.report("abc12345-0000", "attention", "/a"))["background"] == "abc12345"


def test_a_late_report_of_the_agent_whose_death_closed_the_session_does_not_bring_it_back(make: MakeBackend) -> None:
    """A report its agent fired before dying, delivered after the reaper closed the session
    (from the spool, or by a manager that was hung), must not reopen it: a ghost. The same
    session in a new agent process (a resume, a respawn) does come back."""
    import subprocess
    import sys

    from shmstore import procs

    store = make()
    agent = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    start = procs.process_start(agent.pid)
    store.report("a", "working", "/a", pid=agent.pid, pid_start=start, at=10.0)
    agent.kill()
    agent.wait()
    store.reap()
    assert (public(store.get("a"))["status"], public(store.get("a"))["closed_reason"]) == ("closed", "agent_gone")
    late = public(store.report("a", "attention", "/a", pid=agent.pid, pid_start=start, at=11.0))
    assert (late["status"], late["closed_reason"]) == ("closed", "agent_gone")
    back = public(store.report("a", "attention", "/a", pid=os.getpid(), at=12.0))  # a new process: it is back
    assert back["status"] == "attention"


def test_where_the_agent_runs_is_kept_until_a_report_names_another(make: MakeBackend) -> None:
    store = make()
    here = ["%3", "/tmp/tmux-1000/default", "/dev/pts/4", None, None, None]
    store.report("a", "working", "/a", terminal=here)
    assert public(store.report("a", "attention", "/a"))["terminal"]["tmux_pane"] == "%3"
    there = ["%9", "/tmp/tmux-1000/work", None, None, None, None]
    assert public(store.report("a", "working", "/a", terminal=there))["terminal"]["tmux_pane"] == "%9"


@pytest.mark.parametrize(
    "terminal",
    [["%3"], [None] * 6, ["3", None, None, None, None, None], [None, "relative/sock", None, None, None, None], "%3"],
    ids=["too-short", "names-nothing", "not-a-pane", "relative-socket", "not-a-list"],
)
def test_a_bad_terminal_is_refused_and_the_store_left_as_it_was(make: MakeBackend, terminal: object) -> None:
    store = make()
    store.report("a", "working", "/a")
    revision, before = store.revision(), store.get("a")
    with pytest.raises(ValidationError, match="terminal"):
        store.report("a", "attention", "/a", terminal=terminal)  # type: ignore[arg-type]
    assert (store.revision(), store.get("a")) == (revision, before)
