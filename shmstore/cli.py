"""The ``shmstore`` command: thin commands over the rest of the package.

Each command parses its arguments, makes one or two calls, and prints what
:mod:`~shmstore.render` makes of the result. Errors of ours are printed in one place
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
import io
import logging
import os
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn, TypeVar

from . import __doc__ as package_doc
from . import __version__, claude_settings, demo, hooks, notify, service, spool
from . import address as addr
from .client import DEFAULT_TIMEOUT, Client, Follower, Link, Notice
from .config import Limits, ServeOptions
from .errors import NotFoundError, ShmstoreError, StoreUnavailableError, ValidationError
from .model import AgentType, Session, Status
from .render import (
    format_closed,
    format_event,
    format_session,
    format_spool,
    format_status,
    format_table,
    printable,
)
from .server import serve
from .state import StateNotSavedError
from .store import Store

STATUSES = [status.value for status in Status]
#: The exit status when stdout's reader goes away early: 128 + SIGPIPE, what a shell reports
#: for a command that SIGPIPE killed (Python ignores SIGPIPE, so we say it ourselves).
OUTPUT_CLOSED = 141

_Settings = TypeVar("_Settings", Limits, ServeOptions)


#: What ``shmstore`` exits with (argparse itself exits 2 on a usage error).
EXIT_OK = 0
EXIT_ERROR = 1  # any other error of ours
EXIT_BAD_INPUT = 2  # usage, or a ValidationError
EXIT_UNAVAILABLE = 3  # no manager running or reachable: StoreUnavailableError
EXIT_NOT_FOUND = 4  # no such session: NotFoundError
EXIT_CODES_HELP = (
    "Exit codes: 0 ok; 1 any other error; 2 bad input (usage or an invalid value); "
    "3 the manager is not running or cannot be reached; 4 no such session; 130/143 interrupted "
    "(SIGINT/SIGTERM; serve stops so, with 0); 141 the reader of the output went away (as if "
    "killed by SIGPIPE)."
)


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
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

    parser.set_defaults(run=usage)
    # Each command is offered only the flags it uses: a command that connects to the
    # manager takes both (the default); serve and install-hooks only --address; demo none.
    address = _Parser(add_help=False)
    address.add_argument("--address", help="unix socket path or host:port (default: the per-user socket)")
    timeout = _Parser(add_help=False)
    timeout.add_argument(
        "--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds to wait for the manager (default: %(default)s)"
    )
    json_flag = _Parser(add_help=False)
    json_flag.add_argument("--json", action="store_true", help="print the session JSON the store itself uses")
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")

    def command(
        name: str,
        run: Callable[[argparse.Namespace], int],
        help: str,
        *parents: _Parser,
        uses: Sequence[_Parser] = (address, timeout),
    ) -> Any:
        cmd = sub.add_parser(name, help=help, description=help, parents=[*uses, *parents])
        cmd.set_defaults(run=run)
        return cmd

    cmd = command("serve", _serve, "run a store manager in the foreground until SIGINT or SIGTERM", uses=[address])
    _add_settings(cmd, Limits)
    _add_settings(cmd, ServeOptions)

    cmd = command("status", _status, "is the manager up, and how is it (exit code 0 up, 3 down)")
    cmd.epilog = EXIT_CODES_HELP

    cmd = command("ls", _ls, "list the live sessions (--status closed: the recently closed ones)", json_flag)
    cmd.add_argument("--status", choices=STATUSES, help="only sessions with this status")

    cmd = command("get", _get, "show one session: its agent, pid, resume id and history", json_flag)
    cmd.add_argument("id")

    cmd = command("set", _set, "create or replace a session", json_flag)
    cmd.add_argument("id")
    cmd.add_argument("--dir", required=True, help="the agent's working directory (absolute)")
    cmd.add_argument("--status", choices=STATUSES, default=Status.WORKING.value)
    cmd.add_argument("--agent", choices=[a.value for a in AgentType], default=AgentType.CLAUDE_CODE.value)
    cmd.add_argument("--session-id", help="the agent's own resume id")
    cmd.add_argument("--expect-revision", type=int, help="replace only if the stored revision is this (0: create only)")

    cmd = command("transition", _transition, "move a session to a new status", json_flag)
    cmd.add_argument("id")
    cmd.add_argument("status", choices=STATUSES)

    cmd = command(
        "closed", _closed, "list recently closed sessions with their resume ids (and how to resume one)", json_flag
    )

    cmd = command("rm", _rm, "remove a session")
    cmd.add_argument("id")

    cmd = command(
        "hook",
        _hook,
        "report one Claude Code hook payload (JSON on stdin); never fails the agent: gives up --timeout seconds "
        "(default 0.9) after its process started, and logs a failed report to ~/.local/state/shmstore/hook.log",
    )
    cmd.add_argument("--pid", type=int, help="the agent's process id (default: found from the parent processes)")
    # For the hook, --timeout is its whole budget, counted from the start of its process.
    cmd.set_defaults(timeout=hooks.HOOK_DEADLINE)

    cmd = command(
        "install-hooks",
        _install_hooks,
        "make `shmstore hook` the one shmstore hook of each event in a Claude Code settings file",
        uses=[address],
    )
    _add_settings_file(cmd)
    cmd.add_argument("--command", dest="hook_command", help="the hook command to install (default: this Python's)")

    cmd = command(
        "uninstall-hooks", _uninstall_hooks, "remove every shmstore hook from a Claude Code settings file", uses=[]
    )
    _add_settings_file(cmd)

    cmd = command(
        "install-service",
        _install_service,
        "run the manager as a user service (systemd; launchd on macOS) that starts at login and restarts on "
        "failure; --address is passed on to `serve`, --timeout bounds each systemctl/launchctl command",
    )
    _add_service_flags(cmd)
    cmd.add_argument("--dry-run", action="store_true", help="print the unit file and the commands, change nothing")

    cmd = command(
        "uninstall-service", _uninstall_service, "stop the user service and remove its file (only ours)", uses=[timeout]
    )
    _add_service_flags(cmd)

    cmd = command(
        "reaper",
        _reaper,
        "for a Redis store that several hosts share (a manager reaps its own): every reap_interval of the "
        "store's limits, close this host's sessions whose agent died and renew this host's lease; one reaper "
        "also marks silent sessions stale and looks after the sessions of hosts whose reaper stopped; runs "
        "until interrupted",
    )
    cmd.add_argument("--once", action="store_true", help="one pass, then exit")

    cmd = command("prune", _prune, "forget recently closed sessions that closed at least SECONDS ago")
    cmd.add_argument("--older-than", type=float, required=True, metavar="SECONDS")

    cmd = command(
        "watch",
        _watch,
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

    command(
        "top",
        _top,
        "a live full-screen table of the sessions, those waiting for you first, kept up to date from the change "
        "feed and through manager restarts; q or Ctrl-C quits (without a terminal: prints the table once)",
    )

    cmd = command(
        "demo",
        _demo,
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


def _add_service_flags(cmd: argparse.ArgumentParser) -> None:
    # --timeout bounds each systemctl/launchctl call; `enable --now` waits for the manager.
    cmd.set_defaults(timeout=service.COMMAND_TIMEOUT)
    cmd.add_argument(
        "--init",
        choices=service.INITS,
        default=service.default_init(),
        help="the service manager (default: %(default)s, this system's)",
    )


def _settings(args: argparse.Namespace, settings: type[_Settings]) -> _Settings:
    return settings(**{field.name: getattr(args, field.name) for field in dataclasses.fields(settings)})


def _client(args: argparse.Namespace) -> Client:
    # Over the socket: a command reads once (or follows the feed, which is the socket's), and
    # mapping the segment first costs more than that read (measured: a one-shot list_all of 20
    # sessions, 8.6-11.6 ms with the map, 3.7-6.5 ms without), and would have the manager
    # make a segment nobody reads.
    return Client(args.address, timeout=args.timeout, shared_memory=False)


# -- commands ------------------------------------------------------------------------------


def _serve(args: argparse.Namespace) -> int:
    options = _settings(args, ServeOptions)
    _log_to_stderr(options.log_level)

    def ready(bound: Any) -> None:
        notify.ready(f"serving at {addr.format_address(bound)}")  # serve() logs it too

    try:
        serve(args.address, store=Store(_settings(args, Limits)), options=options, on_ready=ready)
    except StateNotSavedError:
        return EXIT_ERROR  # logged, with where the sessions went, before "stopped serving"
    finally:
        notify.stopping()
    return 0


def _log_to_stderr(level: str) -> None:
    """The manager's log records, at ``level`` and up, one line each on stderr (where
    journald collects them under the service, with its own timestamps)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("shmstore: %(levelname)s: %(message)s"))
    logger = logging.getLogger("shmstore")
    logger.addHandler(handler)
    logger.setLevel(level.upper())


def _status(args: argparse.Namespace) -> int:
    address = addr.resolve_any(args.address)
    where = addr.format_address(address)  # a Redis URL without its password
    try:
        with _client(args) as store:
            info = store.info()
        print(format_status(info))
        code = EXIT_OK
    except StoreUnavailableError as exc:
        down = "manager: not running" if isinstance(address, str | tuple) else "store: cannot use Redis"
        print(f"{down} at {where} ({printable(str(exc))})")
        code = EXIT_UNAVAILABLE
    # Reports that wait in the spool, or were dropped from a full one, up or down.
    if isinstance(address, str | tuple):
        waiting = spool.counts(spool.path_for(address))
        if waiting["pending"] or waiting["dropped"]:
            print(format_spool(waiting, spool.path_for(address)))
    # Hooks that could not report say so here, up or down: how a user learns that the
    # store was down while their agents worked.
    failures = hooks.recent_failures()
    if failures:
        print(f"recent hook failures (newest last; all in {hooks.failure_log_path()}):")
        print("\n".join("  " + printable(line) for line in failures))
    return code


def _ls(args: argparse.Namespace) -> int:
    closed = args.status == Status.CLOSED
    with _client(args) as store:
        if closed:
            sessions = store.recently_closed()  # a closed session is never among the live ones
        else:
            sessions = [s for s in store.list_all() if args.status is None or s.status == args.status]
    return _print_sessions(sessions, args.json, closed=closed)


def _closed(args: argparse.Namespace) -> int:
    with _client(args) as store:
        sessions = store.recently_closed()
    return _print_sessions(sessions, args.json, closed=True)


def _print_sessions(sessions: Sequence[Session], as_json: bool, closed: bool = False) -> int:
    if as_json:
        print("[" + ",".join(s.to_json().decode() for s in sessions) + "]")
    else:
        print(format_closed(sessions) if closed else format_table(sessions))
    return 0


def _print_session(session: Session, as_json: bool) -> int:
    print(session.to_json().decode() if as_json else format_session(session))
    return 0


def _get(args: argparse.Namespace) -> int:
    with _client(args) as store:
        session = store.get(args.id)
    if session is None:
        raise NotFoundError(args.id)
    return _print_session(session, args.json)


def _set(args: argparse.Namespace) -> int:
    session = Session(
        id=args.id, working_dir=args.dir, status=args.status, agent_type=args.agent, session_id=args.session_id
    )
    with _client(args) as store:
        return _print_session(store.set(session, expected_revision=args.expect_revision), args.json)


def _transition(args: argparse.Namespace) -> int:
    with _client(args) as store:
        return _print_session(store.transition(args.id, args.status), args.json)


def _rm(args: argparse.Namespace) -> int:
    with _client(args) as store:
        removed = store.remove(args.id)
    if removed is None:
        raise NotFoundError(args.id)
    print(f"removed {printable(removed.id)}")
    return 0


def _hook(args: argparse.Namespace) -> int:
    return hooks.run_hook(sys.stdin.buffer, args.address, args.timeout, args.pid)


def _add_settings_file(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument("--settings", type=Path, default=None, help="the settings file (default: ~/.claude/settings.json)")
    cmd.add_argument("--dry-run", action="store_true", help="print a diff of the settings file, write nothing")


def _install_hooks(args: argparse.Namespace) -> int:
    if args.address and addr.is_redis(args.address):
        from .redis_address import parse_redis, password_in_url

        parse_redis(args.address)  # a bad URL is refused now, not at the agent's first event
        if password_in_url(args.address):
            raise ValidationError(
                "address",
                "holds a password, which would be written into Claude Code's settings: put it in a file "
                "(?password_file=PATH, mode 0600) or in $SHMSTORE_REDIS_PASSWORD instead",
            )
    command = args.hook_command or claude_settings.hook_command(args.address)
    path = args.settings or claude_settings.default_settings()
    change = claude_settings.install(path, command, dry_run=args.dry_run)
    return _report_change(change, args.dry_run, f"put `{command}` on")


def _uninstall_hooks(args: argparse.Namespace) -> int:
    path = args.settings or claude_settings.default_settings()
    change = claude_settings.uninstall(path, dry_run=args.dry_run)
    return _report_change(change, args.dry_run, "removed the shmstore hook from")


def _report_change(change: claude_settings.Change, dry_run: bool, done: str) -> int:
    if dry_run:
        sys.stdout.write(change.diff())
        print(f"dry run, nothing written; it would have {done} {len(change.events)} events", file=sys.stderr)
    elif not change.events:
        print(f"{change.path} is as it should be; nothing changed")
    else:
        print(f"{done} {len(change.events)} events in {change.path}")
        if change.backup is not None:
            print(f"the old file is kept as {change.backup}")
    return 0


def _install_service(args: argparse.Namespace) -> int:
    plan = service.plan(args.init, address=args.address, timeout=args.timeout)
    if args.dry_run:
        service.check_not_foreign(plan.path)
        sys.stdout.write(plan.text)
        commands = "".join(f"\n  {shlex.join(argv)}" for argv in plan.commands)
        print(f"dry run: would write {plan.path} and run:{commands}", file=sys.stderr)
        return 0
    try:
        service.check_manager(args.init, address=args.address, timeout=args.timeout)
    except service.NoServiceManagerError as exc:
        print(exc.advice)  # on stdout, to paste into a login script; the reason goes to stderr
        raise
    changed = service.install(plan)
    print(f"{'wrote' if changed else 'kept'} {plan.path}; the {args.init} user service is enabled and started")
    return 0


def _uninstall_service(args: argparse.Namespace) -> int:
    plan = service.plan(args.init, address=None, timeout=args.timeout)
    try:
        service.check_manager(args.init, timeout=args.timeout)
        manager = True
    except service.NoServiceManagerError:
        manager = False
    if not service.uninstall(plan, manager=manager):
        print(f"there is no service file at {plan.path}; nothing to do")
    elif manager:
        print(f"stopped and disabled the service; removed {plan.path}")
    else:
        print(f"removed {plan.path} (no {args.init} user manager is running, so none was told)")
    return 0


def _reaper(args: argparse.Namespace) -> int:
    if isinstance(addr.resolve_any(args.address), str | tuple):
        raise ValidationError("address", "a manager reaps its own sessions; `shmstore reaper` is for a Redis store")
    with _client(args) as store:
        # The store's own interval: each pass renews this host's lease for three of them.
        interval = float(store.info()["reap_interval"])
        print(f"shmstore: reaper for this host at {addr.format_address(store.address)}", file=sys.stderr, flush=True)
        while True:
            changed = store.reap()
            if changed:
                print(f"reaped: {changed} sessions changed", flush=True)
            if args.once:
                return 0
            time.sleep(interval)


def _prune(args: argparse.Namespace) -> int:
    with _client(args) as store:
        print(f"pruned {store.prune(args.older_than)} closed sessions")
    return 0


def _watch(args: argparse.Namespace) -> int:
    _tolerate_encoding(sys.stdout)
    printed = 0
    with _client(args) as store:
        follow = store.watch(args.after_revision) if args.once else Follower(store, args.after_revision)
        with follow:
            try:
                for item in follow:
                    if isinstance(item, Notice):
                        if item.link is Link.LIVE or item.attempt == 1:  # not every try of a long outage
                            print(f"shmstore: watch: {printable(item.message)}", file=sys.stderr, flush=True)
                        continue
                    print(item.to_json().decode() if args.json else format_event(item), flush=True)
                    printed += 1
                    if args.limit is not None and printed >= args.limit:
                        break
            except KeyboardInterrupt:
                pass
    return 0


def _tolerate_encoding(stream: object) -> None:
    """Event lines hold arrows (and ids any text): on a terminal whose encoding lacks
    a character, print it escaped rather than fail."""
    if isinstance(stream, io.TextIOWrapper):
        stream.reconfigure(errors="backslashreplace")


def _top(args: argparse.Namespace) -> int:
    from . import top  # only here: it imports rich, which no other command needs

    with _client(args) as store:
        return top.run(store)


def _demo(args: argparse.Namespace) -> int:
    return demo.run(args.duration, args.workers, args.agents)


if __name__ == "__main__":
    sys.exit(main())
