"""Telling a service manager how the manager is doing: systemd's ``sd_notify`` protocol,
written out here rather than taken as a dependency, since it is one datagram.

A service of ``Type=notify`` is given ``$NOTIFY_SOCKET``, a unix datagram socket (a path,
or a name in the abstract namespace when it starts with ``@``); each message is one
datagram of ``KEY=VALUE`` lines. :func:`ready` says clients can connect now, and
:func:`stopping` that the manager is on its way out. Without the variable both do nothing;
a failure to send is logged and never raised, since serving matters more than telling.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)

ENV_SOCKET = "NOTIFY_SOCKET"
#: Seconds a send may block: a datagram to a local socket queues at once unless the
#: receiver's queue is full, and a manager that stopped reading must not hold up serving.
SEND_TIMEOUT = 1.0


def ready(status: str) -> bool:
    """Say that the manager serves (``READY=1``), with its pid and ``status`` as the line
    ``systemctl status`` shows."""
    return notify(f"READY=1\nMAINPID={os.getpid()}\nSTATUS={_one_line(status)}")


def stopping(status: str = "stopping") -> bool:
    """Say that the manager is stopping (``STOPPING=1``)."""
    return notify(f"STOPPING=1\nSTATUS={_one_line(status)}")


def notify(message: str) -> bool:
    """Send ``message`` to ``$NOTIFY_SOCKET``; False when there is none or sending failed
    (which is logged as a warning)."""
    target = os.environ.get(ENV_SOCKET, "")
    if not target:
        return False
    address = "\0" + target[1:] if target.startswith("@") else target
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.settimeout(SEND_TIMEOUT)
            sock.sendto(message.encode(), address)
    except (OSError, ValueError) as exc:  # ValueError: a NUL inside the path
        log.warning("could not notify the service manager at %s: %s", target, exc)
        return False
    return True


def _one_line(text: str) -> str:
    return " ".join(text.splitlines())
