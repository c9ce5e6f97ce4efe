"""The exceptions shmstore raises.

Every error of ours derives from :class:`ShmstoreError`, so a daemon can catch the
package's failures in one place, and each carries, beside its message, the fields a caller
needs to act on it (``error.id``, ``error.current``, ``error.address``...) rather than text
to parse. Errors raised inside the manager travel back to the client by pickle; they pickle
with their message and fields, whatever their ``__init__`` takes.
"""

from __future__ import annotations

# The type checker's names, not imported at run time: ``typing`` costs the hook ~4 ms of
# start-up (mypy takes any name TYPE_CHECKING as true).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


class ShmstoreError(Exception):
    """Base class of every error shmstore raises."""

    def __reduce__(self) -> tuple[Any, ...]:
        return _rebuild, (type(self), self.args, self.__dict__)


def _rebuild(cls: type[ShmstoreError], args: tuple[Any, ...], fields: dict[str, Any]) -> ShmstoreError:
    error = cls.__new__(cls)
    error.args = args
    error.__dict__.update(fields)
    return error


class ValidationError(ShmstoreError, ValueError):
    """Input that does not make a valid session or argument; ``field`` names it and
    ``problem`` says what is wrong with it."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


class NotFoundError(ShmstoreError, LookupError):
    """An operation named a session ``id`` the store does not hold."""

    def __init__(self, id: str, message: str | None = None) -> None:
        super().__init__(message or f"no session with id {id!r}")
        self.id = id


class StoreFullError(ShmstoreError):
    """A write would take the store past one of its limits (``limit`` names it, e.g.
    ``max_sessions``); nothing was changed. ``id`` is the session it was for."""

    def __init__(self, message: str, *, limit: str, id: str | None = None) -> None:
        super().__init__(message)
        self.limit = limit
        self.id = id


class ConflictError(ShmstoreError):
    """``set`` was given an ``expected`` revision of session ``id`` that is no longer its
    ``current`` one (0: the session does not exist)."""

    def __init__(self, id: str, expected: int, current: int) -> None:
        super().__init__(f"session {id!r} is at revision {current}, not the expected {expected}")
        self.id = id
        self.expected = expected
        self.current = current


class ResyncRequiredError(ShmstoreError):
    """The change feed cannot continue after ``after_revision``: ``reason`` is ``epoch``
    (the manager restarted), ``ahead`` (the revision is newer than the store's),
    ``compacted`` (the log moved on) or ``history`` (Redis went back to older data and wrote
    on: the event at ``after_revision`` is not the one the follower was given). Start again
    from a fresh ``snapshot()``."""

    def __init__(self, message: str, *, reason: str, after_revision: int) -> None:
        super().__init__(message)
        self.reason = reason
        self.after_revision = after_revision


class StoreUnavailableError(ShmstoreError, ConnectionError):
    """The manager at ``address`` could not be reached, went away, did not answer in time,
    or may not be trusted (its directory or key file is not private)."""

    def __init__(self, message: str, *, address: str | None = None) -> None:
        super().__init__(message)
        self.address = address


class AuthKeyError(ShmstoreError):
    """The manager at ``address`` refused our authkey, or could not prove it holds it."""

    def __init__(self, message: str, *, address: str | None = None) -> None:
        super().__init__(message)
        self.address = address


class AddressInUseError(ShmstoreError):
    """Something already holds the ``address`` a new manager was to bind: a live manager,
    or a file that is not a socket (which is never removed)."""

    def __init__(self, message: str, *, address: str | None = None) -> None:
        super().__init__(message)
        self.address = address


class JumpRefusedError(ShmstoreError):
    """``shmstore go`` did not switch to the terminal of session ``id``, because it could
    not be sure the terminal is still that agent's (or there is none to switch to).
    ``reason`` says why, as a word a script can test: ``closed`` (the session ended),
    ``no_tmux`` (its terminal is not a tmux pane), ``unverified`` (no agent pid the store
    could check), ``other_host`` (the agent runs on another host), ``agent_gone`` (its
    process exited, or its pid now names another process), ``server_gone`` (the tmux
    server is not running), ``pane_gone`` (the pane was closed), ``pane_reused`` (the pane
    now runs another program than the agent), ``tmux_failed`` (tmux is missing, failed or
    did not answer in time)."""

    def __init__(self, id: str, reason: str, message: str) -> None:
        super().__init__(message)
        self.id = id
        self.reason = reason
