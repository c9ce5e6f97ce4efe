"""Validation of single values: ids, paths, times, counts and pids, each in its bounds.

Each ``check_*`` function returns the value (normalised) or raises :class:`ValidationError`
naming the field. The bounds are the module's constants, each with its reason. The model
builds its values with these, and the store checks its arguments with them.
"""

from __future__ import annotations

import enum
import time

from .errors import ValidationError

# The type checker's names, not imported at run time: ``typing`` costs the hook ~4 ms of
# start-up (mypy takes any name TYPE_CHECKING as true).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import TypeVar

    _E = TypeVar("_E", bound=enum.StrEnum)

#: Longest session id accepted, in bytes of UTF-8. Claude Code ids are 36-character UUIDs.
MAX_ID_LENGTH = 256
#: Longest working directory accepted, in bytes of UTF-8: Linux's PATH_MAX counts bytes, and
#: the bytes are what a session costs to keep and to send.
MAX_PATH_LENGTH = 4096
#: The longest one ``changes`` call may wait in the manager.
MAX_WAIT = 60.0
#: Token counters are 64-bit signed on the wire.
MAX_TOKENS = 2**63 - 1
#: How far past this host's clock a timestamp may be, in seconds. Timestamps come from the
#: clock every process on the host shares, so one ahead of it was made before the clock
#: stepped back (or on another host). A day covers the largest step seen in practice, a
#: hardware clock read as local time instead of UTC (up to 14 h); anything further is not
#: a clock but garbage, which would keep a session from ever going stale and break the
#: arithmetic and the printing of times.
MAX_CLOCK_AHEAD = 86_400.0
#: The longest duration or age accepted, in seconds: 100 years, longer than any session or
#: setting can mean, and small enough that adding it to a timestamp stays exact to the ms.
MAX_DURATION = 100 * 365.25 * 86_400.0


def now() -> float:
    """Seconds since the epoch, to the millisecond: the clock every process on the host
    agrees on, at a resolution that keeps encoded sessions short."""
    global _horizon
    at = round(time.time(), 3)
    _horizon = at + MAX_CLOCK_AHEAD  # free here, since the clock was read anyway
    return at


#: The latest timestamp :func:`check_time` accepts without reading the clock: the bound as
#: of the last :func:`now` (or the last value past it). It trails the true bound, so a value
#: past it is only checked again against a fresh clock, never refused on its account.
_horizon = 0.0


# -- field checks: each returns the normalised value or raises ValidationError ---------


def check_id(value: object, field: str = "id", max_length: int = MAX_ID_LENGTH) -> str:
    if not isinstance(value, str):
        raise ValidationError(field, f"must be a string, not {type(value).__name__}")
    if not value:
        raise ValidationError(field, "must not be empty")
    if len(value) > max_length:  # more characters than bytes allowed: no need to encode it
        raise ValidationError(field, f"is {len(value)} characters long; the limit is {max_length} bytes of UTF-8")
    if not value.isprintable():  # which also refuses lone surrogates, so it encodes
        raise ValidationError(field, f"contains control or unprintable characters: {value!r}")
    if len(value) * 4 > max_length:  # else it cannot be too long: UTF-8 takes at most 4 bytes a character
        size = len(value.encode("utf-8"))
        if size > max_length:
            raise ValidationError(field, f"is {size} bytes long in UTF-8; the limit is {max_length}")
    return value


def _check_enum(kind: type[_E], value: object, field: str) -> _E:
    if type(value) is kind:
        return value
    if isinstance(value, str):
        member = kind._value2member_map_.get(value)
        if member is not None:
            return member  # type: ignore[return-value]
    allowed = ", ".join(member.value for member in kind)
    raise ValidationError(field, f"must be one of {allowed}; got {value!r}")


def check_dir(value: object, field: str = "working_dir") -> str:
    if not isinstance(value, str):
        raise ValidationError(field, f"must be a string, not {type(value).__name__}")
    if not value.startswith("/"):
        raise ValidationError(field, f"must be an absolute path; got {value!r}")
    if len(value) > MAX_PATH_LENGTH:  # more characters than bytes allowed: no need to encode it
        raise ValidationError(field, f"is {len(value)} characters long; the limit is {MAX_PATH_LENGTH} bytes of UTF-8")
    if "\x00" in value:
        raise ValidationError(field, "contains a NUL character")
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        raise ValidationError(field, "contains lone surrogates, which cannot be encoded") from None
    if size > MAX_PATH_LENGTH:
        raise ValidationError(field, f"is {size} bytes long in UTF-8; the limit is {MAX_PATH_LENGTH}")
    return value


def check_time(value: object, field: str) -> float:
    """A timestamp: finite, non-negative epoch seconds, at most :data:`MAX_CLOCK_AHEAD` past
    this host's clock."""
    if type(value) is float and 0.0 <= value <= _horizon:
        return value  # the common case, first and cheap: no clock read
    limit = now() + MAX_CLOCK_AHEAD
    return _check_seconds(value, field, limit, f"{limit:.3f} (a day past this host's clock)")


def check_duration(value: object, field: str, limit: float = MAX_DURATION) -> float:
    """A duration or an age: finite, non-negative seconds, at most ``limit`` (by default
    :data:`MAX_DURATION`)."""
    if type(value) is float and 0.0 <= value <= limit:
        return value  # the common case, first and cheap
    return _check_seconds(value, field, limit, "100 years" if limit == MAX_DURATION else f"{limit:g} s")


def _check_seconds(value: object, field: str, limit: float, bound: str) -> float:
    """``value`` as a float of seconds from 0 to ``limit`` (described as ``bound``). An int
    is compared before it is converted, since float() of one past 1.8e308 overflows."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValidationError(field, f"must be a number, not {type(value).__name__}")
    if not 0 <= value <= limit:  # NaN fails every comparison, so it is refused too
        if isinstance(value, int) and value.bit_length() > 64:
            shown = f"an int of {value.bit_length()} bits"  # repr() of one is slow, and refused past 4,300 digits
        else:
            shown = repr(value)
        raise ValidationError(field, f"must be between 0 and {bound}; got {shown}")
    return float(value)


def check_pid(value: object, field: str = "pid") -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValidationError(field, f"must be an int, not {type(value).__name__}")
    if not 0 < value < 2**31:
        raise ValidationError(field, f"must be a process id (1 to 2**31 - 1); got {value}")
    return value


def check_positive(value: object, field: str) -> int:
    """An int of at least 1 (a size or a count limit)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValidationError(field, f"must be an int >= 1; got {value!r}")
    return value


#: The longest ``closed_reason``: a reason and the agent's own word for it.
MAX_REASON_LENGTH = 64


def check_closed_reason(value: object, field: str = "closed_reason") -> str:
    """A short printable reason (at most MAX_REASON_LENGTH characters)."""
    if not isinstance(value, str) or not value or len(value) > MAX_REASON_LENGTH or not value.isprintable():
        raise ValidationError(field, f"must be 1 to {MAX_REASON_LENGTH} printable characters, not {value!r:.80}")
    return value


#: The longest host id (:func:`shmstore.procs.host_id` makes 16 hex digits; a user may name one).
MAX_HOST_LENGTH = 64


def check_host(value: object, field: str = "host") -> str:
    """A host id: 1 to MAX_HOST_LENGTH of A-Z a-z 0-9 . _ -."""
    if (
        not isinstance(value, str)
        or not 0 < len(value) <= MAX_HOST_LENGTH
        or not value.isascii()
        or not value.replace(".", "").replace("_", "").replace("-", "").isalnum()
    ):
        raise ValidationError(field, f"must be 1 to {MAX_HOST_LENGTH} of A-Z a-z 0-9 . _ -, not {value!r:.80}")
    return value


def check_count(value: object, field: str) -> int:
    """A non-negative int that fits the wire's 64 bits."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValidationError(field, f"must be an int, not {type(value).__name__}")
    if not 0 <= value <= MAX_TOKENS:
        raise ValidationError(field, f"must be between 0 and {MAX_TOKENS}; got {value}")
    return value
