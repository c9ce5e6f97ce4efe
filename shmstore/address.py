"""Where a manager listens and where its authkey lives.

By default a manager listens on a unix socket in a per-user runtime directory that only
its owner may enter (mode 0700), and writes its authkey to a key file (mode 0600) named
after the socket: the socket's path plus ``.key``. Clients find both without being told.
``host:port`` selects TCP instead, with the key file in the runtime directory.
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import stat
from pathlib import Path

from .errors import AddressInUseError, StoreUnavailableError, ValidationError
from .wire import Address

#: Environment variable that overrides the default address.
ENV_ADDRESS = "SHMSTORE_ADDRESS"
#: Environment variable that holds the authkey, overriding the key file.
ENV_AUTHKEY = "SHMSTORE_AUTHKEY"

#: The longest path a unix socket address may have on Linux (sun_path less its NUL).
MAX_SOCKET_PATH = 107
#: What is added to a socket's path to name its key file.
KEY_SUFFIX = ".key"

#: What :func:`new_key` makes: 64 lowercase hex digits.
_KEY_SHAPE = re.compile(rb"[0-9a-f]{64}")
#: More than any key file of ours holds.
_MAX_KEY_FILE = 64 * 1024
#: Opening a file to look at it: never through a symlink, never blocking on a FIFO.
_INSPECT = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def runtime_dir() -> Path:
    """The per-user directory for sockets and key files: ``$XDG_RUNTIME_DIR/shmstore``,
    or ``/tmp/shmstore-UID`` where there is no runtime directory."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    if base:
        return Path(base) / "shmstore"
    return Path("/tmp") / f"shmstore-{os.getuid()}"


def default_address() -> Address:
    text = os.environ.get(ENV_ADDRESS)
    return parse_address(text) if text else str(runtime_dir() / "store.sock")


def resolve(address: Address | os.PathLike[str] | None) -> Address:
    """The address to use: as given (a path, ``host:port`` or a tuple), else the default."""
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


def format_address(address: Address) -> str:
    return address if isinstance(address, str) else f"{address[0]}:{address[1]}"


def key_path(address: Address) -> Path:
    """The key file that goes with ``address``: the socket's path plus ``.key`` (nothing of
    the path is replaced, so two sockets never share a key file), or for a TCP address
    ``tcp-HOST-PORT.key`` in the runtime directory."""
    if isinstance(address, str):
        return Path(address + KEY_SUFFIX)
    host, port = address
    return runtime_dir() / f"tcp-{host}-{port}.key"


def new_key() -> bytes:
    return secrets.token_hex(32).encode("ascii")


def as_key(authkey: bytes | str) -> bytes:
    if isinstance(authkey, str):
        authkey = authkey.encode("utf-8")
    if not isinstance(authkey, bytes) or not authkey:
        raise ValidationError("authkey", "must be non-empty bytes or str")
    return authkey


def read_key(address: Address) -> bytes:
    """The authkey for ``address``: from ``$SHMSTORE_AUTHKEY``, else from its key file."""
    env = os.environ.get(ENV_AUTHKEY)
    if env:
        return as_key(env)
    path = key_path(address)
    try:
        return as_key(path.read_bytes().strip())
    except FileNotFoundError:
        raise StoreUnavailableError(
            f"no manager at {format_address(address)}: key file {path} does not exist"
        ) from None
    except (OSError, ValidationError) as exc:
        raise StoreUnavailableError(f"cannot read key file {path}: {exc}") from None


def ensure_private_dir(path: Path) -> None:
    """Create ``path`` with mode 0700, or check that an existing one is ours and private."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = path.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
        raise StoreUnavailableError(f"{path} is not a directory owned by this user; refusing to use it")
    if stat.S_IMODE(info.st_mode) & 0o077:
        os.chmod(path, 0o700)


def create_key_file(path: Path, key: bytes) -> tuple[int, int]:
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


def _remove_stale_key(path: Path, key: bytes) -> None:
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
    path.unlink(missing_ok=True)


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
