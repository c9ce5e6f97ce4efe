"""Replacing a file atomically and durably: what the state file and Claude Code's settings
are written with, so that a crash leaves the old file or the new one, never a mix.

The new content goes to a temporary file created exclusively beside the target (never
through a symlink someone placed at a predictable name), is fsynced, renamed over the
target, and the directory is fsynced so that the rename itself survives a crash. A symlink
stays one: the file it points to is replaced (renaming over the link would leave the
target stale and the link gone).
"""

from __future__ import annotations

import contextlib
import os
import tempfile

from .errors import ShmstoreError


class ChangedMeanwhileError(ShmstoreError):
    """The file at ``path`` changed between the caller's read of it and our rename over
    it (another program wrote it); nothing was written."""

    def __init__(self, path: str) -> None:
        super().__init__(f"{path} changed while it was being rewritten; nothing was written")
        self.path = path


def replace_file(path: str | os.PathLike[str], data: bytes, mode: int = 0o600, expect: bytes | None = None) -> None:
    """Make the file at ``path`` (through any symlink) hold ``data``, with ``mode``. A
    missing directory is made (0700). With ``expect``, the file must still hold exactly
    that (``b""``: be missing or empty) just before the rename, else nothing is written and
    :class:`ChangedMeanwhileError` is raised: a read-change-write of a file that another
    program also edits (a settings file) then never loses that program's edit, but for
    one that lands in the microseconds between the check and the rename."""
    target = os.path.realpath(path)
    directory = os.path.dirname(target)
    os.makedirs(directory, mode=0o700, exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=f".{os.path.basename(target)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as file:
            os.fchmod(file.fileno(), mode)
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        if expect is not None and _content(target) != expect:
            raise ChangedMeanwhileError(target)
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    _fsync_dir(directory)


def _content(path: str) -> bytes:
    try:
        with open(path, "rb") as file:
            return file.read()
    except FileNotFoundError:
        return b""


def _fsync_dir(directory: str) -> None:
    """Make a rename in ``directory`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on a directory; the rename itself is done
    finally:
        os.close(fd)
