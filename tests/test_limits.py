"""Limits that keep the store servable: bounded times.

Store logic is tested in-process (a Store is a plain object taking and returning orjson
bytes); what depends on the transport goes through a real manager.
"""

from __future__ import annotations

import math
import time

import orjson
import pytest
from conftest import make_session
from test_cli import run

import shmstore
from shmstore import Session, StateTransition, Status, ValidationError
from shmstore.model import MAX_CLOCK_AHEAD, MAX_DURATION


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


def test_the_manager_refuses_a_far_future_time_sent_as_raw_json(store: shmstore.Client) -> None:
    good = orjson.loads(make_session("s").to_json())
    for field, value in [("since", 1e300), ("last_activity", far(2)), ("since", 1e308)]:
        with pytest.raises(ValidationError, match=field):
            store._call("set", orjson.dumps({**good, field: value}), None)
    with pytest.raises(ValidationError):  # an int past 64 bits is not even parsed
        store._call("set", b'{"id":"s","working_dir":"/","since":1' + b"0" * 400 + b"}", None)
    assert store.revision() == 0


def test_the_command_line_can_neither_store_nor_trip_over_far_times(server: shmstore.ServerProcess) -> None:
    with shmstore.connect(server.address, server.authkey) as store:
        good = orjson.loads(make_session("far").to_json())
        with pytest.raises(ValidationError):
            store._call("set", orjson.dumps({**good, "since": 1e300, "last_activity": 1e300}), None)
    got = run("get", "far", address=server.address)
    assert got.returncode == 1 and got.stderr == "shmstore: error: no session with id 'far'\n"
    pruned = run("prune", "--older-than", "1e300", address=server.address)
    assert pruned.returncode == 1 and pruned.stderr.startswith("shmstore: error: older_than: must be between 0")
    assert pruned.stderr.count("\n") == 1
    created = run("set", "near", "--dir", "/src", address=server.address)
    assert created.returncode == 0, created.stderr
    shown = run("get", "near", address=server.address)
    assert shown.returncode == 0 and "near" in shown.stdout and "Traceback" not in shown.stderr


def test_serve_refuses_a_stale_after_past_a_century(sock_dir: object) -> None:
    result = run("serve", "--stale-after", "1e300", address=f"{sock_dir}/x.sock", timeout=30)
    assert result.returncode == 1
    assert result.stderr.startswith("shmstore: error: stale_after: must be between 0 and 100 years")
