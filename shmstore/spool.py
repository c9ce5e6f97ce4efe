"""The spool: reports a hook could not deliver in time, kept until the manager takes them.

An agent waits for its hooks, so a hook gives up on the manager at its deadline (a busy
machine, a manager restarting or hung). Rather than drop its report, it keeps it here, a
small private directory beside the manager's socket (``store.sock.spool``; for TCP, in the
runtime directory), one file a report, and exits. The manager reads the directory when it
starts and every :data:`DELIVER_INTERVAL` while it serves, applies each report through
``once`` with the hook's own token (a report that did reach the manager before its hook
gave up is not applied twice), oldest event first, and removes the file.

Order does not rest on delivery: every report carries the time its event fired, and the
store never lets an older event move a session's status back (:meth:`Store.report`), so a
spooled report that arrives after a newer one only counts as activity. A manager that
crashes between applying an entry and removing it applies it again at its next start,
which changes nothing (the same event: no new transition, since the status is already
that one or a newer event's).

The spool holds at most :data:`MAX_ENTRIES` reports. Past that a report is dropped: one
line in the directory's ``dropped`` file (and in the hook's failure log), which
``shmstore status`` counts. Entries are written to a temporary name and renamed, so a
reader never sees half of one; the directory is the user's own, mode 0700, never a
symlink. This module is on the hook's path: standard library only, nothing heavy.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import time

from .errors import StoreUnavailableError
from .transport import address as addr

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterator
    from typing import Any

    from .transport.protocol import Address

#: The most reports the spool keeps. A report's file is ~300 bytes (up to ~4.5 KB with the
#: longest working dir), so the spool stays under ~2.3 MiB even then; 512 reports is over a
#: hundred tool calls of one agent, or a few minutes of a busy team's.
MAX_ENTRIES = 512
#: Seconds between the manager's looks at the spool while it serves (a look at an empty
#: spool is one listing of its directory: a few microseconds).
DELIVER_INTERVAL = 0.5
#: The file whose lines count the reports dropped because the spool was full.
DROPPED = "dropped"
#: What the format of an entry says; an entry of another version is left for a newer shmstore.
VERSION = 1
_SUFFIX = ".json"
_LARGEST = 64 * 1024  # more than any entry of ours


def path_for(address: Address) -> str:
    """The spool of the manager at ``address``: beside its socket, or for TCP beside its
    key file in the runtime directory."""
    key = addr.key_path(address)
    return key[: -len(addr.KEY_SUFFIX)] + ".spool"


def _private(directory: str) -> None:
    """Make ``directory`` (0700), and the directory it is in as a manager would make it
    (after a reboot, the runtime directory is not there until something makes it), or
    check that it is a directory of the user's own that nobody else may enter; raise
    StoreUnavailableError if not."""
    parent = os.path.dirname(directory)
    try:
        if addr.is_runtime_dir(parent):
            addr.ensure_private_dir(parent)
        elif not os.path.isdir(parent):
            os.makedirs(parent, mode=0o700, exist_ok=True)
            addr.check_socket_dir(parent)
        os.mkdir(directory, 0o700)
        return
    except FileExistsError:
        pass
    except OSError as exc:
        raise StoreUnavailableError(f"cannot make the spool {directory}: {exc.strerror or exc}") from None
    info = os.lstat(directory)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise StoreUnavailableError(
            f"the spool {directory} is not a private directory of this user (mode 0700); nothing was kept in it"
        )


def keep(directory: str, token: bytes, args: tuple[Any, ...], at: float) -> bool:
    """Keep the report ``args`` (those of :meth:`Store.report`), made with request
    ``token`` for an event at ``at``; False, with a line in ``dropped``, when the spool
    is full. Raises OSError or StoreUnavailableError when it cannot be written."""
    _private(directory)
    if sum(1 for name in os.listdir(directory) if name.endswith(_SUFFIX)) >= MAX_ENTRIES:
        _append(os.path.join(directory, DROPPED), f"{time.time():.3f} {args[0]}\n")
        return False
    doc = {"version": VERSION, "token": token.hex(), "report": list(args), "at": at, "pidns": _pid_namespace()}
    body = json.dumps(doc).encode()
    # Named by the event's time, so that a listing sorts them oldest first.
    name = f"{round(at * 1e9):020d}-{os.getpid()}-{token.hex()[:8]}"
    temporary = os.path.join(directory, f".{name}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, body)
    finally:
        os.close(fd)
    os.rename(temporary, os.path.join(directory, name + _SUFFIX))
    return True


def _append(path: str, line: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o600)
    try:
        if stat.S_ISREG(os.fstat(fd).st_mode):
            os.write(fd, line.encode("utf-8", "replace"))
    finally:
        os.close(fd)


def _pid_namespace() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


class Entry:
    """One spooled report: its file's ``name``, the hook's ``token``, the ``report``'s
    arguments, the event's time ``at``, and whether the hook ran in the reader's pid
    namespace (None: cannot be told), so that its pid means the same process here."""

    __slots__ = ("at", "name", "report", "same_pid_namespace", "token")

    def __init__(
        self, name: str, token: bytes, report: tuple[Any, ...], at: float, same_pid_namespace: bool | None
    ) -> None:
        self.name, self.token, self.report, self.at = name, token, report, at
        self.same_pid_namespace = same_pid_namespace


def entries(directory: str) -> Iterator[Entry | str]:
    """The spooled reports, oldest event first; an entry that cannot be read (not ours,
    not whole, another version) comes as its file's name, a string, for the caller to
    set aside. Nothing at all when there is no spool, or it is not private."""
    try:
        info = os.lstat(directory)
        names = sorted(name for name in os.listdir(directory) if name.endswith(_SUFFIX))
    except OSError:
        return
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        return
    for name in names:
        entry = _read(os.path.join(directory, name))
        yield name if entry is None else Entry(name, *entry)


def _read(path: str) -> tuple[bytes, tuple[Any, ...], float, bool | None] | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid() or info.st_size > _LARGEST:
            return None
        doc = json.loads(os.read(fd, _LARGEST))
        if doc.get("version") != VERSION or not isinstance(doc.get("report"), list):
            return None
        at = doc["at"]
        if type(at) not in (int, float):
            return None
        theirs, ours = doc.get("pidns"), _pid_namespace()
        same = None if theirs is None or ours is None else theirs == ours
        return bytes.fromhex(doc["token"]), tuple(doc["report"]), float(at), same
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None
    finally:
        os.close(fd)


def done(directory: str, name: str) -> None:
    """Remove an entry that was delivered (or set aside)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(directory, name))


def set_aside(directory: str, name: str) -> str:
    """Rename an entry that cannot be delivered out of the spool's way (``NAME.bad``, or
    ``NAME.bad-N`` if that is taken), keeping it for a person to look at; returns the new
    name. Never over anything: OSError when no free name is left."""
    for n in range(100):
        bad = f"{name}.bad" + (f"-{n}" if n else "")
        try:
            os.link(os.path.join(directory, name), os.path.join(directory, bad))  # fails if taken
        except FileExistsError:
            continue
        os.unlink(os.path.join(directory, name))
        return bad
    raise OSError(f"no free name to set {name} aside")


#: Seconds after which a temporary file of the spool is a killed hook's leftover: a hook
#: writes and renames one within its 0.9 s.
STALE_TEMPORARY = 60.0


def clear_temporaries(directory: str) -> None:
    """Remove the temporary files (``.NAME.tmp``) hooks killed while writing left, once
    they are :data:`STALE_TEMPORARY` old; only regular files of this user."""
    try:
        names = [name for name in os.listdir(directory) if name.startswith(".") and name.endswith(".tmp")]
    except OSError:
        return
    for name in names:
        path = os.path.join(directory, name)
        with contextlib.suppress(OSError):
            info = os.lstat(path)
            if (
                stat.S_ISREG(info.st_mode)
                and info.st_uid == os.getuid()
                and time.time() - info.st_mtime > STALE_TEMPORARY
            ):
                os.unlink(path)


def counts(directory: str) -> dict[str, int]:
    """How many reports wait in the spool, and how many were dropped because it was full
    (what ``shmstore status`` shows); zeros when there is none."""
    pending = 0
    with contextlib.suppress(OSError):
        pending = sum(1 for name in os.listdir(directory) if name.endswith(_SUFFIX))
    dropped = 0
    try:
        with open(os.path.join(directory, DROPPED), "rb") as file:
            dropped = file.read(1 << 20).count(b"\n")
    except OSError:
        pass
    return {"pending": pending, "dropped": dropped}
