"""The commands on sessions: ``ls``, ``get``, ``set``, ``transition``, ``rm``, ``closed``,
``prune``, ``watch``, ``top`` and ``go``."""

from __future__ import annotations

import argparse
import io
import sys
from collections.abc import Sequence

from ..clients.client import Client
from ..clients.follow import Follower, Link, Notice
from ..errors import NotFoundError, ValidationError
from ..model import Session, Status
from .common import client_for
from .render import format_closed, format_event, format_session, format_table, printable


def ls(args: argparse.Namespace) -> int:
    closed = args.status == Status.CLOSED
    with client_for(args) as store:
        if closed:
            sessions = store.recently_closed()  # a closed session is never among the live ones
        else:
            sessions = [s for s in store.list_all() if args.status is None or s.status == args.status]
    return _print_sessions(sessions, args.json, closed=closed)


def closed(args: argparse.Namespace) -> int:
    with client_for(args) as store:
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


def get(args: argparse.Namespace) -> int:
    with client_for(args) as store:
        session = store.get(args.id)
    if session is None:
        raise NotFoundError(args.id)
    return _print_session(session, args.json)


def set(args: argparse.Namespace) -> int:
    session = Session(
        id=args.id, working_dir=args.dir, status=args.status, agent_type=args.agent, session_id=args.session_id
    )
    with client_for(args) as store:
        return _print_session(store.set(session, expected_revision=args.expect_revision), args.json)


def transition(args: argparse.Namespace) -> int:
    with client_for(args) as store:
        return _print_session(store.transition(args.id, args.status), args.json)


def rm(args: argparse.Namespace) -> int:
    with client_for(args) as store:
        removed = store.remove(args.id)
    if removed is None:
        raise NotFoundError(args.id)
    print(f"removed {printable(removed.id)}")
    return 0


def prune(args: argparse.Namespace) -> int:
    with client_for(args) as store:
        print(f"pruned {store.prune(args.older_than)} closed sessions")
    return 0


def watch(args: argparse.Namespace) -> int:
    _tolerate_encoding(sys.stdout)
    printed = 0
    with client_for(args) as store:
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


def top(args: argparse.Namespace) -> int:
    from . import top

    with client_for(args) as store:
        return top.run(store)


def go(args: argparse.Namespace) -> int:
    from .. import tmux  # here: only `go` (and top) runs tmux

    with client_for(args) as store:
        session = find(store, args.id)
    print(printable(tmux.jump(session, timeout=args.timeout).message()))
    return 0


def find(store: Client, id: str) -> Session:
    """The session ``id`` names: the live or recently closed session with that id, else the
    only one whose id starts with it (a live one before a closed one of the same id)."""
    session = store.get(id)
    if session is not None:
        return session
    found: dict[str, Session] = {}
    for candidate in [*store.recently_closed(), *store.list_all()]:  # a live one replaces a closed one
        if candidate.id.startswith(id):
            found[candidate.id] = candidate
    if not found:
        raise NotFoundError(id, f"no session with id {id!r} or an id starting with it")
    if len(found) > 1:
        names = ", ".join(repr(name) for name in sorted(found)[:5])
        raise ValidationError(
            "id",
            f"{id!r} starts {len(found)} session ids ({names}{', ...' if len(found) > 5 else ''}): give more of it",
        )
    return next(iter(found.values()))
