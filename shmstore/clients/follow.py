"""Following the change feed through manager restarts and hangs: :class:`Follower`, which
reconnects with back-off (:class:`Backoff`) and says so (:class:`Notice`)."""

from __future__ import annotations

import dataclasses
import enum
import random
import threading
import time
from collections import deque

from ..checks import MAX_WAIT
from ..errors import StoreUnavailableError, ValidationError
from ..feed import Event
from ..model import Session
from ..transport import address as addr
from .client import Client, Watch
from .proxy import StoreProxy


@dataclasses.dataclass(frozen=True, slots=True)
class Backoff:
    """How long a :class:`Follower` waits before each try to reach the manager again:
    ``first`` seconds, doubling at each failed try up to ``cap``. Each wait is drawn at
    random between half and all of that, so that the followers of one restarted manager
    do not all call it at the same instant."""

    first: float = 0.1
    cap: float = 2.0

    def __post_init__(self) -> None:
        for name in ("first", "cap"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= MAX_WAIT:
                raise ValidationError(
                    f"backoff.{name}", f"must be a number of seconds in (0, {MAX_WAIT}]; got {value!r}"
                )
        if self.cap < self.first:
            raise ValidationError("backoff.cap", f"must be at least first ({self.first!r}); got {self.cap!r}")

    def delay(self, attempt: int, draw: float | None = None) -> float:
        """The wait after failed try number ``attempt`` (1, 2, ...); ``draw`` in [0, 1)
        replaces the random draw (for tests)."""
        full = min(self.cap, self.first * 2.0 ** min(max(attempt, 1) - 1, 64))
        return full * (0.5 + 0.5 * (random.random() if draw is None else draw))


class Link(enum.StrEnum):
    """Whether a :class:`Follower` is following the manager."""

    LIVE = "live"
    RECONNECTING = "reconnecting"


@dataclasses.dataclass(frozen=True, slots=True)
class Notice:
    """Not a change: news of a :class:`Follower`'s connection, for a UI to show.

    ``link`` is ``reconnecting`` after each failed try (``attempt`` counts them, ``retry_in``
    is the wait before the next one, ``problem`` says what failed), or ``live`` once the
    manager answers again; ``resynced`` then says the follower started again from a fresh
    snapshot (the manager restarted, or its log moved on meanwhile), which comes next.
    """

    link: Link
    message: str
    attempt: int = 0
    retry_in: float = 0.0
    problem: StoreUnavailableError | None = None
    resynced: bool = False


class _OwnClient(Client):
    """A follower's own client. Once closed it never connects again, so that a follower
    closed from another thread ends at once instead of making a second try at a hung
    manager (which would take up to the timeout)."""

    _shut = False

    def close(self) -> None:
        self._shut = True
        super().close()

    def _get_proxy(self, deadline: float) -> StoreProxy:
        if self._shut:
            raise StoreUnavailableError("the follower was closed", address=addr.format_address(self.address))
        return super()._get_proxy(deadline)


class Follower:
    """A :class:`Watch` that survives the manager: an endless iterator over the store's
    changes, interleaved with :class:`Notice` values about the connection.

    When a call fails with :class:`StoreUnavailableError` (the manager died, or did not
    answer within the client's timeout because it hangs), the follower yields a ``reconnecting``
    notice and tries again after a :class:`Backoff` wait, with a notice for each failed
    try. When the manager answers, it yields a ``live`` notice and carries on: from the
    log if it is the same manager and its log still reaches back, else from a fresh
    snapshot (a ``snapshot`` event, as a :class:`Watch` yields one), since a restarted
    manager has a new epoch. Other errors are raised.

    The follower uses a client of its own, made with ``client``'s address, authkey and
    timeout, so :meth:`close` may be called from any thread: it ends a call in flight and
    a back-off wait at once, and iteration stops. :attr:`sessions` and :attr:`revision`
    are the state rebuilt from the events yielded so far; :attr:`link` and
    :attr:`problem` are the connection's state now.
    """

    def __init__(
        self,
        client: Client,
        after_revision: int | None = None,
        *,
        poll: float = 1.0,
        backoff: Backoff | None = None,
    ) -> None:
        # Over the socket only, its snapshot too: the connection it long-polls on then exists
        # from the start, so close() can end a call to a hung manager at once (a connection
        # still being made cannot be shut down).
        self.client = _OwnClient(client.address, client._authkey, timeout=client.timeout, shared_memory=False)
        self.backoff = Backoff() if backoff is None else backoff
        self.poll_interval = poll
        #: ``live``, or ``reconnecting`` between a failed call and the next one that works.
        self.link = Link.LIVE
        #: The last failure while reconnecting; None while live.
        self.problem: StoreUnavailableError | None = None
        #: Failed tries since the follower was last live.
        self.attempt = 0
        self._watch = Watch(self.client, after_revision, poll=poll)
        self._retry_at = 0.0
        self._held: deque[Event] = deque()  # an event fetched with the news that the manager is back
        # Set by close(), from any thread; back-off waits wait on it, so closing ends them.
        self._closed = threading.Event()

    @property
    def sessions(self) -> dict[str, Session]:
        """The live sessions as the events yielded so far have left them."""
        return self._watch.sessions

    @property
    def revision(self) -> int | None:
        """The revision of the last event yielded; None before the first snapshot."""
        return self._watch.revision

    @property
    def snapshots(self) -> int:
        """How many snapshots the follower has taken (1 at the start, more on each resync)."""
        return self._watch.snapshots

    def __iter__(self) -> Follower:
        return self

    def __next__(self) -> Event | Notice:
        while not self._closed.is_set():
            item = self.poll(self.poll_interval)
            if item is not None:
                return item
        raise StopIteration

    def __enter__(self) -> Follower:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def close(self) -> None:
        """Stop following; safe from any thread, and more than once."""
        self._closed.set()
        self._watch.close()
        self.client.close()

    def poll(self, timeout: float) -> Event | Notice | None:
        """The next event or notice, or None if none came within ``timeout`` seconds
        (or the follower was closed). While reconnecting, the next try waits for its
        back-off, however often this is called."""
        deadline = time.monotonic() + timeout
        if self._closed.is_set():
            return None
        if self._held:
            return self._held.popleft()
        if self.link is Link.RECONNECTING and not self._wait_for_retry(deadline):
            return None
        snapshots = self._watch.snapshots
        try:
            event = self._watch.poll(max(0.0, deadline - time.monotonic()))
        except StoreUnavailableError as exc:
            return None if self._closed.is_set() else self._failed(exc)
        if self.link is Link.RECONNECTING:
            if event is not None:
                self._held.append(event)
            return self._back(resynced=self._watch.snapshots > snapshots)
        return event

    def _wait_for_retry(self, deadline: float) -> bool:
        """Wait for the next try's time, but not past ``deadline``; True if it has come."""
        wait = min(self._retry_at, deadline) - time.monotonic()
        if wait > 0 and self._closed.wait(wait):
            return False
        return not self._closed.is_set() and time.monotonic() >= self._retry_at

    def _failed(self, exc: StoreUnavailableError) -> Notice:
        self.link, self.problem = Link.RECONNECTING, exc
        self.attempt += 1
        delay = self.backoff.delay(self.attempt)
        self._retry_at = time.monotonic() + delay
        message = f"{exc}; reconnecting (try {self.attempt + 1} in {delay:.1f} s)"
        return Notice(Link.RECONNECTING, message, attempt=self.attempt, retry_in=delay, problem=exc)

    def _back(self, *, resynced: bool) -> Notice:
        tries = self.attempt
        self.link, self.problem, self.attempt = Link.LIVE, None, 0
        where = addr.format_address(self.client.address)
        if resynced:
            message = f"reconnected to {where} after {tries} failed tries; resynced from a fresh snapshot"
        else:
            message = f"reconnected to {where} after {tries} failed tries; no change was missed"
        return Notice(Link.LIVE, message, resynced=resynced)
