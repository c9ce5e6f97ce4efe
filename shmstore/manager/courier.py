"""Delivering the hooks' spool (:mod:`shmstore.spool`) to the store, in the manager."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from .. import procs, spool
from ..errors import ShmstoreError, StoreUnavailableError
from ..store import Store

log = logging.getLogger("shmstore.manager")


class Courier:
    """Delivers the reports hooks kept in the manager's spool (:mod:`shmstore.spool`):
    all of them at start, then whenever the spool changes (a stat of its directory every
    :data:`spool.DELIVER_INTERVAL`). Each goes through ``once`` with its hook's token,
    oldest event first, and is removed once applied; one the store refuses as invalid is
    set aside (``NAME.bad``) and logged. Only its own thread runs :meth:`deliver`, apart
    from tests; ``_lock`` guards the counts that :meth:`info` reads."""

    def __init__(self, store: Store, directory: str) -> None:
        self.store = store
        self.directory = directory
        self._seen: tuple[int, int] | None = None
        self._lock = threading.Lock()
        self._delivered = 0
        self._dropped = 0

    def run(self, stop: threading.Event) -> None:
        while True:
            try:
                self.deliver()
            except Exception:  # never take the manager down for its spool
                log.exception("delivering the spool %s failed", self.directory)
            if stop.wait(spool.DELIVER_INTERVAL):
                return

    def deliver(self) -> int:
        """Deliver what is spooled now, if the spool changed; returns how many."""
        seen = spool.changed_since(self.directory, self._seen)
        if seen is None:
            return 0
        delivered, oldest = 0, None
        for entry in spool.entries(self.directory):
            if isinstance(entry, str):
                log.warning("set aside %s in the spool %s: not a report this manager reads", entry, self.directory)
                spool.set_aside(self.directory, entry)
                continue
            procs.caller.same_pid_namespace = entry.same_pid_namespace
            try:
                self.store.once(entry.token, 1, "report", *entry.report)
            except StoreUnavailableError:
                return delivered  # stopping: the next manager delivers the rest
            except ShmstoreError as exc:
                bad = spool.set_aside(self.directory, entry.name)
                log.warning("a spooled report was refused (%s); kept as %s in %s", exc, bad, self.directory)
                continue
            spool.done(self.directory, entry.name)
            delivered += 1
            oldest = entry.at if oldest is None else min(oldest, entry.at)
        self._seen = spool.changed_since(self.directory, None)
        counts = spool.counts(self.directory)
        with self._lock:
            self._delivered += delivered
            newly_dropped, self._dropped = counts["dropped"] - self._dropped, counts["dropped"]
        if oldest is not None:
            log.info("delivered %d spooled reports (the oldest fired %.1f s ago)", delivered, time.time() - oldest)
        if newly_dropped > 0:
            log.warning("%d reports were dropped: the spool %s was full", newly_dropped, self.directory)
        return delivered

    def info(self) -> dict[str, Any]:
        counts = spool.counts(self.directory)
        with self._lock:
            return dict(counts, delivered=self._delivered, path=self.directory)
