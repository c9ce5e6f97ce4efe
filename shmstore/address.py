"""Where a manager listens and where its authkey lives.

By default a manager listens on a unix socket in a per-user runtime directory that only
its owner may enter (mode 0700), and writes its authkey to a key file (mode 0600) beside
the socket. Clients find both without being told. ``host:port`` selects TCP instead.
"""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

from .errors import StoreUnavailableError, ValidationError
from .wire import Address

#: Environment variable that overrides the default address.
ENV_ADDRESS = "SHMSTORE_ADDRESS"
#: Environment variable that holds the authkey, overriding the key file.
ENV_AUTHKEY = "SHMSTORE_AUTHKEY"

#: The longest path a unix socket address may have on Linux (sun_path less its NUL).
MAX_SOCKET_PATH = 107


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
    """The key file that goes with ``address``: beside a unix socket, or in the runtime
    directory for a TCP address."""
    if isinstance(address, str):
        return Path(address).with_suffix(".key")
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


def write_key(path: Path, key: bytes) -> None:
    """Write ``key`` where only its owner can read it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, key)
    finally:
        os.close(fd)


def ensure_private_dir(path: Path) -> None:
    """Create ``path`` with mode 0700, or check that an existing one is ours and private."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = path.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
        raise StoreUnavailableError(f"{path} is not a directory owned by this user; refusing to use it")
    if stat.S_IMODE(info.st_mode) & 0o077:
        os.chmod(path, 0o700)
