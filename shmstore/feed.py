"""The change feed's values: what kind of change an event is, the event, and what one
``changes`` or ``snapshot`` call returns, with their JSON encoding.

The manager builds this JSON around the sessions' stored bytes (:func:`encode_event`)
without decoding them; clients decode it into these frozen values.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Iterable
from typing import Any

import orjson

from .checks import _check_enum, check_count, check_id
from .model import Session, _fields, loads
from .record import session_from_store


class EventKind(enum.StrEnum):
    """What kind of change an :class:`Event` reports."""

    SET = "set"
    TRANSITION = "transition"
    ADD_USAGE = "add_usage"
    REMOVE = "remove"
    #: A hook reported on the session (created it, changed its status, or just showed life).
    REPORT = "report"
    #: The session ended and left the live sessions for the recently closed ones.
    CLOSE = "close"
    #: The manager marked the session stale: working, but silent for too long.
    STALE = "stale"
    #: Not a change: the watch helper (re)loaded the whole state from a snapshot.
    SNAPSHOT = "snapshot"


@dataclasses.dataclass(frozen=True, slots=True)
class Event:
    """One change to the store: its revision, its kind, the session id, and the session as
    it is after the change (None after a remove). A ``snapshot`` event has no id and
    carries every session instead."""

    revision: int
    kind: EventKind
    id: str | None
    session: Session | None = None
    sessions: tuple[Session, ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"revision": self.revision, "kind": self.kind}
        if self.kind is EventKind.SNAPSHOT:
            data["sessions"] = [s.to_dict() for s in self.sessions or ()]
        else:
            data["id"] = self.id
            data["session"] = None if self.session is None else self.session.to_dict()
        return data

    def to_json(self) -> bytes:
        return orjson.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, data: object) -> Event:
        fields = _fields(data, "event", ("revision", "kind", "id", "session"))
        session = fields["session"]
        return cls(
            revision=check_count(fields["revision"], "event.revision"),
            kind=_check_enum(EventKind, fields["kind"], "event.kind"),
            id=check_id(fields["id"]),
            session=None if session is None else session_from_store(session),
        )


def encode_snapshot(epoch: str, revision: int, sessions: Iterable[bytes]) -> bytes:
    """A ``snapshot()`` reply: the epoch, the revision and the sessions' stored bytes."""
    return b'{"epoch":"%s","revision":%d,"sessions":[%s]}' % (epoch.encode(), revision, b",".join(sessions))


def encode_changes(epoch: str, events: Iterable[tuple[int, EventKind, str, bytes | None]], max_bytes: int) -> bytes:
    """A ``changes()`` reply: the epoch and ``events`` (revision, kind, id, session bytes),
    in order, as many as fit ``max_bytes`` of JSON (at least one)."""
    return join_changes(epoch, fit_events((encode_event(*event) for event in events), max_bytes))


def fit_events(encoded: Iterable[bytes], max_bytes: int) -> list[bytes]:
    """The first of the ``encoded`` events that fit ``max_bytes`` of a reply (at least one)."""
    budget = max_bytes
    fitted: list[bytes] = []
    for data in encoded:
        budget -= len(data) + 1
        if budget < 0 and fitted:
            break
        fitted.append(data)
    return fitted


def join_changes(epoch: str, encoded: Iterable[bytes]) -> bytes:
    """A ``changes()`` reply of events already encoded (:func:`encode_event`)."""
    return b'{"epoch":"%s","events":[%s]}' % (epoch.encode(), b",".join(encoded))


def encode_event(revision: int, kind: EventKind, id: str, session: bytes | None) -> bytes:
    """The JSON of an event, built around the session's stored bytes without re-encoding them."""
    return b'{"revision":%d,"kind":"%s","id":%s,"session":%s}' % (
        revision,
        kind.value.encode(),
        orjson.dumps(id),
        b"null" if session is None else session,
    )


@dataclasses.dataclass(frozen=True, slots=True)
class Changes:
    """What one ``changes`` call returns: the store's epoch and the events it asked for.
    Pass ``epoch`` to the next call as it is: Redis's carries the follower's place in its
    history too (``EPOCH.MARK``, see :mod:`shmstore.redis.store`), so it changes with the
    events while the store stays the same one."""

    epoch: str
    events: tuple[Event, ...]

    @classmethod
    def from_json(cls, data: bytes) -> Changes:
        fields = _fields(loads(data, "changes"), "changes", ("epoch", "events"))
        return cls(fields["epoch"], tuple(Event.from_dict(item) for item in fields["events"]))


@dataclasses.dataclass(frozen=True, slots=True)
class Snapshot:
    """Every session at one revision of one manager (``epoch`` tells managers apart, since a
    restarted manager counts revisions from zero again)."""

    epoch: str
    revision: int
    sessions: tuple[Session, ...]

    @classmethod
    def from_json(cls, data: bytes) -> Snapshot:
        fields = _fields(loads(data, "snapshot"), "snapshot", ("epoch", "revision", "sessions"))
        return cls(fields["epoch"], fields["revision"], tuple(session_from_store(s) for s in fields["sessions"]))
