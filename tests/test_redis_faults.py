"""The Redis backend under faults, each against a redis-server of the test's own that the test
stops, starts again or changes (issue #23)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shmstore import Client, ShmstoreError, StoreUnavailableError
from shmstore.config import Limits

if shutil.which("redis-server") is None:
    if os.environ.get("CI") == "true":
        raise RuntimeError("redis-server is not installed (.ci/run installs Debian's redis-server)")
    pytest.skip("redis-server is not installed", allow_module_level=True)

from shmstore.redis.address import parse_redis
from shmstore.redis.store import RedisStore


class RedisServer:
    """A redis-server on a unix socket in ``directory``, with an append-only file synced at
    every write, so that a stop and a start lose nothing."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = str(directory / "r.sock")
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, appendonly: bool = True) -> None:
        options = ["--port", "0", "--unixsocket", self.path, "--unixsocketperm", "700", "--dir", str(self.directory)]
        options += ["--save", "", "--appendonly", "yes" if appendonly else "no", "--appendfsync", "always"]
        self.process = subprocess.Popen(
            ["redis-server", *options], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 10
        while not self._listening():  # its socket file comes before its listen(): refused in between
            assert self.process.poll() is None, "redis-server exited"
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.02)

    def _listening(self) -> bool:
        with socket.socket(socket.AF_UNIX) as probe:
            try:
                probe.connect(self.path)
            except OSError:
                return False
            return True

    def stop(self) -> None:
        if self.process is not None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(10)
            self.process = None


@pytest.fixture
def redis(tmp_path: Path) -> RedisServer:
    server = RedisServer(tmp_path)
    server.start()
    yield server  # type: ignore[misc]
    server.stop()


def test_the_reaper_rides_out_a_redis_restart_and_its_hosts_sessions_stay(redis: RedisServer) -> None:
    """A Redis restart of a second with nothing lost: the reaper says the store is away,
    tries again, says it is back, and goes on renewing its host's lease; the host's live
    session is untouched. (It exited with 3 at the first error, and its lease lapsed.)"""
    url = f"redis+unix://{redis.path}?namespace=faults"
    setup = RedisStore(parse_redis(url), 10.0, Limits(reap_interval=0.5))  # the namespace's limits: a fast reaper
    agent = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    reaper = subprocess.Popen(
        [sys.executable, "-m", "shmstore", "reaper", "--address", url], stderr=subprocess.PIPE, text=True
    )
    try:
        setup.report("s1", "working", "/src/app", pid=agent.pid)
        setup.close()
        time.sleep(1.5)  # a few passes
        redis.stop()
        time.sleep(1.0)  # passes against no Redis at all
        assert reaper.poll() is None
        redis.start()
        time.sleep(2.0)  # passes again
        assert reaper.poll() is None, reaper.communicate()[1]
    finally:
        reaper.terminate()
        _, said = reaper.communicate(timeout=30)
        agent.kill()
        agent.wait()
    assert "the store is away" in said, said
    assert "the store is back" in said, said
    with Client(url) as store:
        session = store.get("s1")
        assert session is not None
        assert (session.status, session.closed_reason) == ("working", None)


def test_the_reaper_once_still_fails_when_the_store_is_away(tmp_path: Path) -> None:
    url = f"redis+unix://{tmp_path / 'none.sock'}?namespace=faults"
    ran = subprocess.run(
        [sys.executable, "-m", "shmstore", "reaper", "--once", "--address", url],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ran.returncode == 3, ran.stderr  # a single pass says the store was away, in its exit code
    with pytest.raises(StoreUnavailableError):
        Client(url, timeout=1).list_all()


def test_a_lost_revisions_key_is_a_damaged_namespace_at_once(redis: RedisServer) -> None:
    """With the namespace's revisions key deleted or evicted, a write to an existing session
    looped at full speed until its deadline (5,831 script calls in 2 s) and failed as "the
    session kept changing"; now it is the typed "damaged" error at once, and nothing changes."""
    store = RedisStore(parse_redis(f"redis+unix://{redis.path}?namespace=revs"), 5.0)
    try:
        store.report("s1", "working", "/src/app")
        revs = store._keys[4]
        assert revs.endswith("revs")
        store._redis.delete(revs)
        before = store.get("s1"), store.revision()
        started = time.monotonic()
        with pytest.raises(ShmstoreError, match="damaged: the key of its sessions' revisions is gone"):
            store.transition("s1", "attention")
        assert time.monotonic() - started < 1.0
        assert (store.get("s1"), store.revision()) == before
    finally:
        store.close()


def test_a_write_the_acl_refuses_changes_nothing_and_is_not_tried_again(redis: RedisServer) -> None:
    """An ACL user without +xadd: the write failed at XADD inside the script, after the
    session was changed (a script is not undone), and the client tried it again as if the
    connection broke: the session ended two revisions on, with no event, while the caller
    was told it failed. Now the script checks its commands before its first change."""
    url = f"redis+unix://{redis.path}?namespace=acl"
    admin = RedisStore(parse_redis(url), 5.0)
    try:
        admin.report("s1", "working", "/src/app")
        admin._redis.execute_command("ACL", "SETUSER", "noxadd", "on", ">secret", "~*", "+@all", "-xadd")
        before = admin.get("s1"), admin.revision(), admin._redis.xlen(admin._keys[5])
        with Client(f"redis+unix://noxadd:secret@{redis.path}?namespace=acl", timeout=5) as limited:
            with pytest.raises(StoreUnavailableError, match=r"NOPERM.*XADD"):
                limited.transition("s1", "attention")
            with pytest.raises(StoreUnavailableError, match=r"NOPERM.*XADD"):
                limited.report("s2", "working", "/src/other")
            with pytest.raises(StoreUnavailableError, match=r"NOPERM.*XADD"):
                limited.remove("s1")
        assert (admin.get("s1"), admin.revision(), admin._redis.xlen(admin._keys[5])) == before
        assert admin.get("s2") is None
    finally:
        admin.close()


@pytest.mark.parametrize("command", ["reaper", "watch", "top"])
def test_a_long_running_command_refuses_a_password_on_its_command_line(command: str, tmp_path: Path) -> None:
    """`ps` shows every user a command line for as long as the command runs."""
    url = f"redis+unix://user:s3cret-pass@{tmp_path / 'r.sock'}?namespace=x"
    ran = subprocess.run(
        [sys.executable, "-m", "shmstore", command, "--address", url], capture_output=True, text=True, timeout=60
    )
    assert ran.returncode == 2, ran.stderr
    assert "password_file" in ran.stderr
    assert "s3cret-pass" not in ran.stderr + ran.stdout


def test_a_reaper_given_its_password_by_the_environment_shows_none_in_ps(redis: RedisServer) -> None:
    admin = RedisStore(parse_redis(f"redis+unix://{redis.path}?namespace=pw"), 5.0)
    admin._redis.config_set("requirepass", "s3cret-pass")
    admin.close()
    env = {**os.environ, "SHMSTORE_REDIS_PASSWORD": "s3cret-pass"}
    reaper = subprocess.Popen(
        [sys.executable, "-m", "shmstore", "reaper", "--address", f"redis+unix://{redis.path}?namespace=pw"],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(1.0)
        assert reaper.poll() is None
        assert b"s3cret-pass" not in Path(f"/proc/{reaper.pid}/cmdline").read_bytes()
    finally:
        reaper.terminate()
        _, said = reaper.communicate(timeout=30)
    assert "away" not in said, said  # it got in, with the password from its environment


def test_the_hook_ends_by_its_budget_against_a_paused_redis(redis: RedisServer) -> None:
    """One deadline over importing the Redis client, connecting and every read: against a
    paused Redis the hook took 1.12-1.23 s (each part had a timeout of its own)."""
    import json

    url = f"redis+unix://{redis.path}?namespace=hook"
    payload = {"session_id": "h1", "cwd": "/src/app", "hook_event_name": "Stop"}
    assert redis.process is not None
    redis.process.send_signal(signal.SIGSTOP)
    try:
        started = time.monotonic()
        ran = subprocess.run(
            [sys.executable, "-m", "shmstore", "hook", "--address", url],
            input=json.dumps(payload).encode(),
            capture_output=True,
            timeout=30,
        )
        took = time.monotonic() - started
    finally:
        redis.process.send_signal(signal.SIGCONT)
    assert ran.returncode == 0
    assert b"did not answer in time" in ran.stderr
    assert took < 1.0, took  # 0.9 s from its start (0.75 given to Redis), and the exit


def test_a_session_set_by_a_host_whose_clock_runs_ahead_is_judged_by_redis_clock(redis: RedisServer) -> None:
    """A session written with set() by a host an hour ahead had its last activity in every
    reaper's future: never closed as host_gone. Its activity is Redis's clock at the latest."""
    from shmstore import Session
    from shmstore.record import session_from_store

    url = f"redis+unix://{redis.path}?namespace=clock"
    store = RedisStore(parse_redis(url), 5.0)
    try:
        ahead = time.time() + 3600
        session = Session(id="s1", working_dir="/src/app", since=ahead, last_activity=ahead)
        store.set(session.to_json())
        stored = session_from_store(store.get("s1"))
        assert stored.last_activity is not None
        assert stored.last_activity <= store._time()
    finally:
        store.close()


def test_a_feed_past_the_revision_is_damage_readers_are_told_of_never_replayed(redis: RedisServer) -> None:
    """With the namespace's meta key deleted while its feed kept revisions 1..N, reads made
    meta anew at revision 0 under a new epoch, and changes(0) handed the old events out as
    new (6 snapshots and 34 old events replayed in one run). Now every read says the
    namespace is damaged, and a follower stops on it instead of replaying."""
    from shmstore import EventKind, Follower

    url = f"redis+unix://{redis.path}?namespace=meta"
    store = RedisStore(parse_redis(url), 5.0)
    try:
        for n in range(3):
            store.report(f"s{n}", "working", "/src/app")
        store._redis.delete(store._keys[0])  # meta
        for read in (lambda: store.changes(0), lambda: store.list_all(None, 0), store.snapshot, store.revision):
            with pytest.raises(ShmstoreError, match="damaged: its feed reaches 3-"):
                read()
    finally:
        store.close()
    with Client(url, timeout=5) as client:
        with pytest.raises(ShmstoreError, match="damaged"):
            client.changes(0)
        events: list[object] = []
        with pytest.raises(ShmstoreError, match="damaged"):
            _follow(Follower(client), events)
        assert not [event for event in events if getattr(event, "kind", None) is EventKind.REPORT]  # none replayed


def _follow(follower: object, into: list[object]) -> None:
    for event in follower:  # type: ignore[attr-defined]
        into.append(event)


def test_a_redis_gone_back_to_an_older_snapshot_is_noticed_by_a_follower(redis: RedisServer) -> None:
    """Redis restarted from an older snapshot (two writes lost), then new writes took the
    revision past the follower's: the follower missed changes and kept a session that no
    longer existed, with no resync. Now the feed's event at the follower's revision is
    another one (another mark), and it resyncs to exactly what the store holds."""
    from shmstore.clients.client import Watch

    url = f"redis+unix://{redis.path}?namespace=rollback"
    store = RedisStore(parse_redis(url), 5.0)
    try:
        store.report("kept", "working", "/src/app")
        store._redis.save()  # the snapshot Redis goes back to: revision 1
        shutil.copy(redis.directory / "dump.rdb", redis.directory / "older.rdb")
        store.report("lost", "working", "/src/app")  # revision 2: lost in the rollback
        store.transition("kept", "attention")  # revision 3: lost too
    finally:
        store.close()
    with Client(url, timeout=5) as client:
        watch = Watch(client)
        while watch.poll(0.5) is not None:
            pass
        assert (watch.revision, sorted(watch.sessions)) == (3, ["kept", "lost"])
        redis.stop()
        for name in os.listdir(redis.directory):
            if name.startswith("appendonly") or name == "dump.rdb":
                path = redis.directory / name
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        shutil.copy(redis.directory / "older.rdb", redis.directory / "dump.rdb")
        redis.start(appendonly=False)
        assert client.snapshot().revision == 1  # gone back
        for n in range(3):  # revisions 2, 3, 4: past the follower's
            client.report(f"new{n}", "question", "/src/app")
        while watch.poll(0.5) is not None:
            pass
        assert watch.snapshots == 2  # it resynced, once
        held = {s.id: s.status for s in client.snapshot().sessions}
        assert {id: s.status for id, s in watch.sessions.items()} == held
        assert "lost" not in watch.sessions
        assert held["kept"] == "working"


@pytest.mark.parametrize("key", ["live", "feed"])
def test_a_key_evicted_whole_is_a_damaged_namespace_for_readers(redis: RedisServer, key: str) -> None:
    """Under allkeys-lru every session was evicted with no event and no resync: a follower
    kept 40 sessions, the store had 0. Redis evicts whole keys; one the others need (the
    live sessions, the feed) gone is now a damaged namespace, which readers are told."""
    url = f"redis+unix://{redis.path}?namespace=evicted"
    store = RedisStore(parse_redis(url), 5.0)
    try:
        for n in range(3):
            store.report(f"s{n}", "working", "/src/app")
        store._redis.delete(f"{{evicted}}:{key}")  # as an eviction removes a key: whole
        for read in (lambda: store.changes(3), store.snapshot, lambda: store.list_all(None, 0)):
            with pytest.raises(ShmstoreError, match=r"is gone \(deleted, or evicted"):
                read()
    finally:
        store.close()
