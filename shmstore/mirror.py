"""The live sessions again, in a shared segment (:mod:`shmstore.transport.segment`), for
readers in other processes: :class:`Mirror`, which the :class:`~shmstore.store.Store` keeps
in step with itself.

Every method is called with the store's lock held: a reply leaves the manager only once its
change is in the segment, so a client reads its own writes from it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable

from .transport.segment import Segment, SegmentFullError

log = logging.getLogger(__name__)


class Mirror:
    """The store's segment, or None while nobody reads one."""

    def __init__(self) -> None:
        self.segment: Segment | None = None

    def attach(self, segment: Segment, sessions: Iterable[tuple[str, bytes]], revision: int) -> None:
        """Mirror ``sessions`` into ``segment`` from now on (the serving manager makes it in
        its own process, when a client first asks for it)."""
        self.segment = segment
        for id, data in sessions:
            self.put(id, data, revision)
        if self.segment is not None:
            self.segment.set_revision(revision)

    def detach(self) -> None:
        """Stop: the segment is closed (its readers read over the socket again)."""
        segment, self.segment = self.segment, None
        if segment is not None:
            segment.close()

    def handle(self) -> tuple[int, Segment] | None:
        """A duplicate of the segment's fd, and the segment (for its hello), or None. The
        caller sends the fd (without the lock: a client that does not read must not stall
        the store) and closes it; the duplicate stays valid whatever a grow does meanwhile."""
        segment = self.segment
        return None if segment is None else (os.dup(segment.fd), segment)

    def put(self, id: str, data: bytes | None, revision: int) -> None:
        """Write session ``id`` (``data``; None: no longer live) at store ``revision``. A
        full segment is replaced by a grown one (its readers re-attach); any other failure
        (e.g. out of memory) stops mirroring, so that readers fall back to the socket rather
        than read a segment that no longer follows the store."""
        segment = self.segment
        if segment is None:
            return
        try:
            try:
                if data is None:
                    segment.delete(id, revision)
                else:
                    segment.put(id, data, revision)
            except SegmentFullError:
                self.segment = segment = segment.grow()
                log.info("grew the shared segment to %d slots", segment.slot_count)
                self.put(id, data, revision)
        except Exception:
            log.exception("stopped sharing the sessions in memory: the segment failed")
            self.segment = None
            segment.close()
