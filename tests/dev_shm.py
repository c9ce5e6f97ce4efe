"""What one process holds in /dev/shm: the names it maps or has open.

Tests ask each process under test rather than list /dev/shm, which every pytest-xdist
worker shares: another worker's multiprocess semaphores (``sem.mp-*``) come and go there
while a test runs (seen in CI: five of them made a leak check fail).
"""

from __future__ import annotations

import os


def held() -> list[str]:
    """The /dev/shm paths this process maps or holds an fd to, sorted."""
    with open("/proc/self/maps") as maps:
        names = {line.split(maxsplit=5)[5].strip() for line in maps if "/dev/shm/" in line}
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue  # the fd listing's own fd, closed by now
        if target.startswith("/dev/shm/"):
            names.add(target)
    return sorted(names)
