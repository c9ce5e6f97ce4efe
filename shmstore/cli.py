"""The ``shmstore`` command: serve a store, inspect and change it, or watch a live demo."""

from __future__ import annotations

import argparse
import os
import random
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from itertools import pairwise
from pathlib import Path
from typing import Any, NoReturn

import multiprocess

from . import __doc__ as package_doc
from . import address as addr
from .client import DEFAULT_TIMEOUT, Client
from .errors import ShmstoreError, StoreUnavailableError
from .hooks import agent_pid, default_settings, hook_command, install, read_payload, status_for
from .model import AgentType, Event, EventKind, Session, Status
from .server import (
    DEFAULT_LOG_SIZE,
    DEFAULT_MAX_CLOSED,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_HISTORY,
    DEFAULT_MAX_SESSIONS,
    DEFAULT_STALE_AFTER,
    Store,
    serve,
    start_server,
)

STATUSES = [status.value for status in Status]


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        result: int = args.run(args)
        return result
    except ShmstoreError as exc:
        print(f"shmstore: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # Arguments are echoed in the message: never let one put control characters (or a
        # terminal escape sequence) on the user's screen.
        super().error("".join(c if c.isprintable() else repr(c)[1:-1] for c in message))


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="shmstore",
        description=(package_doc or "").splitlines()[0],
        epilog=(
            f"The address defaults to ${addr.ENV_ADDRESS}, else {addr.runtime_dir()}/store.sock; "
            f"clients read the authkey from ${addr.ENV_AUTHKEY}, else from the key file beside the socket."
        ),
    )

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
    cmd.add_argument(
        "--max-history", type=int, default=DEFAULT_MAX_HISTORY, help="history entries kept per session (%(default)s)"
    )
    cmd.add_argument(
        "--log-size", type=int, default=DEFAULT_LOG_SIZE, help="events the change feed keeps (%(default)s)"
    )
    cmd.add_argument(
        "--max-sessions", type=int, default=DEFAULT_MAX_SESSIONS, help="sessions the store holds (%(default)s)"
    )
    cmd.add_argument(
        "--max-connections", type=int, default=DEFAULT_MAX_CONNECTIONS, help="clients at once (%(default)s)"
    )
    cmd.add_argument(
        "--max-closed", type=int, default=DEFAULT_MAX_CLOSED, help="recently closed sessions kept (%(default)s)"
    )
    cmd.add_argument(
        "--stale-after",
        type=float,
        default=DEFAULT_STALE_AFTER,
        metavar="SECONDS",
        help="mark a working session stale after this long without activity (%(default)s)",
    )
    cmd.add_argument(
        "--allow-remote",
        action="store_true",
        help="allow a TCP address beyond loopback (authkey holders can run code in the manager)",
    )

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
    cmd.add_argument("--since", type=int, help="continue from this revision instead of a snapshot")
    cmd.add_argument("--limit", type=int, help="stop after this many lines")

    cmd = command("demo", _demo, "run a manager, agent workers and a live subscriber on a private socket")
    cmd.add_argument("--duration", type=float, default=10.0, help="seconds the agents run (default: %(default)s)")
    cmd.add_argument("--workers", type=int, default=4, help="agent worker processes (default: %(default)s)")
    cmd.add_argument("--agents", type=int, default=2, help="sessions each worker plays (default: %(default)s)")
    return parser


def _client(args: argparse.Namespace) -> Client:
    return Client(args.address, timeout=args.timeout)


# -- commands ------------------------------------------------------------------------------


def _serve(args: argparse.Namespace) -> int:
    def ready(bound: Any) -> None:
        print(f"shmstore: serving at {addr.format_address(bound)} (pid {os.getpid()})", file=sys.stderr, flush=True)

    store = Store(
        max_sessions=args.max_sessions,
        max_history=args.max_history,
        log_size=args.log_size,
        max_closed=args.max_closed,
        stale_after=args.stale_after,
    )
    serve(
        args.address,
        store=store,
        allow_remote=args.allow_remote,
        max_connections=args.max_connections,
        on_ready=ready,
    )
    print("shmstore: stopped", file=sys.stderr)
    return 0


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


def _get(args: argparse.Namespace) -> int:
    with _client(args) as store:
        session = store.get(args.id)
    if session is None:
        print(f"shmstore: error: no session with id {args.id!r}", file=sys.stderr)
        return 1
    _print_session(session, args.json)
    return 0


def _set(args: argparse.Namespace) -> int:
    session = Session(
        id=args.id, working_dir=args.dir, status=args.status, agent_type=args.agent, session_id=args.session_id
    )
    with _client(args) as store:
        _print_session(store.set(session, expected_revision=args.expect_revision), args.json)
    return 0


def _transition(args: argparse.Namespace) -> int:
    with _client(args) as store:
        _print_session(store.transition(args.id, args.status), args.json)
    return 0


def _rm(args: argparse.Namespace) -> int:
    with _client(args) as store:
        removed = store.remove(args.id)
    if removed is None:
        print(f"shmstore: error: no session with id {args.id!r}", file=sys.stderr)
        return 1
    print(f"removed {removed.id}")
    return 0


#: The longest `shmstore hook` may take: an agent waits for its hooks.
HOOK_DEADLINE = 0.9


class _DeadlineError(Exception):
    pass


def _hook(args: argparse.Namespace) -> int:
    """Report one hook payload. Whatever goes wrong, exit 0 within HOOK_DEADLINE seconds and
    say why on stderr: a status display must never block or fail the agent."""

    def expire(signum: int, frame: Any) -> None:
        raise _DeadlineError(f"gave up after {HOOK_DEADLINE} s")

    signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, HOOK_DEADLINE)
    try:
        payload = read_payload(sys.stdin.buffer)
        status = status_for(payload)
        if status is None:
            print(f"shmstore hook: ignored event {payload['hook_event_name']!r}", file=sys.stderr)
            return 0
        id = payload["session_id"]
        with Client(args.address, timeout=min(args.timeout, HOOK_DEADLINE / 2)) as store:
            store.report(id, status, payload["cwd"], pid=args.pid or agent_pid(), session_id=id)
    except (Exception, _DeadlineError) as exc:
        print(f"shmstore hook: not reported ({exc}); the agent carries on", file=sys.stderr)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    return 0


def _install_hooks(args: argparse.Namespace) -> int:
    path = args.settings or default_settings()
    command = args.hook_command or hook_command(args.address)
    added, text, backup = install(path, command, dry_run=args.dry_run)
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
    with _client(args) as store, store.watch(args.since) as watch:
        try:
            for event in watch:
                print(event.to_json().decode() if args.json else format_event(event), flush=True)
                printed += 1
                if args.limit is not None and printed >= args.limit:
                    break
        except KeyboardInterrupt:
            pass
    return 0


def format_event(event: Event) -> str:
    """One human line for an event of the change feed."""
    head = f"rev {event.revision:<6} {event.kind:<10}"
    if event.kind is EventKind.SNAPSHOT:
        return f"{head} {len(event.sessions or ())} sessions"
    session = event.session
    if session is None:
        return f"{head} {event.id}"
    detail = session.status.value
    if event.kind is EventKind.TRANSITION and session.history:
        detail = f"{session.history[-1].from_} -> {session.status}"
    elif event.kind is EventKind.ADD_USAGE and session.api_usage is not None:
        detail = f"tokens {session.api_usage.input_tokens}/{session.api_usage.output_tokens}"
    return f"{head} {event.id}  {detail}"


def _print_session(session: Session, as_json: bool) -> None:
    if as_json:
        print(session.to_json().decode())
        return
    print(format_table([session]))
    for entry in session.history:
        print(f"  {_clock(entry.timestamp)}  {entry.from_:>9} -> {entry.to:<9} after {entry.duration:.1f}s")


# -- rendering -----------------------------------------------------------------------------


def format_table(sessions: Sequence[Session], at: float | None = None) -> str:
    """Sessions as an aligned text table, newest change first."""
    at = time.time() if at is None else at
    rows = [("ID", "STATUS", "FOR", "LAST SEEN", "TOKENS IN/OUT", "CHANGES", "REV", "WORKING DIR")]
    for s in sorted(sessions, key=lambda s: s.since, reverse=True):
        usage = s.api_usage
        tokens = "-" if usage is None else f"{usage.input_tokens}/{usage.output_tokens}"
        status = f"{s.status} (stale)" if s.stale else s.status.value
        seen = _age(at - (s.last_activity or s.since)) + " ago"
        rows.append(
            (s.id, status, _age(at - s.since), seen, tokens, str(len(s.history)), str(s.revision), s.working_dir)
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=False)) + "  " + row[-1] for row in rows
    )


def _age(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.0f}s"
    if seconds < 3600:
        return f"{seconds // 60:.0f}m{seconds % 60:02.0f}s"
    return f"{seconds // 3600:.0f}h{seconds % 3600 // 60:02.0f}m"


def _clock(timestamp: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(timestamp)) + f".{int(timestamp * 1000) % 1000:03d}"


# -- demo ----------------------------------------------------------------------------------

#: How a demo agent picks its next status: mostly working, sometimes waiting on the user.
_DEMO_WEIGHTS = {Status.WORKING: 6, Status.ATTENTION: 2, Status.QUESTION: 1}


def _demo(args: argparse.Namespace) -> int:
    if args.workers < 1 or args.agents < 1 or args.duration < 0:
        raise SystemExit("shmstore demo: --workers and --agents must be >= 1, --duration >= 0")
    ctx = multiprocess.get_context("fork")
    socket_path = os.path.join(tempfile.mkdtemp(prefix="shmstore-demo-"), "store.sock")
    with start_server(socket_path, store=Store(max_history=10_000)) as server:
        print(f"demo: manager pid {server.pid} at {socket_path}; {args.workers} workers x {args.agents} agents")
        deadline = time.time() + args.duration
        results = ctx.Queue()
        workers = [
            ctx.Process(target=_demo_worker, args=(server.address, server.authkey, n, args.agents, deadline, results))
            for n in range(args.workers)
        ]
        subscriber = ctx.Process(target=_demo_subscriber, args=(server.address, server.authkey, deadline + 0.5))
        for process in [*workers, subscriber]:
            process.start()
        reports = [results.get(timeout=args.duration + 30) for _ in workers]
        for process in [*workers, subscriber]:
            process.join(30)
        with Client(server.address, server.authkey) as store:
            sessions = store.list_all() + store.recently_closed()
            revision = store.revision()
    return _demo_summary(reports, sessions, revision)


def _demo_worker(address: Any, authkey: bytes, worker: int, agents: int, deadline: float, results: Any) -> None:
    """One worker process playing ``agents`` coding agents until ``deadline``."""
    rng = random.Random(worker)
    counts = {"worker": worker, "transitions": 0, "input_tokens": 0, "output_tokens": 0, "errors": 0}
    with Client(address, authkey) as store:
        ids = [f"agent-{worker}-{k}" for k in range(agents)]
        for k, id in enumerate(ids):
            store.set(Session(id=id, working_dir=f"/home/demo/project-{worker}-{k}", session_id=f"resume-{worker}-{k}"))
        statuses, weights = list(_DEMO_WEIGHTS), list(_DEMO_WEIGHTS.values())
        while time.time() < deadline:
            id = rng.choice(ids)
            try:
                session = store.transition(id, rng.choices(statuses, weights)[0])
                counts["transitions"] += 1
                if session.status is Status.WORKING:
                    tokens_in, tokens_out = rng.randint(100, 5000), rng.randint(10, 800)
                    store.add_usage(id, tokens_in, tokens_out)
                    counts["input_tokens"] += tokens_in
                    counts["output_tokens"] += tokens_out
            except StoreUnavailableError:
                counts["errors"] += 1
            time.sleep(rng.uniform(0.02, 0.25))
        for id in ids:
            store.transition(id, Status.CLOSED)
            counts["transitions"] += 1
    results.put(counts)


def _demo_subscriber(address: Any, authkey: bytes, deadline: float) -> None:
    """The subscriber: follows the change feed and redraws the live table at most ten
    times a second (or prints a line a second when not on a terminal)."""
    live = sys.stdout.isatty()
    last_draw = 0.0
    with Client(address, authkey) as store, store.watch() as watch:
        while time.time() < deadline:
            watch.poll(0.1)
            if time.time() - last_draw < (0.1 if live else 1.0):
                continue
            last_draw = time.time()
            sessions = list(watch.sessions.values())
            if live:
                sys.stdout.write("\x1b[H\x1b[2J" + format_table(sessions) + f"\nrevision {watch.revision}\n")
                sys.stdout.flush()
            else:
                live = [status for status in Status if status is not Status.CLOSED]
                line = "  ".join(f"{status.value} {sum(s.status is status for s in sessions)}" for status in live)
                print(f"subscriber: rev {watch.revision:>5}  live {len(sessions)}: {line}", flush=True)


def _demo_summary(reports: list[dict[str, int]], sessions: list[Session], revision: int) -> int:
    print()
    print(format_table(sessions))
    sent = sum(r["transitions"] for r in reports)
    stored = sum(len(s.history) for s in sessions)
    tokens_sent = sum(r["input_tokens"] + r["output_tokens"] for r in reports)
    tokens_stored = sum(s.api_usage.input_tokens + s.api_usage.output_tokens for s in sessions if s.api_usage)
    chains_ok = all(all(a.to == b.from_ for a, b in pairwise(s.history)) for s in sessions)
    ok = sent == stored and tokens_sent == tokens_stored and chains_ok
    print(
        f"\ndemo: {len(sessions)} sessions, store revision {revision}; transitions sent {sent}, stored {stored}; "
        f"tokens sent {tokens_sent}, stored {tokens_stored}; histories {'consistent' if chains_ok else 'BROKEN'}"
    )
    print("demo: nothing lost" if ok else "demo: MISMATCH between what workers sent and what the store holds")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
