"""The ``shmstore`` command: thin commands over the rest of the package.

Each command parses its arguments, makes one or two calls, and prints what
:mod:`~shmstore.render` makes of the result. Errors of ours are printed in one place
(:func:`main`), which exits with a code that says what kind of error it was (see
:data:`EXIT_CODES_HELP`); the flags of ``serve`` are generated from :class:`~shmstore.config.Limits`
and :class:`~shmstore.config.ServeOptions`, so they cannot drift from the settings.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn, TypeVar

from . import __doc__ as package_doc
from . import __version__, demo, hooks
from . import address as addr
from .client import DEFAULT_TIMEOUT, Client
from .config import Limits, ServeOptions
from .errors import NotFoundError, ShmstoreError, StoreUnavailableError, ValidationError
from .model import AgentType, Session, Status
from .render import age, format_event, format_session, format_table, printable
from .server import serve
from .store import Store

STATUSES = [status.value for status in Status]

_Settings = TypeVar("_Settings", Limits, ServeOptions)


#: What ``shmstore`` exits with (argparse itself exits 2 on a usage error).
EXIT_OK = 0
EXIT_ERROR = 1  # any other error of ours
EXIT_BAD_INPUT = 2  # usage, or a ValidationError
EXIT_UNAVAILABLE = 3  # no manager running or reachable: StoreUnavailableError
EXIT_NOT_FOUND = 4  # no such session: NotFoundError
EXIT_CODES_HELP = (
    "Exit codes: 0 ok; 1 any other error; 2 bad input (usage or an invalid value); "
    "3 the manager is not running or cannot be reached; 4 no such session."
)


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        result: int = args.run(args)
        return result
    except ShmstoreError as exc:
        print(f"shmstore: error: {printable(str(exc))}", file=sys.stderr)
        return exit_code(exc)
    except KeyboardInterrupt:
        return 130


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
    common = _Parser(add_help=False)
    common.add_argument("--address", help="unix socket path or host:port (default: the per-user socket)")
    common.add_argument(
        "--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds to wait for the manager (default: %(default)s)"
    )
    json_flag = _Parser(add_help=False)
    json_flag.add_argument("--json", action="store_true", help="print the session JSON the store itself uses")
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")

    def command(name: str, run: Callable[[argparse.Namespace], int], help: str, *parents: Any) -> Any:
        cmd = sub.add_parser(name, help=help, description=help, parents=[common, *parents])
        cmd.set_defaults(run=run)
        return cmd

    cmd = command("serve", _serve, "run a store manager in the foreground until SIGINT or SIGTERM")
    _add_settings(cmd, Limits)
    _add_settings(cmd, ServeOptions)

    cmd = command("status", _status, "is the manager up, and how is it (exit code 0 up, 3 down)")
    cmd.epilog = EXIT_CODES_HELP

    cmd = command("ls", _ls, "list the live sessions (--status closed: the recently closed ones)", json_flag)
    cmd.add_argument("--status", choices=STATUSES, help="only sessions with this status")

    cmd = command("get", _get, "show one session", json_flag)
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

    cmd = command("closed", _closed, "list recently closed sessions (with their resume ids)", json_flag)

    cmd = command("rm", _rm, "remove a session")
    cmd.add_argument("id")

    cmd = command("hook", _hook, "report one Claude Code hook payload (JSON on stdin); never fails the agent")
    cmd.add_argument("--pid", type=int, help="the agent's process id (default: found from the parent processes)")

    cmd = command("install-hooks", _install_hooks, "add `shmstore hook` to a Claude Code settings file")
    cmd.add_argument("--settings", type=Path, default=None, help="the settings file (default: ~/.claude/settings.json)")
    cmd.add_argument("--command", dest="hook_command", help="the hook command to install (default: this Python's)")
    cmd.add_argument("--dry-run", action="store_true", help="print the merged settings, write nothing")

    cmd = command("prune", _prune, "forget recently closed sessions that closed at least SECONDS ago")
    cmd.add_argument("--older-than", type=float, required=True, metavar="SECONDS")

    cmd = command("watch", _watch, "print every change as it happens (a snapshot first), until interrupted")
    cmd.add_argument("--json", action="store_true", help="one JSON event per line")
    cmd.add_argument(
        "--after-revision", type=int, help="continue after this revision instead of from a snapshot", metavar="REV"
    )
    cmd.add_argument("--limit", type=int, help="stop after this many lines")

    cmd = command("demo", _demo, "run a manager, agent workers and a live subscriber on a private socket")
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


def _settings(args: argparse.Namespace, settings: type[_Settings]) -> _Settings:
    return settings(**{field.name: getattr(args, field.name) for field in dataclasses.fields(settings)})


def _client(args: argparse.Namespace) -> Client:
    return Client(args.address, timeout=args.timeout)


# -- commands ------------------------------------------------------------------------------


def _serve(args: argparse.Namespace) -> int:
    options = _settings(args, ServeOptions)
    _log_to_stderr(options.log_level)
    serve(args.address, store=Store(_settings(args, Limits)), options=options)
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
    where = addr.format_address(addr.resolve(args.address))
    try:
        with _client(args) as store:
            info = store.info()
    except StoreUnavailableError as exc:
        print(f"manager: not running at {where} ({printable(str(exc))})")
        return EXIT_UNAVAILABLE
    print(format_status(info))
    # TODO(lead): "recent hook failures" go here (hooks.recent_failures()).
    return EXIT_OK


def format_status(info: dict[str, Any], at: float | None = None) -> str:
    """The manager's ``info()`` as aligned lines for people."""
    at = time.time() if at is None else at
    uss = info.get("uss")
    rows = [
        ("manager", f"up at {info.get('address', '?')}"),
        ("pid", str(info["pid"])),
        ("uptime", age(at - info["started"]) if "started" in info else "?"),
        ("epoch", info["epoch"]),
        ("revision", str(info["revision"])),
        ("sessions", f"{info['live']} live, {info['closed']} recently closed"),
        ("clients", f"{info.get('clients', '?')} connected (this one included)"),
        ("memory", "?" if uss is None else f"{uss / 2**20:.1f} MiB USS"),
        ("state file", _format_state(info.get("state"), at)),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name + ':':<{width + 1}} {printable(str(value))}" for name, value in rows)


def _format_state(saved: dict[str, Any] | None, at: float) -> str:
    if saved is None:
        return "none (sessions are not kept across a restart; serve --state FILE keeps them)"
    if saved["error"]:
        last = f"last save failed: {saved['error']}"
    elif saved["saved"] is None:
        last = "not saved since the start (nothing changed)"
    else:
        last = f"saved {age(at - saved['saved'])} ago ({saved['sessions']} sessions, {saved['ms']} ms)"
    return f"{saved['path']}, {last}"


def _ls(args: argparse.Namespace) -> int:
    with _client(args) as store:
        if args.status == Status.CLOSED:
            sessions = store.recently_closed()  # a closed session is never among the live ones
        else:
            sessions = [s for s in store.list_all() if args.status is None or s.status == args.status]
    return _print_sessions(sessions, args.json)


def _closed(args: argparse.Namespace) -> int:
    with _client(args) as store:
        return _print_sessions(store.recently_closed(), args.json)


def _print_sessions(sessions: Sequence[Session], as_json: bool) -> int:
    if as_json:
        print("[" + ",".join(s.to_json().decode() for s in sessions) + "]")
    else:
        print(format_table(sessions))
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


def _install_hooks(args: argparse.Namespace) -> int:
    path = args.settings or hooks.default_settings()
    command = args.hook_command or hooks.hook_command(args.address)
    added, text, backup = hooks.install(path, command, dry_run=args.dry_run)
    if args.dry_run:
        sys.stdout.write(text)
        print(f"dry run: would add the hook to {len(added)} events in {path}", file=sys.stderr)
    elif not added:
        print(f"{path} already runs `{command}` on every event; nothing changed")
    else:
        print(f"added `{command}` to {len(added)} events in {path}")
        if backup is not None:
            print(f"the old file is kept as {backup}")
    return 0


def _prune(args: argparse.Namespace) -> int:
    with _client(args) as store:
        print(f"pruned {store.prune(args.older_than)} closed sessions")
    return 0


def _watch(args: argparse.Namespace) -> int:
    printed = 0
    with _client(args) as store, store.watch(args.after_revision) as watch:
        try:
            for event in watch:
                print(event.to_json().decode() if args.json else format_event(event), flush=True)
                printed += 1
                if args.limit is not None and printed >= args.limit:
                    break
        except KeyboardInterrupt:
            pass
    return 0


def _demo(args: argparse.Namespace) -> int:
    return demo.run(args.duration, args.workers, args.agents)


if __name__ == "__main__":
    sys.exit(main())
