"""The model on its own: validation, value semantics, and the one JSON encoding."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Callable

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shmstore import AgentType, ApiUsage, Session, StateTransition, Status, ValidationError
from shmstore.checks import MAX_ID_LENGTH, MAX_TOKENS
from shmstore.record import (
    ID,
    STATUS_CODE,
    dump,
    load_record,
    pack,
    public_json,
    restamped,
    session_from_store,
    to_record,
)
from shmstore.record_checks import session_record, stored_record
from shmstore.rules import add_usage_record, transition_record


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
        last_event=110.5,
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
        "host",
        "last_event",
        "asked_by",
        "background",
        "terminal",
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
        ({"agent_type": "aider"}, "agent_type"),
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


def checked(record: list[object]) -> Session:
    """A record as the model's own validating path reads it (its public JSON)."""
    return Session.from_json(public_json(orjson.dumps(record)))


def test_transition_record_appends_and_bounds_history() -> None:
    record = to_record(Session(id="a", working_dir="/", since=10.0))
    transition_record(record, STATUS_CODE[Status.ATTENTION], 12.5, max_history=2)
    transition_record(record, STATUS_CODE[Status.WORKING], 13.0, max_history=2)
    transition_record(record, STATUS_CODE[Status.CLOSED], 20.0, max_history=2)
    session = checked(record)
    assert session.status is Status.CLOSED
    assert session.closed
    assert session.since == 20.0
    assert [(h.from_, h.to, h.duration) for h in session.history] == [
        (Status.ATTENTION, Status.WORKING, 0.5),
        (Status.WORKING, Status.CLOSED, 7.0),
    ]


def test_transition_record_never_goes_back_in_time() -> None:
    record = to_record(Session(id="a", working_dir="/", since=50.0))
    transition_record(record, STATUS_CODE[Status.ATTENTION], 40.0, max_history=10)  # the wall clock stepped back
    entry = checked(record).history[0]
    assert entry.duration == 0.0
    assert entry.timestamp == 50.0


def test_add_usage_record_adds_and_refuses_overflow() -> None:
    record = to_record(Session(id="a", working_dir="/"))
    add_usage_record(record, 5, 7)
    add_usage_record(record, 1, 1)
    assert checked(record).api_usage == ApiUsage(6, 8)
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


# -- the manager's one-pass check agrees with the model ---------------------------------------

_junk = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**65), max_value=2**65),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
)


def _mostly(good: st.SearchStrategy[object], bad: st.SearchStrategy[object]) -> st.SearchStrategy[object]:
    """``good`` four times in five: deep fields are only reached past good earlier ones."""
    return st.integers(0, 4).flatmap(lambda roll: bad if roll == 0 else good)


_statuses = _mostly(st.sampled_from(["working", "attention", "question", "closed"]), _junk)
_times = _mostly(
    st.one_of(st.floats(min_value=0, max_value=2e9), st.integers(min_value=0, max_value=2**40)),
    st.one_of(st.floats(min_value=-1), st.floats(min_value=1e10), _junk),
)
_entry = _mostly(
    st.fixed_dictionaries({"timestamp": _times, "from": _statuses, "to": _statuses, "duration": _times}),
    st.one_of(st.fixed_dictionaries({"timestamp": _times, "from": _statuses}), _junk),
)
_session_json = st.fixed_dictionaries(
    {
        "id": _mostly(st.just("s1"), st.one_of(st.sampled_from(["", "a\nb", "x" * 300]), _junk)),
        "working_dir": _mostly(st.just("/home/dev"), st.one_of(st.sampled_from(["relative", "/a\x00b"]), _junk)),
        "since": _times,
    },
    optional={
        "status": _statuses,
        "agent_type": _mostly(st.just("claude_code"), _junk),
        "last_activity": _mostly(st.none(), _times),
        "history": _mostly(st.lists(_entry, max_size=3), _junk),
        "api_usage": _mostly(
            st.one_of(st.none(), st.fixed_dictionaries({"input_tokens": _times, "output_tokens": _times})),
            st.one_of(st.fixed_dictionaries({"input_tokens": _times}), _junk),
        ),
        "closed": _mostly(st.booleans(), _junk),
        "stale": _mostly(st.booleans(), _junk),
        "session_id": _mostly(st.just("resume"), _junk),
        "pid": _mostly(st.integers(min_value=1, max_value=2**31 - 1), st.one_of(st.sampled_from([0, 2**31]), _junk)),
        "pid_start": _mostly(st.integers(min_value=0, max_value=2**63 - 1), st.one_of(st.just(-1), _junk)),
        "revision": _mostly(st.integers(min_value=0, max_value=2**63 - 1), st.one_of(st.just(2**64 - 1), _junk)),
        "closed_reason": _mostly(st.just("session_end:logout"), st.one_of(st.sampled_from(["", "a\tb"]), _junk)),
    },
)


def _outcome(decode: Callable[[bytes], object], data: bytes) -> tuple[str, object]:
    try:
        return "ok", orjson.dumps(decode(data))
    except ValidationError as exc:  # the clock's bound, read at each call, may have moved on
        return "refused", (exc.field, re.sub(r"\d+\.\d{3} \(a day past", "T (a day past", str(exc)))


@settings(max_examples=600, deadline=None)
@given(fields=_session_json)
def test_the_managers_one_pass_check_accepts_and_refuses_exactly_what_the_model_does(
    fields: dict[str, object],
) -> None:
    data = json.dumps(fields).encode()
    assert _outcome(session_record, data) == _outcome(lambda d: to_record(Session.from_json(d)), data)


def test_the_one_pass_check_holds_the_id_to_the_stores_limit() -> None:
    data = make_json(id="x" * 20)
    assert session_record(data, max_id_length=20)[ID] == "x" * 20
    with pytest.raises(ValidationError) as refused:
        session_record(make_json(id="x" * 21), max_id_length=20)
    assert refused.value.field == "id"


def test_the_one_pass_check_gives_what_the_model_encodes() -> None:
    session = full_session()
    assert dump(session_record(session.to_json())) == pack(session)
    assert dump(stored_record(pack(session))) == pack(session)


# -- the stored form ----------------------------------------------------------------------------


@pytest.mark.parametrize("resume", [None, "resume-1", "sess-ü-日本"])
def test_a_record_keeps_every_field_and_the_resume_id_only_once_when_it_is_the_id(resume: str | None) -> None:
    session = dataclasses.replace(full_session(), session_id=resume, pid=7, pid_start=99, stale=True)
    data = pack(session)
    assert session_from_store(data) == session
    assert orjson.loads(public_json(data)) == orjson.loads(session.to_json())
    assert data.count("sess-ü-日本".encode()) == 1  # the id, and the resume id only when it differs
    assert (b'"resume-1"' in data) is (resume == "resume-1")


def test_history_times_are_whole_milliseconds_counted_back_from_the_next_entry_unless_they_cannot_be() -> None:
    exact = dataclasses.replace(full_session(), since=120.5)  # entries at 100.0 and 110.25
    assert load_record(pack(exact))[6] == [10250, 1, 5500, 10250, 6, 10250]
    assert session_from_store(pack(exact)) == exact
    odd = dataclasses.replace(full_session(), history=(StateTransition(1.0001, "working", "question", 0.0005),))
    assert load_record(pack(odd))[6] == [1.0001, 2, 0.0005]  # kept as they were: nothing is rounded
    assert session_from_store(pack(odd)) == odd


def test_a_transition_appends_to_either_form_and_keeps_every_time() -> None:
    for session in [full_session(), dataclasses.replace(full_session(), since=110.2501)]:
        record = to_record(session)
        transition_record(record, STATUS_CODE[Status.WORKING], 200.125, max_history=10)
        transition_record(record, STATUS_CODE[Status.CLOSED], 230.0000001, max_history=10)  # not whole ms
        times = [(h.timestamp, h.duration) for h in checked(record).history]
        assert times == [(100.0, 5.5), (110.25, 10.25), (200.125, 89.875), (230.0000001, 29.875)]
        del record[6][:3]  # the oldest entry cut: the others keep their times
        assert [h.timestamp for h in checked(record).history] == [110.25, 200.125, 230.0000001]


def test_a_record_is_less_than_half_the_public_json() -> None:
    history = tuple(StateTransition(1.795e9 + i, Status.WORKING, Status.ATTENTION, 12.345) for i in range(10))
    session = Session(
        id="0f8e3c1a-5b7d-4e2f-9a6c-1d2e3f4a5b6c",
        working_dir="/home/dev/src/project",
        session_id="0f8e3c1a-5b7d-4e2f-9a6c-1d2e3f4a5b6c",
        since=1.795e9 + 10,
        history=history,
        pid=12345,
    )
    assert len(pack(session)) * 2 < len(session.to_json())


# Two good records: times in whole milliseconds (the history's int form), and not (float form).
_good_records = [
    load_record(pack(dataclasses.replace(full_session(), pid=7, pid_start=99))),
    orjson.loads(
        pack(dataclasses.replace(full_session(), history=(StateTransition(1.0001, "working", "question", 0.5),)))
    ),
]
assert [type(record[6][0]) for record in _good_records] == [int, float]


@settings(max_examples=800, deadline=None)
@given(which=st.integers(0, 1), position=st.integers(0, 13), entry=st.integers(0, 5), value=_junk)
def test_whatever_the_record_check_accepts_is_a_session_the_model_accepts(
    which: int, position: int, entry: int, value: object
) -> None:
    """One field of a good record (or one value of its history) replaced by junk: the check
    refuses it with our error, or what it keeps is a session the validating path accepts."""
    record = orjson.loads(orjson.dumps(_good_records[which]))
    if position == 6:
        record[6][entry % len(record[6])] = value
    else:
        record[position] = value
    try:
        data = orjson.dumps(record)
    except TypeError:  # junk orjson cannot encode (an integer past 64 bits) never reaches the store
        return
    try:
        kept = stored_record(data)
    except ValidationError:
        return
    assert checked(kept) == session_from_store(kept)


def test_restamped_changes_only_revision_and_pid_start() -> None:
    session = dataclasses.replace(full_session(), pid=42)
    stamped = restamped(session, 9, 1234)
    assert stamped == dataclasses.replace(session, revision=9, pid_start=1234)
    assert (session.revision, session.pid_start) == (7, None)  # the original is untouched


def every_field_its_own_value() -> Session:
    """A session where no two fields of one type hold the same value: a copy or a decode
    that swapped two fields cannot come out equal to it."""
    return dataclasses.replace(
        full_session(), last_activity=111.5, pid=42, pid_start=43, revision=44, stale=True, host="h-1"
    )


def test_restamping_and_decoding_keep_every_field_in_its_place() -> None:
    session = every_field_its_own_value()
    for copy in (restamped(session, session.revision, session.pid_start), session_from_store(pack(session))):
        for field in dataclasses.fields(Session):
            assert getattr(copy, field.name) == getattr(session, field.name), field.name


def fresh_record(session: Session) -> list[object]:
    """``session``'s record worked out from its public JSON: no cache of model's involved."""
    return session_record(session.to_json())


def test_a_packed_history_is_reused_only_for_the_same_tuple_and_the_same_since() -> None:
    session = full_session()
    assert load_record(pack(session)) == fresh_record(session)
    # The same history tuple counted back from another since is another flat form.
    later = dataclasses.replace(session, since=120.5, status=Status.QUESTION)
    assert later.history is session.history
    assert load_record(pack(later)) == fresh_record(later)
    assert load_record(pack(session)) == fresh_record(session)


def test_a_session_decoded_then_changed_packs_to_what_it_holds() -> None:
    decoded = session_from_store(pack(full_session()), remember=True)
    changed = dataclasses.replace(decoded, status=Status.WORKING, since=decoded.since + 1)
    assert load_record(pack(changed)) == fresh_record(changed)
    assert load_record(pack(decoded)) == fresh_record(decoded)


def test_only_a_clients_pack_or_a_decode_asked_to_remember_keeps_the_flat_history() -> None:
    # A manager decodes sessions and makes records (restoring its state file) that no set
    # will send back: keeping them would hold up to 256 histories for its lifetime.
    from shmstore import record as model

    session = full_session()
    data = pack(session)
    model._FLAT.clear()
    session_from_store(data)
    to_record(session)
    assert model._FLAT == {}
    decoded = session_from_store(data, remember=True)
    assert model._FLAT[id(decoded.history)][0] is decoded.history
    pack(session)
    assert model._FLAT[id(session.history)][0] is session.history


def test_a_long_history_is_packed_but_not_kept() -> None:
    from shmstore import record as model

    history = tuple(StateTransition(100.0 + k, "working", "attention", 0.5) for k in range(model._FLAT_LONGEST + 1))
    session = dataclasses.replace(full_session(), history=history, since=1000.0)
    model._FLAT.clear()
    assert load_record(pack(session)) == fresh_record(session)
    assert model._FLAT == {}


def test_the_store_changing_a_record_in_place_changes_no_later_pack() -> None:
    session = full_session()
    pack(session)
    record = to_record(session)
    transition_record(record, STATUS_CODE[Status.WORKING], 130.0, max_history=10)  # appends to record[6]
    assert load_record(pack(session)) == fresh_record(session)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 5), st.sampled_from([110.25, 111.0, 111.0005, 200.0])),
        min_size=1,
        max_size=40,
    )
)
def test_packing_whatever_sessions_in_whatever_order_gives_each_its_own_record(
    picks: list[tuple[int, float]],
) -> None:
    # Histories made and dropped as we go, past the cache's limit: a tuple's id may be
    # taken by a new one once the old is freed, which must never bring back its form.
    from shmstore import record as model

    model._FLAT_LIMIT, limit = 3, model._FLAT_LIMIT
    try:
        for length, since in picks:
            history = tuple(
                StateTransition(100.0 + k + (0.0005 if since == 111.0005 else 0.0), "working", "attention", 0.25)
                for k in range(length)
            )
            session = dataclasses.replace(full_session(), history=history, since=since)
            assert load_record(pack(session)) == fresh_record(session)
            del history, session
    finally:
        model._FLAT_LIMIT = limit


def make_json(**fields: object) -> bytes:
    return orjson.dumps({"working_dir": "/home/dev", "since": 100.0, **fields})


def test_decoding_reuses_entries_already_built_but_never_one_of_another_value() -> None:
    session = full_session()
    first, again = session_from_store(pack(session)), session_from_store(pack(session))
    assert first == again == session
    assert all(a is b for a, b in zip(first.history, again.history, strict=True))  # built once
    # A record sent by a client may hold a duration as float seconds where the store would
    # write int milliseconds: 5.0 s must not be read as the 5 ms entry built before it.
    record = load_record(pack(session))
    record[6][2] = 5  # the first entry: 5 ms
    short = session_from_store(orjson.dumps(record)).history[0]
    record[6][2] = 5.0  # 5 s
    long = session_from_store(orjson.dumps(stored_record(orjson.dumps(record)))).history[0]
    assert (short.duration, long.duration) == (0.005, 5.0)


def test_a_negative_zero_is_read_as_zero_whichever_session_was_decoded_first() -> None:
    # The decode cache must not hand one session's -0.0 to another session's 0.0 (they
    # compare equal): both are read back as 0.0.
    negative = orjson.dumps(["a", 0, 1, "/", 10.0, 10.0, [0, 1, -0.0], None, False, None, None, None, 0, None, None])
    zero = orjson.dumps(["b", 0, 1, "/", 10.0, 10.0, [0, 1, 0], None, False, None, None, None, 0, None, None])
    for first, second in [(negative, zero), (zero, negative)]:
        model_built_clear()
        durations = [session_from_store(stored_record(data)).history[0].duration for data in (first, second)]
        assert [math.copysign(1.0, d) for d in durations] == [1.0, 1.0]


def model_built_clear() -> None:
    from shmstore import record as model

    model._BUILT.clear()


def test_a_history_back_in_whole_milliseconds_returns_to_the_compact_form() -> None:
    session = dataclasses.replace(
        full_session(), history=(StateTransition(100.0001, "working", "question", 0.5),), since=110.0
    )
    record = to_record(session)
    assert type(record[6][0]) is float
    transition_record(record, STATUS_CODE[Status.WORKING], 120.5, max_history=1)  # the odd entry is cut
    assert record[6] == [0, 8, 10500]
    assert checked(record).history[0].timestamp == 120.5
