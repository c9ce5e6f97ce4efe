"""The stored form of a session: the compact record the manager keeps, sends and shares,
packing a :class:`~shmstore.model.Session` into one, and decoding one back (checking what
a client sends is :mod:`shmstore.record_checks`').

The form is internal: everything a user sees is the public JSON of
:meth:`Session.to_json <shmstore.model.Session.to_json>`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import orjson

from .errors import ValidationError
from .model import AgentType, ApiUsage, Session, StateTransition, Status, Terminal, loads

_new = object.__new__

# -- the stored form -------------------------------------------------------------------------
#
# The manager keeps each session as the orjson bytes of a positional array (a "record"),
# not of the public object: no keys, the status and agent type as their index in
# STATUSES and AGENT_TYPES, the resume id as SAME_AS_ID when it equals the id (the hook
# uses one value for both), and the history flat, three values an entry (ENTRY):
#
#   when      an int: the entry's time in milliseconds *before the next entry's* (the
#             last entry's: before ``since``), so a transition appends (0, code, ms) and
#             rewrites one number, and cutting the oldest entries changes none. A float:
#             the time in epoch seconds, for a history with any time that is not a whole
#             millisecond (only ``set`` can write one): every ``when`` of a history is of
#             one kind, so the first tells which.
#   code      from * 4 + to, each a status code.
#   duration  an int: milliseconds; a float: seconds (one that is not whole milliseconds).
#
# Nothing is rounded on the way in: a time is written as an int only when dividing it
# back gives the same float. bench/bench.py's session with 10 history entries takes
# 1,196 bytes as public JSON and 267 as a record; a manager holding 10,000 of them
# shrank from 1,380 to ~480 bytes a session (bench's bytes_per_session_10k). The form is
# internal: the manager stores it, sends it and shares it, the client decodes it into a
# Session, and everything a user sees (--json, the state file, README) is the public
# JSON of Session.to_json().

#: Positions in a record.
(ID, AGENT, STATUS, DIR, SINCE, ACTIVITY, HISTORY, USAGE, STALE, RESUME, PID, PID_START, REVISION, REASON, HOST,
 LAST_EVENT, ASKED_BY, BACKGROUND, TERMINAL) = range(19)  # fmt: skip
RECORD_LENGTH = 19
#: Records as shorter versions of this module wrote them (in a state file, a Redis
#: namespace, or sent by an older client) are read with the later fields None: fields are
#: only ever added at the end. Records are written without trailing nulls past this
#: length (:func:`dump`), so a field that most sessions leave null costs them nothing.
OLDEST_RECORD_LENGTH = 15
#: A status's code in a record is its index here, and an agent type's in AGENT_TYPES.
STATUSES: tuple[Status, ...] = tuple(Status)
AGENT_TYPES: tuple[AgentType, ...] = tuple(AgentType)
STATUS_CODE: dict[str, int] = {status: code for code, status in enumerate(STATUSES)}  # a member or its string value
AGENT_CODE: dict[str, int] = {agent: code for code, agent in enumerate(AGENT_TYPES)}
WORKING, ATTENTION, QUESTION, CLOSED = (
    STATUS_CODE[s] for s in (Status.WORKING, Status.ATTENTION, Status.QUESTION, Status.CLOSED)
)
#: A record's resume id when it is the session's id.
SAME_AS_ID = 1
#: Values a history entry takes in a record: when, from * 4 + to, duration.
ENTRY = 3
_CODES = len(STATUSES)

Record = list[Any]
#: A history entry decoded: timestamp, from code, to code, duration (seconds).
Entry = tuple[float, int, int, float]


def _ms(seconds: float) -> int | None:
    """``seconds`` as whole milliseconds, if that is exactly what it is, else None (-0.0 is
    0 milliseconds: it is read back as 0.0, which it equals)."""
    ms = round(seconds * 1000)
    return ms if ms / 1000 == seconds else None


def _duration(seconds: float) -> float | int:
    ms = _ms(seconds)
    return seconds if ms is None else ms


def flat_history(entries: list[Entry], since: float, floats: bool = False) -> list[Any]:
    """Decoded history entries, oldest first, as a record's history (see above): times in
    milliseconds when every one is whole milliseconds, unless ``floats``."""
    flat: list[Any] = []
    if not floats:
        following, backwards = round(since * 1000), []
        for at, was, to, duration in reversed(entries):
            ms = round(at * 1000)
            if ms / 1000 != at:
                break  # a time that is not whole milliseconds: every time as it is
            whole = round(duration * 1000)  # _duration(), inlined: this loop packs a client's set
            backwards.append((following - ms, was * _CODES + to, whole if whole / 1000 == duration else duration))
            following = ms
        else:
            for entry in reversed(backwards):
                flat += entry
            return flat
    for at, was, to, duration in entries:
        flat += (at, was * _CODES + to, _duration(duration))
    return flat


def history_entries(flat: list[Any], since: float) -> list[Entry]:
    """A record's history decoded, oldest first (trusted: the store wrote it)."""
    entries: list[Entry] = []
    if not flat:
        return entries
    if type(flat[0]) is int:
        following = round(since * 1000)
        for at in range(len(flat) - ENTRY, -1, -ENTRY):
            ms = following - flat[at]
            was, to = divmod(flat[at + 1], _CODES)
            entries.append((ms / 1000, was, to, _seconds(flat[at + 2])))
            following = ms
        entries.reverse()
        return entries
    for at in range(0, len(flat), ENTRY):
        was, to = divmod(flat[at + 1], _CODES)
        entries.append((flat[at], was, to, _seconds(flat[at + 2])))
    return entries


def append_entry(record: Record, at: float, to: int) -> None:
    """Add the entry for a move from the record's status to ``to`` at ``at`` (no earlier
    than its ``since``, which the caller then sets to ``at``)."""
    flat, since = record[HISTORY], record[SINCE]
    code, duration = record[STATUS] * _CODES + to, _duration(round(at - since, 3))
    at_ms = _ms(at)
    if not flat or type(flat[0]) is int:
        if at_ms is not None:
            if flat:  # the last entry's time was counted back from since; now from this one
                flat[-ENTRY] = at_ms - (round(since * 1000) - flat[-ENTRY])
            flat += (0, code, duration)
            return
        if flat:  # a time that is not whole milliseconds: the history takes the float form
            flat[:] = flat_history(history_entries(flat, since), since, floats=True)
    flat += (at, code, duration)


def to_record(session: Session) -> Record:
    """``session`` in the stored form (it was checked when it was made)."""
    return _record(session, _flat(session.history, session.since))  # not kept: a manager makes these


def _record(session: Session, history: list[Any] | tuple[Any, ...]) -> Record:
    usage = session.api_usage
    resume = session.session_id
    return [
        session.id,
        AGENT_CODE[session.agent_type],
        STATUS_CODE[session.status],
        session.working_dir,
        session.since,
        session.last_activity,
        history,
        None if usage is None else [usage.input_tokens, usage.output_tokens],
        session.stale,
        SAME_AS_ID if resume is not None and resume == session.id else resume,
        session.pid,
        session.pid_start,
        session.revision,
        session.closed_reason,
        session.host,
        session.last_event,
        session.asked_by,
        session.background,
        None if session.terminal is None else session.terminal.as_list(),
    ]


def _flat_of(history: tuple[StateTransition, ...], since: float) -> tuple[Any, ...]:
    """``history`` as a record's, from :data:`_FLAT` when this very tuple was packed or
    decoded with this ``since`` before. A client's ``set`` usually sends a session it got
    (or replaced a field of), whose history tuple is the one it decoded: packing its 10
    entries again cost ~55k of a pack's ~67k instructions (callgrind)."""
    known = _FLAT.get(id(history))
    if known is not None and known[0] is history and known[1] == since:
        return known[2]
    flat = tuple(_flat(history, since))
    _remember_flat(history, since, flat)
    return flat


def _flat(history: tuple[StateTransition, ...], since: float) -> list[Any]:
    code = STATUS_CODE
    entries = [(entry.timestamp, code[entry.from_], code[entry.to], entry.duration) for entry in history]
    return flat_history(entries, since)


def _remember_flat(history: tuple[StateTransition, ...], since: float, flat: tuple[Any, ...]) -> None:
    if len(history) > _FLAT_LONGEST:
        return
    if len(_FLAT) >= _FLAT_LIMIT:
        _FLAT.clear()  # as for _BUILT: simpler than an LRU, and as good
    _FLAT[id(history)] = (history, since, flat)


#: History tuples this process packed or decoded lately, by id(), each with the ``since``
#: its flat form counts back from, and that form (a tuple: nothing can change it). The
#: history tuple itself is kept, so that its id names no other while the entry lasts. At
#: most _FLAT_LIMIT of them, of at most _FLAT_LONGEST entries (5x the default
#: max_history): ~100 bytes an entry, so a few MiB at the very worst.
_FLAT: dict[int, tuple[tuple[StateTransition, ...], float, tuple[Any, ...]]] = {}
_FLAT_LIMIT = 256
_FLAT_LONGEST = 100


def pack(session: Session) -> bytes:
    """``session``'s record as the bytes a client sends ``set``."""
    return dump(_record(session, _flat_of(session.history, session.since)))


def dump(record: Record) -> bytes:
    """``record``'s bytes, without the nulls it ends with (:func:`trim`)."""
    return orjson.dumps(trim(record))


def trim(record: Record) -> Record:
    """``record`` without the nulls it ends with past :data:`OLDEST_RECORD_LENGTH` (a
    session with no event time, subagent question, background job or terminal costs no byte for
    them; decoding pads them back); ``record`` itself when it ends with none."""
    end = len(record)
    while end > OLDEST_RECORD_LENGTH and record[end - 1] is None:
        end -= 1
    return record if end == len(record) else record[:end]


def new_record(id: str, agent: AgentType, status: Status, working_dir: str, at: float, reason: str | None) -> Record:
    """The record of a session first reported at ``at``, from values already checked."""
    agent_code, status_code = AGENT_CODE[agent], STATUS_CODE[status]
    return [
        id,
        agent_code,
        status_code,
        working_dir,
        at,
        at,
        [],
        None,
        False,
        None,
        None,
        None,
        0,
        reason,
        None,
        None,
        None,
        None,
        None,
    ]


def load_record(data: bytes) -> Record:
    """A stored record's bytes, decoded, at this version's length (a shorter record, from
    an older version, gets None for the fields it lacks)."""
    record: Record = orjson.loads(data)
    if len(record) < RECORD_LENGTH:
        record += [None] * (RECORD_LENGTH - len(record))
    return record


# -- decoding what the store sends ---------------------------------------------------------
#
# Everything in the store was checked on its way in, and the manager is trusted (its
# protocol is pickle), so a client rebuilds the values it is sent without checking every
# field again: validating a session with ten history entries costs ~50 us, about a whole
# round trip; this costs a few. Anything that does not fit is a ValidationError, never a
# half-built value.


def _setters(cls: type, *names: str) -> tuple[Callable[[object, object], None], ...]:
    # The slots' own descriptors: the fastest way to fill a frozen, slotted value.
    return tuple(cls.__dict__[name].__set__ for name in names)


# Each field's slot setter, named by the field it sets (Session's field order plays no part).
_set_id = _setters(Session, "id")[0]
_set_dir = _setters(Session, "working_dir")[0]
_set_agent = _setters(Session, "agent_type")[0]
_set_status = _setters(Session, "status")[0]
_set_since = _setters(Session, "since")[0]
_set_activity = _setters(Session, "last_activity")[0]
_set_history = _setters(Session, "history")[0]
_set_usage = _setters(Session, "api_usage")[0]
_set_stale = _setters(Session, "stale")[0]
_set_resume = _setters(Session, "session_id")[0]
_set_pid = _setters(Session, "pid")[0]
_set_pid_start = _setters(Session, "pid_start")[0]
_set_rev = _setters(Session, "revision")[0]
_set_reason = _setters(Session, "closed_reason")[0]
_set_host = _setters(Session, "host")[0]
_set_last_event = _setters(Session, "last_event")[0]
_set_asked_by = _setters(Session, "asked_by")[0]
_set_background = _setters(Session, "background")[0]
_set_terminal = _setters(Session, "terminal")[0]
_ENTRY_SET = _setters(StateTransition, *(field.name for field in dataclasses.fields(StateTransition)))
_USAGE_SET = _setters(ApiUsage, "input_tokens", "output_tokens")
#: A history entry's code -> its (from, to) statuses.
_PAIRS = tuple((was, to) for was in STATUSES for to in STATUSES)


def _stored_session(record: Record) -> Session:
    if len(record) < RECORD_LENGTH:  # from an older version
        record = record + [None] * (RECORD_LENGTH - len(record))
    (
        id,
        agent,
        status,
        working_dir,
        since,
        activity,
        flat,
        usage,
        stale,
        resume,
        pid,
        pid_start,
        revision,
        reason,
        host,
        last_event,
        asked_by,
        background,
        terminal,
    ) = record
    session = _new(Session)
    _set_id(session, id)
    _set_dir(session, working_dir)
    _set_agent(session, AGENT_TYPES[agent])
    _set_status(session, STATUSES[status])
    _set_since(session, since)
    _set_activity(session, activity)
    _set_history(session, _stored_history(flat, since) if flat else ())
    tokens = None
    if usage is not None:
        set_in, set_out = _USAGE_SET
        tokens = _new(ApiUsage)
        set_in(tokens, usage[0])
        set_out(tokens, usage[1])
    _set_usage(session, tokens)
    _set_stale(session, stale)
    _set_resume(session, id if resume == SAME_AS_ID and type(resume) is int else resume)
    _set_pid(session, pid)
    _set_pid_start(session, pid_start)
    _set_rev(session, revision)
    _set_reason(session, reason)
    _set_host(session, host)
    _set_last_event(session, last_event)
    _set_asked_by(session, asked_by)
    _set_background(session, background)
    _set_terminal(session, None if terminal is None else Terminal(*terminal))
    return session


def _stored_history(flat: list[Any], since: float) -> tuple[StateTransition, ...]:
    """:func:`history_entries` as the values themselves. A client decodes each session it
    is sent, and successive versions of a session share all but their newest entry, so an
    entry already built is reused (values are frozen): building one cost ~5,000
    instructions, finding it ~2,000 (callgrind; bench's 10-entry session decoded in 87k
    instructions, ~55k with every entry found)."""
    count = len(flat) // ENTRY
    if type(flat[0]) is not int:  # times that are not whole milliseconds: rare, not kept
        return tuple(_stored_entry(flat[at], flat[at + 1], _seconds(flat[at + 2])) for at in range(0, len(flat), ENTRY))
    built, limit = _BUILT, _BUILT_LIMIT
    history: list[Any] = [None] * count
    following = round(since * 1000)
    for k in range(count - 1, -1, -1):
        at = k * ENTRY
        following -= flat[at]
        duration = flat[at + 2]
        # + 0.0: a -0.0 duration is read as 0.0, so that the key names one value (-0.0 == 0.0).
        key = (following, flat[at + 1], duration / 1000 if type(duration) is int else duration + 0.0)
        entry = built.get(key)
        if entry is None:
            entry = _stored_entry(following / 1000, key[1], key[2])
            if len(built) >= limit:
                built.clear()  # simpler than an LRU, and as good for sessions that change
            built[key] = entry
        history[k] = entry
    return tuple(history)


#: Entries already built, by (time in whole milliseconds, code, duration in seconds): a key
#: names one value, whatever form its duration had in the record.
_BUILT: dict[tuple[int, int, float], StateTransition] = {}
_BUILT_LIMIT = 4096


def _seconds(duration: float | int) -> float:
    return duration / 1000 if type(duration) is int else duration


def _stored_entry(at: float, code: int, duration: float) -> StateTransition:
    set_time, set_from, set_to, set_duration = _ENTRY_SET
    entry = _new(StateTransition)
    set_time(entry, at)
    was, to = _PAIRS[code]
    set_from(entry, was)
    set_to(entry, to)
    set_duration(entry, duration)
    return entry


def session_from_store(data: Any, *, remember: bool = False) -> Session:
    """A session as the store sent it: a record (bytes, or already parsed), or the public
    JSON of a manager from before records (which is validated). With ``remember``, its
    history's flat form is kept in :data:`_FLAT`, so that a ``set`` of it (or of a copy with
    the same history) does not pack it again: a client's decodes do so, a manager's not."""
    parsed = loads(data, "session") if isinstance(data, bytes | str) else data
    if type(parsed) is not list:
        return Session.from_dict(parsed)
    try:
        session = _stored_session(parsed)
    except (ValueError, TypeError, IndexError, AttributeError) as exc:
        raise ValidationError("session", f"is not a record the store writes: {exc}") from None
    if remember and session.history:
        _remember_flat(session.history, session.since, tuple(parsed[HISTORY]))
    return session


def public_json(data: bytes) -> bytes:
    """A stored record's bytes as the session's public JSON (:meth:`Session.to_json`)."""
    return session_from_store(data).to_json()


def restamped(session: Session, revision: int, pid_start: int | None) -> Session:
    """``session`` with the ``revision`` and ``pid_start`` the store gave it, copied without
    checking again what its construction checked (``dataclasses.replace`` would run every
    check of ``__post_init__``, ~14 us of a client's ``set``). The store is trusted for the
    two values, as it is for everything :func:`session_from_store` decodes."""
    copy = _new(Session)  # field by field, not in a loop over them: 26k -> 12k instructions
    _set_id(copy, session.id)
    _set_dir(copy, session.working_dir)
    _set_agent(copy, session.agent_type)
    _set_status(copy, session.status)
    _set_since(copy, session.since)
    _set_activity(copy, session.last_activity)
    _set_history(copy, session.history)
    _set_usage(copy, session.api_usage)
    _set_stale(copy, session.stale)
    _set_resume(copy, session.session_id)
    _set_pid(copy, session.pid)
    _set_pid_start(copy, pid_start)
    _set_rev(copy, revision)
    _set_reason(copy, session.closed_reason)
    _set_host(copy, session.host)
    _set_last_event(copy, session.last_event)
    _set_asked_by(copy, session.asked_by)
    _set_background(copy, session.background)
    _set_terminal(copy, session.terminal)
    return copy
