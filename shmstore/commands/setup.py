"""The commands that set things up: ``install-hooks``, ``uninstall-hooks``,
``install-service`` and ``uninstall-service``."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from .. import agents
from ..agents.settings import HTTP_PATH, Change, hook_command
from ..clients.client import Client
from ..config import ServeOptions
from ..errors import ShmstoreError, StoreUnavailableError, ValidationError
from ..transport import address as addr
from . import service


def add_settings_file(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument(
        "--settings", type=Path, default=None, help="the settings file (default: the agent's own, as README lists them)"
    )
    cmd.add_argument("--dry-run", action="store_true", help="print a diff of the settings file, write nothing")


def add_agent_choice(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument(
        "--agent",
        choices=[*agents.names(), "all"],
        default=agents.DEFAULT,
        help="whose settings: an agent, or all (every agent found on this machine) (default: %(default)s)",
    )


def _chosen(args: argparse.Namespace) -> list[str]:
    """The agents ``--agent`` names: one, or with ``all`` each one this machine has."""
    if args.agent != "all":
        return [args.agent]
    if args.settings is not None:
        raise ValidationError("--settings", "names one agent's file: give --agent NAME with it, not all")
    found = [name for name in agents.names() if agents.get(name).found()]
    if not found:
        raise ValidationError("--agent", "all: no agent was found on this machine (see README: Agents)")
    return found


def install_hooks(args: argparse.Namespace) -> int:
    if args.address and addr.is_redis(args.address):  # (cli refused a password in it)
        from ..redis.address import parse_redis

        parse_redis(args.address)  # a bad URL is refused now, not at the agent's first event
    # The address is always written out: a background session's hooks run in Claude's
    # daemon's environment, not the shell's, so a default read there could differ.
    address = args.address or addr.format_address(addr.default_address())
    for name in _chosen(args):
        agent = agents.get(name)
        command = args.hook_command or hook_command(address, None if name == agents.DEFAULT else name)
        if args.via == "http" and not agent.TAKES_HTTP:
            raise ValidationError("--via", f"http: {agent.TITLE} has command hooks only; install with --via command")
        if args.via == "http" and args.address and addr.is_redis(args.address):
            raise ValidationError("--via", "http: a Redis store takes command hooks only (http hooks go to a manager)")
        url = _event_url(args, agent.NAME) if agent.TAKES_HTTP else None
        path = args.settings or agent.default_settings()
        change = agent.install(path, command, url=url, dry_run=args.dry_run)
        _report_change(change, args.dry_run, f"put `{command}`{f' and {url}' if url else ''} on")
    return 0


def _event_url(args: argparse.Namespace, agent: str) -> str | None:
    """Where http hooks post ``agent``'s events: the HTTP endpoint of the manager at
    ``--address`` (``--via http``: it must have one; ``auto``: if it has), else None."""
    if args.via == "command" or (args.address and addr.is_redis(args.address)):
        return None
    try:
        with Client(args.address, timeout=2.0, shared_memory=False) as store:
            http = store.info().get("http")
    except ShmstoreError as exc:
        http, why = None, f"the manager cannot be asked ({exc})"
    else:
        why = "the manager does not take events over HTTP (`serve --http PORT`)"
    if http:
        return f"http://127.0.0.1:{http['port']}{HTTP_PATH}{agent}"
    if args.via == "http":
        raise StoreUnavailableError(f"no http hooks: {why}; or install with --via command")
    print(f"command hooks only: {why}", file=sys.stderr)
    return None


def uninstall_hooks(args: argparse.Namespace) -> int:
    for name in _chosen(args):
        agent = agents.get(name)
        path = args.settings or agent.default_settings()
        _report_change(agent.uninstall(path, dry_run=args.dry_run), args.dry_run, "removed the shmstore hook from")
    return 0


def _report_change(change: Change, dry_run: bool, done: str) -> int:
    """Say what ``change`` did to each file it names (a second one: Codex's config.toml)."""
    also = change.also
    if dry_run:
        sys.stdout.write(change.diff())
        print(f"dry run, nothing written; it would have {done} {len(change.events)} events", file=sys.stderr)
    elif change.before == change.after and (also is None or also.before == also.after):
        print(f"{change.path} is as it should be; nothing changed")
    else:
        for each in (change, also):
            if each is None or each.before == each.after:
                continue
            print(f"{done} {len(each.events)} events in {each.path}" if each is change else f"rewrote {each.path}")
            if each.backup is not None:
                print(f"the old file is kept as {each.backup}")
    return 0


def install_service(args: argparse.Namespace) -> int:
    notify = None if args.notify is None else _notify_flags(args.notify)
    plan = service.plan(args.init, address=args.address, timeout=args.timeout, http=_service_http(args), notify=notify)
    if args.dry_run:
        for path in (plan.path, *(path for path, _ in plan.extra)):
            service.check_not_foreign(path)
        written = [(plan.path, plan.text), *((path, text) for path, text in plan.extra if text is not None)]
        sys.stdout.write("".join(text for _, text in written))
        commands = "".join(f"\n  {shlex.join(argv)}" for argv in [*plan.before, *plan.commands])
        paths = " and ".join(str(path) for path, _ in written)
        print(f"dry run: would write {paths} and run:{commands}", file=sys.stderr)
        return 0
    try:
        service.check_manager(args.init, address=args.address, timeout=args.timeout)
    except service.NoServiceManagerError as exc:
        print(exc.advice)  # on stdout, to paste into a login script; the reason goes to stderr
        raise
    changed = service.install(plan)
    print(f"{'wrote' if changed else 'kept'} {plan.path}; the {args.init} user service is enabled and started")
    if notify is not None:
        where = next(path for path, text in plan.extra if text is not None and "notify" in path.name)
        print(f"and `shmstore notify` runs beside it ({where})")
    return 0


def uninstall_service(args: argparse.Namespace) -> int:
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


def _notify_flags(text: str) -> list[str]:
    """The flags of ``--notify=FLAGS`` as words, refused now if ``shmstore notify`` would
    refuse them when the service starts."""
    from . import notify

    try:
        words = shlex.split(text)
    except ValueError as exc:
        raise ValidationError("--notify", f"{text!r}: {exc}") from None
    notify.check_flags(words)
    return words


def _service_http(args: argparse.Namespace) -> str | None:
    """The ``--http`` port the service's manager is to take events on: ``none``, none;
    ``auto``, the one the installed unit already names (the http hooks in the agents'
    settings name it), else a port free now, written into the unit so that it stays the
    same across restarts."""
    http: str = args.http
    if http == "none":
        return None
    if http == "auto":
        kept = service.installed_http(args.init)
        if kept is not None:
            return kept
        import socket

        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            return str(probe.getsockname()[1])
    ServeOptions(http=http)  # a bad port is refused now, not when the service starts
    return http


def add_service_flags(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument(
        "--init",
        choices=service.INITS,
        default=service.default_init(),
        help="the service manager (default: %(default)s, this system's)",
    )
