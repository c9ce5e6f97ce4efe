"""What the manager remembers of each client's newest write, so that a retried write is
answered rather than applied twice (:meth:`Store.once <shmstore.store.Store.once>`):
:class:`NewestWrites`. Its caller holds the store's lock for every call."""

from __future__ import annotations

from typing import Any

#: Clients whose newest write the manager remembers, for retries (the oldest is forgotten).
MAX_REMEMBERED_CLIENTS = 4096


class NewestWrites:
    """Each client's newest write as (request number, result), oldest client first.
    Numbers rise per client, and a client only ever retries its newest request, so one
    entry per client is enough."""

    def __init__(self) -> None:
        self._done: dict[bytes, tuple[int, Any]] = {}

    def answer(self, client: bytes, number: int) -> tuple[bool, Any]:
        """(True, what to answer) when request ``number`` of ``client`` is not to be run:
        its first result for a retry, None for a request older than the newest; else
        (False, None)."""
        done = self._done.get(client)
        if done is not None and number <= done[0]:
            return True, done[1] if number == done[0] else None
        return False, None

    def remember(self, client: bytes, number: int, result: Any) -> None:
        """``client``'s newest request is ``number``, which returned ``result``."""
        self._done.pop(client, None)
        self._done[client] = (number, result)
        if len(self._done) > MAX_REMEMBERED_CLIENTS:
            del self._done[next(iter(self._done))]
