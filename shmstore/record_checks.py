"""Checking what a client sends ``set`` (a record, or a session's public JSON) in one
pass, as the record the store keeps, without building a :class:`~shmstore.model.Session`.

"""

from __future__ import annotations

from typing import Any

from . import checks
from .checks import (
    MAX_DURATION,
    MAX_ID_LENGTH,
    check_closed_reason,
    check_count,
    check_dir,
    check_duration,
    check_host,
    check_id,
    check_time,
    now,
)
from .errors import ValidationError
from .model import (
    _SESSION_KEYS,
    _SESSION_OPTIONAL,
    AgentType,
    Status,
    Terminal,
    _check_agent_pid,
    _fields,
    check_agent_type,
    check_status,
    loads,
)
from .record import (
    _CODES,
    ACTIVITY,
    AGENT,
    AGENT_CODE,
    AGENT_TYPES,
    ASKED_BY,
    BACKGROUND,
    CLOSED,
    DIR,
    ENTRY,
    HISTORY,
    HOST,
    ID,
    LAST_EVENT,
    OLDEST_RECORD_LENGTH,
    PID,
    PID_START,
    QUESTION,
    REASON,
    RECORD_LENGTH,
    RESUME,
    REVISION,
    SAME_AS_ID,
    SINCE,
    STALE,
    STATUS,
    STATUS_CODE,
    STATUSES,
    TERMINAL,
    USAGE,
    Entry,
    Record,
    flat_history,
)
from .terminal import check_terminal

# -- checking what a client sends, without building a Session ------------------------------
#
# ``set`` stores what it is sent. Building a Session to check it cost ~48 us for a
# 10-entry session (JSON parse included) on the development VM, most of a set's work in
# the manager; checking each field of the decoded JSON in place costs ~17 us for the
# public JSON, less for a record (measured in-process, interleaved). Both paths apply the
# same check_* functions as the model: whatever they accept is a valid Session
# (tests/test_model.py checks both against the model on generated input).


def stored_record(data: bytes | str, max_id_length: int = MAX_ID_LENGTH) -> Record:
    """What a client sent ``set`` (a record, or a session's public JSON), checked field by
    field in one pass, as the record the store keeps. Raises :class:`ValidationError`
    naming the first bad field (``id`` is also held to ``max_id_length``)."""
    parsed = loads(data, "session")
    if type(parsed) is list:
        return checked_record(parsed, max_id_length)
    return session_record(parsed, max_id_length)


def checked_record(record: list[Any], max_id_length: int = MAX_ID_LENGTH) -> Record:
    """A decoded record (as :func:`pack` makes them) with every field checked, in
    Session.__post_init__'s order; ValidationError names the first that is wrong."""
    if type(record) is not list:
        raise ValidationError("session", f"a record is a list, not {type(record).__name__}")
    if not OLDEST_RECORD_LENGTH <= len(record) <= RECORD_LENGTH:
        raise ValidationError(
            "session", f"a record has {OLDEST_RECORD_LENGTH} to {RECORD_LENGTH} fields, not {len(record)}"
        )
    record += [None] * (RECORD_LENGTH - len(record))
    id = record[ID] = check_id(record[ID], max_length=max_id_length)
    check_dir(record[DIR])
    _check_code(record[AGENT], len(AGENT_TYPES), "agent_type")
    status = _check_code(record[STATUS], _CODES, "status")
    since = record[SINCE] = check_time(record[SINCE], "since")
    record[ACTIVITY] = check_time(record[ACTIVITY], "last_activity")
    history = record[HISTORY]
    if type(history) is not list or len(history) % ENTRY:
        raise ValidationError("history", f"must be a flat list of {ENTRY} values an entry")
    _check_flat_history(history, since)
    if type(record[STALE]) is not bool:
        raise ValidationError("stale", f"must be true or false, not {type(record[STALE]).__name__}")
    _check_agent_pid(record[PID], record[PID_START])
    usage = record[USAGE]
    if usage is not None:
        if type(usage) is not list or len(usage) != 2:
            raise ValidationError("api_usage", "must be [input_tokens, output_tokens] or null")
        check_count(usage[0], "api_usage.input_tokens")
        check_count(usage[1], "api_usage.output_tokens")
    resume = record[RESUME]
    if type(resume) is str:
        record[RESUME] = SAME_AS_ID if check_id(resume, "session_id") == id else resume
    elif resume is not None and (type(resume) is not int or resume != SAME_AS_ID):
        raise ValidationError("session_id", f"must be a string, {SAME_AS_ID} (the id) or null, not {resume!r:.80}")
    check_count(record[REVISION], "revision")
    reason = record[REASON]
    if reason is not None:
        check_closed_reason(reason)
        if status != CLOSED:
            raise ValidationError("closed_reason", f"is only for a closed session, not one that is {STATUSES[status]}")
    if record[HOST] is not None:
        check_host(record[HOST])
    if record[LAST_EVENT] is not None:
        record[LAST_EVENT] = check_time(record[LAST_EVENT], "last_event")
    if record[ASKED_BY] is not None:
        check_id(record[ASKED_BY], "asked_by")
        if status != QUESTION:
            raise ValidationError(
                "asked_by", f"is only for a session with a question, not one that is {STATUSES[status]}"
            )
    if record[BACKGROUND] is not None:
        check_id(record[BACKGROUND], "background")
    check_terminal(record[TERMINAL])
    return record


def _check_code(value: object, count: int, field: str) -> int:
    if type(value) is not int or not 0 <= value < count:
        raise ValidationError(field, f"must be a code from 0 to {count - 1}, not {value!r:.80}")
    return value


def _check_flat_history(history: list[Any], since: float) -> None:
    """A record's history, entry by entry, as :meth:`StateTransition.from_dict` checks one
    (newest first when its times count back from ``since``). Values as the store writes
    them pass the checks' bounds inline; any other takes the checks' own path."""
    if not history:
        return
    kind, horizon = type(history[0]), checks._horizon
    if kind is not int and kind is not float:
        raise ValidationError("history.timestamp", f"must be a number, not {kind.__name__}")
    following = round(since * 1000)
    for at in range(len(history) - ENTRY, -1, -ENTRY) if kind is int else range(0, len(history), ENTRY):
        when, code, duration = history[at], history[at + 1], history[at + 2]
        if type(when) is not kind:
            raise ValidationError("history.timestamp", f"must all be {kind.__name__}s in one history")
        if kind is int:
            if not -_MAX_MS <= when <= _MAX_MS:
                raise ValidationError("history.timestamp", f"is {when!r:.40} ms from the next; the most is {_MAX_MS}")
            following -= when
            when = following / 1000
        if not 0.0 <= when <= horizon:
            check_time(when, "history.timestamp")
        if type(code) is not int or not 0 <= code < _CODES * _CODES:
            _check_code(code, _CODES * _CODES, "history.code")
        if type(duration) is int:
            if not 0 <= duration <= _MAX_DURATION_MS:
                raise ValidationError("history.duration", f"must be 0 to {_MAX_DURATION_MS} ms; got {duration}")
        elif not (type(duration) is float and 0.0 <= duration <= MAX_DURATION):
            check_duration(duration, "history.duration")


_MAX_DURATION_MS = round(MAX_DURATION * 1000)
#: The most milliseconds between two times the checks allow (both within 0..horizon).
_MAX_MS = 2**53


def session_record(data: object, max_id_length: int = MAX_ID_LENGTH) -> Record:
    """A session's public JSON (parsed, or bytes) checked field by field in one pass, as
    the record the store keeps, ``last_activity`` filled in. Raises
    :class:`ValidationError` wherever :meth:`Session.from_json` would (``id`` is also held
    to ``max_id_length``)."""
    parsed = loads(data, "session") if isinstance(data, bytes | str) else data
    fields = _fields(parsed, "session", _SESSION_KEYS, optional=_SESSION_OPTIONAL)
    history = fields.get("history", ())
    if not isinstance(history, list | tuple):
        raise ValidationError("history", f"must be a list, not {type(history).__name__}")
    entries = _history_entries(history)
    usage = fields.get("api_usage")
    if usage is not None:
        counts = _fields(usage, "api_usage", ("input_tokens", "output_tokens"))
        usage = [
            check_count(counts["input_tokens"], "api_usage.input_tokens"),
            check_count(counts["output_tokens"], "api_usage.output_tokens"),
        ]
    # From here in Session.__post_init__'s order, so that the first bad field is the same one.
    id = check_id(fields["id"], max_length=max_id_length)
    working_dir = check_dir(fields["working_dir"])
    agent = check_agent_type(fields.get("agent_type", AgentType.CLAUDE_CODE))
    status = check_status(fields.get("status", Status.WORKING))
    since = check_time(fields["since"], "since") if "since" in fields else now()
    last_activity = fields.get("last_activity")
    last_activity = since if last_activity is None else check_time(last_activity, "last_activity")
    stale = fields.get("stale", False)
    if not isinstance(stale, bool):
        raise ValidationError("stale", f"must be true or false, not {type(stale).__name__}")
    pid, pid_start = fields.get("pid"), fields.get("pid_start")
    _check_agent_pid(pid, pid_start)
    session_id = fields.get("session_id")
    if session_id is not None:
        check_id(session_id, "session_id")
    revision = check_count(fields.get("revision", 0), "revision")
    reason = fields.get("closed_reason")
    if reason is not None:
        check_closed_reason(reason)
        if status is not Status.CLOSED:
            raise ValidationError("closed_reason", f"is only for a closed session, not one that is {status}")
    host = fields.get("host")
    if host is not None:
        check_host(host)
    last_event = fields.get("last_event")
    if last_event is not None:
        last_event = check_time(last_event, "last_event")
    asked_by, background = fields.get("asked_by"), fields.get("background")
    if asked_by is not None:
        check_id(asked_by, "asked_by")
        if status is not Status.QUESTION:
            raise ValidationError("asked_by", f"is only for a session that has a question, not {status}")
    if background is not None:
        check_id(background, "background")
    terminal = fields.get("terminal")
    terminal = None if terminal is None else Terminal.from_dict(terminal).as_list()
    closed = status is Status.CLOSED
    if "closed" in fields and fields["closed"] is not closed:
        raise ValidationError("closed", f"must be {closed} when status is {status}")
    return [
        id,
        AGENT_CODE[agent],
        STATUS_CODE[status],
        working_dir,
        since,
        last_activity,
        flat_history(entries, since),
        usage,
        stale,
        SAME_AS_ID if session_id == id else session_id,
        pid,
        pid_start,
        revision,
        reason,
        host,
        last_event,
        asked_by,
        background,
        terminal,
    ]


def _history_entries(history: list[Any] | tuple[Any, ...]) -> list[Entry]:
    """History entries' public JSON, each checked as :meth:`StateTransition.from_dict`
    checks it. Entries as Session.to_json writes them pass the same bounds inline, in this
    loop; any other takes the checks' own path (:func:`_entry_record`)."""
    horizon, code, keys = checks._horizon, STATUS_CODE, _ENTRY_KEYS
    entries: list[Entry] = []
    for entry in history:
        if type(entry) is dict and tuple(entry) == keys:  # these keys, in this order
            at, was, to, duration = entry["timestamp"], entry["from"], entry["to"], entry["duration"]
            if (
                type(at) is float
                and 0.0 <= at <= horizon
                and type(duration) is float
                and 0.0 <= duration <= MAX_DURATION
                and type(was) is str
                and type(to) is str
                and was in code
                and to in code
            ):
                entries.append((at, code[was], code[to], duration))
                continue
        entries.append(_entry_record(entry))
    return entries


def _entry_record(data: object) -> Entry:
    """One history entry's public JSON, checked as :meth:`StateTransition.from_dict` checks it."""
    fields = _fields(data, "history[]", _ENTRY_KEYS)
    return (
        check_time(fields["timestamp"], "history.timestamp"),
        STATUS_CODE[check_status(fields["from"], "history.from")],
        STATUS_CODE[check_status(fields["to"], "history.to")],
        check_duration(fields["duration"], "history.duration"),
    )


_ENTRY_KEYS = ("timestamp", "from", "to", "duration")
