"""The commands that run something: ``serve``, ``status``, ``hook``, ``reaper`` and ``demo``."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import Any

from .. import spool
from ..clients.follow import Backoff
from ..config import Limits, ServeOptions
from ..errors import StoreUnavailableError, ValidationError
from ..hook import failures as failure_log
from ..hook import run
from ..manager import lifecycle, notify
from ..manager.state import StateNotSavedError
from ..store import Store
from ..transport import address as addr
from . import demo as demos
from . import status_line
from .common import EXIT_ERROR, EXIT_OK, EXIT_UNAVAILABLE, client_for, settings_from
from .render import format_spool, format_status, printable


def serve(args: argparse.Namespace) -> int:
    options = settings_from(args, ServeOptions)
    _log_to_stderr(options.log_level)

    def ready(bound: Any) -> None:
        notify.ready(f"serving at {addr.format_address(bound)}")  # serve() logs it too

    try:
        lifecycle.serve(args.address, store=Store(settings_from(args, Limits)), options=options, on_ready=ready)
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


def status(args: argparse.Namespace) -> int:
    if args.line:
        return _status_line(args)
    address = addr.resolve_any(args.address)
    where = addr.format_address(address)  # a Redis URL without its password
    try:
        with client_for(args) as store:
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
    failures = failure_log.recent_failures()
    if failures:
        print(f"recent hook failures (newest last; all in {failure_log.failure_log_path()}):")
        print("\n".join("  " + printable(line) for line in failures))
    return code


def _status_line(args: argparse.Namespace) -> int:
    """``status --line`` as the full parser runs it: a manager by the fast path's function,
    with ``--timeout``; a Redis store through the full client."""
    address = addr.resolve_any(args.address)
    if isinstance(address, str | tuple):
        return status_line.show(address, time.monotonic() + args.timeout)
    try:
        with client_for(args) as store:
            sessions = store.list_all()
    except StoreUnavailableError:
        print(status_line.NO_ANSWER)
        return status_line.EXIT_NO_ANSWER
    print(status_line.summary(((s.status.value, s.since, s.working_dir) for s in sessions), time.time()))
    return EXIT_OK


def hook(args: argparse.Namespace) -> int:
    return run.run_hook(sys.stdin.buffer, args.address, args.timeout, args.pid, agent=args.agent)


def reaper(args: argparse.Namespace) -> int:
    """Reap this host's sessions every reap_interval, riding out a store that is away (a
    Redis restart, a network blip): it says so once, tries again after a capped, jittered
    back-off, and says when the store is back. It exited at the first error, and its host's
    lease then lapsed, so another host's reaper would close this host's live sessions."""
    if isinstance(addr.resolve_any(args.address), str | tuple):
        raise ValidationError("address", "a manager reaps its own sessions; `shmstore reaper` is for a Redis store")
    with client_for(args) as store:
        interval, away = None, 0
        where = addr.format_address(store.address)
        print(f"shmstore: reaper for this host at {where}", file=sys.stderr, flush=True)
        while True:
            try:
                # The store's own interval: each pass renews this host's lease for three of them.
                interval = float(store.info()["reap_interval"]) if interval is None else interval
                changed = store.reap()
            except StoreUnavailableError as exc:
                if args.once:
                    raise
                away += 1
                if away == 1:
                    print(f"shmstore: reaper: the store is away ({exc}); trying again", file=sys.stderr, flush=True)
                time.sleep(REAPER_BACKOFF.delay(away))
                continue
            if away:
                print(f"shmstore: reaper: the store is back after {away} tries", file=sys.stderr, flush=True)
                away = 0
            if changed:
                print(f"reaped: {changed} sessions changed", flush=True)
            if args.once:
                return 0
            time.sleep(interval)


#: The reaper's waits while the store is away: from 0.2 s, doubling, up to 5 s (the default
#: reap_interval: a lease lasts three of them, so one missed pass costs it nothing).
REAPER_BACKOFF = Backoff(first=0.2, cap=5.0)


def demo(args: argparse.Namespace) -> int:
    return demos.run(args.duration, args.workers, args.agents)
