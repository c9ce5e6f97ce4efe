"""Store operations through a real manager process and a real client."""

from __future__ import annotations

import dataclasses
import threading
import time
from pathlib import Path

import orjson
import pytest
from helpers import BAD_CALLS, RawStore, StartServer, make_session, snapshot

import shmstore
from shmstore import ApiUsage, ConflictError, NotFoundError, Session, Status, ValidationError
from shmstore.record import pack, session_from_store


def test_create_read_update_delete(any_store: shmstore.Client) -> None:
    assert any_store.get("s1") is None
    created = any_store.set(make_session("s1", session_id="r1"))
    assert created.revision == 1
    assert any_store.get("s1") == created
    replaced = any_store.set(make_session("s1", working_dir="/elsewhere"))
    assert replaced.revision == 2
    assert any_store.get("s1") == replaced
    assert any_store.remove("s1") == replaced
    assert any_store.get("s1") is None
    assert any_store.remove("s1") is None
    assert any_store.revision() == 3


def test_list_all_returns_every_session(any_store: shmstore.Client) -> None:
    ids = {f"s{i}" for i in range(25)}
    for id in ids:
        any_store.set(make_session(id))
    assert {s.id for s in any_store.list_all()} == ids


def test_transition_records_history_and_durations(any_store: shmstore.Client) -> None:
    start = any_store.set(make_session("s1"))
    time.sleep(0.05)
    first = any_store.transition("s1", Status.ATTENTION)
    second = any_store.transition("s1", "question")
    third = any_store.transition("s1", Status.CLOSED)
    assert [(h.from_, h.to) for h in third.history] == [
        (Status.WORKING, Status.ATTENTION),
        (Status.ATTENTION, Status.QUESTION),
        (Status.QUESTION, Status.CLOSED),
    ]
    assert first.history[0].duration == pytest.approx(first.since - start.since, abs=0.002)
    assert first.history[0].duration >= 0.04
    assert second.since >= first.since
    assert third.since == third.history[-1].timestamp
    assert third.closed
    assert not second.closed
    assert third.revision == start.revision + 3


def test_add_usage_increments(any_store: shmstore.Client) -> None:
    any_store.set(make_session("s1"))
    any_store.add_usage("s1", 100, 20)
    assert any_store.add_usage("s1", input_tokens=1, output_tokens=2).api_usage == ApiUsage(101, 22)


def test_unknown_id_raises_not_found_and_changes_nothing(any_store: shmstore.Client) -> None:
    any_store.set(make_session("s1"))
    before = snapshot(any_store)
    with pytest.raises(NotFoundError, match="nope"):
        any_store.transition("nope", Status.WORKING)
    with pytest.raises(NotFoundError):
        any_store.add_usage("nope", 1, 1)
    assert snapshot(any_store) == before


def test_expected_revision_refuses_a_stale_write(any_store: shmstore.Client) -> None:
    seen = any_store.set(make_session("s1"))
    any_store.transition("s1", Status.ATTENTION)
    with pytest.raises(ConflictError, match="revision 2"):
        any_store.set(make_session("s1", working_dir="/stale"), expected_revision=seen.revision)
    with pytest.raises(ConflictError):
        any_store.set(make_session("s1"), expected_revision=0)
    current = any_store.get("s1")
    assert current is not None
    assert current.status is Status.ATTENTION
    assert any_store.set(make_session("s1"), expected_revision=current.revision).revision == 3
    assert any_store.set(make_session("new"), expected_revision=0).revision == 4


@pytest.mark.parametrize(("method", "args"), BAD_CALLS)
def test_invalid_input_is_refused_and_leaves_the_store_as_it_was(
    store: shmstore.Client, raw: RawStore, method: str, args: tuple[object, ...]
) -> None:
    store.set(make_session("s1"))
    store.add_usage("s1", 5, 5)
    before = snapshot(store)
    # Straight to the manager, past the client's own checks: the manager must refuse too.
    with pytest.raises(ValidationError):
        raw.call(method, *args)
    assert snapshot(store) == before


def test_client_refuses_non_sessions_and_bad_statuses(any_store: shmstore.Client) -> None:
    with pytest.raises(ValidationError, match="session"):
        any_store.set({"id": "x"})  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="status"):
        any_store.transition("s1", "bogus")
    assert any_store.revision() == 0


def test_every_field_round_trips_through_the_manager(sock_dir: object) -> None:
    # 3,000 history entries take ~210 KB of JSON: past the default record limit (16 KiB), so
    # this store is configured for them.
    config = shmstore.Store(max_history=3000, max_record_bytes=256 * 2**10)
    history = tuple(shmstore.StateTransition(1000.0 + k, Status.WORKING, Status.QUESTION, 0.5) for k in range(3000))
    session = Session(
        id="ünï-cødé-会话-🙂",
        working_dir="/home/dév/プロジェクト/with space",
        status=Status.QUESTION,
        since=4000.125,
        history=history,
        api_usage=ApiUsage(2**40, 7),
        session_id="resume-ü",
    )
    with (
        shmstore.start_server(f"{sock_dir}/r.sock", store=config) as server,
        shmstore.connect(server.address, server.authkey) as store,
    ):
        stored = store.set(session)
        assert stored == dataclasses.replace(session, revision=1)
        assert store.get(session.id) == stored
        assert store.list_all() == [stored]
        assert store.snapshot().sessions == (stored,)


def test_unchanged_sessions_are_decoded_once(any_store: shmstore.Client) -> None:
    any_store.set(make_session("s1"))
    first, again = any_store.get("s1"), any_store.get("s1")
    assert first is again  # the same frozen value, handed out twice
    assert any_store.list_all()[0] is first
    changed = any_store.transition("s1", Status.ATTENTION)
    assert any_store.get("s1") is changed
    assert changed is not first


def test_client_returns_copies_the_manager_does_not_share(any_store: shmstore.Client) -> None:
    session = any_store.set(make_session("s1"))
    mine = any_store.get("s1")
    assert mine == session
    assert mine is not session
    any_store.transition("s1", Status.ATTENTION)
    assert mine.status is Status.WORKING  # our copy is a value; it did not move


def test_one_client_shared_by_threads(any_store: shmstore.Client) -> None:
    any_store.set(make_session("s1"))
    errors: list[BaseException] = []

    def hammer() -> None:
        try:
            for _ in range(50):
                any_store.add_usage("s1", 1, 2)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=hammer) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert any_store.get("s1").api_usage == ApiUsage(300, 600)  # type: ignore[union-attr]


def test_history_is_bounded_by_max_history(start_server: StartServer) -> None:
    server = start_server(max_history=3)
    with shmstore.connect(server.address, server.authkey) as store:
        store.set(Session(id="s", working_dir="/"))
        for status in ["attention", "working", "question", "working", "closed"]:
            result = store.transition("s", status)
        assert [h.to for h in result.history] == [Status.QUESTION, Status.WORKING, Status.CLOSED]


# -- list_all: an unchanged listing costs a comparison; sessions decoded once per revision -------


def test_list_all_given_the_callers_current_revision_answers_unchanged(store: shmstore.Client, raw: RawStore) -> None:
    store.set(make_session("s1"))
    epoch, revision, index, datas = raw.call("list_all", None, 0)
    assert (epoch, revision) == (store.info()["epoch"], 1)
    assert orjson.loads(index) == [["s1"], [1]]
    assert [session_from_store(d).id for d in datas] == ["s1"]
    assert raw.call("list_all", epoch, revision) is None  # unchanged: nothing sent but None
    assert raw.call("list_all", "another-epoch", revision)[1] == revision  # another store: all of it
    store.transition("s1", Status.ATTENTION)
    _, after, index, _ = raw.call("list_all", epoch, revision)
    assert (after, orjson.loads(index)) == (2, [["s1"], [2]])
    assert raw.call("list_all") == [pack(store.get("s1"))]  # called bare, as before: the records


def test_list_all_refuses_a_bad_revision_or_epoch(raw: RawStore) -> None:
    for args, field in [((None, -1), "revision"), ((None, True), "revision"), ((7, 0), "epoch")]:
        with pytest.raises(ValidationError) as info:
            raw.call("list_all", *args)
        assert info.value.field == field


def test_list_all_returns_the_new_session_after_an_update_of_the_same_size(any_store: shmstore.Client) -> None:
    any_store.set(make_session("s1", working_dir="/src/one", since=100.0))  # a fixed time: a fixed size
    other = any_store.set(make_session("s2"))
    first, kept = sorted(any_store.list_all(), key=lambda s: s.id)  # listed in no set order
    updated = any_store.set(make_session("s1", working_dir="/src/two", since=100.0))
    assert len(updated.to_json()) == len(first.to_json())
    now, still = sorted(any_store.list_all(), key=lambda s: s.id)
    assert now == updated
    assert now.working_dir == "/src/two"
    assert still is kept  # unchanged (id, revision): the value decoded before
    assert kept == other


def test_list_all_unchanged_hands_out_the_same_sessions_in_a_new_list(any_store: shmstore.Client) -> None:
    any_store.set(make_session("s1"))
    first = any_store.list_all()
    again = any_store.list_all()
    assert again == first
    assert again is not first  # the caller may change its list
    assert again[0] is first[0]
    again.clear()
    assert any_store.list_all() == first


def test_list_all_after_a_manager_restart_lists_the_new_managers_sessions(start_server: StartServer) -> None:
    server = start_server("r.sock")
    client = shmstore.connect(server.address, server.authkey)
    try:
        client.set(make_session("s1", working_dir="/old"))
        assert [s.working_dir for s in client.list_all()] == ["/old"]
        server.stop()
        server = start_server("r.sock", server.authkey)  # a new epoch at the same address
        client.set(make_session("s1", working_dir="/new"))  # the same id at the same revision, 1
        assert [s.working_dir for s in client.list_all()] == ["/new"]
    finally:
        client.close()


class _StoreBeforeListings(shmstore.Store):
    """A manager's store from before ``list_all`` took the caller's epoch and revision."""

    def list_all(self) -> list[bytes]:  # type: ignore[override]
        return super().list_all()


def test_list_all_works_with_a_manager_from_before_listings(sock_dir: Path) -> None:
    with (
        shmstore.start_server(sock_dir / "old.sock", store=_StoreBeforeListings()) as server,
        shmstore.connect(server.address, server.authkey) as store,
    ):
        store.set(make_session("s1"))
        assert [s.id for s in store.list_all()] == ["s1"]
        assert [s.id for s in store.list_all()] == ["s1"]


class _StoreBeforeRecords(shmstore.Store):
    """A manager from before the compact record: its set() takes only public JSON."""

    def set(self, data: bytes, expected_revision: int | None = None) -> tuple[int, int | None]:
        if isinstance(data, bytes) and data[:1] == b"[":
            raise ValidationError("session", "must be a JSON object, not list")
        return super().set(data, expected_revision)


def test_a_client_sets_a_session_on_a_manager_from_before_records(sock_dir: Path) -> None:
    server = shmstore.start_server(sock_dir / "old.sock", store=_StoreBeforeRecords())
    with server, shmstore.connect(server.address, server.authkey) as client:
        stored = client.set(make_session("s1", session_id="r1"))
        assert client.get("s1") == stored
        with pytest.raises(ValidationError, match="history"):
            client.set(make_session("s2", history=tuple(make_history(30))))  # other refusals still raise


def make_history(count: int) -> list[shmstore.StateTransition]:
    return [shmstore.StateTransition(float(k), Status.WORKING, Status.QUESTION, 1.0) for k in range(count)]
