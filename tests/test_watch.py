"""The change feed: snapshot, changes, and the lossless watch, across real processes."""

from __future__ import annotations

import contextlib
import random
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import multiprocess
import orjson
import pytest
from helpers import PYTHON, RawStore, StartServer, make_session

import shmstore
from shmstore import EventKind, ResyncRequiredError, Status, ValidationError


def test_snapshot_and_changes(store: shmstore.Client) -> None:
    assert store.snapshot().revision == 0
    assert store.snapshot().sessions == ()
    store.set(make_session("a"))
    snap = store.snapshot()
    store.transition("a", Status.ATTENTION)
    store.add_usage("a", 1, 2)
    store.set(make_session("b"))
    store.remove("b")
    changes = store.changes(snap.revision)
    assert changes.epoch == snap.epoch
    assert [(e.revision, e.kind, e.id) for e in changes.events] == [
        (2, EventKind.TRANSITION, "a"),
        (3, EventKind.ADD_USAGE, "a"),
        (4, EventKind.SET, "b"),
        (5, EventKind.REMOVE, "b"),
    ]
    assert changes.events[0].session is not None
    assert changes.events[0].session.status is Status.ATTENTION
    assert changes.events[1].session is not None
    assert changes.events[1].session.revision == 3
    assert changes.events[3].session is None
    assert store.changes(5).events == ()


def test_changes_waits_for_a_write_and_wakes_promptly(store: shmstore.Client, server: Any) -> None:
    started = time.monotonic()
    assert store.changes(0, timeout=0.3).events == ()
    assert time.monotonic() - started >= 0.25

    def write_soon() -> None:
        time.sleep(0.2)
        with shmstore.connect(server.address, server.authkey) as writer:
            writer.set(make_session("late"))

    threading.Thread(target=write_soon).start()
    started = time.monotonic()
    events = store.changes(0, timeout=20).events
    assert [e.id for e in events] == ["late"]
    assert time.monotonic() - started < 5  # woken by the write, not by the timeout


def test_changes_refuses_what_it_cannot_answer(start_server: StartServer) -> None:
    small = start_server(log_size=4)
    with shmstore.connect(small.address, small.authkey) as store:
        for n in range(10):
            store.set(make_session(f"s{n}"))
        with pytest.raises(ResyncRequiredError, match="left the log"):
            store.changes(2)
        assert [e.revision for e in store.changes(6).events] == [7, 8, 9, 10]
        with pytest.raises(ResyncRequiredError, match="ahead"):
            store.changes(11)
        with pytest.raises(ResyncRequiredError, match="restarted"):
            store.changes(10, epoch="someone-else")
        with RawStore(small.address, small.authkey) as raw:
            for bad in [(-1,), (0, -1.0), (0, 1000.0), (0, "soon"), ("0",), (0, 0.0, 42)]:
                with pytest.raises(ValidationError):
                    raw.call("changes", *bad)


def test_blocked_watchers_do_not_hold_up_writers(server: Any) -> None:
    watchers = [shmstore.connect(server.address, server.authkey) for _ in range(4)]
    woken = []

    def wait(client: shmstore.Client) -> None:
        woken.append(len(client.changes(client.revision(), timeout=30).events))

    threads = [threading.Thread(target=wait, args=(w,)) for w in watchers]
    for t in threads:
        t.start()
    time.sleep(0.2)  # let every watcher block in the manager
    started = time.monotonic()
    with shmstore.connect(server.address, server.authkey) as writer:
        writer.set(make_session("w"))
        for n in range(200):
            writer.transition("w", Status.ATTENTION if n % 2 else Status.WORKING)
    assert time.monotonic() - started < 10  # had waiters held the lock, this would take 30 s
    for t in threads:
        t.join(10)
    assert len(woken) == 4
    assert all(n >= 1 for n in woken)


def _writer(address: Any, authkey: bytes, seed: int, rounds: int) -> None:
    rng = random.Random(seed)
    with shmstore.connect(address, authkey) as store:
        for _ in range(rounds):
            id = f"s{rng.randrange(4)}"
            roll = rng.random()
            if roll < 0.1:
                store.remove(id)
            elif roll < 0.3 or store.get(id) is None:
                store.set(make_session(id, working_dir=f"/w/{seed}"))
            else:
                try:
                    if roll < 0.7:
                        store.transition(id, rng.choice([Status.WORKING, Status.ATTENTION, Status.QUESTION]))
                    else:
                        store.add_usage(id, 2, 1)
                except shmstore.NotFoundError:
                    pass  # removed by another writer in between


def _subscriber(address: Any, authkey: bytes, ready: Any, stop_at: Any, out: Any) -> None:
    seen: list[int] = []
    with shmstore.connect(address, authkey) as store, store.watch(poll=0.2) as watch:
        first = next(watch)
        ready.set()
        last = first.revision
        while not (stop_at.value and last >= stop_at.value):
            event = watch.poll(0.2)
            if event is not None:
                seen.append(event.revision)
                last = event.revision
        out.put((first.revision, seen, {id: s.to_json() for id, s in watch.sessions.items()}, watch.snapshots))


def test_watch_follows_many_writers_losslessly(start_server: StartServer) -> None:
    # A log that holds every event of the test (at most 600): following it must then be
    # lossless with one snapshot however slowly the subscriber is scheduled. Falling behind
    # a shorter log is a resync by design, tested below; with the default 256 events, a
    # loaded CI machine once made this subscriber resync.
    server = start_server(max_history=10_000, log_size=1024)
    ctx = multiprocess.get_context("fork")
    ready, stop_at, out = ctx.Event(), ctx.Value("q", 0), ctx.Queue()
    with shmstore.connect(server.address, server.authkey) as store:
        subscriber = ctx.Process(target=_subscriber, args=(server.address, server.authkey, ready, stop_at, out))
        subscriber.start()
        assert ready.wait(30)
        writers = [ctx.Process(target=_writer, args=(server.address, server.authkey, n, 120)) for n in range(5)]
        for p in writers:
            p.start()
        for p in writers:
            p.join(60)
            assert p.exitcode == 0
        final = store.snapshot()
        stop_at.value = final.revision
        start, seen, state, snapshots = out.get(timeout=60)
        subscriber.join(10)
    assert snapshots == 1
    assert seen == list(range(start + 1, final.revision + 1))  # in order, no gap, no duplicate
    assert len(seen) >= 5 * 120 * 0.9  # nearly every round writes (a few find their session just removed)
    assert state == {s.id: s.to_json() for s in final.sessions}


def test_watch_that_falls_behind_a_small_log_resyncs(start_server: StartServer) -> None:
    server = start_server(log_size=4)
    with shmstore.connect(server.address, server.authkey) as store:
        watch = store.watch()
        assert next(watch).kind is EventKind.SNAPSHOT
        for n in range(30):
            store.set(make_session(f"s{n % 3}", working_dir=f"/v/{n}"))
        event = next(watch)  # the log moved on by 30 events; the watch starts again from a snapshot
        assert event.kind is EventKind.SNAPSHOT
        assert event.revision == 30
        assert watch.snapshots == 2
        store.transition("s1", Status.CLOSED)
        event = next(watch)
        assert (event.kind, event.revision, event.id) == (EventKind.CLOSE, 31, "s1")
        assert "s1" not in watch.sessions  # it left the live sessions
        assert watch.sessions == {s.id: s for s in store.snapshot().sessions}
        watch.close()
        assert list(watch) == []


def test_watch_resyncs_after_a_manager_restart(sock_dir: Path) -> None:
    path = sock_dir / "r.sock"
    with contextlib.ExitStack() as stack:  # the client outlives the first manager
        with shmstore.start_server(path, authkey=b"k") as server:
            store = stack.enter_context(shmstore.connect(path, b"k"))
            watch = store.watch(poll=0.1)
            next(watch)
            for n in range(5):
                store.set(make_session(f"s{n}"))
            assert [next(watch).revision for _ in range(5)] == [1, 2, 3, 4, 5]
            server.stop()
            with pytest.raises(shmstore.StoreUnavailableError):
                next(watch)  # the subscriber is told; it is never silently stale
        with shmstore.start_server(path, authkey=b"k"):
            for n in range(7):  # the new store passes the old revision: only the epoch tells
                store.set(make_session(f"new{n}"))
            event = next(watch)
            assert event.kind is EventKind.SNAPSHOT
            assert event.revision == 7
            assert set(watch.sessions) == {f"new{n}" for n in range(7)}


def test_cli_watch_prints_events(server: Any) -> None:
    proc = subprocess.Popen(
        [PYTHON, "-m", "shmstore", "watch", "--json", "--limit", "3", "--address", str(server.address)],
        stdout=subprocess.PIPE,
        text=True,
    )
    first = orjson.loads(proc.stdout.readline())  # type: ignore[union-attr]
    assert first == {"revision": 0, "kind": "snapshot", "sessions": []}
    with shmstore.connect(server.address, server.authkey) as store:
        store.set(make_session("cli"))
        store.transition("cli", Status.QUESTION)
    out, _ = proc.communicate(timeout=20)
    lines = [orjson.loads(line) for line in out.splitlines()]
    assert [(e["revision"], e["kind"], e["id"]) for e in lines] == [(1, "set", "cli"), (2, "transition", "cli")]
    assert lines[1]["session"]["status"] == "question"
    assert proc.returncode == 0
