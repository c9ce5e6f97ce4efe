"""The session model: typed, frozen values and their one JSON encoding (single values are
checked by :mod:`~shmstore.checks`).

Everything that crosses a process boundary is encoded here and nowhere else: the wire
carries :meth:`Session.to_json` bytes, the CLI's ``--json`` prints them, and README shows
them. Values are frozen so that a client's copy can never be mistaken for the store's:
the only way to change the store is to call it.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable, Mapping
from typing import Any

import orjson

from . import checks
from .checks import (
    MAX_DURATION,
    MAX_ID_LENGTH,
    _check_enum,
    check_closed_reason,
    check_count,
    check_dir,
    check_duration,
    check_id,
    check_pid,
    check_time,
    now,
)
from .errors import ValidationError


class Status(enum.StrEnum):
    """What an agent session is doing, as the user needs to know it."""

    WORKING = "working"
    ATTENTION = "attention"
    QUESTION = "question"
    CLOSED = "closed"


class AgentType(enum.StrEnum):
    """Which coding agent runs the session."""

    CLAUDE_CODE = "claude_code"


def check_status(value: object, field: str = "status") -> Status:
    return _check_enum(Status, value, field)


def check_agent_type(value: object, field: str = "agent_type") -> AgentType:
    return _check_enum(AgentType, value, field)


_new = object.__new__


def _set(obj: object, name: str, value: object) -> None:
    # Frozen dataclasses normalise their own fields in __post_init__ through this.
    object.__setattr__(obj, name, value)


# -- values ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class StateTransition:
    """One status change. ``duration`` is the time spent in ``from_`` before it.

    ``from`` is a Python keyword, so the field is ``from_``; its JSON key is ``from``.
    """

    timestamp: float
    from_: Status
    to: Status
    duration: float

    def __post_init__(self) -> None:
        _set(self, "timestamp", check_time(self.timestamp, "history.timestamp"))
        _set(self, "from_", check_status(self.from_, "history.from"))
        _set(self, "to", check_status(self.to, "history.to"))
        _set(self, "duration", check_duration(self.duration, "history.duration"))

    def to_dict(self) -> dict[str, Any]:
        return {"timestamp": self.timestamp, "from": self.from_, "to": self.to, "duration": self.duration}

    @classmethod
    def from_dict(cls, data: object) -> StateTransition:
        fields = _fields(data, "history[]", ("timestamp", "from", "to", "duration"))
        # The same checks as __post_init__, without building the value twice: a session
        # decodes many of these.
        entry: StateTransition = _new(cls)
        _set(entry, "timestamp", check_time(fields["timestamp"], "history.timestamp"))
        _set(entry, "from_", check_status(fields["from"], "history.from"))
        _set(entry, "to", check_status(fields["to"], "history.to"))
        _set(entry, "duration", check_duration(fields["duration"], "history.duration"))
        return entry


@dataclasses.dataclass(frozen=True, slots=True)
class ApiUsage:
    """Tokens the session's model calls have used so far."""

    input_tokens: int = 0
    output_tokens: int = 0

    def __post_init__(self) -> None:
        check_count(self.input_tokens, "api_usage.input_tokens")
        check_count(self.output_tokens, "api_usage.output_tokens")

    def to_dict(self) -> dict[str, Any]:
        return {"input_tokens": self.input_tokens, "output_tokens": self.output_tokens}

    @classmethod
    def from_dict(cls, data: object) -> ApiUsage:
        fields = _fields(data, "api_usage", ("input_tokens", "output_tokens"))
        return cls(fields["input_tokens"], fields["output_tokens"])


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Session:
    """The state of one agent session, as the store holds it.

    ``since`` is when ``status`` last changed (epoch seconds); ``last_activity`` is when the
    session last reported anything (it defaults to ``since``). ``closed`` is derived from
    ``status`` so the two can never disagree. ``stale`` is set by the manager on a session
    that has been working with no activity for too long, and cleared by any activity.
    ``pid`` is the agent's process, which the manager watches so that a session whose agent
    died is closed. ``pid_start`` is the start time of the agent process, in clock ticks
    since boot as /proc gave it when the manager first saw the pid; with ``pid``, it
    identifies the agent (a reused pid has another start time). The manager fills it in,
    and leaves it None when the pid is not one it can check (the reporting process is in
    another pid namespace, or the pid had no process): such a session is never closed for
    its pid. ``revision`` is the store-wide revision of the change that last touched the
    session; the store assigns it, and ``set`` can use it to refuse overwriting a newer
    value.

    ``session_id`` is the agent's own **resume id** (Claude Code's ``session_id``, what
    ``claude --resume`` takes), kept so that a closed session can be resumed; ``id`` is the
    store's key (the hook uses the same value for both).

    ``closed_reason`` says why a closed session closed, and is None while it is open:
    ``session_end`` (the agent's hook reported the end; Claude Code's own reason follows a
    colon when it gave one, e.g. ``session_end:logout``), ``agent_gone`` (the manager
    found the agent's process dead), or ``transition`` (someone moved it to ``closed`` by
    hand). A session written whole with ``set`` may carry any short printable reason.
    JSON written before the field existed decodes with None.
    """

    id: str
    working_dir: str
    agent_type: AgentType = AgentType.CLAUDE_CODE
    status: Status = Status.WORKING
    since: float = dataclasses.field(default_factory=now)
    last_activity: float | None = None
    history: tuple[StateTransition, ...] = ()
    api_usage: ApiUsage | None = None
    stale: bool = False
    session_id: str | None = None
    pid: int | None = None
    pid_start: int | None = None
    revision: int = 0
    closed_reason: str | None = None

    def __post_init__(self) -> None:
        check_id(self.id)
        check_dir(self.working_dir)
        _set(self, "agent_type", check_agent_type(self.agent_type))
        _set(self, "status", check_status(self.status))
        _set(self, "since", check_time(self.since, "since"))
        if self.last_activity is None:
            _set(self, "last_activity", self.since)
        else:
            _set(self, "last_activity", check_time(self.last_activity, "last_activity"))
        _set(self, "history", _check_history(self.history))
        if not isinstance(self.stale, bool):
            raise ValidationError("stale", f"must be true or false, not {type(self.stale).__name__}")
        if self.pid is not None:
            check_pid(self.pid)
        if self.pid_start is not None:
            check_count(self.pid_start, "pid_start")
            if self.pid is None:
                raise ValidationError("pid_start", "is the start time of the process pid, so it needs a pid")
        if self.api_usage is not None and not isinstance(self.api_usage, ApiUsage):
            raise ValidationError("api_usage", f"must be an ApiUsage or None, not {type(self.api_usage).__name__}")
        if self.session_id is not None:
            check_id(self.session_id, "session_id")
        check_count(self.revision, "revision")
        if self.closed_reason is not None:
            check_closed_reason(self.closed_reason)
            if self.status is not Status.CLOSED:
                raise ValidationError("closed_reason", f"is only for a closed session, not one that is {self.status}")

    @property
    def closed(self) -> bool:
        """True once the session has ended (its status is ``closed``)."""
        return self.status is Status.CLOSED

    # -- encoding -------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "agent_type": self.agent_type,
            "status": self.status,
            "working_dir": self.working_dir,
            "since": self.since,
            "last_activity": self.last_activity,
            "history": [entry.to_dict() for entry in self.history],
            "api_usage": None if self.api_usage is None else self.api_usage.to_dict(),
            "closed": self.closed,
            "stale": self.stale,
            "session_id": self.session_id,
            "pid": self.pid,
            "pid_start": self.pid_start,
            "revision": self.revision,
            "closed_reason": self.closed_reason,
        }

    def to_json(self) -> bytes:
        return orjson.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, data: object) -> Session:
        fields = _fields(data, "session", _SESSION_KEYS, optional=_SESSION_OPTIONAL)
        history = fields.get("history", ())
        if not isinstance(history, list | tuple):
            raise ValidationError("history", f"must be a list, not {type(history).__name__}")
        usage = fields.get("api_usage")
        session = cls(
            id=fields["id"],
            working_dir=fields["working_dir"],
            agent_type=fields.get("agent_type", AgentType.CLAUDE_CODE),
            status=fields.get("status", Status.WORKING),
            since=fields["since"] if "since" in fields else now(),
            last_activity=fields.get("last_activity"),
            history=tuple(StateTransition.from_dict(entry) for entry in history),
            api_usage=None if usage is None else ApiUsage.from_dict(usage),
            stale=fields.get("stale", False),
            session_id=fields.get("session_id"),
            pid=fields.get("pid"),
            pid_start=fields.get("pid_start"),
            revision=fields.get("revision", 0),
            closed_reason=fields.get("closed_reason"),
        )
        if "closed" in fields and fields["closed"] is not session.closed:
            raise ValidationError("closed", f"must be {session.closed} when status is {session.status}")
        return session

    @classmethod
    def from_json(cls, data: bytes | str) -> Session:
        return cls.from_dict(loads(data, "session"))


_SESSION_KEYS = ("id", "working_dir")
_SESSION_OPTIONAL = (
    "agent_type",
    "status",
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
)


class ClosedReason(enum.StrEnum):
    """Why the store closed a session (:attr:`Session.closed_reason`)."""

    SESSION_END = "session_end"
    AGENT_GONE = "agent_gone"
    TRANSITION = "transition"


def _check_history(history: object) -> tuple[StateTransition, ...]:
    if not isinstance(history, list | tuple):
        raise ValidationError("history", f"must be a sequence of StateTransition, not {type(history).__name__}")
    for entry in history:
        if not isinstance(entry, StateTransition):
            raise ValidationError("history", f"entries must be StateTransition, not {type(entry).__name__}")
    return tuple(history)


_KEY_SETS: dict[tuple[str, ...], frozenset[str]] = {}


def _fields(data: object, what: str, required: tuple[str, ...], optional: tuple[str, ...] = ()) -> Mapping[str, Any]:
    """``data`` as a mapping that has every required key and no unknown one."""
    shape = required + optional
    keys = _KEY_SETS.get(shape)
    if keys is None:
        keys = _KEY_SETS[shape] = frozenset(shape)
    if type(data) is dict and data.keys() == keys:
        return data  # every key present and none unknown: the shape the store itself writes
    if not isinstance(data, Mapping):
        raise ValidationError(what, f"must be a JSON object, not {type(data).__name__}")
    missing = [key for key in required if key not in data]
    if missing:
        raise ValidationError(what, f"missing {', '.join(missing)}")
    unknown = sorted(set(data) - set(required) - set(optional), key=str)
    if unknown:
        raise ValidationError(what, f"unknown field(s) {', '.join(map(str, unknown))}")
    return data


def loads(data: bytes | str, what: str) -> Any:
    """Parse JSON, turning a parse failure into our ValidationError."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise ValidationError(what, f"is not valid JSON: {exc}") from None


# -- checking a session's JSON without building it -------------------------------------------
#
# The manager stores what ``set`` is sent. Building a Session to check it cost ~48 us for a
# 10-entry session (JSON parse included) on the development VM, most of a set's work in
# the manager; checking each field of the decoded JSON in place costs ~17 us (measured
# in-process, interleaved). Both apply the same check_* functions, in the same order, to the same fields: a
# session the model refuses is refused here with the same error (tests/test_model.py
# compares the two on generated input).


def session_record(data: bytes | str, max_id_length: int = MAX_ID_LENGTH) -> dict[str, Any]:
    """Session JSON checked field by field, in one pass, as the record the store keeps:
    every field in :meth:`Session.to_dict`'s order, enums as members, times as floats,
    ``last_activity`` filled in. Raises :class:`ValidationError` wherever
    :meth:`Session.from_json` would (``id`` is also held to ``max_id_length``)."""
    fields = _fields(loads(data, "session"), "session", _SESSION_KEYS, optional=_SESSION_OPTIONAL)
    history = fields.get("history", ())
    if not isinstance(history, list | tuple):
        raise ValidationError("history", f"must be a list, not {type(history).__name__}")
    entries = _history_record(history)
    usage = fields.get("api_usage")
    if usage is not None:
        counts = _fields(usage, "api_usage", ("input_tokens", "output_tokens"))
        usage = {
            "input_tokens": check_count(counts["input_tokens"], "api_usage.input_tokens"),
            "output_tokens": check_count(counts["output_tokens"], "api_usage.output_tokens"),
        }
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
    if pid is not None:
        check_pid(pid)
    if pid_start is not None:
        check_count(pid_start, "pid_start")
        if pid is None:
            raise ValidationError("pid_start", "is the start time of the process pid, so it needs a pid")
    session_id = fields.get("session_id")
    if session_id is not None:
        check_id(session_id, "session_id")
    revision = check_count(fields.get("revision", 0), "revision")
    reason = fields.get("closed_reason")
    if reason is not None:
        check_closed_reason(reason)
        if status is not Status.CLOSED:
            raise ValidationError("closed_reason", f"is only for a closed session, not one that is {status}")
    closed = status is Status.CLOSED
    if "closed" in fields and fields["closed"] is not closed:
        raise ValidationError("closed", f"must be {closed} when status is {status}")
    return {
        "id": id,
        "agent_type": agent,
        "status": status,
        "working_dir": working_dir,
        "since": since,
        "last_activity": last_activity,
        "history": entries,
        "api_usage": usage,
        "closed": closed,
        "stale": stale,
        "session_id": session_id,
        "pid": pid,
        "pid_start": pid_start,
        "revision": revision,
        "closed_reason": reason,
    }


def _history_record(history: list[Any] | tuple[Any, ...]) -> list[Any]:
    """History entries' JSON, each checked as :meth:`StateTransition.from_dict` checks it.
    Entries as the store writes them pass the same bounds inline, in this loop, and are
    kept as they are (a session may carry hundreds of them): each value is already what
    its check would return or, a status, encodes the same. Any other entry takes the
    checks' own path (:func:`_entry_record`)."""
    horizon, statuses, keys = checks._horizon, _STATUS, _ENTRY_KEYS
    entries = []
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
                and was in statuses
                and to in statuses
            ):
                entries.append(entry)
                continue
        entries.append(_entry_record(entry))
    return entries


def _entry_record(data: object) -> dict[str, Any]:
    """One history entry's JSON, checked as :meth:`StateTransition.from_dict` checks it."""
    fields = _fields(data, "history[]", _ENTRY_KEYS)
    return {
        "timestamp": check_time(fields["timestamp"], "history.timestamp"),
        "from": check_status(fields["from"], "history.from"),
        "to": check_status(fields["to"], "history.to"),
        "duration": check_duration(fields["duration"], "history.duration"),
    }


_ENTRY_KEYS = ("timestamp", "from", "to", "duration")


# -- decoding what the store sends ---------------------------------------------------------
#
# Everything in the store was validated on its way in, and the manager is trusted (its
# protocol is pickle), so a client rebuilds the values it is sent without checking every
# field again: validating a session with ten history entries costs ~50 us, about a whole
# round trip; this costs ~10. Anything that does not fit falls back to the validating
# path, so a malformed reply is still a ValidationError, never a half-built value.

_STATUS = {status.value: status for status in Status}
_AGENT_TYPE = {agent.value: agent for agent in AgentType}


def _setters(cls: type, *names: str) -> tuple[Callable[[object, object], None], ...]:
    # The slots' own descriptors: the fastest way to fill a frozen, slotted value.
    return tuple(cls.__dict__[name].__set__ for name in names)


# In field order, as _stored_session unpacks them.
_SESSION_FIELDS = tuple(field.name for field in dataclasses.fields(Session))
_SESSION_SET = _setters(Session, *_SESSION_FIELDS)
_REVISION, _PID_START = _SESSION_FIELDS.index("revision"), _SESSION_FIELDS.index("pid_start")
_ENTRY_SET = _setters(StateTransition, *(field.name for field in dataclasses.fields(StateTransition)))


def _stored_session(data: Mapping[str, Any]) -> Session:
    (
        set_id,
        set_dir,
        set_agent,
        set_status,
        set_since,
        set_activity,
        set_history,
        set_usage,
        set_stale,
        set_resume,
        set_pid,
        set_pid_start,
        set_rev,
        set_reason,
    ) = _SESSION_SET
    set_time, set_from, set_to, set_duration = _ENTRY_SET
    status = _STATUS
    history = []
    for entry in data["history"]:
        transition = _new(StateTransition)
        set_time(transition, entry["timestamp"])
        set_from(transition, status[entry["from"]])
        set_to(transition, status[entry["to"]])
        set_duration(transition, entry["duration"])
        history.append(transition)
    session = _new(Session)
    set_id(session, data["id"])
    set_dir(session, data["working_dir"])
    set_agent(session, _AGENT_TYPE[data["agent_type"]])
    set_status(session, status[data["status"]])
    set_since(session, data["since"])
    set_activity(session, data["last_activity"])
    set_history(session, tuple(history))
    usage = data["api_usage"]
    set_usage(session, None if usage is None else ApiUsage(usage["input_tokens"], usage["output_tokens"]))
    set_stale(session, data["stale"])
    set_resume(session, data["session_id"])
    set_pid(session, data["pid"])
    set_pid_start(session, data["pid_start"])
    set_rev(session, data["revision"])
    set_reason(session, data["closed_reason"])  # absent in JSON from before it: the validating path
    return session


def session_from_store(data: Any) -> Session:
    """A session as the store encoded it (bytes, or already parsed)."""
    parsed = loads(data, "session") if isinstance(data, bytes | str) else data
    try:
        return _stored_session(parsed)
    except (KeyError, TypeError, AttributeError):
        return Session.from_dict(parsed)


def restamped(session: Session, revision: int, pid_start: int | None) -> Session:
    """``session`` with the ``revision`` and ``pid_start`` the store gave it, copied without
    checking again what its construction checked (``dataclasses.replace`` would run every
    check of ``__post_init__``, ~14 us of a client's ``set``). The store is trusted for the
    two values, as it is for everything :func:`session_from_store` decodes."""
    copy = _new(Session)
    for setter, name in zip(_SESSION_SET, _SESSION_FIELDS, strict=True):
        setter(copy, getattr(session, name))
    _SESSION_SET[_REVISION](copy, revision)
    _SESSION_SET[_PID_START](copy, pid_start)
    return copy
