"""The ``shmstore`` command: thin commands over the rest of the package.

Each command parses its arguments, makes one or two calls, and prints what
:mod:`~shmstore.commands.render` makes of the result. Errors of ours are printed in one place
(:func:`main`), which exits with a code that says what kind of error it was (see
:data:`EXIT_CODES_HELP`); the flags of ``serve`` are generated from :class:`~shmstore.config.Limits`
and :class:`~shmstore.config.ServeOptions`, so they cannot drift from the settings.
A command is offered only the connection flags it uses (``--address``, ``--timeout``).
When the reader of stdout goes away (``shmstore ls | head -1``), the command ends quietly
with status 141, as one killed by SIGPIPE.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn, TypeVar

from .. import __doc__ as package_doc
from .. import __version__, agents
from ..clients.client import DEFAULT_TIMEOUT
from ..config import Limits, ServeOptions
from ..errors import JumpRefusedError, NotFoundError, ShmstoreError, StoreUnavailableError, ValidationError
from ..hook.run import HOOK_DEADLINE
from ..model import AgentType, Status
from ..transport import address as addr
from . import notify, running, service, sessions, setup
from .common import (
    EXIT_BAD_INPUT,
    EXIT_CODES_HELP,
    EXIT_ERROR,
    EXIT_NOT_FOUND,
    EXIT_REFUSED,
    EXIT_UNAVAILABLE,
)
from .render import printable

STATUSES = [status.value for status in Status]
#: The exit status when stdout's reader goes away early: 128 + SIGPIPE, what a shell reports
#: for a command that SIGPIPE killed (Python ignores SIGPIPE, so we say it ourselves).
OUTPUT_CLOSED = 141

_Settings = TypeVar("_Settings", Limits, ServeOptions)


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        _no_password_in_argv(args)
        result: int = args.run(args)
        sys.stdout.flush()  # here, so that a reader gone early is seen below
        return result
    except ShmstoreError as exc:
        print(f"shmstore: error: {printable(str(exc))}", file=sys.stderr)
        return exit_code(exc)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return _output_closed()


#: The commands that must not take a Redis password in their ``--address`` URL, and why.
PASSWORD_SHOWN = {
    "install-hooks": "would be written into Claude Code's settings",
    # They run for long, and so sit in `ps` for anyone on the host to read.
    **{
        name: f"`ps` shows every user for as long as `shmstore {name}` runs"
        for name in ("reaper", "watch", "top", "notify")
    },
}


def _no_password_in_argv(args: argparse.Namespace) -> None:
    """Refuse a Redis password in the ``--address`` of a command of :data:`PASSWORD_SHOWN`."""
    address, shown = getattr(args, "address", None), PASSWORD_SHOWN.get(args.command)
    if shown and isinstance(address, str) and addr.is_redis(address):
        from ..redis.address import password_in_url

        if password_in_url(address):
            raise ValidationError(
                "address",
                f"holds a password, which {shown}: put it in a file (?password_file=PATH, mode 0600) or in "
                "$SHMSTORE_REDIS_PASSWORD instead",
            )


def _output_closed() -> int:
    """The reader of stdout went away (``shmstore ls | head -1``): end quietly with the
    status of a command killed by SIGPIPE, as other tools in a pipeline do. Whatever is
    still buffered has nowhere to go; stdout now points at the null device so that the
    interpreter's own flush at exit does not fail again (and print a traceback)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return OUTPUT_CLOSED


def exit_code(exc: ShmstoreError) -> int:
    """The exit code that tells a script what kind of error ``exc`` is."""
    if isinstance(exc, ValidationError):
        return EXIT_BAD_INPUT
    if isinstance(exc, StoreUnavailableError):
        return EXIT_UNAVAILABLE
    if isinstance(exc, NotFoundError):
        return EXIT_NOT_FOUND
    if isinstance(exc, JumpRefusedError):
        return EXIT_REFUSED
    return EXIT_ERROR


def version() -> str:
    """This shmstore's version, as installed (else the package's own)."""
    import importlib.metadata  # here, not at the top: it costs every command (the hook too) ~5 ms

    try:
        return importlib.metadata.version("shmstore")
    except importlib.metadata.PackageNotFoundError:
        return __version__


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # Arguments are echoed in the message: never let one put control characters (or a
        # terminal escape sequence) on the user's screen.
        super().error(printable(message))


class _Version(argparse.Action):
    """``--version``, looked up only when asked for (importlib.metadata costs ~10 ms)."""

    def __init__(self, option_strings: Sequence[str], dest: str, help: str | None = None) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help=help)

    def __call__(self, parser: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> NoReturn:
        print(f"shmstore {version()}")
        parser.exit()


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="shmstore",
        description=(package_doc or "").splitlines()[0],
        epilog=(
            f"The address defaults to ${addr.ENV_ADDRESS}, else {addr.runtime_dir()}/store.sock; "
            f"clients read the authkey from ${addr.ENV_AUTHKEY}, else from the key file beside the socket. "
            + EXIT_CODES_HELP
        ),
    )
    parser.add_argument("--version", action=_Version, help="print the version and exit")

    def usage(args: argparse.Namespace) -> int:
        parser.print_help()
        return 2

    parser.set_defaults(run=usage, command=None)
    # Each command is offered only the flags it uses: a command that connects to the
    # manager takes both (the default); serve and install-hooks only --address; demo none.
    address = _Parser(add_help=False)
    address.add_argument("--address", help="unix socket path or host:port (default: the per-user socket)")

    def timeout(default: float = DEFAULT_TIMEOUT, what: str = "seconds to wait for the manager") -> _Parser:
        # A parser of its own for each command: argparse shares a parent's actions with every
        # child, so set_defaults() on one command changed the default of all (status waited
        # 30 s, the service commands' default, instead of 5).
        flag = _Parser(add_help=False)
        flag.add_argument("--timeout", type=float, default=default, help=f"{what} (default: %(default)s)")
        return flag

    json_flag = _Parser(add_help=False)
    json_flag.add_argument("--json", action="store_true", help="print the session JSON the store itself uses")
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")

    def command(
        name: str,
        run: Callable[[argparse.Namespace], int],
        help: str,
        *parents: _Parser,
        uses: Sequence[_Parser] | None = None,
    ) -> Any:
        uses = (address, timeout()) if uses is None else uses
        cmd = sub.add_parser(name, help=help, description=help, parents=[*uses, *parents])
        cmd.set_defaults(run=run, command=name)
        return cmd

    cmd = command(
        "serve", running.serve, "run a store manager in the foreground until SIGINT or SIGTERM", uses=[address]
    )
    _add_settings(cmd, Limits)
    _add_settings(cmd, ServeOptions)

    cmd = command("status", running.status, "is the manager up, and how is it (exit code 0 up, 3 down)")
    cmd.add_argument(
        "--line",
        action="store_true",
        help="one short line for a status bar or a prompt: sessions by status and the oldest question; "
        "from a manager within 50 ms, or 'shmstore: no answer' (exit 3); --timeout is then the budget",
    )
    cmd.epilog = EXIT_CODES_HELP

    cmd = command("ls", sessions.ls, "list the live sessions (--status closed: the recently closed ones)", json_flag)
    cmd.add_argument("--status", choices=STATUSES, help="only sessions with this status")

    cmd = command("get", sessions.get, "show one session: its agent, pid, resume id and history", json_flag)
    cmd.add_argument("id")

    cmd = command("set", sessions.set, "create or replace a session", json_flag)
    cmd.add_argument("id")
    cmd.add_argument("--dir", required=True, help="the agent's working directory (absolute)")
    cmd.add_argument("--status", choices=STATUSES, default=Status.WORKING.value)
    cmd.add_argument("--agent", choices=[a.value for a in AgentType], default=AgentType.CLAUDE_CODE.value)
    cmd.add_argument("--session-id", help="the agent's own resume id")
    cmd.add_argument("--expect-revision", type=int, help="replace only if the stored revision is this (0: create only)")

    cmd = command("transition", sessions.transition, "move a session to a new status", json_flag)
    cmd.add_argument("id")
    cmd.add_argument("status", choices=STATUSES)

    cmd = command(
        "go",
        sessions.go,
        "switch to the tmux pane a session's agent runs in (inside tmux: this client switches to it, across "
        "tmux sessions; outside: the pane is made current for the next attach, and how to attach is printed); "
        "refused (exit code 5, nothing switched) when the session is closed, not in tmux, or its pane is gone "
        "or no longer runs the agent (the pane's process must be the agent or an ancestor of it, and the "
        "agent's pid must still be the process that reported)",
        uses=[address, timeout(what="seconds to wait for the manager, and for each tmux command")],
    )
    cmd.add_argument("id", help="the session's id, or a prefix of it that only one session has")
    cmd.epilog = EXIT_CODES_HELP

    cmd = command(
        "closed",
        sessions.closed,
        "list recently closed sessions with their resume ids (and how to resume one)",
        json_flag,
    )

    cmd = command("rm", sessions.rm, "remove a session")
    cmd.add_argument("id")

    cmd = command(
        "hook",
        running.hook,
        "report one agent hook payload (JSON on stdin); never fails the agent: gives up --timeout seconds "
        "(default 0.9) after its process started, keeps a report the manager did not take in its spool, and "
        "logs it to ~/.local/state/shmstore/hook.log",
        # For the hook, --timeout is its whole budget, counted from the start of its process.
        uses=[address, timeout(HOOK_DEADLINE, "seconds from the hook's process start to give up by")],
    )
    cmd.add_argument("--pid", type=int, help="the agent's process id (default: found from the parent processes)")
    cmd.add_argument(
        "--agent", choices=agents.names(), default=agents.DEFAULT, help="whose payload it is (default: %(default)s)"
    )

    cmd = command(
        "install-hooks",
        setup.install_hooks,
        "make shmstore's hooks the only ones of ours in an agent's settings (Claude Code's by default): for "
        "Claude, http hooks to the manager where Claude allows them and no status the user acts on depends on "
        "them, `shmstore hook` elsewhere; for the other agents, `shmstore hook --agent NAME`",
        uses=[address],
    )
    setup.add_settings_file(cmd)
    setup.add_agent_choice(cmd)
    cmd.add_argument("--command", dest="hook_command", help="the hook command to install (default: this Python's)")
    cmd.add_argument(
        "--via",
        choices=("auto", "http", "command"),
        default="auto",
        help="how events reach the manager: http (it must serve with --http), command (a process per event), "
        "or auto: http if the manager at --address takes events over HTTP, else command (default: %(default)s)",
    )

    cmd = command(
        "uninstall-hooks",
        setup.uninstall_hooks,
        "remove every shmstore hook from an agent's settings (Claude Code's by default)",
        uses=[],
    )
    setup.add_settings_file(cmd)
    setup.add_agent_choice(cmd)

    cmd = command(
        "install-service",
        setup.install_service,
        "run the manager as a user service (systemd; launchd on macOS) that starts at login and restarts on "
        "failure, and with --notify `shmstore notify` beside it; --address is passed on to both, --timeout "
        "bounds each systemctl/launchctl command",
        uses=[address, timeout(service.COMMAND_TIMEOUT, "seconds each systemctl/launchctl command may take")],
    )
    setup.add_service_flags(cmd)
    cmd.add_argument("--dry-run", action="store_true", help="print the unit file and the commands, change nothing")
    cmd.add_argument(
        "--http",
        default="auto",
        metavar="PORT",
        help="the port on 127.0.0.1 where the manager takes agents' events over HTTP (install-hooks then "
        "writes http hooks): a number, auto (one free now, kept in the unit) or none (default: %(default)s)",
    )
    cmd.add_argument(
        "--notify",
        nargs="?",
        const="",
        metavar="FLAGS",
        help="also run `shmstore notify` as a second user service (shmstore-notify.service; launchd: "
        "local.shmstore.notify), given FLAGS (--notify='--on question --url URL'); without --notify, a "
        "notifier service of an earlier install is stopped and removed",
    )

    cmd = command(
        "uninstall-service",
        setup.uninstall_service,
        "stop the user service and remove its file (only ours)",
        uses=[timeout(service.COMMAND_TIMEOUT, "seconds each systemctl/launchctl command may take")],
    )
    setup.add_service_flags(cmd)

    cmd = command(
        "reaper",
        running.reaper,
        "for a Redis store that several hosts share (a manager reaps its own): every reap_interval of the "
        "store's limits, close this host's sessions whose agent died and renew this host's lease; one reaper "
        "also marks silent sessions stale and looks after the sessions of hosts whose reaper stopped; runs "
        "until interrupted",
    )
    cmd.add_argument("--once", action="store_true", help="one pass, then exit")

    cmd = command("prune", sessions.prune, "forget recently closed sessions that closed at least SECONDS ago")
    cmd.add_argument("--older-than", type=float, required=True, metavar="SECONDS")

    cmd = command(
        "watch",
        sessions.watch,
        "print every change as it happens (a snapshot first), until interrupted; carries on through a manager "
        "restart or hang (reconnecting, then resyncing from a fresh snapshot), with a line on stderr saying so",
    )
    cmd.add_argument("--json", action="store_true", help="one JSON event per line")
    cmd.add_argument(
        "--once", action="store_true", help="do not reconnect: exit with an error when the manager cannot be reached"
    )
    cmd.add_argument(
        "--after-revision", type=int, help="continue after this revision instead of from a snapshot", metavar="REV"
    )
    cmd.add_argument("--limit", type=int, help="stop after this many lines")

    cmd = command(
        "notify",
        notify.run,
        "tell the user when a session enters question or attention (not the ones already waiting): a desktop "
        "notification, a terminal bell, an HTTP POST or a command of theirs; follows the change feed until "
        "interrupted, through manager restarts, as watch does",
    )
    notify.add_flags(cmd)

    command(
        "top",
        sessions.top,
        "a live full-screen table of the sessions, those waiting for you first, kept up to date from the change "
        "feed and through manager restarts; the arrow keys or j/k select a row, Enter or g switches to its "
        "session's tmux pane (as `go` does), q or Ctrl-C quits (without a terminal: prints the table once)",
    )

    cmd = command(
        "demo",
        running.demo,
        "run a manager, agent workers and a live subscriber on a private socket (on Redis, in a namespace of "
        "its own, when $SHMSTORE_ADDRESS is a Redis URL)",
        uses=[],
    )
    cmd.add_argument("--duration", type=float, default=10.0, help="seconds the agents run (default: %(default)s)")
    cmd.add_argument("--workers", type=int, default=4, help="agent worker processes (default: %(default)s)")
    cmd.add_argument("--agents", type=int, default=2, help="sessions each worker plays (default: %(default)s)")
    return parser


def _add_settings(cmd: argparse.ArgumentParser, settings: type[_Settings]) -> None:
    """One flag per field of ``settings``: ``--max-history N`` for ``max_history``."""
    for field in dataclasses.fields(settings):
        flag = "--" + field.name.replace("_", "-")
        help = field.metadata["help"]
        if isinstance(field.default, bool):
            cmd.add_argument(flag, action="store_true", help=help)
        else:
            cmd.add_argument(
                flag,
                type=type(field.default),
                default=field.default,
                metavar=field.metadata["metavar"],
                help=f"{help} (default: %(default)s)" if field.default != "" else help,
            )


if __name__ == "__main__":
    sys.exit(main())
