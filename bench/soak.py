#!/usr/bin/env python3
"""Soak: worker processes and a watching subscriber run a mixed load, then the invariants
are checked.

    python bench/soak.py [--seconds 60] [--workers 8] [--out bench/soak.json] [--address URL]

Workers transition, add usage to, and read 32 shared sessions. Afterwards: every write got
a revision of its own and the revisions have no hole (no write was lost to a race), every
session's tokens equal what the workers added, every history chain is consistent, the feed
the subscriber followed had no gap (and, if it never had to resync, showed every transition
once), and the state the subscriber rebuilt equals the final snapshot. It reports ops/s and
the manager's USS, sampled every second. Exits 1 if an invariant fails. With ``--address``
(a Redis URL) it runs against that store instead of a manager of its own (no USS then).
"""

from __future__ import annotations

import argparse
import contextlib
import random
import sys
import tempfile
import time
from collections import Counter
from itertools import pairwise
from pathlib import Path
from typing import Any

import multiprocess
import orjson
import psutil

import shmstore
from shmstore import EventKind, Session, Status

IDS = [f"soak-{n:02d}" for n in range(32)]
STATUSES = [Status.WORKING, Status.ATTENTION, Status.QUESTION]


def _worker(address: Any, authkey: bytes, seconds: float, seed: int, start: Any, out: Any) -> None:
    rng = random.Random(seed)
    transitions: Counter[str] = Counter()
    tokens: Counter[str] = Counter()
    revisions: list[int] = []
    ops = 0
    with shmstore.connect(address, authkey) as store:
        start.wait(30)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            roll, id = rng.random(), rng.choice(IDS)
            if roll < 0.4:
                revisions.append(store.transition(id, rng.choice(STATUSES)).revision)
                transitions[id] += 1
            elif roll < 0.7:
                revisions.append(store.add_usage(id, 7, 3).revision)
                tokens[id] += 1
            elif roll < 0.95:
                store.get(id)
            else:
                store.list_all()
            ops += 1
    out.put((ops, dict(transitions), dict(tokens), revisions))


def _subscriber(address: Any, authkey: bytes, ready: Any, stop_at: Any, out: Any) -> None:
    """Follow the feed; count the transitions it shows and any revision it skipped
    (a resync from a snapshot is not a gap: the snapshot carries what was skipped)."""
    transitions: Counter[str] = Counter()
    gaps = 0
    with shmstore.connect(address, authkey) as store, store.watch(poll=0.2) as watch:
        last = next(watch).revision
        ready.set()
        while not (stop_at.value and last >= stop_at.value):
            event = watch.poll(0.2)
            if event is None:
                continue
            if event.kind is not EventKind.SNAPSHOT and event.revision != last + 1:
                gaps += 1
            last = event.revision
            if event.kind is EventKind.TRANSITION and event.id is not None:
                transitions[event.id] += 1
        state = {id: s.to_json() for id, s in watch.sessions.items()}
        out.put((dict(transitions), gaps, watch.snapshots, state))


def run(
    seconds: float = 60.0, workers: int = 8, sock_dir: Path | None = None, address: str | None = None
) -> dict[str, Any]:
    """Run the soak; returns the report (its ``ok`` says whether every invariant held)."""
    ctx = multiprocess.get_context("fork")
    folder = sock_dir or Path(tempfile.mkdtemp(prefix="shmsoak-", dir="/tmp"))
    with contextlib.ExitStack() as stack:
        where: Any = address
        authkey, manager = None, None
        if where is None:
            server = stack.enter_context(shmstore.start_server(folder / "soak.sock"))
            where, authkey, manager = server.address, server.authkey, psutil.Process(server.pid)
        store = stack.enter_context(shmstore.connect(where, authkey))
        for id in IDS:
            store.set(Session(id=id, working_dir=f"/soak/{id}"))
        ready, start, stop_at, results, feed = ctx.Event(), ctx.Event(), ctx.Value("q", 0), ctx.Queue(), ctx.Queue()
        subscriber = ctx.Process(target=_subscriber, args=(where, authkey, ready, stop_at, feed))
        subscriber.start()
        ready.wait(30)
        procs = [ctx.Process(target=_worker, args=(where, authkey, seconds, n, start, results)) for n in range(workers)]
        for p in procs:
            p.start()
        time.sleep(0.5)
        initial_revision = store.revision()
        uss = [] if manager is None else [manager.memory_full_info().uss / 2**20]
        began = time.monotonic()
        start.set()
        while time.monotonic() - began < seconds:
            time.sleep(min(1.0, max(0.0, seconds - (time.monotonic() - began))))
            if manager is not None:
                uss.append(manager.memory_full_info().uss / 2**20)
        reports = [results.get(timeout=60) for _ in procs]
        elapsed = time.monotonic() - began
        for p in procs:
            p.join(30)
        final = store.snapshot()
        stop_at.value = final.revision
        seen_transitions, gaps, snapshots, state = feed.get(timeout=60)
        subscriber.join(30)

    made: Counter[str] = Counter()
    added: Counter[str] = Counter()
    write_revisions: list[int] = []
    for _, transitions, tokens, revisions in reports:
        made.update(transitions)
        added.update(tokens)
        write_revisions.extend(revisions)
    sessions = {s.id: s for s in final.sessions}
    tokens_ok = all(
        (s.api_usage.input_tokens if s.api_usage else 0, s.api_usage.output_tokens if s.api_usage else 0)
        == (7 * added[id], 3 * added[id])
        for id, s in sessions.items()
    )
    chains_ok = all(
        all(a.to == b.from_ for a, b in pairwise(s.history)) and (not s.history or s.history[-1].to == s.status)
        for s in sessions.values()
    )
    checks = {
        # Every write got a revision of its own and every revision is a write: none was
        # applied to a stale copy and overwritten.
        "no_write_lost": sorted(write_revisions) == list(range(initial_revision + 1, final.revision + 1)),
        # The feed shows each transition once, unless the subscriber fell behind the log and
        # resynced, when the snapshot stands in for what it skipped.
        "feed_shows_every_transition": snapshots > 1 or dict(seen_transitions) == dict(made),
        "no_token_lost": tokens_ok,
        "histories_consistent": chains_ok,
        "feed_has_no_gap": gaps == 0,
        "subscriber_equals_final_state": state == {s.id: s.to_json() for s in final.sessions},
    }
    ops = sum(r[0] for r in reports)
    return {
        "seconds": round(elapsed, 2),
        "workers": workers,
        "ops": ops,
        "ops_per_s": round(ops / elapsed),
        "transitions": sum(made.values()),
        "usage_additions": sum(added.values()),
        "final_revision": final.revision,
        "subscriber_snapshots": snapshots,
        "manager_uss_start_mib": round(uss[0], 2) if uss else None,
        "manager_uss_after_first_second_mib": round(uss[min(1, len(uss) - 1)], 2) if uss else None,
        "manager_uss_end_mib": round(uss[-1], 2) if uss else None,
        "manager_uss_max_mib": round(max(uss), 2) if uss else None,
        "checks": checks,
        "ok": all(checks.values()),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="how long the load runs (%(default)s)")
    parser.add_argument("--workers", type=int, default=8, help="worker processes (%(default)s)")
    parser.add_argument("--out", default=str(Path(__file__).with_name("soak.json")), help="where to write JSON")
    parser.add_argument("--address", help="a Redis URL to soak instead of a manager of its own")
    args = parser.parse_args()
    report = run(args.seconds, args.workers, address=args.address)
    for key, value in report.items():
        if key != "checks":
            print(f"{key:<24}{value}")
    for name, held in report["checks"].items():
        print(f"{'check ' + name:<40}{'ok' if held else 'FAILED'}")
    Path(args.out).write_text(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode() + "\n")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
