"""The Redis backend on its own: what only it has (addresses, its feed and epoch, exactly
once, limits checked in Lua), against a real redis-server per xdist worker (conftest.py).
What both backends share is tested on both (``any_store`` in test_store.py, test_watch.py,
test_errors.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import multiprocess
import orjson
import pytest
from helpers import BAD_CALLS, SOAK, make_session
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import shmstore
from shmstore import ConflictError, ResyncRequiredError, Status, StoreFullError, ValidationError
from shmstore.record import pack, session_from_store
from shmstore.redis.address import RedisAddress, parse_redis
from shmstore.transport.address import resolve_any

redis_store = pytest.importorskip("shmstore.redis.store") if os.environ.get("CI") != "true" else None
from shmstore.redis.store import RedisStore  # noqa: E402  (CI: the import must work)


@pytest.fixture
def raw(redis_url: str) -> Iterator[RedisStore]:
    """The Redis store called directly, past the Client's own checks."""
    store = RedisStore(parse_redis(redis_url), timeout=5.0)
    yield store
    store.close()


def limited(redis_url: str, **limits: object) -> RedisStore:
    return RedisStore(parse_redis(redis_url), 5.0, shmstore.Limits(**limits))  # type: ignore[arg-type]


# -- addresses -----------------------------------------------------------------------------


def test_a_redis_url_selects_redis_and_is_shown_without_its_password(monkeypatch: pytest.MonkeyPatch) -> None:
    address = parse_redis("redis://me:s3cret@localhost:6380/2?namespace=team")
    assert (address.host, address.port, address.db, address.namespace) == ("localhost", 6380, 2, "team")
    assert (address.username, address.password) == ("me", "s3cret")
    assert "s3cret" not in str(address)
    assert "s3cret" not in repr(address)
    assert str(address) == "redis://me:***@localhost:6380/2?namespace=team"
    monkeypatch.setenv("SHMSTORE_ADDRESS", "valkey+unix:///run/valkey.sock?db=1")
    found = resolve_any(None)
    assert isinstance(found, RedisAddress)
    assert (found.path, found.db, found.namespace) == ("/run/valkey.sock", 1, "shmstore")
    monkeypatch.setenv("SHMSTORE_REDIS_PASSWORD", "from-env")
    assert parse_redis("rediss://cache.example:6379").password == "from-env"


@pytest.mark.parametrize(
    "url",
    [
        "redis://10.0.0.5:6379",  # off this host in the clear
        "valkey://cache.example",
        "redis://localhost?namespace=no spaces",
        "redis://localhost?colour=red",
        "redis://localhost/notadb",
        "redis+unix://relative.sock",
        "redis://:99999999",
    ],
)
def test_a_bad_or_unsafe_redis_url_is_refused_with_our_error(url: str) -> None:
    with pytest.raises(ValidationError) as refused:
        parse_redis(url)
    assert refused.value.field == "address"


def test_plain_redis_off_this_host_is_allowed_only_when_asked() -> None:
    assert parse_redis("redis://10.0.0.5?allow_insecure=true").allow_insecure


def test_a_manager_command_refuses_a_redis_address() -> None:
    with pytest.raises(ValidationError, match="Redis"):
        shmstore.transport.address.resolve("redis://localhost")


# -- the same errors, the store unchanged ---------------------------------------------------


@pytest.mark.parametrize(("method", "args"), BAD_CALLS)
def test_invalid_input_is_refused_by_redis_and_leaves_it_as_it_was(
    raw: RedisStore, method: str, args: tuple[object, ...]
) -> None:
    raw.set(pack(make_session("s1")))
    raw.add_usage("s1", 5, 5)
    before = (raw.revision(), sorted(raw.list_all()), raw.snapshot())
    with pytest.raises(ValidationError):
        getattr(raw, method)(*args)
    assert (raw.revision(), sorted(raw.list_all()), raw.snapshot()) == before


def test_limits_are_checked_before_anything_changes(redis_url: str) -> None:
    store = limited(redis_url, max_sessions=1, max_store_bytes=2**20, max_closed=2)
    store.report("a", "working", "/a")
    revision = store.revision()
    with pytest.raises(StoreFullError) as full:
        store.report("b", "working", "/b")
    assert (full.value.limit, full.value.id) == ("max_sessions", "b")
    assert (store.revision(), store.get("b")) == (revision, None)
    for id in ["c", "d", "e"]:  # closed ones do not count, and only the newest two are kept
        store.set(make_session(id, status=Status.CLOSED).to_json())
    assert [session_from_store(d).id for d in store.recently_closed()] == ["e", "d"]


def test_a_history_that_outgrows_the_record_limit_loses_its_oldest_entries(redis_url: str) -> None:
    store = limited(redis_url, max_history=10_000, max_record_bytes=8192, max_closed=2)
    store.report("s", "working", "/w")
    for k in range(1_500):
        store.transition("s", ["attention", "working"][k % 2])
    data = store.get("s")
    assert data is not None
    assert 8192 - 200 < len(data) <= 8192
    assert session_from_store(data).history[-1].to is Status.WORKING


# -- the feed, its epoch, exactly once -------------------------------------------------------


def test_a_follower_past_the_trimmed_feed_is_told_to_resync(redis_url: str) -> None:
    store = limited(redis_url, log_size=4)
    for k in range(10):
        store.report(f"s{k}", "working", "/w")
    events = orjson.loads(store.changes(6))["events"]
    assert [e["revision"] for e in events] == [7, 8, 9, 10]
    with pytest.raises(ResyncRequiredError) as resync:
        store.changes(2)
    assert resync.value.reason == "compacted"
    with pytest.raises(ResyncRequiredError) as ahead:
        store.changes(11)
    assert ahead.value.reason == "ahead"


def test_a_redis_that_lost_its_data_is_a_new_store_with_a_new_epoch(redis_url: str, raw: RedisStore) -> None:
    raw.report("s", "working", "/w")
    epoch = orjson.loads(raw.changes(0))["epoch"]
    raw._redis.delete(*raw._keys)  # as a restart without persistence leaves it
    with pytest.raises(ResyncRequiredError) as resync:
        raw.changes(1, epoch=epoch)
    assert resync.value.reason == "epoch"
    assert orjson.loads(raw.changes(0))["epoch"] != epoch


def test_changes_waits_in_redis_for_the_next_write(raw: RedisStore, redis_url: str) -> None:
    raw.report("s", "working", "/w")
    with shmstore.connect(redis_url) as writer:
        timer = threading.Timer(0.3, writer.transition, ("s", "attention"))
        timer.start()
        try:
            events = orjson.loads(raw.changes(1, timeout=5.0))["events"]
        finally:
            timer.join()
    assert [(e["revision"], e["kind"]) for e in events] == [(2, "transition")]
    assert orjson.loads(raw.changes(2, timeout=0.05))["events"] == []  # waited, then nothing


def test_a_retried_write_is_applied_once(raw: RedisStore) -> None:
    raw.report("s", "working", "/w")
    token = os.urandom(16)
    first = raw.once(token, 1, "add_usage", "s", 5, 0)
    assert raw.once(token, 1, "add_usage", "s", 5, 0) == first  # the reply was lost: asked again
    assert raw.once(token, 0, "add_usage", "s", 5, 0) is None  # older than its newest: not run
    assert session_from_store(raw.get("s")).api_usage == shmstore.ApiUsage(5, 0)


def test_set_with_an_expected_revision_is_compare_and_set(raw: RedisStore) -> None:
    revision, _ = raw.set(pack(make_session("s")), 0)
    with pytest.raises(ConflictError) as conflict:
        raw.set(pack(make_session("s")), 0)
    assert (conflict.value.expected, conflict.value.current) == (0, revision)
    assert raw.set(pack(make_session("s")), revision)[0] == revision + 1


# -- racing writers in several processes ----------------------------------------------------


def _add_tokens(url: str, count: int, start: multiprocess.synchronize.Event) -> None:
    with shmstore.connect(url) as client:
        start.wait(10)
        for k in range(count):
            client.add_usage("s", 1, 0)
            client.transition("s", ["attention", "working"][k % 2])


def test_writers_in_four_processes_racing_on_one_session_lose_nothing(redis_url: str) -> None:
    """Each write reads the session and commits only if no other write came between (the
    Lua script's revision check); without it, racing read-modify-writes lose updates."""
    with shmstore.connect(redis_url) as client:
        client.report("s", "working", "/w")
        ctx = multiprocess.get_context("spawn")
        start = ctx.Event()
        workers = [ctx.Process(target=_add_tokens, args=(redis_url, 100, start)) for _ in range(4)]
        with client.watch() as watch:
            for worker in workers:
                worker.start()
            start.set()
            for worker in workers:
                worker.join(60)
                assert worker.exitcode == 0
            final = client.get("s")
            assert final is not None
            assert final.api_usage == shmstore.ApiUsage(400, 0)
            assert final.revision == 1 + 4 * 100 * 2  # every write counted once
            seen = None
            for _ in watch:
                seen = watch.sessions.get("s")
                if seen is not None and seen.revision == final.revision:
                    break
            assert seen == final  # the change feed rebuilt exactly the stored session


def test_a_session_from_redis_decodes_as_one_from_the_manager(any_store: shmstore.Client) -> None:
    session = any_store.report("r", Status.QUESTION, "/src", pid=4242, session_id="resume-r")
    any_store.add_usage("r", 7, 3)
    moved = any_store.transition("r", Status.CLOSED)
    assert (session.pid, session.session_id, session.status) == (4242, "resume-r", Status.QUESTION)
    assert moved.closed_reason == "transition"
    assert [(h.from_, h.to) for h in moved.history] == [(Status.QUESTION, Status.CLOSED)]
    assert moved.api_usage == shmstore.ApiUsage(7, 3)
    assert any_store.get("r") == moved


# -- several hosts: each reaps its own, one looks after hosts that went away ----------------


def on_host(redis_url: str, host: str, **limits: object) -> RedisStore:
    """The store as a client on ``host`` sees it (several hosts simulated on this one)."""
    store = limited(redis_url, **limits)
    store.host = host
    return store


def test_a_hosts_reaper_closes_its_own_dead_agents_and_never_another_hosts(redis_url: str) -> None:
    a, b = on_host(redis_url, "host-a"), on_host(redis_url, "host-b")
    agent = subprocess.Popen(["sleep", "60"])
    try:
        a.report("on-a", "working", "/a", pid=agent.pid)
        b.report("on-b", "working", "/b", pid=agent.pid)  # the same number names another process there
        assert (a.reap(), b.reap()) == (0, 0)  # both hosts alive (their reports renewed their leases)
    finally:
        agent.kill()
        agent.wait()
    assert session_from_store(a.get("on-a")).host == "host-a"
    assert a.reap() == 1  # its own agent died: closed; host-b's session is not host-a's to judge
    assert [session_from_store(a.get(id)).closed for id in ("on-a", "on-b")] == [True, False]
    assert b.reap() == 1  # host-b closes its own, and leaves host-a's as it is
    closed = [session_from_store(b.get(id)) for id in ("on-a", "on-b")]
    assert [(s.closed_reason, s.host) for s in closed] == [("agent_gone", "host-a"), ("agent_gone", "host-b")]
    assert closed[0].revision < closed[1].revision  # host-b's pass did not touch host-a's


def test_a_host_whose_reaper_stopped_has_its_sessions_stale_at_once_then_closed_after_the_grace(
    redis_url: str,
) -> None:
    timing = {"reap_interval": 0.1, "host_grace": 1.0}  # a lease of 0.3 s
    a, b = on_host(redis_url, "host-a", **timing), on_host(redis_url, "host-b", **timing)
    b.report("on-b", "attention", "/b")  # waits for its user: silent, never stale on its own
    a.reap()
    for _ in range(12):  # host-b's reaper runs for longer than the grace: its session stays
        b.reap()
        time.sleep(0.1)
    assert a.reap() == 0
    assert session_from_store(a.get("on-b")).stale is False  # host-b is alive
    time.sleep(0.5)  # host-b's reaper stopped: its lease ran out
    assert a.reap() == 1
    stale = session_from_store(a.get("on-b"))
    assert (stale.stale, stale.closed) == (True, False)  # at once, but not closed yet: it may come back
    assert a.reap() == 0  # the grace counts from when host-b went, not from its last report
    time.sleep(1.1)
    assert a.reap() == 1
    closed = session_from_store(a.get("on-b"))
    assert (closed.closed, closed.closed_reason) == (True, "host_gone")
    back = session_from_store(b.report("on-b", "working", "/b"))  # host-b is back
    assert (back.closed, back.stale, back.host) == (False, False, "host-b")


def test_the_reaper_command_runs_a_pass_for_redis_and_refuses_a_manager(
    redis_url: str, server: shmstore.ServerProcess
) -> None:
    ran = subprocess.run(
        [sys.executable, "-m", "shmstore", "reaper", "--once", "--address", redis_url],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ran.returncode == 0, ran.stderr
    refused = subprocess.run(
        [sys.executable, "-m", "shmstore", "reaper", "--once", "--address", server.address],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode == 2
    assert "reaps its own" in refused.stderr


def test_top_shows_the_sessions_of_two_hosts_in_one_table_with_their_hosts(redis_url: str) -> None:
    on_host(redis_url, "gpu-box").report("train", "question", "/srv/train")
    on_host(redis_url, "laptop").report("web", "working", "/home/dev/web")
    shown = subprocess.run(
        [sys.executable, "-m", "shmstore", "top", "--address", redis_url],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert shown.returncode == 0, shown.stderr
    rows = [line.split() for line in shown.stdout.splitlines() if "train" in line or "web" in line]
    assert [(row[0], row[1], row[2]) for row in rows] == [
        ("question", "gpu-box", "train"),
        ("working", "laptop", "web"),
    ]


def test_the_demo_runs_on_redis_loses_nothing_and_leaves_no_keys(redis_url: str, raw: RedisStore) -> None:
    environment = {**os.environ, "SHMSTORE_ADDRESS": redis_url}
    ran = subprocess.run(
        [sys.executable, "-m", "shmstore", "demo", "--duration", "1", "--workers", "2"],
        capture_output=True,
        text=True,
        timeout=120,
        env=environment,
    )
    assert ran.returncode == 0, ran.stdout[-2000:] + ran.stderr[-2000:]
    assert "demo: Redis at redis+unix://" in ran.stdout
    assert "demo: nothing lost" in ran.stdout
    assert list(raw._redis.scan_iter(match="*-demo-*")) == []


# -- the same operations, the same answers ---------------------------------------------------

_ids = st.sampled_from(["a", "b", "c"])
_statuses = st.sampled_from(["working", "attention", "question", "closed"])
_operations = st.lists(
    st.one_of(
        st.tuples(st.just("report"), _ids, _statuses, st.sampled_from(["/w", "/x"])),
        st.tuples(st.just("transition"), _ids, _statuses),
        st.tuples(st.just("add_usage"), _ids, st.integers(0, 2**62), st.integers(0, 10)),
        st.tuples(st.just("remove"), _ids),
        st.tuples(st.just("set"), _ids, st.sampled_from([None, 0, 1, 2, 5])),
        st.tuples(st.just("get"), _ids),
    ),
    max_size=14,
)


def _outcome(store: shmstore.Store | RedisStore, operation: tuple[object, ...]) -> object:
    name, *args = operation
    if name == "set":
        args = [pack(make_session(str(args[0]), status=Status.QUESTION)), args[1]]
    try:
        result = getattr(store, str(name))(*args)
    except shmstore.ShmstoreError as exc:
        return type(exc).__name__
    if isinstance(result, bytes):
        session = session_from_store(result)
        # What may differ: each backend's clock and host (and so a pid's start time).
        public = orjson.loads(session.to_json())
        for key in ("since", "last_activity", "host", "pid_start"):
            del public[key]
        public["history"] = [(h["from"], h["to"]) for h in public["history"]]
        return public
    return result


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(operations=_operations)
def test_the_same_operations_on_both_backends_give_the_same_answers(
    redis_socket: str, operations: list[tuple[object, ...]]
) -> None:
    manager = shmstore.Store()
    redis = RedisStore(parse_redis(f"redis+unix://{redis_socket}?namespace=h-{os.urandom(6).hex()}"), 5.0)
    try:
        for operation in operations:
            assert _outcome(manager, operation) == _outcome(redis, operation), operation
        assert manager.revision() == redis.revision()
        listed = [sorted(session_from_store(d).id for d in store.list_all()) for store in (manager, redis)]
        assert listed[0] == listed[1]
    finally:
        redis.delete_namespace()
        redis.close()


def test_tls_off_this_host_still_needs_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SHMSTORE_REDIS_PASSWORD", raising=False)
    with pytest.raises(ValidationError, match="password"):
        parse_redis("rediss://cache.example:6380")
    assert parse_redis("rediss://:pw@cache.example:6380").password == "pw"
    assert parse_redis("rediss://cache.example?allow_insecure=true").password is None


def test_token_counts_are_exact_to_2_63_less_1_and_an_overflow_changes_nothing(raw: RedisStore) -> None:
    raw.report("s", "working", "/w")
    raw.add_usage("s", 2**63 - 2, 0)
    at_most = session_from_store(raw.add_usage("s", 1, 0))
    assert at_most.api_usage == shmstore.ApiUsage(2**63 - 1, 0)
    before = (raw.revision(), raw.get("s"))
    with pytest.raises(ValidationError, match="input_tokens"):
        raw.add_usage("s", 1, 0)
    assert (raw.revision(), raw.get("s")) == before


def test_a_namespace_whose_revision_was_lost_refuses_writes_instead_of_forking_its_feed(raw: RedisStore) -> None:
    for k in range(3):
        raw.report(f"s{k}", "working", "/w")
    raw._redis.hdel(raw._meta, "revision")  # by hand: the feed now reaches past the revision
    live = sorted(raw.list_all())
    with pytest.raises(shmstore.ShmstoreError, match="damaged"):
        raw.report("s0", "question", "/w")
    with pytest.raises(shmstore.ShmstoreError, match="damaged"):
        raw.remove("s1")
    assert sorted(raw.list_all()) == live  # nothing was changed


def test_a_password_file_must_be_private_and_is_never_shown(tmp_path: Path) -> None:
    secret = tmp_path / "redis.pw"
    secret.write_text("s3cret\n")
    secret.chmod(0o600)
    address = parse_redis(f"rediss://cache.example?password_file={secret}")
    assert address.password == "s3cret"
    assert "s3cret" not in str(address) + repr(address)
    secret.chmod(0o644)
    with pytest.raises(ValidationError, match="0600"):
        parse_redis(f"rediss://cache.example?password_file={secret}")


def test_a_redis_url_without_the_redis_package_is_one_clear_error(redis_url: str) -> None:
    script = (
        "import sys; sys.modules['redis'] = None\n"  # as if it were not installed
        "import shmstore\n"
        f"try:\n    shmstore.connect({redis_url!r})\n"
        "except shmstore.StoreUnavailableError as exc:\n    print(exc)\n"
    )
    ran = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert "pip install 'shmstore[redis]'" in ran.stdout, ran.stderr


def test_install_hooks_refuses_to_write_a_redis_password_into_claudes_settings(tmp_path: Path) -> None:
    settings = tmp_path / "settings.json"
    url = "redis://me:s3cret@127.0.0.1:6379?namespace=team"
    ran = subprocess.run(
        [sys.executable, "-m", "shmstore", "install-hooks", "--settings", str(settings), "--dry-run", "--address", url],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ran.returncode == 2
    assert "password_file" in ran.stderr
    assert "s3cret" not in ran.stdout + ran.stderr
    assert not settings.exists()


def test_a_short_soak_on_redis_holds_every_invariant(redis_url: str, tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    soak = subprocess.run(
        [sys.executable, str(SOAK), "--seconds", "3", "--workers", "4", "--out", str(out), "--address", redis_url],
        capture_output=True,
        timeout=180,
    )
    report = orjson.loads(out.read_bytes())
    assert soak.returncode == 0, soak.stdout
    assert report["checks"] == dict.fromkeys(report["checks"], True)
    assert report["ops"] > 300


@pytest.mark.parametrize(
    ("url", "secret"),
    [("redis://user:qz#jx@10.1.2.3", "qz"), ("redis://:kq/wv@localhost", "kq"), ("redis://u:jq?zx@host", "zx")],
)
def test_a_misparsed_password_never_shows_in_the_error(url: str, secret: str) -> None:
    with pytest.raises(ValidationError) as refused:
        parse_redis(url)
    assert secret not in str(refused.value)


def test_a_host_id_from_the_environment_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHMSTORE_HOST_ID", "ci runner #7")
    with pytest.raises(ValidationError, match="SHMSTORE_HOST_ID"):
        shmstore.procs.host_id()
    monkeypatch.setenv("SHMSTORE_HOST_ID", "ci-runner-7")
    assert shmstore.procs.host_id() == "ci-runner-7"


def test_a_retried_write_gets_its_first_answer_even_after_its_session_was_removed(raw: RedisStore) -> None:
    raw.report("s", "working", "/w")
    token = os.urandom(16)
    first = raw.once(token, 1, "transition", "s", "question")
    raw.remove("s")  # another client, between the lost reply and the retry
    assert raw.once(token, 1, "transition", "s", "question") == first


def test_prune_is_applied_once_however_often_it_is_retried(raw: RedisStore) -> None:
    for id in ["a", "b"]:
        raw.report(id, "working", "/w")
        raw.report(id, "closed", "/w")
    token = os.urandom(16)
    assert raw.once(token, 1, "prune", 0.0) == 2
    assert raw.once(token, 1, "prune", 0.0) == 2  # the first answer, not a second prune's 0
    assert raw.once(token, 0, "prune", 0.0) is None  # older than its newest: not run


def test_a_wait_for_changes_on_a_stopped_redis_ends_within_its_deadlines(tmp_path: Path) -> None:
    """A redis-server of this test's own, stopped (SIGSTOP) while a client waits in it:
    the wait ends within twice (timeout + wait), as over the manager's socket."""
    sock = tmp_path / "r.sock"
    server = subprocess.Popen(
        ["redis-server", "--port", "0", "--unixsocket", str(sock), "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        with shmstore.Client(f"redis+unix://{sock}", timeout=1.0) as client:
            client.report("s", "working", "/w")
            threading.Timer(0.3, os.kill, (server.pid, signal.SIGSTOP)).start()
            began = time.monotonic()
            with pytest.raises(shmstore.StoreUnavailableError):
                client.changes(1, timeout=5.0)
            assert time.monotonic() - began < 2 * (1.0 + 5.0)
    finally:
        os.kill(server.pid, signal.SIGCONT)
        server.terminate()
        server.wait(10)
