"""Settings as values: what a store holds at most (:class:`Limits`) and how a manager serves
it (:class:`ServeOptions`).

Each is one frozen dataclass, validated once when it is made and then passed whole: to
:class:`~shmstore.store.Store`, :func:`~shmstore.manager.lifecycle.serve`, across the fork of
:func:`~shmstore.manager.launch.start_server`, and to the command line, whose ``serve`` flags are
generated from the fields (name, default, and the ``help`` in each field's metadata).
The defaults' reasons are in the comments beside them.
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

from .checks import MAX_ID_LENGTH, check_duration, check_positive
from .errors import ValidationError
from .transport.protocol import MAX_MESSAGE

#: The most bytes one stored session (its record, see shmstore.model) may take, by default.
#: Measured: a typical session's record is ~270 bytes (bench/bench.py's session, with a
#: 10-entry history: 264; its public JSON 1,196); the largest the field limits allow with 20
#: history entries, a 4,096-byte working dir, 256-byte ids and every number at its widest
#: is 5,381 bytes (6,780 of public JSON), and 9,732 when every character of the dir and the
#: id needs a two-byte escape (" or \). 16 KiB holds all of these and RECORD_RESERVE; only
#: a dir made mostly of control characters, each a six-byte \u escape, is refused.
DEFAULT_MAX_RECORD_BYTES = 16 * 2**10
#: The least ``max_record_bytes``: the largest session of characters that need no escape,
#: with 20 history entries (5,381 bytes, as above), plus RECORD_RESERVE, fits.
MIN_RECORD_BYTES = 8 * 2**10
#: Of ``max_record_bytes``, what a session written from outside (``set``, or created by
#: ``report``) must leave free for the store's own later changes to it, so that those never
#: fail for size. Measured from the smallest form of a session to the largest the store can
#: make of it without history, on the public JSON, which takes more bytes than the record
#: for every field: a resume id set by a report (514 bytes of JSON for 256 escaped
#: characters, where there was null), token counts, pid, pid_start, revision, times and
#: flags at their widest add 644 bytes. The history entries the store adds are not
#: covered: when one would not fit, the oldest entries go, as they do past ``max_history``.
RECORD_RESERVE = 2**10
#: The most bytes the live sessions may take together, by default, which is also the most
#: one reply of ``changes()`` carries. One ``snapshot()`` or ``list_all()`` carries them all,
#: and must stay under the wire's MAX_MESSAGE (64 MiB) or it fails for every subscriber.
#: 32 MiB holds the default 10,000 sessions (max_sessions) at 3.3 KB each, nearly three times
#: the typical size, or 2,048 of the largest (16 KiB) ones.
DEFAULT_MAX_STORE_BYTES = 32 * 2**20
#: The highest ``max_store_bytes``: half of what the wire carries. The rest is framing,
#: measured at 6 bytes per session for ``list_all`` (pickle's per-item header) and 39 bytes
#: in all for ``snapshot``, far under the other half even for sessions of the minimum size.
MAX_STORE_BYTES = MAX_MESSAGE // 2


#: The levels ``--log-level`` takes, as the ``logging`` module names them (lower case).
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


_Settings = TypeVar("_Settings", "Limits", "ServeOptions")


def changed(settings: type[_Settings], base: _Settings | None, changes: dict[str, Any], field: str) -> _Settings:
    """``base`` (the defaults when None) with the fields named in ``changes`` changed,
    validated; a keyword that names no field is a ValidationError on ``field``."""
    try:
        return settings(**changes) if base is None else dataclasses.replace(base, **changes)
    except TypeError as exc:
        raise ValidationError(field, str(exc)) from None


def _setting(default: Any, help: str, metavar: str = "N") -> Any:
    return dataclasses.field(default=default, metadata={"help": help, "metavar": metavar})


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Limits:
    """What one store holds at most, and how often it looks after itself."""

    max_sessions: int = _setting(10_000, "live sessions held before new ones are refused")
    max_history: int = _setting(20, "history entries kept per session; older ones are dropped")
    max_id_length: int = _setting(MAX_ID_LENGTH, "longest session id accepted, in bytes")
    # Each event refers to the session bytes it carries, so the log costs little more than
    # the session versions it keeps alive.
    log_size: int = _setting(256, "events the change feed keeps for followers")
    max_closed: int = _setting(100, "recently closed sessions kept with their resume ids")
    stale_after: float = _setting(600.0, "seconds a working session may stay silent before it is stale", "SECONDS")
    reap_interval: float = _setting(5.0, "seconds between passes for dead agents and stale sessions", "SECONDS")
    # Several hosts (Redis): a host whose reaper stops is gone or cut off; its sessions are
    # marked stale at once and closed only after this, since a network split heals.
    host_grace: float = _setting(1800.0, "seconds a gone host's silent sessions wait before they close", "SECONDS")
    max_record_bytes: int = _setting(DEFAULT_MAX_RECORD_BYTES, "most bytes one session's stored record may take")
    max_store_bytes: int = _setting(DEFAULT_MAX_STORE_BYTES, "most bytes the live sessions may take together")

    def __post_init__(self) -> None:
        for name in ("max_sessions", "max_history", "max_id_length", "log_size", "max_closed"):
            check_positive(getattr(self, name), name)
        check_duration(self.stale_after, "stale_after")
        check_duration(self.host_grace, "host_grace")
        if not check_duration(self.reap_interval, "reap_interval"):
            raise ValidationError("reap_interval", "must be more than 0")
        if self.max_id_length > MAX_ID_LENGTH:
            raise ValidationError("max_id_length", f"must be at most {MAX_ID_LENGTH}; got {self.max_id_length}")
        if check_positive(self.max_record_bytes, "max_record_bytes") < MIN_RECORD_BYTES:
            raise ValidationError(
                "max_record_bytes",
                f"must be at least {MIN_RECORD_BYTES}, to hold a session as long as the field limits allow; "
                f"got {self.max_record_bytes}",
            )
        if check_positive(self.max_store_bytes, "max_store_bytes") > MAX_STORE_BYTES:
            raise ValidationError(
                "max_store_bytes",
                f"must be at most {MAX_STORE_BYTES}, half the largest message the wire carries; "
                f"got {self.max_store_bytes}",
            )
        if self.max_closed * self.max_record_bytes > self.max_store_bytes:
            raise ValidationError(
                "max_closed",
                f"{self.max_closed} closed sessions of up to {self.max_record_bytes} bytes (max_record_bytes) could "
                f"take more than max_store_bytes ({self.max_store_bytes}), which recently_closed() must fit in",
            )


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ServeOptions:
    """How a manager serves its store, beyond where (the address) and with which key."""

    allow_remote: bool = _setting(False, "serve TCP beyond loopback (anyone with the key can run code in it)", "")
    max_connections: int = _setting(
        256, "clients connected at once (a sixteenth kept for hook reports); more are told the manager is full"
    )
    handshake_timeout: float = _setting(2.0, "seconds a new connection has to authenticate", "SECONDS")
    state: str = _setting("", "keep sessions across restarts in this file (default: none are kept)", "FILE")
    # A crash loses at most this much. Saving 10,000 sessions with 10-entry histories (an
    # 11.8 MB file) took 90-190 ms on a loaded 2-CPU machine, about half of it write + fsync;
    # 100 sessions, 12 ms. So 5 s costs at most ~3% of one CPU while sessions change, and
    # nothing while they do not (an unchanged store is not written).
    save_interval: float = _setting(5.0, "seconds between saves of the state file, when sessions changed", "SECONDS")
    log_level: str = _setting("info", f"what the manager logs to stderr: {', '.join(LOG_LEVELS)}", "LEVEL")
    http: str = _setting("", "take agents' events over HTTP on 127.0.0.1:PORT ('auto': a free port)", "PORT")

    def __post_init__(self) -> None:
        if not isinstance(self.allow_remote, bool):
            raise ValidationError("allow_remote", f"must be true or false, not {type(self.allow_remote).__name__}")
        check_positive(self.max_connections, "max_connections")
        if not check_duration(self.handshake_timeout, "handshake_timeout"):
            raise ValidationError("handshake_timeout", "must be more than 0")
        if not isinstance(self.state, str) or "\0" in self.state:
            raise ValidationError("state", f"must be a file path, not {self.state!r:.80}")
        if not check_duration(self.save_interval, "save_interval"):
            raise ValidationError("save_interval", "must be more than 0")
        if not isinstance(self.http, str) or not (self.http in ("", "auto") or _is_port(self.http)):
            raise ValidationError("http", f"must be a TCP port (1-65535) or 'auto', not {self.http!r:.80}")
        if self.log_level not in LOG_LEVELS:
            raise ValidationError("log_level", f"must be one of {', '.join(LOG_LEVELS)}; got {self.log_level!r:.80}")


def _is_port(text: str) -> bool:
    return text.isdigit() and 0 < int(text) < 65536
