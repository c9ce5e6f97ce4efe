"""Where a manager listens, where its authkey lives, and whether to trust either.

By default a manager listens on a unix socket in a per-user runtime directory that only
its owner may enter (mode 0700), and writes its authkey to a key file (mode 0600) named
after the socket: the socket's path plus ``.key``. Clients find both without being told.
``host:port`` selects TCP instead, with the key file in the runtime directory.

A client that reads a key file gives whoever wrote it the power to answer as the manager,
and the manager's replies are unpickled: code in them runs as the client. So before a key
is used, the directories and the key file are checked (:func:`check_address`,
:func:`read_key`), and the manager refuses to serve from places a client would refuse.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import stat

from ..errors import AddressInUseError, StoreUnavailableError, ValidationError
from .protocol import Address

# The type checker's view only: at run time a Redis address comes from its own module,
# imported when one is used (dataclasses and urllib would double the hook's start-up).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from ..redis.address import RedisAddress

#: Environment variable that overrides the default address.
ENV_ADDRESS = "SHMSTORE_ADDRESS"
#: URL schemes that name a Redis (or Valkey) server instead of a manager.
REDIS_SCHEMES = ("redis", "rediss", "redis+unix", "valkey", "valkeys", "valkey+unix")
#: Environment variable that holds the authkey, overriding the key file.
ENV_AUTHKEY = "SHMSTORE_AUTHKEY"

#: The longest path a unix socket address may have on Linux (sun_path less its NUL).
MAX_SOCKET_PATH = 107
#: What is added to a socket's path to name its key file.
KEY_SUFFIX = ".key"

#: Where logind makes each user's runtime directory, and where we go without one.
_RUN_USER = "/run/user"
_TMP = "/tmp"
#: What :func:`new_key` makes: 64 lowercase hex digits.
_KEY_SHAPE = re.compile(rb"[0-9a-f]{64}")
#: More than any key file of ours holds.
_MAX_KEY_FILE = 64 * 1024
#: Opening a file to look at it: never through a symlink, never blocking on a FIFO.
_INSPECT = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def runtime_dir() -> str:
    """The per-user directory for sockets and key files: ``$XDG_RUNTIME_DIR/shmstore``;
    without that variable, ``/run/user/UID/shmstore`` if ``/run/user/UID`` is a directory
    of this user; else ``/tmp/shmstore-UID``."""
    return _runtime_dir(os.environ.get("XDG_RUNTIME_DIR"), os.getuid())


def _runtime_dir(xdg: str | None, uid: int, run_user: str = _RUN_USER, tmp: str = _TMP) -> str:
    if xdg:
        return os.path.join(xdg, "shmstore")
    home = os.path.join(run_user, str(uid))
    try:
        info = os.lstat(home)
    except OSError:
        pass
    else:
        if stat.S_ISDIR(info.st_mode) and info.st_uid == uid:
            return os.path.join(home, "shmstore")
    return os.path.join(tmp, f"shmstore-{uid}")


def default_address() -> Address:
    text = os.environ.get(ENV_ADDRESS)
    return parse_address(text) if text else os.path.join(runtime_dir(), "store.sock")


def resolve(address: Address | os.PathLike[str] | None) -> Address:
    """The address of a manager to use: as given (a path, ``host:port`` or a tuple), else
    the default. A Redis URL is refused here: it names no manager (see :func:`resolve_any`)."""
    found = resolve_any(address)
    if not isinstance(found, str | tuple):
        raise ValidationError("address", f"{found} is a Redis store, not a manager this command can use")
    return found


def is_redis(text: str) -> bool:
    """Whether ``text`` is a Redis URL (``redis://``, ``valkey+unix://`` and the rest)."""
    return text.partition("://")[0].lower() in REDIS_SCHEMES


def resolve_any(address: Address | RedisAddress | os.PathLike[str] | None) -> Address | RedisAddress:
    """The store to use: a manager's address as :func:`resolve` gives it, or for a Redis
    URL (given, or in ``$SHMSTORE_ADDRESS``) a :class:`~shmstore.redis.address.RedisAddress`."""
    if address is None:
        address = os.environ.get(ENV_ADDRESS) or None
    if isinstance(address, str) and is_redis(address):
        from ..redis.address import parse_redis

        return parse_redis(address)
    if address is not None and not isinstance(address, str | tuple | os.PathLike):
        return address  # a RedisAddress already
    if address is None:
        return default_address()
    if isinstance(address, os.PathLike):
        return parse_address(os.fspath(address))
    if isinstance(address, str):
        return parse_address(address)
    if isinstance(address, tuple) and len(address) == 2 and isinstance(address[0], str) and isinstance(address[1], int):
        return address
    raise ValidationError("address", f"must be a socket path or host:port, not {address!r}")


def parse_address(text: str) -> Address:
    """``host:port`` becomes a TCP address; anything with a slash, a unix socket path."""
    if "/" not in text:
        host, sep, port = text.rpartition(":")
        if not sep or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValidationError("address", f"must be a socket path (with a '/') or host:port; got {text!r}")
        return (host.strip("[]") or "127.0.0.1", int(port))
    if len(os.fsencode(text)) > MAX_SOCKET_PATH:
        raise ValidationError("address", f"socket path is longer than {MAX_SOCKET_PATH} bytes: {text!r}")
    return text


def format_address(address: Address | RedisAddress) -> str:
    """An address to show: a path, ``host:port``, or a Redis URL without its password."""
    if isinstance(address, str):
        return address
    if isinstance(address, tuple):
        return f"{address[0]}:{address[1]}"
    return str(address)


def key_path(address: Address) -> str:
    """The key file that goes with ``address``: the socket's path plus ``.key`` (nothing of
    the path is replaced, so two sockets never share a key file), or for a TCP address
    ``tcp-HOST-PORT.key`` in the runtime directory."""
    if isinstance(address, str):
        return address + KEY_SUFFIX
    host, port = address
    return os.path.join(runtime_dir(), f"tcp-{host}-{port}.key")


def socket_dir(address: str) -> str:
    """The directory a unix socket lives in, as an absolute path."""
    return os.path.dirname(os.path.abspath(address))


def is_runtime_dir(path: str) -> bool:
    return os.path.abspath(path) == os.path.abspath(runtime_dir())


def new_key() -> bytes:
    # os.urandom is what secrets.token_hex uses; importing secrets (and random) cost the
    # hook ~3 ms of start-up.
    return os.urandom(32).hex().encode("ascii")


def as_key(authkey: bytes | str) -> bytes:
    if isinstance(authkey, str):
        authkey = authkey.encode("utf-8")
    if not isinstance(authkey, bytes) or not authkey:
        raise ValidationError("authkey", "must be non-empty bytes or str")
    return authkey


# -- what a client trusts -------------------------------------------------------------------


def check_address(address: Address) -> None:
    """Refuse to use ``address`` if its directories could be another user's doing.

    For a unix socket: its directory must not be another user's (root's is fine) nor
    writable by group or others without the sticky bit (:func:`check_socket_dir`), and if
    it is the default runtime directory, that must be private (:func:`check_private_dir`).
    Raises :class:`StoreUnavailableError` saying why and what to do.
    """
    if not isinstance(address, str):
        return
    directory = socket_dir(address)
    try:
        if is_runtime_dir(directory):
            check_private_dir(directory)
        check_socket_dir(directory)
    except FileNotFoundError:
        raise StoreUnavailableError(f"no manager at {address}: {directory} does not exist") from None


def check_private_dir(path: str) -> None:
    """Refuse ``path`` unless it is a directory (not a symlink) of this user that no one
    else may enter. Raises FileNotFoundError if there is nothing there."""
    info = os.lstat(path)
    problem = _not_private(info)
    if problem:
        raise StoreUnavailableError(
            f"refusing the runtime directory {path}: it {problem}; another user may have made it to pose "
            f"as your manager. Remove it (a manager recreates it), or set XDG_RUNTIME_DIR to a directory "
            f"of your own"
        )
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o077:
        raise StoreUnavailableError(
            f"refusing the runtime directory {path}: its mode is {mode:04o}, so others may enter it; "
            f"run `chmod 700 {path}` (a manager does this itself when it starts)"
        )


def check_socket_dir(path: str) -> None:
    """Refuse a socket's directory that another user controls: one owned by another user
    (other than root), or writable by group or others without the sticky bit (where anyone
    could replace the socket and its key file). ``/tmp`` itself passes: root's, and sticky.
    Raises FileNotFoundError if there is nothing there."""
    info = os.stat(path)  # the directory the socket really is in, through any symlink
    uid = os.getuid()
    if not stat.S_ISDIR(info.st_mode):
        problem = "is not a directory"
    elif info.st_uid not in (uid, 0):
        problem = f"belongs to uid {info.st_uid}, not to this user (uid {uid}) or root"
    elif info.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not info.st_mode & stat.S_ISVTX:
        problem = (
            f"is writable by {'group and others' if info.st_mode & stat.S_IWOTH else 'its group'} "
            "without the sticky bit, so others could replace the socket and its key file"
        )
    else:
        return
    raise StoreUnavailableError(
        f"refusing the socket directory {path}: it {problem}. Use a directory of your own (or the default, "
        f"unset {ENV_ADDRESS}), or fix the directory's owner or mode"
    )


def read_key(address: Address) -> bytes:
    """The authkey for ``address``: from ``$SHMSTORE_AUTHKEY``, else from its key file.

    Either way the directories are checked first (:func:`check_address`). The key file
    must be a regular file (not a symlink) of this user with mode exactly 0600, as seen on
    the file actually opened; otherwise :class:`StoreUnavailableError` says why.
    """
    check_address(address)
    env = os.environ.get(ENV_AUTHKEY)
    if env:
        return as_key(env)
    path = key_path(address)
    if not isinstance(address, str):
        try:
            check_private_dir(os.path.dirname(path))
        except FileNotFoundError:
            raise StoreUnavailableError(
                f"no manager at {format_address(address)}: key file {path} does not exist"
            ) from None
    try:
        fd = os.open(path, _INSPECT)
    except FileNotFoundError:
        raise StoreUnavailableError(
            f"no manager at {format_address(address)}: key file {path} does not exist"
        ) from None
    except OSError as exc:
        raise _untrusted_key(path, _open_problem(exc)) from None
    try:
        problem = _not_our_key_file(os.fstat(fd))
        data = b"" if problem else os.read(fd, _MAX_KEY_FILE)
    except OSError as exc:
        raise StoreUnavailableError(f"cannot read key file {path}: {exc}") from None
    finally:
        os.close(fd)
    if problem:
        raise _untrusted_key(path, problem)
    try:
        return as_key(data.strip())
    except ValidationError as exc:
        raise StoreUnavailableError(f"cannot read key file {path}: {exc}") from None


def _untrusted_key(path: str, problem: str) -> StoreUnavailableError:
    return StoreUnavailableError(
        f"refusing key file {path}: it {problem}, so it may not be your manager's. Remove it and restart "
        "the manager, or pass the authkey explicitly"
    )


# -- what a manager claims --------------------------------------------------------------------


def ensure_private_dir(path: str) -> None:
    """Create ``path`` with mode 0700, or check that an existing one is a directory of
    ours (not a symlink) and make it private if it is not yet."""
    with contextlib.suppress(FileExistsError):
        os.makedirs(path, mode=0o700)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        fd = None  # not a directory, a symlink, or not ours to read: lstat says which
    try:
        info = os.fstat(fd) if fd is not None else os.lstat(path)
        problem = _not_private(info) or (None if fd is not None else "cannot be opened")
        if problem:
            raise StoreUnavailableError(
                f"refusing the runtime directory {path}: it {problem}; another user may have made it to "
                f"pose as this manager to its clients. Remove it, or set XDG_RUNTIME_DIR to a directory of "
                f"your own"
            )
        if fd is not None and stat.S_IMODE(info.st_mode) & 0o077:
            os.fchmod(fd, 0o700)
    finally:
        if fd is not None:
            os.close(fd)


def create_key_file(path: str, key: bytes) -> tuple[int, int]:
    """Write ``key`` to a new file at ``path`` that only its owner can read; returns the
    file's ``(st_dev, st_ino)``.

    The file is created exclusively, never through a symlink. Something already at
    ``path`` is replaced only if it is a stale key file of ours: a regular file of this
    user, mode 0600, holding a key of the shape :func:`new_key` makes (or ``key`` itself).
    The caller must hold the address the key file belongs to (its socket bound), so no
    live manager can be using that file. Anything else there is left alone and is an
    :class:`AddressInUseError` naming it.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    for attempt in range(2):
        try:
            fd = os.open(path, flags, 0o600)
        except FileExistsError:
            if attempt:
                raise AddressInUseError(f"{path} was created again while this manager was replacing it") from None
            _remove_stale_key(path, key)
            continue
        try:
            os.fchmod(fd, 0o600)  # whatever the umask
            view = memoryview(key)
            while view:
                view = view[os.write(fd, view) :]
            info = os.fstat(fd)
        except BaseException:
            os.unlink(path)
            raise
        finally:
            os.close(fd)
        return info.st_dev, info.st_ino
    raise AssertionError("unreachable")


def _remove_stale_key(path: str, key: bytes) -> None:
    """Remove the key file a dead manager left at ``path``, or say why it is not one."""
    try:
        fd = os.open(path, _INSPECT)
    except FileNotFoundError:
        return  # gone meanwhile
    except OSError as exc:
        problem: str | None = _open_problem(exc)
    else:
        try:
            problem = _not_our_key_file(os.fstat(fd))
            if not problem:
                data = os.read(fd, _MAX_KEY_FILE)
                if not (_KEY_SHAPE.fullmatch(data) or data == key):
                    problem = "does not hold a shmstore key"
        finally:
            os.close(fd)
    if problem:
        raise AddressInUseError(
            f"{path} is where this manager's key file goes, and it {problem}. shmstore replaces only a stale "
            "key file of its own there (a regular file of this user, mode 0600, holding a key); remove it if "
            "you do not need it, or choose another address"
        )
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


# -- what to make of a file -------------------------------------------------------------------


def _kind(mode: int) -> str:
    kinds = [
        (stat.S_ISREG, "a regular file"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISLNK, "a symbolic link"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISFIFO, "a FIFO"),
    ]
    return next((name for test, name in kinds if test(mode)), "a device")


def describe(st_mode: int) -> str:
    """What a file with ``st_mode`` is, in words: "a regular file", "a symbolic link", ..."""
    return _kind(st_mode)


def _not_private(info: os.stat_result) -> str | None:
    """Why a directory with ``info`` (from lstat or fstat) is not one of ours, or None."""
    if not stat.S_ISDIR(info.st_mode):
        return f"is {_kind(info.st_mode)}, not a directory"
    if info.st_uid != os.getuid():
        return f"belongs to uid {info.st_uid}, not to this user (uid {os.getuid()})"
    return None


def _not_our_key_file(info: os.stat_result) -> str | None:
    """Why a key file with ``info`` (fstat of the file opened) is not one we wrote, or None."""
    if not stat.S_ISREG(info.st_mode):
        return f"is {_kind(info.st_mode)}, not a regular file"
    if info.st_uid != os.getuid():
        return f"belongs to uid {info.st_uid}, not to this user (uid {os.getuid()})"
    mode = stat.S_IMODE(info.st_mode)
    if mode != 0o600:
        return f"has mode {mode:04o}, not 0600"
    return None


def _open_problem(exc: OSError) -> str:
    if exc.errno == errno.ELOOP:
        return "is a symbolic link, not a regular file"
    if exc.errno == errno.ENXIO:
        return "is a socket, not a regular file"
    return f"cannot be opened ({exc.strerror})"
