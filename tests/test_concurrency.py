"""Several OS processes hammer the same sessions; nothing may be lost."""

from __future__ import annotations

import random
from collections import Counter
from itertools import pairwise
from typing import Any

import multiprocess
from helpers import make_session

import shmstore
from shmstore import Status

STATUSES = [Status.WORKING, Status.ATTENTION, Status.QUESTION]


def _hammer(address: Any, authkey: bytes, seed: int, ids: list[str], rounds: int, out: Any) -> None:
    rng = random.Random(seed)
    transitions: Counter[str] = Counter()
    tokens: Counter[str] = Counter()
    revisions = []
    with shmstore.connect(address, authkey) as store:
        for _ in range(rounds):
            id = rng.choice(ids)
            if rng.random() < 0.6:
                result = store.transition(id, rng.choice(STATUSES))
                transitions[id] += 1
            else:
                result = store.add_usage(id, 3, 1)
                tokens[id] += 1
            revisions.append(result.revision)
    out.put((dict(transitions), dict(tokens), revisions))


def test_processes_racing_on_shared_sessions_lose_nothing(server: shmstore.ServerProcess) -> None:
    ids = ["a", "b", "c"]
    with shmstore.connect(server.address, server.authkey) as store:
        for id in ids:
            store.set(make_session(id))
        ctx = multiprocess.get_context("fork")
        out = ctx.Queue()
        workers = [
            ctx.Process(target=_hammer, args=(server.address, server.authkey, seed, ids, 150, out)) for seed in range(6)
        ]
        for w in workers:
            w.start()
        results = [out.get(timeout=90) for _ in workers]
        for w in workers:
            w.join(30)
            assert w.exitcode == 0

        transitions: Counter[str] = Counter()
        tokens: Counter[str] = Counter()
        revisions: list[int] = []
        for t, k, r in results:
            transitions.update(t)
            tokens.update(k)
            revisions.extend(r)

        final = {s.id: s for s in store.list_all()}
        for id in ids:
            session = final[id]
            assert len(session.history) == transitions[id], f"lost transitions on {id}"
            assert session.api_usage is not None
            assert (session.api_usage.input_tokens, session.api_usage.output_tokens) == (3 * tokens[id], tokens[id])
            chain = session.history
            assert chain[0].from_ is Status.WORKING
            assert all(prev.to == nxt.from_ for prev, nxt in pairwise(chain))
            assert all(prev.timestamp <= nxt.timestamp for prev, nxt in pairwise(chain))
            assert session.status == chain[-1].to
        # Every write got a revision of its own: none was applied on top of a stale read.
        assert len(revisions) == len(set(revisions)) == 6 * 150
        assert store.revision() == len(ids) + 6 * 150
