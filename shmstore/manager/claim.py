"""Claiming an address for a manager: nothing live is there, its directory is one clients
will trust, a TCP address off the loopback is served only when asked for; and, on the way
out, removing the key file that is still ours.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import socket
import stat
import warnings
from pathlib import Path

from ..errors import AddressInUseError, ValidationError
from ..transport import address as addr
from ..transport import wire

log = logging.getLogger("shmstore.manager")


def check_exposure(address: wire.Address, allow_remote: bool) -> None:
    """Refuse a TCP address off the loopback unless the caller opted in, and then warn."""
    if isinstance(address, str):
        return
    host = address[0]
    try:
        loopback = ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
    except (OSError, ValueError):
        loopback = False
    if loopback:
        return
    if not allow_remote:
        raise ValidationError(
            "address",
            f"{host} is not a loopback address; anyone who holds the authkey can run code in the "
            "manager (its protocol is pickle), so serving beyond this host needs allow_remote=True "
            "(--allow-remote)",
        )
    warnings.warn(
        f"shmstore is serving on {host}:{address[1]}, beyond this host: anyone who holds the authkey "
        "can run code in the manager",
        stacklevel=3,
    )


def claim(address: wire.Address) -> None:
    """Make sure nothing live holds ``address`` and its directory is one clients will trust;
    remove a socket a dead manager left, and nothing else."""
    if not isinstance(address, str):
        return  # TCP: bind() itself tells us the port is taken
    path = Path(address)
    directory = addr.socket_dir(address)
    if addr.is_runtime_dir(directory):
        addr.ensure_private_dir(directory)
    else:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        addr.check_socket_dir(directory)
    try:
        info = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        raise AddressInUseError(
            f"{address} exists and is {addr.describe(info.st_mode)}, not a socket; shmstore removes only a socket "
            "that a dead manager left. Choose another address, or remove it if you do not need it",
            address=address,
        )
    probe = socket.socket(socket.AF_UNIX)
    probe.settimeout(1.0)
    try:
        probe.connect(address)
    except (ConnectionRefusedError, FileNotFoundError):
        path.unlink(missing_ok=True)  # stale: nobody listens there any more
        return
    except OSError as exc:
        raise AddressInUseError(f"{address} exists and cannot be probed: {exc}", address=address) from None
    finally:
        probe.close()
    raise AddressInUseError(f"a manager is already serving at {address}", address=address)


def remove_key(path: str, key: bytes, written: tuple[int, int] | None = None) -> None:
    """Remove our key file: only if it still holds ``key`` and (given ``written``, its
    ``(st_dev, st_ino)``) is the very file we wrote, never one another manager has since
    put there, and never through a symlink."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return
    try:
        info = os.fstat(fd)
        ours = (
            stat.S_ISREG(info.st_mode)
            and (written is None or (info.st_dev, info.st_ino) == written)
            and os.read(fd, len(key) + 1) == key
        )
    except OSError:
        ours = False
    finally:
        os.close(fd)
    if ours:
        with contextlib.suppress(OSError):
            os.unlink(path)
