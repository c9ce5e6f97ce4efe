"""The state keeper: a manager's state file (:mod:`shmstore.manager.state`'s format),
restored once at start, saved while serving when the store changed, saved a last time at a
stop, and a rescue file when that last save fails.
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from ..errors import ShmstoreError, StoreUnavailableError
from ..store import Store
from ..transport import address as addr
from . import state

log = logging.getLogger("shmstore.manager")


#: How long a new manager waits for the one before it to finish its final save (its
#: drain, 5 s at most, then the save) before it gives up on the state file.
LOCK_WAIT = 30.0
#: How long the final save waits for a periodic save in progress (one of 10,000 sessions
#: took 90-190 ms, measured; a disk that takes longer than this is not one to wait for).
SAVE_JOIN_TIMEOUT = 10.0


class StateKeeper:
    """The state file of one manager (:mod:`shmstore.manager.state`): restores the store from it
    once, saves the store to it when it changed, and remembers how the last save went.
    When the final save fails (a full disk), it keeps the sessions in a rescue file in the
    runtime directory instead (:func:`state.rescue_path`), which the next manager restores
    from, and removes once it has saved them to the state file.

    The store's lock is held only to copy the sessions (:meth:`Store.dump`); encoding and
    writing happen outside it, under ``_writing``, which makes saves one at a time (a
    periodic one and the final one never interleave) and guards ``_saved_revision`` and
    ``_rescued``. ``_lock`` guards ``_last`` and is only held for a moment, so ``info``
    (what ``status`` shows) answers even while a slow disk holds a save.
    """

    def __init__(self, path: Path, store: Store) -> None:
        self.path = path  # changed only by restore(), before the saver starts
        self.store = store
        self.rescue = state.rescue_path(path, addr.runtime_dir())
        self._writing = threading.Lock()
        self._saved_revision = 0  # an empty store needs no file; restore() sets what it read
        self._file_revision = 0  # what the state file itself holds (a rescue may hold more)
        self._rescued = False  # restored from the rescue file, which goes once saved
        self._held: int | None = None  # the lock file's descriptor, while the state file is ours
        self._lock = threading.Lock()
        self._last: dict[str, Any] = {"saved": None, "sessions": 0, "ms": None, "error": None}

    def lock(self, stop: threading.Event) -> None:
        """Make the state file this manager's: hold an exclusive lock on ``FILE.lock``
        (created 0600, never through a symlink) until :meth:`unlock`. A manager that still
        stops holds it until its final save is done; this waits for that (up to
        :data:`LOCK_WAIT`, or until ``stop``), else raises StoreUnavailableError: two
        managers saving one file would each overwrite the other's sessions."""
        path = self.path.with_name(self.path.name + ".lock")
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as exc:  # where no lock can be made, no save can be either: it will say so
            log.warning("cannot lock %s (%s): the state file is not kept from another manager", path, exc)
            return
        deadline, said = time.monotonic() + LOCK_WAIT, False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                self._held = fd
                return
            except BlockingIOError:
                if not said:
                    log.info("waiting for the manager that holds %s to finish its final save", path)
                    said = True
                if time.monotonic() >= deadline or stop.wait(0.05):
                    os.close(fd)
                    raise StoreUnavailableError(
                        f"the state file {self.path} is another manager's (it holds {path}); stop it first"
                    ) from None

    def unlock(self) -> None:
        fd, self._held = self._held, None
        if fd is not None:
            os.close(fd)  # closing releases the lock

    def restore(self) -> None:
        """Fill the (new) store from the state file, or from the rescue file when a
        manager whose final save failed left a newer one; a state file that cannot be
        restored is renamed aside with a warning, and the store starts empty. Temporary
        files that interrupted saves left are removed first."""
        began = time.perf_counter()
        for leftover in state.remove_leftovers(self.path):
            log.info("removed %s, left by an interrupted save", leftover)
        try:
            saved = state.read(self.path)
        except state.StateFileError as exc:
            self._keep_aside(exc)
            saved = None
        self._file_revision = 0 if saved is None else saved.revision
        rescued = self._read_rescue()
        source = self.path
        if rescued is not None and (saved is None or rescued.revision >= saved.revision):
            saved, source, self._rescued = rescued, self.rescue, True
            log.warning(
                "restoring from %s, which the last manager wrote when it could not save to %s", source, self.path
            )
        if saved is None:
            log.info("no state file at %s yet: starting empty", self.path)
            return
        for line in self.store.restore(saved.revision, saved.live, saved.closed):
            log.warning("not restored from %s: session %s", source, line)
        _, revision, live, closed = self.store.dump()
        with self._writing:
            self._saved_revision = -1 if self._rescued else revision  # from a rescue: save at once
        log.info(
            "restored %d live and %d closed sessions from %s (revision %d) in %.1f ms",
            len(live),
            len(closed),
            source,
            revision,
            (time.perf_counter() - began) * 1000,
        )

    def _read_rescue(self) -> state.Saved | None:
        """The rescue file's sessions, or None. One that is there but cannot be used (not
        ours, damaged) is said so and kept aside, never silently passed over."""
        try:
            return state.read_rescue(self.rescue)
        except state.StateFileError as exc:
            try:
                aside = state.keep_aside(self.rescue)
            except OSError as error:
                log.warning("%s; not restored, and it could not be moved aside (%s)", exc, error)
                return None
            log.warning("%s; not restored: it is kept as %s", exc, aside)
            return None

    def _keep_aside(self, exc: state.StateFileError) -> None:
        try:
            aside = state.keep_aside(self.path)
        except OSError as error:
            log.warning(
                "%s; starting empty; it could not be moved aside (%s), so it will not be saved over", exc, error
            )
            self.path = self.path.with_name(self.path.name + ".unsaved")  # never write over what we could not read
            return
        log.warning("%s; starting empty; the file is kept as %s", exc, aside)

    def run(self, stop: threading.Event, interval: float) -> None:
        """Save every ``interval`` seconds when the store changed, until ``stop``."""
        while not stop.wait(interval):
            self.save()

    def save(self, final: bool = False) -> bool:
        """Write the store to the state file if it changed since the last save; False if
        that failed (logged and remembered, never raised: the manager serves on). Waits at
        most SAVE_JOIN_TIMEOUT for a save in progress, so a hung disk cannot hang the stop."""
        if not self._writing.acquire(timeout=SAVE_JOIN_TIMEOUT):
            self._failed("an earlier save is still writing")
            return False
        try:
            began = time.perf_counter()
            epoch, revision, live, closed = self.store.dump()
            if revision == self._saved_revision:
                return True
            try:
                state.write(self.path, state.encode(epoch, revision, live, closed))
            except OSError as exc:
                self._failed(str(exc))
                return False
            ms = (time.perf_counter() - began) * 1000
            self._saved_revision = self._file_revision = revision
            if self._rescued:
                self.rescue.unlink(missing_ok=True)
                self._rescued = False
                log.info("saved the rescued sessions to %s; removed %s", self.path, self.rescue)
            with self._lock:
                self._last.update(saved=time.time(), sessions=len(live) + len(closed), ms=round(ms, 1), error=None)
        finally:
            self._writing.release()
        log.log(
            logging.INFO if final else logging.DEBUG,
            "saved %d live and %d closed sessions to %s in %.1f ms",
            len(live),
            len(closed),
            self.path,
            ms,
        )
        return True

    def _failed(self, problem: str) -> None:
        with self._lock:
            self._last["error"] = f"{time.strftime('%Y-%m-%d %H:%M:%S')}: {problem}"
        log.error("could not save the sessions to %s: %s", self.path, problem)

    def final_save(self) -> state.StateNotSavedError | None:
        """The last save, once nothing can change any more. If it fails, the sessions go
        to the rescue file instead; returns the error that says where they are (or that
        they are lost), for the manager to exit with, or None when they are saved."""
        if self.save(final=True):
            return None
        with self._lock:
            problem = str(self._last["error"]).partition(": ")[2]
        epoch, revision, live, closed = self.store.dump()
        rescue: Path | None = self.rescue
        try:
            addr.ensure_private_dir(str(self.rescue.parent))
            state.write(self.rescue, state.encode(epoch, revision, live, closed))
        except (OSError, ShmstoreError) as exc:
            log.error("could not keep the sessions in %s either: %s", self.rescue, exc)
            rescue = None
        error = state.StateNotSavedError(self.path, problem, saved_revision=self._file_revision, rescue=rescue)
        log.error("%s", error)
        return error

    def info(self) -> dict[str, Any]:
        with self._lock:
            return dict(self._last, path=str(self.path))
