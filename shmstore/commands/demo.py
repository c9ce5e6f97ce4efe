"""``shmstore demo``: a manager, worker processes playing coding agents, and a subscriber
following the change feed, on a private socket; at the end it checks that the store holds
exactly what the workers sent.

The socket is in a temporary directory, removed however the demo ends. The subscriber
redraws a live table only on a terminal that takes escape codes
(:func:`~shmstore.commands.render.escapes_allowed`); piped, it prints plain lines."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from itertools import pairwise
from typing import Any

import multiprocess

from ..clients.client import Client
from ..config import DEFAULT_MAX_STORE_BYTES, MIN_RECORD_BYTES
from ..errors import StoreUnavailableError, ValidationError
from ..manager.launch import start_server
from ..model import AgentType, Session, Status
from ..redis.address import RedisAddress
from ..store import Store
from ..transport import address as addr
from .render import escapes_allowed, format_table

#: Cursor to the top left, then erase the screen: the subscriber's redraw on a terminal.
_CLEAR_SCREEN = "\x1b[H\x1b[2J"

#: How a demo agent picks its next status: mostly working, sometimes waiting on the user.
_WEIGHTS = {Status.WORKING: 6, Status.ATTENTION: 2, Status.QUESTION: 1}


def _store_for(sessions: int) -> Store:
    """A store that keeps every transition and every closed session, so that the summary
    can check them all: the live-set budget is shared out among the sessions (an agent
    makes ~4 transitions a second, ~70 bytes each)."""
    budget = DEFAULT_MAX_STORE_BYTES // sessions
    if budget < MIN_RECORD_BYTES:
        raise ValidationError("workers", f"{sessions} agents in all is more than a demo store keeps")
    return Store(max_history=100_000, max_record_bytes=min(budget, 2**20), max_closed=sessions)


def run(duration: float = 10.0, workers: int = 4, agents: int = 2) -> int:
    """Run the demo; 0 when the store holds exactly what the workers sent. Its socket lives
    in a temporary directory that is removed however the demo ends (SIGTERM included:
    it ends the demo as Ctrl-C does, with the processes it started).

    With a Redis URL in ``$SHMSTORE_ADDRESS`` it runs on that Redis instead of a manager,
    in a namespace of its own (the URL's namespace, then ``-demo-`` and a random suffix),
    whose keys it deletes at the end."""
    if workers < 1 or agents < 1:
        raise ValidationError("workers", "--workers and --agents must be at least 1")
    if not 0 <= duration <= 3600:
        raise ValidationError("duration", "must be between 0 and 3600 seconds")
    found = addr.resolve_any(None)
    with _sigterm_exits():
        if isinstance(found, str | tuple):
            with tempfile.TemporaryDirectory(prefix="shmstore-demo-") as directory:
                reports, sessions, revision = _play(os.path.join(directory, "store.sock"), duration, workers, agents)
        else:
            reports, sessions, revision = _play_on_redis(found, duration, workers, agents)
    return _summary(reports, sessions, revision)


def _play_on_redis(
    address: RedisAddress, duration: float, workers: int, agents: int
) -> tuple[list[dict[str, int]], list[Session], int]:
    """:func:`_play` on Redis: the namespace is made with the demo store's limits (every
    client reads a namespace's limits from Redis), and deleted at the end."""
    from ..redis.store import RedisStore

    demo = dataclasses.replace(address, namespace=f"{address.namespace}-demo-{os.urandom(4).hex()}")
    store = RedisStore(demo, 10.0, _store_for(workers * agents).limits)
    try:
        print(f"demo: Redis at {demo}; {workers} workers x {agents} agents", flush=True)
        return _run_players(demo, None, duration, workers, agents)
    finally:
        store.delete_namespace()
        store.close()


def _play(
    socket_path: str, duration: float, workers: int, agents: int
) -> tuple[list[dict[str, int]], list[Session], int]:
    """A manager at ``socket_path``, the workers and the subscriber, until the workers are
    done; returns their reports and what the store holds then. Every process it started
    has ended when it returns or raises."""
    with start_server(socket_path, store=_store_for(workers * agents)) as server:
        print(f"demo: manager pid {server.pid} at {socket_path}; {workers} workers x {agents} agents", flush=True)
        return _run_players(server.address, server.authkey, duration, workers, agents)


def _run_players(
    address: Any, authkey: bytes | None, duration: float, workers: int, agents: int
) -> tuple[list[dict[str, int]], list[Session], int]:
    """The workers and the subscriber on the store at ``address``, until the workers are
    done; their reports and what the store holds then."""
    ctx = multiprocess.get_context("fork")
    redraw = escapes_allowed(sys.stdout)
    deadline = time.time() + duration
    results, stop = ctx.Queue(), ctx.Event()
    players = [
        ctx.Process(target=_worker, args=(address, authkey, n, agents, deadline, stop, results)) for n in range(workers)
    ]
    subscriber = ctx.Process(target=_subscriber, args=(address, authkey, deadline + 0.5, stop, redraw))
    everyone = [*players, subscriber]
    try:
        with _interrupts_held():
            for process in everyone:
                process.start()
        reports = [results.get(timeout=duration + 30) for _ in players]
        for process in everyone:
            process.join(30)
    finally:
        stop.set()  # an interrupted demo: the players stop at their next step
        _end(everyone)
    with Client(address, authkey) as store:
        return reports, store.list_all() + store.recently_closed(), store.revision()


def _end(processes: list[Any]) -> None:
    """Wait for those of ``processes`` still running (an interrupted demo; they were told
    to stop) to end within a few seconds, then terminate them, then kill any that still
    did not end. Stopping on their own, they close their sessions and connections as
    they should (terminated halfway through a handshake, a client makes the manager warn)."""
    for process in processes:
        if process.is_alive():
            process.join(5)
    for process in processes:
        if process.is_alive():
            process.terminate()
            process.join(1)
            if process.is_alive():
                process.kill()
                process.join(1)


@contextlib.contextmanager
def _sigterm_exits() -> Iterator[None]:
    """While the block runs, SIGTERM raises SystemExit (exit status 143) in this process,
    so that the block's cleanup runs as it does for Ctrl-C; the handler is put back after.
    Only the main thread can handle signals: elsewhere nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def exit(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, exit)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


#: The signals that end a demo early: Ctrl-C and a plain kill.
_INTERRUPTS = {signal.SIGINT, signal.SIGTERM}


@contextlib.contextmanager
def _interrupts_held() -> Iterator[None]:
    """Hold back SIGINT and SIGTERM while processes are started: one arriving halfway
    through a fork would leave a child that the demo does not know of, so it could neither
    end it nor wait for it. A signal that arrived meanwhile is handled when the block ends,
    when every child is known. The children inherit the mask; :func:`_ignore_interrupts`
    lifts it once their own handlers are set."""
    signal.pthread_sigmask(signal.SIG_BLOCK, _INTERRUPTS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _INTERRUPTS)


def _ignore_interrupts() -> None:
    """In a worker or the subscriber: Ctrl-C reaches the whole process group, but the demo
    process decides when these end (it tells them to stop, and terminates those that do
    not), so they neither stop nor print a traceback of their own; SIGTERM ends them at once."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _INTERRUPTS)


def _worker(address: Any, authkey: bytes, worker: int, agents: int, deadline: float, stop: Any, results: Any) -> None:
    """One worker process playing ``agents`` coding agents until ``deadline`` or ``stop``."""
    _ignore_interrupts()
    rng = random.Random(worker)
    counts = {"worker": worker, "transitions": 0, "input_tokens": 0, "output_tokens": 0, "errors": 0}
    with Client(address, authkey) as store:
        ids = [f"agent-{worker}-{k}" for k in range(agents)]
        kinds = list(AgentType)  # the agents a developer runs side by side, in turn
        for k, id in enumerate(ids):
            agent = kinds[(worker * agents + k) % len(kinds)]
            directory = f"/home/demo/project-{worker}-{k}"
            store.set(Session(id=id, agent_type=agent, working_dir=directory, session_id=f"resume-{worker}-{k}"))
        statuses, weights = list(_WEIGHTS), list(_WEIGHTS.values())
        while time.time() < deadline and not stop.is_set():
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


def _subscriber(address: Any, authkey: bytes, deadline: float, stop: Any, redraw: bool) -> None:
    """The subscriber: follows the change feed and, with ``redraw`` (a terminal that takes
    escape codes), redraws the live table at most ten times a second; else it prints a
    plain line a second."""
    _ignore_interrupts()
    try:
        _follow(address, authkey, deadline, stop, redraw)
    except BrokenPipeError:
        # The reader of the demo's output went away (``demo | head``): stop following. The
        # demo process itself ends as the CLI does on a closed pipe. Pointing stdout at the
        # null device keeps the flush at this process's exit from failing with a traceback.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def _follow(address: Any, authkey: bytes, deadline: float, stop: Any, redraw: bool) -> None:
    statuses = [status for status in Status if status is not Status.CLOSED]
    last_draw = 0.0
    with Client(address, authkey) as store, store.watch() as watch:
        while time.time() < deadline and not stop.is_set():
            watch.poll(0.1)
            if time.time() - last_draw < (0.1 if redraw else 1.0):
                continue
            last_draw = time.time()
            sessions = list(watch.sessions.values())
            if redraw:
                sys.stdout.write(_CLEAR_SCREEN + format_table(sessions) + f"\nrevision {watch.revision}\n")
                sys.stdout.flush()
            else:
                line = "  ".join(f"{status.value} {sum(s.status is status for s in sessions)}" for status in statuses)
                print(f"subscriber: rev {watch.revision:>5}  live {len(sessions)}: {line}", flush=True)


def _summary(reports: list[dict[str, int]], sessions: list[Session], revision: int) -> int:
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
