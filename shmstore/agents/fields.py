"""Reading a hook payload's fields as the store takes them, for every adapter: the session's
id and working directory (a ValidationError names a field that is wrong), and the fields
a report can do without (an id or an end reason the store would refuse is dropped, never
failing the report that carries it).

On the hook's path: the standard library's light modules only.
"""

from __future__ import annotations

from ..checks import check_closed_reason, check_dir, check_id
from ..errors import ValidationError

TYPE_CHECKING = False  # as typing's, without importing typing (~4 ms of the hook's start-up)
if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import Any


def session_and_cwd(payload: Mapping[str, Any], session_field: str, cwd: object) -> tuple[str, str]:
    """The session id under ``session_field`` and the working directory ``cwd``, checked."""
    return check_id(payload.get(session_field), session_field), check_dir(cwd, "cwd")


def event_name(value: object, field: str) -> str:
    """The event's name, which every report needs."""
    if not isinstance(value, str) or not value:
        raise ValidationError(field, "is missing")
    return value


def an_id(value: object) -> str | None:
    """``value`` if it is an id the store takes, else None (never fail a report for it)."""
    try:
        return check_id(value) if value else None
    except ValidationError:
        return None


def end_reason(reason: object) -> str | None:
    """An agent's word for why a session ended, when the store takes it as
    ``session_end:REASON`` (:func:`check_closed_reason`, as ``Store.report`` makes it);
    anything else is dropped, so that the session is closed whatever the reason looks like."""
    if not isinstance(reason, str) or not reason:
        return None
    try:
        check_closed_reason(f"session_end:{reason}", "reason")
    except ValidationError:
        return None
    return reason
