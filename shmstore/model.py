"""The session model: typed, frozen values and their public JSON (single values are
checked by :mod:`~shmstore.checks`).

What a user sees of a session is encoded here and nowhere else: the CLI's ``--json``, the
state file of version 1, README's examples and a session's JSON on the change feed are
:meth:`Session.to_json`. Values are frozen so that a client's copy can never be mistaken
for the store's: the only way to change the store is to call it. How the store keeps a
session (a compact record) is :mod:`shmstore.record`'s.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from typing import Any

import orjson

from .checks import (
    _check_enum,
    check_closed_reason,
    check_count,
    check_dir,
    check_duration,
    check_host,
    check_id,
    check_pid,
    check_time,
    now,
)
from .errors import ValidationError
from .terminal import FIELDS as TERMINAL_FIELDS
from .terminal import check_terminal


class Status(enum.StrEnum):
    """What an agent session is doing, as the user needs to know it."""

    WORKING = "working"
    ATTENTION = "attention"
    QUESTION = "question"
    CLOSED = "closed"


class AgentType(enum.StrEnum):
    """Which coding agent runs the session."""

    CLAUDE_CODE = "claude_code"
    CODEX = "codex"
    GEMINI_CLI = "gemini_cli"
    COPILOT_CLI = "copilot_cli"
    CURSOR = "cursor"
    OPENCODE = "opencode"


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


@dataclasses.dataclass(frozen=True, slots=True)
class Terminal:
    """Where a session's agent runs (what the hook read from its environment and /proc): its
    tmux pane and tmux server's socket, its tty, and its WezTerm pane, kitty window or
    iTerm2 session; None for each one not known. ``shmstore go`` jumps to the tmux pane."""

    tmux_pane: str | None = None
    tmux_socket: str | None = None
    tty: str | None = None
    wezterm_pane: str | None = None
    kitty_window_id: str | None = None
    iterm_session_id: str | None = None

    def __post_init__(self) -> None:
        check_terminal(self.as_list())

    def as_list(self) -> list[str | None]:
        """The terminal as a record and a report hold it (:data:`shmstore.terminal.FIELDS`)."""
        return [getattr(self, name) for name in TERMINAL_FIELDS]

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in TERMINAL_FIELDS}

    @classmethod
    def from_dict(cls, data: object) -> Terminal:
        return cls(**_fields(data, "terminal", (), optional=TERMINAL_FIELDS))


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

    ``host`` names the machine (and pid namespace) the agent runs on, when sessions of
    several hosts share one store (the Redis backend: :func:`shmstore.procs.host_id`); a
    pid is checked only by a reaper on that host. None for a manager's own sessions.

    ``last_event`` is when the agent fired the newest event whose report moved this session
    (epoch seconds, by the clock of the agent's host): a report of an older event, arriving
    late (kept in the hook's spool, or overtaken by a faster one), counts as activity but
    never moves the status back. It is compared only with other events of the same agent,
    so no two hosts' clocks are compared. None until a report carries an event time.

    ``asked_by`` is the subagent whose question the session waits on (``question`` from an
    event of a subagent of the session's agent: Claude Code's ``agent_id``); None for the
    agent's own question, or no question. Only that subagent's next event ends it.

    ``background`` is set when the agent runs in the background, detached from any
    terminal (Claude Code's ``claude --bg`` and agent view): its job's short id, what
    ``claude attach`` takes. None for an agent in a terminal.

    ``terminal`` is where the agent runs (:class:`Terminal`), as its hook last read it;
    None when nothing identified one.
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
    host: str | None = None
    last_event: float | None = None
    asked_by: str | None = None
    background: str | None = None
    terminal: Terminal | None = None

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
        _check_agent_pid(self.pid, self.pid_start)
        if self.api_usage is not None and not isinstance(self.api_usage, ApiUsage):
            raise ValidationError("api_usage", f"must be an ApiUsage or None, not {type(self.api_usage).__name__}")
        if self.session_id is not None:
            check_id(self.session_id, "session_id")
        check_count(self.revision, "revision")
        if self.closed_reason is not None:
            check_closed_reason(self.closed_reason)
            if self.status is not Status.CLOSED:
                raise ValidationError("closed_reason", f"is only for a closed session, not one that is {self.status}")
        if self.host is not None:
            check_host(self.host)
        if self.last_event is not None:
            _set(self, "last_event", check_time(self.last_event, "last_event"))
        if self.asked_by is not None:
            check_id(self.asked_by, "asked_by")
            if self.status is not Status.QUESTION:
                raise ValidationError(
                    "asked_by", f"is only for a session with a question, not one that is {self.status}"
                )
        if self.background is not None:
            check_id(self.background, "background")
        if self.terminal is not None and not isinstance(self.terminal, Terminal):
            raise ValidationError("terminal", f"must be a Terminal or None, not {type(self.terminal).__name__}")

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
            "host": self.host,
            "last_event": self.last_event,
            "asked_by": self.asked_by,
            "background": self.background,
            "terminal": None if self.terminal is None else self.terminal.to_dict(),
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
            host=fields.get("host"),
            last_event=fields.get("last_event"),
            asked_by=fields.get("asked_by"),
            background=fields.get("background"),
            terminal=None if fields.get("terminal") is None else Terminal.from_dict(fields["terminal"]),
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
    "host",
    "last_event",
    "asked_by",
    "background",
    "terminal",
)


class ClosedReason(enum.StrEnum):
    """Why the store closed a session (:attr:`Session.closed_reason`)."""

    SESSION_END = "session_end"
    AGENT_GONE = "agent_gone"
    TRANSITION = "transition"
    #: Its host's reaper stopped renewing its lease (a store several hosts share) and the
    #: session stayed silent for ``host_grace`` seconds more.
    HOST_GONE = "host_gone"


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


def _check_agent_pid(pid: object, pid_start: object) -> None:
    """The agent's pid and its start time, each optional, but no start time without a pid."""
    if pid is not None:
        check_pid(pid)
    if pid_start is not None:
        check_count(pid_start, "pid_start")
        if pid is None:
            raise ValidationError("pid_start", "is the start time of the process pid, so it needs a pid")
