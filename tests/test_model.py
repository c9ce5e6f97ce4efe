"""The model on its own: validation, value semantics, and the one JSON encoding."""

from __future__ import annotations

import dataclasses
import math

import orjson
import pytest

from shmstore import AgentType, ApiUsage, Session, StateTransition, Status, ValidationError
from shmstore.checks import MAX_ID_LENGTH, MAX_TOKENS
from shmstore.model import session_from_store
from shmstore.store import add_usage_record, transition_record


def full_session() -> Session:
    history = (
        StateTransition(100.0, Status.WORKING, Status.ATTENTION, 5.5),
        StateTransition(110.25, Status.ATTENTION, Status.QUESTION, 10.25),
    )
    return Session(
        id="sess-ü-日本",
        working_dir="/home/dév/プロジェクト",
        agent_type=AgentType.CLAUDE_CODE,
        status=Status.QUESTION,
        since=110.25,
        history=history,
        api_usage=ApiUsage(1200, 340),
        session_id="resume-1",
        revision=7,
    )


def test_json_round_trip_keeps_every_field() -> None:
    session = full_session()
    assert Session.from_json(session.to_json()) == session


def test_json_encoding_is_exact() -> None:
    data = orjson.loads(full_session().to_json())
    assert list(data) == [
        "id",
        "agent_type",
        "status",
        "working_dir",
        "since",
        "last_activity",
        "history",
        "api_usage",
        "closed",
        "stale",
        "session_id",
        "pid",
        "pid_start",
        "revision",
        "closed_reason",
    ]
    assert data["history"][0] == {"timestamp": 100.0, "from": "working", "to": "attention", "duration": 5.5}
    assert data["api_usage"] == {"input_tokens": 1200, "output_tokens": 340}
    assert data["closed"] is False


def test_large_history_round_trips() -> None:
    history = tuple(
        StateTransition(float(i), Status.WORKING if i % 2 else Status.ATTENTION, Status.ATTENTION, 1.0)
        for i in range(5000)
    )
    session = Session(id="big", working_dir="/x", history=history)
    assert Session.from_json(session.to_json()).history == history


def test_values_are_frozen_and_compare_by_value() -> None:
    a, b = full_session(), full_session()
    assert a == b
    assert a is not b
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.status = Status.WORKING  # type: ignore[misc]
    assert dataclasses.replace(a, status=Status.WORKING) != a
    assert "sess-ü-日本" in repr(a)


def test_closed_follows_status() -> None:
    assert Session(id="a", working_dir="/", status=Status.CLOSED).closed
    assert not Session(id="a", working_dir="/", status=Status.ATTENTION).closed
    data = orjson.loads(Session(id="a", working_dir="/").to_json())
    data["closed"] = True
    with pytest.raises(ValidationError, match="closed"):
        Session.from_dict(data)


def test_enum_values_as_strings_are_accepted() -> None:
    session = Session(id="a", working_dir="/", status="attention", agent_type="claude_code")  # type: ignore[arg-type]
    assert session.status is Status.ATTENTION
    assert session.agent_type is AgentType.CLAUDE_CODE


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"id": ""}, "id"),
        ({"id": 5}, "id"),
        ({"id": "a\nb"}, "id"),
        ({"id": "a\x00"}, "id"),
        ({"id": "x" * (MAX_ID_LENGTH + 1)}, "id"),
        ({"working_dir": "relative/path"}, "working_dir"),
        ({"working_dir": "/a\x00b"}, "working_dir"),
        ({"working_dir": "/bad\udcff"}, "working_dir"),
        ({"working_dir": None}, "working_dir"),
        ({"status": "sleeping"}, "status"),
        ({"status": 1}, "status"),
        ({"agent_type": "cursor"}, "agent_type"),
        ({"since": -1.0}, "since"),
        ({"since": math.nan}, "since"),
        ({"since": "yesterday"}, "since"),
        ({"history": [("not", "a", "transition")]}, "history"),
        ({"history": "abc"}, "history"),
        ({"api_usage": {"input_tokens": 1}}, "api_usage"),
        ({"session_id": ""}, "session_id"),
        ({"revision": -1}, "revision"),
        ({"revision": True}, "revision"),
    ],
)
def test_invalid_fields_raise_validation_error_naming_the_field(fields: dict[str, object], field: str) -> None:
    base: dict[str, object] = {"id": "ok", "working_dir": "/ok"}
    with pytest.raises(ValidationError) as info:
        Session(**{**base, **fields})  # type: ignore[arg-type]
    assert info.value.field == field
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    ("usage", "field"),
    [
        ((-1, 0), "api_usage.input_tokens"),
        ((0, -5), "api_usage.output_tokens"),
        ((1.5, 0), "api_usage.input_tokens"),
        ((MAX_TOKENS + 1, 0), "api_usage.input_tokens"),
        ((True, 0), "api_usage.input_tokens"),
    ],
)
def test_token_counts_must_be_non_negative_ints(usage: tuple[object, object], field: str) -> None:
    with pytest.raises(ValidationError) as info:
        ApiUsage(*usage)  # type: ignore[arg-type]
    assert info.value.field == field


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"{",
        b"[]",
        b'{"id": "a"}',
        b'{"id": "a", "working_dir": "/", "color": "red"}',
        b'{"id": "a", "working_dir": "/", "history": [{"timestamp": 1}]}',
        b'{"id": "a", "working_dir": "/", "history": {}}',
    ],
)
def test_malformed_json_raises_validation_error(data: bytes) -> None:
    with pytest.raises(ValidationError):
        Session.from_json(data)


def test_transition_record_appends_and_bounds_history() -> None:
    record = orjson.loads(Session(id="a", working_dir="/", since=10.0).to_json())
    transition_record(record, Status.ATTENTION, 12.5, max_history=2)
    transition_record(record, Status.WORKING, 13.0, max_history=2)
    transition_record(record, Status.CLOSED, 20.0, max_history=2)
    session = Session.from_dict(record)
    assert session.status is Status.CLOSED
    assert session.closed
    assert session.since == 20.0
    assert [(h.from_, h.to, h.duration) for h in session.history] == [
        (Status.ATTENTION, Status.WORKING, 0.5),
        (Status.WORKING, Status.CLOSED, 7.0),
    ]


def test_transition_record_never_goes_back_in_time() -> None:
    record = orjson.loads(Session(id="a", working_dir="/", since=50.0).to_json())
    transition_record(record, Status.ATTENTION, 40.0, max_history=10)  # the wall clock stepped back
    entry = Session.from_dict(record).history[0]
    assert entry.duration == 0.0
    assert entry.timestamp == 50.0


def test_add_usage_record_adds_and_refuses_overflow() -> None:
    record = orjson.loads(Session(id="a", working_dir="/").to_json())
    add_usage_record(record, 5, 7)
    add_usage_record(record, 1, 1)
    assert Session.from_dict(record).api_usage == ApiUsage(6, 8)
    with pytest.raises(ValidationError, match=r"api_usage\.input_tokens"):
        add_usage_record(record, MAX_TOKENS, 0)
    with pytest.raises(ValidationError, match="output_tokens"):
        add_usage_record(record, 0, -1)


def test_fast_decoding_of_stored_sessions_matches_the_validating_one() -> None:
    for session in [full_session(), Session(id="b", working_dir="/b")]:
        data = session.to_json()
        decoded = session_from_store(data)
        assert decoded == Session.from_json(data) == session
        assert type(decoded.history) is tuple
        assert all(type(h.to) is Status for h in decoded.history)


def test_fast_decoding_falls_back_to_validation_on_a_malformed_reply() -> None:
    data = orjson.loads(full_session().to_json())
    del data["agent_type"]
    assert session_from_store(data).agent_type is AgentType.CLAUDE_CODE  # optional: the default applies
    data["status"] = "sleeping"
    with pytest.raises(ValidationError, match="status"):
        session_from_store(data)
