"""The state file: the sessions a manager keeps across a restart, its format, and writing
and reading it safely.

The file is one small, versioned JSON document::

    {"format": "shmstore-state", "version": 1, "saved": 1764123456.7, "epoch": "9f...",
     "revision": 1234, "live": [SESSION, ...], "closed": [SESSION, ...]}

where each SESSION is the store's record of it (:mod:`shmstore.model`'s stored form;
``closed`` is oldest first, as the store keeps it), written as the store holds it, so that
saving is a join of bytes; reading checks every field. Version 1 files, whose sessions
were their public JSON (``Session.to_json``), are read too. ``shmstore ls --json`` prints
the public form.

Writing is atomic: the document goes to a temporary file in the same directory (mode 0600),
which is fsynced and renamed over the old file, and then the directory is fsynced, so after
a crash the file is either the old document or the new one, never a mix. Reading validates
everything (a file may have been edited or be someone else's): a file that is not one of
ours, of a version we do not know, truncated or unreadable is a :class:`StateFileError`, and
:func:`keep_aside` moves it out of the way under a new name, never deleting or overwriting
anything.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import stat
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson

from ..atomic import replace_file
from ..errors import ShmstoreError
from ..model import Session, Status
from ..record import session_from_store
from ..record_checks import checked_record

#: What the ``format`` key says in every state file of ours.
FORMAT = "shmstore-state"
#: The version of the document this module writes; it reads this one and version 1, whose
#: sessions were their public JSON.
VERSION = 2
READS = (1, 2)
#: The largest state file read: the live sessions are bounded by ``max_store_bytes`` (at
#: most 32 MiB) and the closed ones by the same, so anything past this is not ours.
MAX_STATE_BYTES = 256 * 2**20


class StateFileError(ShmstoreError):
    """The state file at ``path`` cannot be restored: ``problem`` says why."""

    def __init__(self, path: Path, problem: str) -> None:
        super().__init__(f"state file {path}: {problem}")
        self.path = path
        self.problem = problem


class StateNotSavedError(StateFileError):
    """A stopping manager could not save its sessions to the state file at ``path``
    (``problem`` says why), which still holds the last good save, at ``saved_revision``.
    ``rescue`` is where the sessions went instead (None: nowhere; they are lost)."""

    def __init__(self, path: Path, problem: str, *, saved_revision: int, rescue: Path | None) -> None:
        if rescue is not None:
            where = f"the sessions are in {rescue}, which the next `serve --state {path}` restores from"
        else:
            where = f"the sessions changed since revision {saved_revision} are lost"
        kept = f"the file holds the last good save (revision {saved_revision})"
        super().__init__(path, f"the final save failed ({problem}); {kept}; {where}")
        self.saved_revision = saved_revision
        self.rescue = rescue


@dataclasses.dataclass(frozen=True, slots=True)
class Saved:
    """What a state file held: the store's revision and epoch when it was written (epoch
    seconds ``saved``), its live sessions, and its recently closed ones, oldest first."""

    revision: int
    epoch: str
    saved: float
    live: tuple[Session, ...]
    closed: tuple[Session, ...]


def encode(epoch: str, revision: int, live: Sequence[bytes], closed: Sequence[bytes]) -> bytes:
    """The state document for a store at ``revision`` holding these sessions' records (as
    :meth:`Store.dump` gives them): a join of the bytes the store holds, so that saving
    10,000 sessions copies them (~3 ms) rather than re-encodes them (~230 ms)."""
    head = orjson.dumps(
        {"format": FORMAT, "version": VERSION, "saved": time.time(), "epoch": epoch, "revision": revision}
    )
    return b'%s,"live":[%s],"closed":[%s]}' % (head[:-1], b",".join(live), b",".join(closed))


def decode(data: bytes, path: Path) -> Saved:
    """The sessions in a state document, every one validated; a document that is not a
    state file of this version raises StateFileError."""
    if not data:
        raise StateFileError(path, "is empty")
    try:
        doc = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise StateFileError(path, f"is not JSON (truncated?): {exc}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise StateFileError(path, f'is not a shmstore state file (no "format": "{FORMAT}")')
    version = doc.get("version")
    if version not in READS:
        raise StateFileError(path, f"is version {version!r}; this shmstore reads versions 1 and {VERSION}")
    try:
        revision, epoch, saved = doc["revision"], doc["epoch"], doc["saved"]
        if not (type(revision) is int and revision >= 0 and isinstance(epoch, str) and type(saved) in (int, float)):
            raise StateFileError(path, "has a revision, epoch or saved time of the wrong type")
        live = _sessions(doc["live"], closed=False, records=version == VERSION)
        closed = _sessions(doc["closed"], closed=True, records=version == VERSION)
    except KeyError as exc:
        raise StateFileError(path, f"has no {exc}") from None
    except (ShmstoreError, TypeError, ValueError, AttributeError) as exc:
        raise StateFileError(path, f"holds a session that is not valid: {exc}") from None
    return Saved(revision, epoch, saved, live, closed)


def _sessions(items: Any, *, closed: bool, records: bool) -> tuple[Session, ...]:
    if not isinstance(items, list):
        raise TypeError(f"sessions must be a list, not {type(items).__name__}")
    if records:
        sessions = tuple(session_from_store(checked_record(item)) for item in items)
    else:
        sessions = tuple(Session.from_dict(item) for item in items)
    for session in sessions:
        if (session.status is Status.CLOSED) is not closed:
            raise TypeError(f"session {session.id!r} is {session.status} among the {'closed' if closed else 'live'}")
    return sessions


def read(path: Path) -> Saved | None:
    """The state file at ``path``, or None if there is none; StateFileError if it cannot
    be read or is not a state file we can restore."""
    try:
        # O_NONBLOCK: opening a FIFO for reading would otherwise block until a writer
        # came, before the manager handles any signal (it hung, deaf to SIGTERM).
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):  # none yet (write() will say if it cannot be made)
        return None
    except OSError as exc:
        raise StateFileError(path, f"cannot be read: {exc.strerror or exc}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise StateFileError(path, "is not a regular file")
    with open(fd, "rb") as file:
        try:
            data = file.read(MAX_STATE_BYTES + 1)
        except OSError as exc:
            raise StateFileError(path, f"cannot be read: {exc.strerror or exc}") from None
    if len(data) > MAX_STATE_BYTES:
        raise StateFileError(path, f"is larger than {MAX_STATE_BYTES} bytes, more than a store holds")
    return decode(data, path)


def write(path: Path, data: bytes) -> None:
    """Replace the file at ``path`` with ``data`` atomically and durably, mode 0600
    (:func:`shmstore.atomic.replace_file`; a symlink stays one)."""
    replace_file(path, data)


def keep_aside(path: Path) -> Path:
    """Rename the file at ``path`` to ``PATH.corrupt-STAMP`` (a free name: ``-1``, ``-2``...
    added if taken) and return the new path; nothing is deleted or overwritten."""
    stamp = time.strftime("%Y%m%dT%H%M%S")
    for attempt in range(1000):
        target = path.with_name(f"{path.name}.corrupt-{stamp}" + (f"-{attempt}" if attempt else ""))
        try:
            os.link(path, target)  # fails if target exists: never overwrites
        except FileExistsError:
            continue
        except OSError:  # a filesystem without hard links, or a directory
            if target.exists():
                continue
            path.rename(target)
            return target
        path.unlink()
        return target
    raise StateFileError(path, "could not be kept aside: every .corrupt name is taken")


#: The temporary files :func:`shmstore.atomic.replace_file` writes a state file through
#: (``tempfile.mkstemp``: the prefix, 8 characters, the suffix), which a save that was
#: killed leaves behind.
def _leftover_pattern(path: Path) -> re.Pattern[str]:
    return re.compile(rf"\.{re.escape(path.name)}\.[a-z0-9_]{{8}}\.tmp")


def remove_leftovers(path: Path) -> list[Path]:
    """Remove what interrupted saves of the state file at ``path`` left beside it, and
    return what went: only files that are ours by name (a temporary file of
    :func:`write`), owner (this user) and mode (0600, as it makes them), never through a
    symlink. A crash-looping service would otherwise fill its directory (55 SIGKILLs during
    saves left 13 files, 7.5 MB)."""
    directory = Path(os.path.realpath(path)).parent
    pattern = _leftover_pattern(Path(os.path.realpath(path)))
    removed: list[Path] = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    for name in names:
        if not pattern.fullmatch(name):
            continue
        leftover = directory / name
        try:
            info = leftover.lstat()
            if stat.S_ISREG(info.st_mode) and info.st_uid == os.getuid() and stat.S_IMODE(info.st_mode) == 0o600:
                leftover.unlink()
                removed.append(leftover)
        except OSError:
            continue
    return removed


def rescue_path(path: Path, runtime_dir: str) -> Path:
    """Where a manager keeps its sessions when its final save to the state file at
    ``path`` fails (a full disk): in the user's private ``runtime_dir``, a memory
    filesystem that a full disk does not touch, named after the state file's absolute
    path (through any symlink), where the next manager with that state file looks."""
    digest = hashlib.sha256(os.path.realpath(path).encode("utf-8", "surrogateescape")).hexdigest()[:16]
    return Path(runtime_dir) / f"rescue-{digest}.json"


def read_rescue(path: Path) -> Saved | None:
    """The sessions kept at a rescue ``path``, or None when there is none; StateFileError
    when a file there is not ours (a regular file of this user, mode 0600) or not whole."""
    try:
        info = path.lstat()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StateFileError(path, f"cannot be read: {exc.strerror or exc}") from None
    if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid() or stat.S_IMODE(info.st_mode) != 0o600:
        raise StateFileError(path, "is not a rescue file of ours (a regular file of this user, mode 0600)")
    return read(path)
