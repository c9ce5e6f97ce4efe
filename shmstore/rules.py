"""The store's rules: what each write does to a session's record, and the checks of its
arguments. Both backends apply these functions (the manager's :class:`~shmstore.store.Store`
under its lock, the Redis backend before its compare-and-set), so that they can never
disagree about what a report, a transition or a usage does.

Records are changed in their decoded form (a list: see :mod:`shmstore.record`), which
costs a few microseconds where building and validating a Session with a long history costs
tens. Records only ever come from :func:`~shmstore.record.to_record`,
:func:`~shmstore.record.new_record` or a check of what a client sent, so they are valid;
these functions keep them so. Statuses are codes (:data:`~shmstore.record.STATUS_CODE`).
"""

from __future__ import annotations

from typing import NamedTuple

import orjson

from . import procs
from .backend import WRITES
from .checks import (
    check_closed_reason,
    check_count,
    check_dir,
    check_id,
    check_pid,
    check_time,
)
from .config import RECORD_RESERVE, Limits
from .errors import (
    ResyncRequiredError,
    ValidationError,
)
from .model import AgentType, ClosedReason, Status, check_agent_type, check_status
from .record import (
    ACTIVITY,
    ASKED_BY,
    ATTENTION,
    BACKGROUND,
    CLOSED,
    ENTRY,
    HISTORY,
    LAST_EVENT,
    PID,
    PID_START,
    QUESTION,
    REASON,
    RESUME,
    SAME_AS_ID,
    SINCE,
    STALE,
    STATUS,
    STATUS_CODE,
    TERMINAL,
    USAGE,
    WORKING,
    Record,
    append_entry,
    dump,
    flat_history,
    history_entries,
    load_record,
    new_record,
)
from .record_checks import stored_record
from .terminal import check_terminal


def pid_start_for(pid: int, fresh: int | None, current: bytes | None) -> int | None:
    """The start time that identifies agent ``pid``, for a caller in our pid namespace:
    /proc's answer now (``fresh``), or, when the pid has no process any more, what the
    stored session (``current``) already had for the same pid: the agent it identified is
    gone, which the reaper will find."""
    if fresh is not None or current is None:
        return fresh
    stored = orjson.loads(current)
    return stored[PID_START] if stored[PID] == pid else None


def transition_record(
    record: Record, to: int, at: float, max_history: int, reason: str = ClosedReason.TRANSITION
) -> Record:
    """Move ``record`` to status code ``to`` at time ``at``: one more history entry,
    ``since`` reset, only the newest ``max_history`` entries kept; ``reason`` is its
    ``closed_reason`` if ``to`` is closed (an open session has none). A clock that stepped
    back never makes a duration negative."""
    at = max(at, record[SINCE])
    append_entry(record, at, to)
    history = record[HISTORY]
    del history[: -ENTRY * max_history]
    if type(history[0]) is float:  # its times in seconds: back to milliseconds once all are whole
        history[:] = flat_history(history_entries(history, at), at)
    record[STATUS] = to
    record[SINCE] = at
    record[REASON] = reason if to == CLOSED else None
    return touch_record(record, at)


def check_feed(epoch: str, revision: int, oldest: int, after: int, asked: str | None, new_store: str) -> None:
    """Whether ``changes(after, epoch=asked)`` can be answered from the feed of store
    ``epoch``, which holds the events ``oldest``..``revision`` (``oldest`` is
    ``revision + 1`` when it holds none); if not, the ResyncRequiredError that says why.
    ``new_store`` says what another epoch means for this backend."""
    if asked is not None and asked != epoch:
        raise ResyncRequiredError(
            f"the store is a new one (epoch {epoch}, not {asked}): {new_store}", reason="epoch", after_revision=after
        )
    if after > revision:
        raise ResyncRequiredError(
            f"revision {after} is ahead of the store's {revision}", reason="ahead", after_revision=after
        )
    if after + 1 < oldest and after < revision:
        raise ResyncRequiredError(
            f"the events after revision {after} have left the log, which holds {oldest}..{revision}",
            reason="compacted",
            after_revision=after,
        )


def check_epoch(epoch: object) -> None:
    """The epoch a caller names: a store's, or None for "whichever"."""
    if epoch is not None and not isinstance(epoch, str):
        raise ValidationError("epoch", f"must be a string or None, not {type(epoch).__name__}")


def check_once(client: object, number: object, method: object) -> None:
    """A client's token, request number and write, as ``once`` takes them."""
    if not isinstance(client, bytes) or not 8 <= len(client) <= 64:
        raise ValidationError("client", f"must be 8 to 64 bytes, not {client!r:.80}")
    check_count(number, "number")
    if not isinstance(method, str) or method not in WRITES:
        raise ValidationError("method", f"must be one of {', '.join(sorted(WRITES))}; got {method!r:.80}")


def checked_set(data: object, expected_revision: object, limits: Limits) -> Record:
    """What ``set`` is sent, checked: the record it stores (:func:`model.stored_record`:
    every field in one pass over the decoded JSON, with the bounds Session's own checks
    apply, at a fraction of the cost of building one), its history within
    ``max_history``, and the expected revision a count or None."""
    if not isinstance(data, bytes):
        raise ValidationError("session", f"must be JSON bytes, not {type(data).__name__}")
    record = stored_record(data, limits.max_id_length)
    entries = len(record[HISTORY]) // ENTRY
    if entries > limits.max_history:
        raise ValidationError("history", f"has {entries} entries; this store keeps at most {limits.max_history}")
    if expected_revision is not None:
        check_count(expected_revision, "expected_revision")
    return record


#: How much older than a session's last event a report's event may be and still be taken
#: as late, not applied. A report is overtaken by milliseconds, and the spool is delivered
#: within half a second of the manager answering again (before any new report, when it
#: restarts); an event older by more than this is taken as the agent's clock having
#: stepped back (NTP), which must not freeze the session's status until it catches up,
#: nor an event time far in the future freeze it for good.
LATE_WINDOW = 60.0


class Report(NamedTuple):
    """A report's arguments, checked (:func:`checked_report`): what the store needs to
    apply it (:func:`report_record`)."""

    id: str
    to: Status
    working_dir: str
    agent: AgentType
    why: str  # the closed reason it gives, if it closes the session
    pid: int | None
    session_id: str | None
    event: float | None  # when the agent fired it (its clock)
    subagent: str | None  # the subagent of the session's agent that fired it
    background: str | None  # the background job the agent runs as
    pid_start: int | None  # the agent's start time, as the reporter read it
    terminal: list[str | None] | None  # where the agent runs (shmstore.terminal.FIELDS)


def checked_report(
    id: object,
    status: object,
    working_dir: object,
    pid: object = None,
    session_id: object = None,
    agent_type: object = AgentType.CLAUDE_CODE,
    reason: object = None,
    at: object = None,
    subagent: object = None,
    background: object = None,
    pid_start: object = None,
    terminal: object = None,
    *,
    max_id_length: int,
) -> Report:
    """A report's arguments (:meth:`Store.report`'s) checked; ValidationError names the
    first that is wrong. The closed reason is ``session_end``, then ``:reason`` when the
    agent said why."""
    check_id(id, max_length=max_id_length)
    to = check_status(status)
    check_dir(working_dir)
    agent = check_agent_type(agent_type)
    if pid is not None:
        check_pid(pid)
    if session_id is not None:
        check_id(session_id, "session_id")
    why = ClosedReason.SESSION_END.value
    if reason is not None:
        why = check_closed_reason(f"{why}:{reason}" if isinstance(reason, str) else reason, "reason")
    for value, field in ((subagent, "subagent"), (background, "background")):
        if value is not None:
            check_id(value, field)
    if pid_start is not None:
        check_count(pid_start, "pid_start")
        if pid is None:
            raise ValidationError("pid_start", "is the start time of the process pid, so it needs a pid")
    event = None if at is None else check_time(at, "at")
    where = check_terminal(terminal)
    return Report(id, to, working_dir, agent, why, pid, session_id, event, subagent, background, pid_start, where)  # type: ignore[arg-type]


def report_record(current: bytes | None, report: Report, at: float, max_history: int) -> tuple[Record | None, bool]:
    """What ``report`` makes, at ``at`` (the store's clock), of the stored session
    ``current`` (None: none), and whether it moved the session. None when there is
    nothing to do: the end of a session the store does not hold (an agent view's own end,
    or a start that never came) creates nothing.

    A new session is created at the report's status. An existing one counts the report
    as activity, and moves to its status (a transition only if the status changes) unless:

    * the report's event is older than the session's last event, by up to
      :data:`LATE_WINDOW` (it arrived late: waited in a spool, or was overtaken), or
    * it is a subagent's (``report.subagent``) and would only move the session to working
      while the agent waits for the user (attention: a background subagent works on), or
      waits on a question that is not that subagent's own, or
    * it comes late from the agent process whose death closed the session (:func:`_from_the_dead`).

    The pid and its start time are the caller's to set (each backend knows them its own
    way), and only on a report that moved the session."""
    code = STATUS_CODE[report.to]
    if current is None:
        if code == CLOSED:
            return None, False
        record = new_record(report.id, report.agent, report.to, report.working_dir, at, None)
    else:
        record = load_record(current)
        last, status = record[LAST_EVENT], record[STATUS]
        if report.event is not None and last is not None and 0 < last - report.event <= LATE_WINDOW:
            return touch_record(record, at), False
        if report.subagent is not None and code == WORKING and _waits_on_another(record, report.subagent):
            return touch_record(record, at), False
        if _from_the_dead(record, report):
            return touch_record(record, at), False
        if status != code:
            transition_record(record, code, at, max_history, report.why)
        touch_record(record, at)
    record[ASKED_BY] = report.subagent if code == QUESTION else None
    if report.session_id is not None:
        record[RESUME] = SAME_AS_ID if report.session_id == report.id else report.session_id
    if report.event is not None:
        record[LAST_EVENT] = report.event
    if report.background is not None:
        record[BACKGROUND] = report.background
    if report.terminal is not None:
        record[TERMINAL] = report.terminal
    return record, True


def _from_the_dead(record: Record, report: Report) -> bool:
    """Whether ``report`` comes from the very agent process (pid and start time) whose
    death closed the session: it fired before that death and arrives late (from a spool, or
    a manager that was hung while the agent ended), so it must not bring back a session
    whose agent is gone. A session that truly comes back does so in a new process."""
    return bool(
        record[STATUS] == CLOSED
        and record[REASON] == ClosedReason.AGENT_GONE
        and report.pid is not None
        and report.pid_start is not None
        and (report.pid, report.pid_start) == (record[PID], record[PID_START])
    )


def _waits_on_another(record: Record, subagent: str) -> bool:
    """Whether the session waits for the user for something other than ``subagent``: at
    its prompt (attention), or on a question of the agent or another subagent."""
    status = record[STATUS]
    return bool(status == ATTENTION or (status == QUESTION and record[ASKED_BY] != subagent))


def encoded(record: Record, limit: int, outside: bool) -> bytes:
    """``record``'s bytes, within ``limit`` (max_record_bytes). A record written from
    ``outside`` (``set``, or created by ``report``) must leave RECORD_RESERVE of it free,
    else ValidationError; a record the store changed that outgrew it loses its oldest
    history entries."""
    # orjson builds its result in a 4 KiB buffer and shrinks it in place, which leaves
    # a hole that later buffers do not fit: kept for long, a 1 KiB session pinned about
    # 3.7 KiB of heap (measured). An exact-size copy costs 0.15 us and packs tightly.
    data = memoryview(dump(record)).tobytes()
    if outside and len(data) > limit - RECORD_RESERVE:
        raise ValidationError(
            "session",
            f"is {len(data)} bytes as a stored record; a session's record may be at most {limit - RECORD_RESERVE} "
            f"(max_record_bytes {limit}, less {RECORD_RESERVE} kept for the store's own changes)",
        )
    return _shed_history(record, data, limit) if len(data) > limit else data


def _shed_history(record: Record, data: bytes, limit: int) -> bytes:
    """``record`` without as many of its oldest history entries as it takes to fit in
    ``limit`` bytes. Only records the store itself grew come here, and RECORD_RESERVE
    leaves them room for everything but history, so this always succeeds."""
    history = record[HISTORY]
    excess, drop = len(data) - limit, 0
    while excess > 0 and drop < len(history):
        excess -= len(orjson.dumps(history[drop : drop + ENTRY])) - 1  # its values and their commas
        drop += ENTRY
    del history[:drop]
    data = memoryview(dump(record)).tobytes()
    if len(data) > limit:  # not reachable while RECORD_RESERVE holds
        raise ValidationError("session", f"is {len(data)} bytes as a stored record; the limit is {limit}")
    return data


def touch_record(record: Record, at: float) -> Record:
    """The session reported something at ``at``: it is active, so no longer stale."""
    record[ACTIVITY] = max(at, record[ACTIVITY])
    record[STALE] = False
    return record


def add_usage_record(record: Record, input_tokens: int, output_tokens: int) -> Record:
    """Add token counts to ``record``; refuses totals the wire cannot carry."""
    usage = record[USAGE] or (0, 0)
    record[USAGE] = [
        check_count(usage[0] + check_count(input_tokens, "input_tokens"), "api_usage.input_tokens"),
        check_count(usage[1] + check_count(output_tokens, "output_tokens"), "api_usage.output_tokens"),
    ]
    return record


def agent_gone(record: Record) -> bool:
    """Whether the session's agent process is gone: no live process has its pid *and* its
    start time (:func:`procs.agent_alive`; no clock is compared). A session with no
    ``pid_start`` (its pid came from another pid namespace, or named no process when
    reported) is never gone for its pid. Read this host's /proc: a caller on another host
    must not ask."""
    pid, start = record[PID], record[PID_START]
    return pid is not None and start is not None and not procs.agent_alive(pid, start)


def silent_at_work(record: Record, at: float, stale_after: float) -> bool:
    """Whether a session working has reported nothing for ``stale_after`` seconds at
    ``at`` (a session that waits for the user is never silent)."""
    return bool(record[STATUS] == WORKING and at - record[ACTIVITY] >= stale_after)
