"""Running the manager as a per-user service that starts at login and restarts on failure:
a systemd user unit on Linux, a launchd agent on macOS; and, when asked, ``shmstore notify``
beside it as a second one (:data:`NOTIFY_UNIT_NAME`, :data:`NOTIFY_LABEL`).

The file's text is made by pure functions (:func:`systemd_unit`, :func:`launchd_plist`);
:func:`plan` says what installing would write and run, and :func:`install` /
:func:`uninstall` do it. A file we wrote carries :data:`MARKER` on a line of its own; a
file at our path without it is the user's, and is never replaced or removed.
"""

from __future__ import annotations

import dataclasses
import os
import plistlib
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from ..errors import ShmstoreError, ValidationError

#: The line that marks a unit or plist as ours (a comment in either format).
MARKER = "Written by `shmstore install-service`; `shmstore uninstall-service` removes it."
UNIT_NAME = "shmstore.service"
#: The socket unit that holds the manager's HTTP port for it (socket activation: systemd
#: passes it to the service of the same name, and keeps it while the manager restarts).
SOCKET_NAME = "shmstore.socket"
#: launchd labels are reverse-DNS names; ``local.`` is the prefix for agents a user makes.
LAUNCHD_LABEL = "local.shmstore"
#: The unit (launchd: the agent) that runs ``shmstore notify`` beside the manager.
NOTIFY_UNIT_NAME = "shmstore-notify.service"
NOTIFY_LABEL = "local.shmstore.notify"
#: What ``shmstore notify`` exits with when its flags cannot work (no channel, a bad value):
#: not a failure a restart would mend.
_BAD_INPUT = 2
#: The state file in the unit: ``%S`` is the user's state directory ($XDG_STATE_HOME,
#: default ~/.local/state), which ``StateDirectory=shmstore`` creates for the service.
UNIT_STATE = "%S/shmstore/state.json"
#: Seconds each systemctl or launchctl call may take. ``enable --now`` waits for the
#: manager's READY=1 (Type=notify); it starts in ~0.3 s, so this is slack for a busy login.
COMMAND_TIMEOUT = 30.0
#: What ``systemctl --user is-system-running`` prints when a user manager answers (it exits
#: non-zero for all but "running"); without one it prints "offline" or nothing.
_MANAGER_STATES = {"initializing", "starting", "running", "degraded", "maintenance", "stopping"}
SYSTEMD = "systemd"
LAUNCHD = "launchd"
INITS = (SYSTEMD, LAUNCHD)


class ServiceError(ShmstoreError):
    """Installing or removing the service failed: a file at ``path`` is not ours, or a
    ``command`` (its argv) failed; the message carries what the command said."""

    def __init__(self, message: str, *, path: str | None = None, command: str | None = None) -> None:
        super().__init__(message)
        self.path = path
        self.command = command


class NoServiceManagerError(ServiceError):
    """There is no service manager to install into (no ``systemctl``, or no systemd user
    manager running); ``advice`` is the command to run the manager some other way."""

    def __init__(self, message: str, *, advice: str) -> None:
        super().__init__(message)
        self.advice = advice


@dataclasses.dataclass(frozen=True)
class Plan:
    """What installing would do: write ``text`` to ``path``, then run ``commands``."""

    init: str
    path: Path
    text: str
    commands: list[list[str]]
    #: To stop and forget the service before its file is removed.
    stop_commands: list[list[str]]
    #: Run after the file is removed.
    after_removal: list[list[str]]
    #: Seconds each command may take.
    timeout: float = COMMAND_TIMEOUT
    #: Other files of ours: each path and the text to write there (None: to remove, if ours).
    extra: tuple[tuple[Path, str | None], ...] = ()
    #: Run (and allowed to fail) before any file is written: to stop a service of ours
    #: whose file this install removes.
    before: list[list[str]] = dataclasses.field(default_factory=list)


def default_init(platform: str = sys.platform) -> str:
    return LAUNCHD if platform == "darwin" else SYSTEMD


def _xdg(variable: str, default: str) -> Path:
    """An XDG base directory: the variable when it holds an absolute path (the spec says to
    ignore a relative one), else ``default`` under the home directory."""
    value = os.environ.get(variable, "")
    return Path(value) if os.path.isabs(value) else Path.home() / default


def unit_path() -> Path:
    return _xdg("XDG_CONFIG_HOME", ".config") / "systemd" / "user" / UNIT_NAME


def socket_path() -> Path:
    return unit_path().with_name(SOCKET_NAME)


def notify_unit_path() -> Path:
    return unit_path().with_name(NOTIFY_UNIT_NAME)


def notify_plist_path() -> Path:
    return plist_path().with_name(f"{NOTIFY_LABEL}.plist")


def notify_argv(python: str, address: str | None = None, flags: Sequence[str] = ()) -> list[str]:
    """The notifier's command line: ``python -m shmstore notify [--address A] FLAGS...``."""
    argv = [python, "-m", "shmstore", "notify"]
    argv += [] if address is None else ["--address", address]
    return [*argv, *flags]


def systemd_notify_unit(python: str, address: str | None = None, flags: Sequence[str] = ()) -> str:
    """The text of the user unit that runs ``shmstore notify`` (with ``flags``) beside the
    manager's unit: started after it, restarted on failure but not when its flags cannot
    work (exit 2). It follows the manager through restarts itself."""
    _check_python(python)
    words = [exec_quote(python, command=True, field="python"), "-m", "shmstore", "notify"]
    if address is not None:
        words += ["--address", exec_quote(address)]
    words += [exec_quote(flag, field="notify") for flag in flags]
    return "\n".join(
        [
            f"# {MARKER}",
            "[Unit]",
            "Description=shmstore notify: tells you when an agent session waits for you",
            f"Wants={UNIT_NAME}",
            f"After={UNIT_NAME}",
            "",
            "[Service]",
            f"ExecStart={' '.join(words)}",
            "Restart=on-failure",
            "RestartSec=5",
            f"RestartPreventExitStatus={_BAD_INPUT}",
            "",
            "[Install]",
            "WantedBy=default.target",
            "",
        ]
    )


def systemd_socket(port: str) -> str:
    """The text of the socket unit that listens on 127.0.0.1:``port`` for the manager."""
    return "\n".join(
        [
            f"# {MARKER}",
            "[Unit]",
            "Description=shmstore: agents' events over HTTP, held while the manager restarts",
            "",
            "[Socket]",
            f"ListenStream=127.0.0.1:{port}",
            "FileDescriptorName=http",
            "",
            "[Install]",
            "WantedBy=sockets.target",
            "",
        ]
    )


def plist_path() -> Path:
    return Path.home() / "Library" / "LaunchAgents" / f"{LAUNCHD_LABEL}.plist"


def state_file(init: str) -> Path:
    """Where the service keeps its state, as a path (the unit itself says ``%S``)."""
    if init == LAUNCHD:
        return Path.home() / "Library" / "Application Support" / "shmstore" / "state.json"
    return _xdg("XDG_STATE_HOME", ".local/state") / "shmstore" / "state.json"


def serve_argv(python: str, state: str, address: str | None = None, http: str | None = None) -> list[str]:
    """The manager's command line: ``python -m shmstore serve --state STATE``."""
    argv = [python, "-m", "shmstore", "serve", "--state", state]
    argv += [] if address is None else ["--address", address]
    return argv if http is None else [*argv, "--http", http]


def exec_quote(arg: str, *, command: bool = False, field: str = "address") -> str:
    """``arg`` as one word of a systemd ``ExecStart=``, taken literally; ``command`` for
    the first word, the program.

    systemd splits the line at whitespace outside quotes, unescapes backslash sequences
    inside double quotes and expands ``%`` specifiers everywhere, and ``$VARIABLE``
    references in the arguments but not in the program's path; so the word is
    double-quoted, ``%`` doubled, and in an argument ``\\`` and ``"`` escaped and ``$``
    doubled. systemd refuses a program path holding a quote or a backslash ("Executable
    name contains special characters", systemd 252), and no unit line can hold a control
    character: those are refused here with a ValidationError on ``field``.
    """
    if not arg.isprintable():
        raise ValidationError(field, f"{arg!r} holds a control character, which a unit file cannot carry")
    if command:
        if any(c in arg for c in "\"'\\"):
            raise ValidationError(field, f"{arg!r}: systemd refuses a program path holding a quote or a backslash")
        return '"' + arg.replace("%", "%%") + '"'
    escaped = arg.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%").replace("$", "$$")
    return f'"{escaped}"'


def systemd_unit(python: str, address: str | None = None, http: str | None = None) -> str:
    """The text of the user unit that runs ``python -m shmstore serve``, for ``python``
    (absolute) and, when given, ``address``; the state file is :data:`UNIT_STATE`."""
    _check_python(python)
    words = [exec_quote(python, command=True, field="python"), "-m", "shmstore", "serve", "--state", UNIT_STATE]
    if address is not None:
        words += ["--address", exec_quote(address)]
    if http is not None:
        words += ["--http", exec_quote(http, field="http")]
    return "\n".join(
        [
            f"# {MARKER}",
            "[Unit]",
            "Description=shmstore: the session store of AI coding agents",
            "",
            "[Service]",
            # The manager sends READY=1 once clients can connect (shmstore.manager.notify), so
            # `enable --now` and units ordered after this one start against a live store.
            "Type=notify",
            "NotifyAccess=main",
            f"ExecStart={' '.join(words)}",
            "Restart=on-failure",
            "StateDirectory=shmstore",
            "",
            "[Install]",
            "WantedBy=default.target",
            "",
        ]
    )


def launchd_plist(python: str, state: Path, log: Path, address: str | None = None, http: str | None = None) -> str:
    """The text of the launchd agent that runs ``python -m shmstore serve``: started at
    login (RunAtLoad), started again when it exits with a failure (KeepAlive), its stderr
    (the manager's log) in ``log``."""
    _check_python(python)
    agent = {
        "Label": LAUNCHD_LABEL,
        "ProgramArguments": serve_argv(python, str(state), address, http),
        "RunAtLoad": True,
        "KeepAlive": {"SuccessfulExit": False},
        "StandardErrorPath": str(log),
        "ProcessType": "Background",
    }
    text = plistlib.dumps(agent, sort_keys=False).decode()
    head, sep, body = text.partition("<plist")
    return f"{head}<!-- {MARKER} -->\n{sep}{body}"


def launchd_notify_plist(python: str, log: Path, address: str | None = None, flags: Sequence[str] = ()) -> str:
    """The text of the launchd agent that runs ``shmstore notify`` (with ``flags``): at
    login, and again when it exits with a failure; its stderr in ``log``."""
    _check_python(python)
    agent = {
        "Label": NOTIFY_LABEL,
        "ProgramArguments": notify_argv(python, address, flags),
        "RunAtLoad": True,
        "KeepAlive": {"SuccessfulExit": False},
        "ThrottleInterval": 5,
        "StandardErrorPath": str(log),
        "ProcessType": "Interactive",
    }
    text = plistlib.dumps(agent, sort_keys=False).decode()
    head, sep, body = text.partition("<plist")
    return f"{head}<!-- {MARKER} -->\n{sep}{body}"


def _check_python(python: str) -> None:
    if not os.path.isabs(python):
        raise ValidationError("python", f"{python!r} is not an absolute path; a service starts with no PATH of ours")


def plan(
    init: str,
    python: str | None = None,
    address: str | None = None,
    timeout: float = COMMAND_TIMEOUT,
    http: str | None = None,
    notify: Sequence[str] | None = None,
) -> Plan:
    """What installing the service for ``init`` (:data:`SYSTEMD` or :data:`LAUNCHD`) would
    write and run; ``python`` defaults to this interpreter (its path as started, so a
    virtualenv's interpreter stays the virtualenv's). ``notify``, when not None, adds a
    second service running ``shmstore notify`` with those flags; when None, a notifier
    service of an earlier install is stopped and removed."""
    python = os.path.abspath(python or sys.executable)
    if init == LAUNCHD:
        path, notify_path = plist_path(), notify_plist_path()
        domain = f"gui/{os.getuid()}"
        logs = Path.home() / "Library" / "Logs"
        notify_text = (
            None if notify is None else launchd_notify_plist(python, logs / "shmstore-notify.log", address, notify)
        )
        # bootout first: bootstrap refuses a label that is loaded already (a reinstall).
        commands = [
            ["launchctl", "bootout", f"{domain}/{LAUNCHD_LABEL}"],
            ["launchctl", "bootstrap", domain, str(path)],
        ]
        if notify is not None:
            commands += [
                ["launchctl", "bootout", f"{domain}/{NOTIFY_LABEL}"],
                ["launchctl", "bootstrap", domain, str(notify_path)],
            ]
        notify_stop = ["launchctl", "bootout", f"{domain}/{NOTIFY_LABEL}"]
        return Plan(
            init=init,
            path=path,
            text=launchd_plist(python, state_file(init), logs / "shmstore.log", address, http),
            commands=commands,
            stop_commands=[*_if_ours(notify_path, notify_stop), ["launchctl", "bootout", f"{domain}/{LAUNCHD_LABEL}"]],
            after_removal=[],
            timeout=timeout,
            extra=((notify_path, notify_text),),
            before=[] if notify is not None else _if_ours(notify_path, notify_stop),
        )
    if init != SYSTEMD:
        raise ValidationError("init", f"{init!r} is not one of {', '.join(INITS)}")
    systemctl = ["systemctl", "--user"]
    commands = [[*systemctl, "daemon-reload"], [*systemctl, "enable", "--now", UNIT_NAME]]
    if http is not None:
        # The manager must let go of the port before systemd can listen on it; a stop is a
        # drain that loses nothing, and the service starts again with the socket.
        commands[1:1] = [[*systemctl, "stop", UNIT_NAME], [*systemctl, "enable", "--now", SOCKET_NAME]]
    notify_stop = [*systemctl, "disable", "--now", NOTIFY_UNIT_NAME]
    if notify is not None:
        # restart, not just enable --now: a running notifier takes its new flags.
        commands += [[*systemctl, "enable", NOTIFY_UNIT_NAME], [*systemctl, "restart", NOTIFY_UNIT_NAME]]
    return Plan(
        init=init,
        path=unit_path(),
        text=systemd_unit(python, address, http),
        commands=commands,
        stop_commands=[
            *_if_ours(notify_unit_path(), notify_stop),
            [*systemctl, "disable", "--now", SOCKET_NAME],
            [*systemctl, "disable", "--now", UNIT_NAME],
        ],
        after_removal=[[*systemctl, "daemon-reload"]],
        timeout=timeout,
        extra=(
            (socket_path(), None if http is None else systemd_socket(http)),
            (notify_unit_path(), None if notify is None else systemd_notify_unit(python, address, notify)),
        ),
        before=[] if notify is not None else _if_ours(notify_unit_path(), notify_stop),
    )


def _if_ours(path: Path, argv: list[str]) -> list[list[str]]:
    """``[argv]`` when ``path`` is a file of ours (a notifier an earlier install made), else ``[]``."""
    return [argv] if is_ours(path) else []


def installed_http(init: str) -> str | None:
    """The ``--http`` port that the service already installed for ``init`` gives its
    manager, or None (no service, or one without it)."""
    path = plist_path() if init == LAUNCHD else unit_path()
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError):
        return None
    found = re.search(r'--http(?:</string>\s*<string>|\s+"?)(\d+)', text)
    return found[1] if found else None


def advice(init: str, python: str | None = None, address: str | None = None) -> str:
    """The command that runs the manager without a service manager."""
    python = os.path.abspath(python or sys.executable)
    return shlex.join(serve_argv(python, str(state_file(init)), address))


def is_ours(path: Path) -> bool | None:
    """True if ``path`` is a file we wrote, False if it is someone else's, None if absent."""
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ServiceError(f"cannot read {path}: {exc.strerror}", path=str(path)) from None
    return any(MARKER in line and line.lstrip().startswith(("#", "<!--")) for line in text.splitlines())


def check_not_foreign(path: Path) -> None:
    if is_ours(path) is False:
        raise ServiceError(
            f"{path} was not written by shmstore (it lacks the line {MARKER!r}); it is left as it is. "
            "Move it away to install shmstore's",
            path=str(path),
        )


def check_manager(
    init: str, python: str | None = None, address: str | None = None, timeout: float = COMMAND_TIMEOUT
) -> None:
    """Raise :class:`NoServiceManagerError` unless ``init``'s service manager can be told to
    run the service (launchctl present; systemctl present and a user manager answering)."""
    tool = "launchctl" if init == LAUNCHD else "systemctl"
    why = None
    if shutil.which(tool) is None:
        why = f"there is no {tool} here"
    elif init == SYSTEMD:
        try:
            state = _run(["systemctl", "--user", "is-system-running"], timeout, check=False).stdout.strip()
        except ServiceError as exc:
            state = str(exc)
        if state not in _MANAGER_STATES:
            said = state or "no answer"
            why = f"no systemd user manager is running here (systemctl --user is-system-running: {said})"
    if why is not None:
        raise NoServiceManagerError(
            f"cannot install a service: {why}. Run the manager yourself instead, e.g. from your login script",
            advice=advice(init, python, address),
        )


def install(service: Plan) -> bool:
    """Write the service's file (unless a file that is not ours is there) and start it.
    Returns False when the file already held exactly this text (the commands still run)."""
    check_not_foreign(service.path)
    for path, _ in service.extra:
        check_not_foreign(path)
    for argv in service.before:
        _run(argv, service.timeout, check=False)
    changed = _read(service.path) != service.text
    if changed:
        _write(service.path, service.text)
    for path, text in service.extra:
        if text is None:
            if is_ours(path):
                path.unlink()  # a socket unit of an earlier install with --http, or a notifier's
                changed = True
        elif _read(path) != text:
            _write(path, text)
            changed = True
    for argv in service.commands:
        _run(argv, service.timeout, check=not _is_bootout(argv))
    return changed


def uninstall(service: Plan, manager: bool = True) -> bool:
    """Stop and disable the service, remove its file (only ours), and tell the service
    manager (when ``manager``). False when there was no file to remove."""
    if is_ours(service.path) is None:
        return False
    check_not_foreign(service.path)
    if manager:
        for argv in service.stop_commands:
            # The socket and the notifier may not be there (an install without them).
            _run(argv, service.timeout, check=not _is_bootout(argv) and not {SOCKET_NAME, NOTIFY_UNIT_NAME} & {*argv})
    service.path.unlink()
    for path, _ in service.extra:
        if is_ours(path):
            path.unlink()
    if manager:
        for argv in service.after_removal:
            _run(argv, service.timeout)
    return True


def _is_bootout(argv: Sequence[str]) -> bool:
    return argv[:2] == ["launchctl", "bootout"]  # fails when nothing is loaded: that is fine


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except (FileNotFoundError, UnicodeDecodeError):
        return None


def _write(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` whole or not at all (a temp file renamed over it)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as file:
                file.write(text)
                file.flush()
                os.fsync(file.fileno())
            os.chmod(temp, 0o644)
            os.replace(temp, path)
        except BaseException:
            os.unlink(temp)
            raise
    except OSError as exc:
        raise ServiceError(f"cannot write {path}: {exc.strerror}", path=str(path)) from None


def _run(argv: list[str], timeout: float, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` for at most ``timeout`` seconds; a failure (when ``check``) is a
    ServiceError carrying what the command said."""
    shown = shlex.join(argv)
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise ServiceError(f"`{shown}` did not finish within {timeout:g} s", command=shown) from None
    except OSError as exc:
        raise ServiceError(f"cannot run `{shown}`: {exc.strerror}", command=shown) from None
    if check and result.returncode != 0:
        said = (result.stderr or result.stdout).strip() or "no message"
        raise ServiceError(f"`{shown}` failed (exit {result.returncode}): {said}", command=shown)
    return result
