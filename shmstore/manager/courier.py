"""Delivering the hooks' spool (:mod:`shmstore.spool`) to the store, in the manager."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from .. import procs, spool
from ..errors import ShmstoreError, StoreFullError, StoreUnavailableError
from ..store import Store

log = logging.getLogger("shmstore.manager")


class Courier:
    """Delivers the reports hooks kept in the manager's spool (:mod:`shmstore.spool`):
    all of them before the manager accepts clients, then every
    :data:`spool.DELIVER_INTERVAL` (a listing of the directory: a few microseconds when it
    is empty). Each goes through ``once`` with its hook's token, oldest event first, and is
    removed once applied. One the store refuses as invalid (or that this version cannot
    read) is set aside (``NAME.bad``) and logged; one refused for a passing reason (the
    store is full, or stopping) stays for a later pass. Only its own thread runs
    :meth:`deliver` once the manager serves; ``_lock`` guards the counts :meth:`info` reads."""

    def __init__(self, store: Store, directory: str) -> None:
        self.store = store
        self.directory = directory
        self._lock = threading.Lock()
        self._delivered = 0
        self._dropped = spool.counts(directory)["dropped"]  # what earlier managers found dropped
        self._stuck: set[str] = set()  # entries kept for later, or not to be moved: said once

    def run(self, stop: threading.Event) -> None:
        while not stop.wait(spool.DELIVER_INTERVAL):
            try:
                self.deliver()
            except Exception:  # never take the manager down for its spool
                log.exception("delivering the spool %s failed", self.directory)

    def deliver(self) -> int:
        """Deliver what is spooled now; returns how many were applied."""
        delivered, oldest = 0, None
        for entry in spool.entries(self.directory):
            name = entry if isinstance(entry, str) else entry.name
            if isinstance(entry, str):
                self._set_aside(name, "not a report this manager reads")
                continue
            procs.caller.same_pid_namespace = entry.same_pid_namespace
            try:
                self.store.once(entry.token, 1, "report", *entry.report)
            except StoreUnavailableError:
                break  # stopping: the next manager delivers the rest
            except StoreFullError as exc:
                self._keep(name, f"kept for later: {exc}")
                continue
            except (ShmstoreError, TypeError, ValueError) as exc:  # invalid, or of another version
                self._set_aside(name, f"refused: {exc}")
                continue
            spool.done(self.directory, name)
            self._stuck.discard(name)
            delivered += 1
            oldest = entry.at if oldest is None else min(oldest, entry.at)
        spool.clear_temporaries(self.directory)
        dropped = spool.counts(self.directory)["dropped"]
        with self._lock:
            self._delivered += delivered
            newly_dropped, self._dropped = dropped - self._dropped, dropped
        if oldest is not None:
            log.info("delivered %d spooled reports (the oldest fired %.1f s ago)", delivered, time.time() - oldest)
        if newly_dropped > 0:
            log.warning("%d reports were dropped: the spool %s was full", newly_dropped, self.directory)
        return delivered

    def _set_aside(self, name: str, why: str) -> None:
        try:
            bad = spool.set_aside(self.directory, name)
        except OSError as exc:
            self._keep(name, f"{why}; it cannot be set aside either ({exc})")
            return
        self._stuck.discard(name)
        log.warning("a spooled report was %s; kept as %s in %s", why, bad, self.directory)

    def _keep(self, name: str, why: str) -> None:
        if name not in self._stuck:
            self._stuck.add(name)
            log.warning("the spooled report %s in %s is %s", name, self.directory, why)

    def info(self) -> dict[str, Any]:
        counts = spool.counts(self.directory)
        with self._lock:
            return dict(counts, delivered=self._delivered, path=self.directory)
