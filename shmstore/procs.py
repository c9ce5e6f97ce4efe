"""Process liveness, as Linux's /proc tells it: which process a pid is, whether it is still
the one the manager first saw, and which pid namespace a process lives in.

An agent is identified by its pid **and** its start time, read from ``/proc/<pid>/stat``
(field 22: clock ticks since boot) the first time the manager sees the pid. The pair
outlives pid reuse (a new process with the same pid has another start time) and needs no
wall clock: comparing start times converted to epoch seconds with when the agent last
reported closed live agents whenever the clock stepped back. Two processes could share
both only if pids wrapped all the way round within one tick (10 ms).

A pid means something only in its own pid namespace: an agent in a container reports a
pid the host's /proc knows as another process, or as none. The manager therefore uses a
reported pid only when the reporting process is in the manager's own pid namespace; the
connection's thread says so in :data:`caller` (see :func:`peer_same_pid_namespace`).
"""

from __future__ import annotations

import os
import struct
from _thread import _local  # threading.local itself; importing threading cost the hook ~1.5 ms

#: What the manager knows of the process calling it, per connection thread. The thread
#: that serves a client connection sets ``caller.same_pid_namespace``: True when the client
#: is in the manager's pid namespace, False when it is not, None when that cannot be told
#: (TCP, or /proc not readable). Left unset (a store used in-process), the caller is taken
#: to be in the same namespace.
caller = _local()

#: A process's /proc state letters that mean it has ended: zombie, dead.
_ENDED = frozenset({"Z", "X"})


class ProcStat:
    """The fields of ``/proc/<pid>/stat`` that shmstore uses. (A plain class: a NamedTuple
    would import ``typing`` into the hook, ~4 ms of its start-up.)"""

    __slots__ = ("name", "parent", "start", "state")

    def __init__(self, name: str, state: str, parent: int, start: int) -> None:
        self.name = name  # field 2, comm: the executable's name, at most 15 bytes, may hold anything
        self.state = state  # field 3: R, S, D, Z, X, ...
        self.parent = parent  # field 4: the parent's pid
        self.start = start  # field 22: when the process started, in clock ticks since boot

    def __repr__(self) -> str:
        return f"ProcStat(name={self.name!r}, state={self.state!r}, parent={self.parent}, start={self.start})"


def process_stat(pid: int) -> ProcStat | None:
    """What ``/proc/<pid>/stat`` says of ``pid``, or None when there is no such process (or
    no /proc, or nothing it says can be parsed).

    The name (field 2) is in parentheses and may itself contain spaces and parentheses, so
    the fields after it are found after the *last* ``)``.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as file:
            stat = file.read()
    except OSError:  # gone (ENOENT, or ESRCH while it exits), or not ours to see
        return None
    try:
        close = stat.rindex(b")")
        fields = stat[close + 2 :].split()
        return ProcStat(
            name=stat[stat.index(b"(") + 1 : close].decode("utf-8", "replace"),
            state=fields[0].decode("ascii"),
            parent=int(fields[1]),
            start=int(fields[19]),
        )
    except (ValueError, IndexError, UnicodeDecodeError):
        return None


def process_start(pid: int) -> int | None:
    """When ``pid`` started, in clock ticks since boot; None if there is no such live process."""
    stat = process_stat(pid)
    return None if stat is None or stat.state in _ENDED else stat.start


def agent_alive(pid: int, start: int) -> bool:
    """Is the process that had ``pid`` and started at ``start`` (clock ticks since boot) still
    running? No when there is no process ``pid``, when it is a zombie, or when the process
    now called ``pid`` started at another time (the pid was reused). No clock is read."""
    stat = process_stat(pid)
    return stat is not None and stat.state not in _ENDED and stat.start == start


def seen_by_caller(pid: int | None, given_start: int | None) -> tuple[bool, int | None]:
    """Whether the calling client (:data:`caller`) is in our pid namespace, so that its
    ``pid`` can be checked here; and, if so and it gave no start time, the pid's start time
    now. Called before taking the store's lock: reading /proc costs a few microseconds."""
    same = getattr(caller, "same_pid_namespace", True) is True  # unset: called in-process
    fresh = process_start(pid) if pid is not None and same and given_start is None else None
    return same, fresh


def pid_namespace(pid: int | str) -> str | None:
    """The pid namespace of process ``pid`` (``"self"`` for this one), as ``pid:[inode]``;
    None when it cannot be read (no such process, another user's, no /proc)."""
    try:
        return os.readlink(f"/proc/{pid}/ns/pid")
    except OSError:
        return None


#: SO_PEERCRED's answer: struct ucred {pid_t pid; uid_t uid; gid_t gid;}.
_UCRED = struct.Struct("3i")


def peer_same_pid_namespace(sock_fd: int) -> bool | None:
    """Is the process at the other end of unix socket ``sock_fd`` in our pid namespace?

    Reads the peer's pid with SO_PEERCRED (the kernel gives it as our namespace numbers it,
    and 0 when the peer's namespace is not one we can see into) and compares its
    ``/proc/<pid>/ns/pid`` with ours. None when that cannot be told: not a unix socket
    (TCP), no credentials, or the peer's /proc entry unreadable. ``sock_fd`` stays open.
    """
    import socket  # here: the hook imports this module and needs no socket module of it

    try:
        sock = socket.socket(fileno=sock_fd)
    except OSError:
        return None
    try:
        if sock.family != socket.AF_UNIX:
            return None
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    except OSError:
        return None
    finally:
        sock.detach()
    pid, _uid, _gid = _UCRED.unpack(creds)
    if pid <= 0:
        return None
    peer, ours = pid_namespace(pid), pid_namespace("self")
    if peer is None or ours is None:
        return None
    return peer == ours


#: Environment variable naming this host for a store that several hosts share; by default
#: :func:`host_id` derives one. Tests simulate several hosts with it.
ENV_HOST_ID = "SHMSTORE_HOST_ID"


def host_id() -> str:
    """This host as a store that several hosts share names it: 16 hex digits of a hash of the
    machine id, the boot id and this process's pid namespace, so that two containers on one
    machine, or one machine before and after a reboot, are different hosts (a pid means
    something only within one of these). ``$SHMSTORE_HOST_ID`` overrides it."""
    named = os.environ.get(ENV_HOST_ID)
    if named:
        from .checks import check_host

        return check_host(named, ENV_HOST_ID)
    import hashlib  # here: the hook imports this module, and must not pay for hashlib

    machine = _first_line("/etc/machine-id") or _first_line("/var/lib/dbus/machine-id")
    parts = [machine, _first_line("/proc/sys/kernel/random/boot_id"), pid_namespace("self") or ""]
    if not any(parts):  # nothing to tell this host by (not Linux): its name, at least
        parts.append(os.uname().nodename)
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def _first_line(path: str) -> str:
    try:
        with open(path, encoding="ascii", errors="replace") as file:
            return file.readline().strip()
    except OSError:
        return ""
