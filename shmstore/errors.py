"""The exceptions shmstore raises.

Every error of ours derives from :class:`ShmstoreError`, so a daemon can catch the
package's failures in one place. Errors raised inside the manager travel back to the
client by pickle, so each class pickles with the arguments its ``__init__`` takes.
"""

from __future__ import annotations


class ShmstoreError(Exception):
    """Base class of every error shmstore raises."""


class ValidationError(ShmstoreError, ValueError):
    """Input that does not make a valid session or argument; names the field."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem

    def __reduce__(self) -> tuple[type[ValidationError], tuple[str, str]]:
        return type(self), (self.field, self.problem)


class NotFoundError(ShmstoreError, LookupError):
    """An operation named a session id the store does not hold."""


class StoreFullError(ShmstoreError):
    """The store holds as many sessions as its ``max_sessions`` allows; nothing was added."""


class ConflictError(ShmstoreError):
    """``set`` was given an expected revision that is no longer current."""


class ResyncRequiredError(ShmstoreError):
    """The change feed no longer holds the events after the asked revision (the log moved
    on, or the manager restarted): start again from a fresh ``snapshot()``."""


class StoreUnavailableError(ShmstoreError, ConnectionError):
    """The manager could not be reached, went away, or did not answer in time."""


class AuthenticationError(ShmstoreError):
    """The manager refused our authkey (or we refused its)."""


class AddressInUseError(ShmstoreError):
    """A live manager already answers at the address a new one was to bind."""
