"""A follower's place in the history of a Redis store, and how a Redis that went back to
older data is noticed.

Each feed entry's id ends in a random mark (``<revision>-<mark>``), and the epoch that
``changes()`` and ``snapshot()`` hand a follower is ``EPOCH.MARK``: the store's epoch and
the mark of the last event the follower was given (the epoch alone before any event).
Given that back, ``changes()`` checks that the feed's event at the follower's revision
still bears the mark. After Redis went back to older data (a restart from an older RDB
snapshot, a failover to a replica that lagged) and new writes took the revision past the
follower's, the event there is another one: the follower is told to resync
(``reason="history"``) instead of missing the changes and keeping sessions that no longer
exist (issue #23: 2 writes lost in a rollback, 3 new ones, and the watch missed changes to
two sessions and kept one that was gone, with no resync). A rollback that has not yet
reached the follower's revision is "ahead" already.

Entries written before marks (``<revision>-0``) are checked the same way: their mark is 0.
"""

from __future__ import annotations

import os

from ..errors import ResyncRequiredError

#: The largest mark: a feed id's second part is a 64-bit number.
MAX_MARK = 2**64 - 1


def new_epoch() -> str:
    """A new store's epoch (made by the first client that finds none)."""
    return os.urandom(8).hex()


def new_mark() -> str:
    """A new event's mark: 64 random bits (a rewritten history bears the same mark at a
    revision once in 2**64)."""
    return str(int.from_bytes(os.urandom(8)))


def mark_of(entry_id: bytes) -> str:
    """The mark of the feed entry ``entry_id`` (``<revision>-<mark>``)."""
    return entry_id.partition(b"-")[2].decode()


def marked(epoch: str, mark: str) -> str:
    """The epoch handed to a follower whose last event bears ``mark`` ("" for none)."""
    return f"{epoch}.{mark}" if mark else epoch


def place(epoch: str | None) -> tuple[str | None, str]:
    """The store's epoch and the mark a follower names in ``epoch`` ("" for none)."""
    if epoch is None:
        return None, ""
    store, _, mark = epoch.partition(".")
    return store, mark


def entries_at(revision: int) -> tuple[str, str]:
    """The range of feed ids that the entry of ``revision`` has, whatever its mark."""
    return f"{revision}-0", f"{revision}-{MAX_MARK}"


def check_place(entry_id: bytes | None, seen: str, after: int) -> str:
    """The mark of the feed's entry at revision ``after`` (``entry_id``; None when the feed
    no longer holds it: ``seen`` stands), or the ResyncRequiredError that says it is not
    the one the follower was given (``seen``; "" for none to check)."""
    mark = mark_of(entry_id) if entry_id is not None else seen
    if seen and mark != seen:
        raise ResyncRequiredError(
            f"the event at revision {after} is not the one this follower was given: Redis went back to older "
            "data (a restart from an older snapshot, a failover) and wrote on from there",
            reason="history",
            after_revision=after,
        )
    return mark
