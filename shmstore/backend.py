"""What a store offers, written down: :class:`Backend`, the protocol that the manager's
:class:`~shmstore.store.Store` and the Redis backend's
:class:`~shmstore.redis.store.RedisStore` both satisfy (mypy checks each against it), and
the names of its operations. A third backend implements this and nothing else: the
:class:`~shmstore.clients.client.Client` calls these methods, by these names, with plain
values and orjson bytes, and gets the same answers and errors from either.
"""

from __future__ import annotations

from typing import Any, Protocol, overload

#: The methods a client may call on the manager's store, and nothing else (the Client has
#: one method of the same name for each but ``once``, which wraps the writes).
EXPOSED = (
    "get",
    "set",
    "remove",
    "list_all",
    "transition",
    "add_usage",
    "report",
    "recently_closed",
    "prune",
    "reap",
    "revision",
    "snapshot",
    "changes",
    "info",
    "once",
)
#: The writes a client may wrap in :meth:`Store.once` so that a retry is never applied twice.
WRITES = frozenset(("set", "remove", "transition", "add_usage", "report", "prune"))

#: Events one ``changes()`` call returns by default; a caller asks again from the last one.
DEFAULT_CHANGES_LIMIT = 1000

#: What ``list_all(epoch, revision)`` returns when the caller's listing is out of date: the
#: store's epoch and revision, the JSON index ``[[id, ...], [revision, ...]]``, and every
#: live session's JSON in the index's order. The index is smaller than the sessions (each
#: id is in its session too), so a listing of at most ``max_store_bytes`` of sessions stays
#: under the wire's MAX_MESSAGE.
Listing = tuple[str, int, bytes, list[bytes]]


class Backend(Protocol):
    """The operations of a store, as the manager exposes them (:data:`EXPOSED`). Sessions
    cross as their stored records' bytes (:mod:`shmstore.record`); errors are
    :mod:`shmstore.errors`' (ValidationError for bad input, with nothing changed;
    NotFoundError, ConflictError, StoreFullError, ResyncRequiredError,
    StoreUnavailableError). Each write is atomic, and :meth:`once` runs a write of
    :data:`WRITES` at most once per client token and request number."""

    def get(self, id: str) -> bytes | None: ...

    @overload
    def list_all(self) -> list[bytes]: ...
    @overload
    def list_all(self, epoch: str | None, revision: int) -> Listing | None: ...

    def recently_closed(self) -> list[bytes]: ...

    def revision(self) -> int: ...

    def info(self) -> dict[str, Any]: ...

    def snapshot(self) -> bytes: ...

    def changes(
        self, after_revision: int, timeout: float = 0.0, epoch: str | None = None, limit: int = DEFAULT_CHANGES_LIMIT
    ) -> bytes: ...

    def set(self, data: bytes, expected_revision: int | None = None) -> Any: ...

    def remove(self, id: str) -> bytes | None: ...

    def transition(self, id: str, status: str) -> bytes: ...

    def add_usage(self, id: str, input_tokens: int, output_tokens: int) -> bytes: ...

    def report(
        self,
        id: str,
        status: str,
        working_dir: str,
        pid: int | None = None,
        session_id: str | None = None,
        agent_type: str = ...,
        reason: str | None = None,
        at: float | None = None,
        subagent: str | None = None,
        background: str | None = None,
        pid_start: int | None = None,
        terminal: list[str | None] | None = None,
    ) -> bytes | None: ...

    def prune(self, older_than: float) -> int: ...

    def reap(self) -> int: ...

    def once(self, client: bytes, number: int, method: str, *args: Any) -> Any: ...
