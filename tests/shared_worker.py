"""Processes for the shared-read stress test, run as ``python shared_worker.py MODE ADDRESS
KEY_HEX SECONDS [CHECK]``; each prints one JSON line.

- ``writer``: reports on IDS over the socket at full speed for SECONDS (status flips, token
  counts that only grow, a working dir whose length changes, so records change size).
- ``reader``: reads the same sessions from shared memory (``get`` and ``list_all``) for
  SECONDS and validates every one it reads: it decodes, its history's last ``to`` is its
  status, its revision and token counts never go back. CHECK 0 turns the seqlock's
  sequence check off, to show that torn reads are then caught.
"""

from __future__ import annotations

import json
import os
import sys
import time

import shmstore
from shmstore import Session

IDS = ["s0", "s1"]  # few, so the readers often meet a slot being written


def writer(client: shmstore.Client, seconds: float) -> dict[str, int]:
    writes = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        id = IDS[writes // 2 % len(IDS)]
        status = ("working", "attention", "question")[writes % 3]
        client.report(id, status, "/home/dev/" + "x" * (writes * 131 % 1500), session_id=f"r{writes}")
        client.add_usage(id, writes % 7, 1)
        writes += 2
    return {"writes": writes}


def reader(client: shmstore.Client, seconds: float) -> dict[str, int]:
    counts = dict.fromkeys(("reads", "violations", "socket"), 0)
    call = client._call

    def counted(method: str, *args: object, **kwds: float) -> object:
        counts["socket"] += method in ("get", "list_all")  # a read the segment did not answer
        return call(method, *args, **kwds)

    client._call = counted  # type: ignore[method-assign]
    last: dict[str, tuple[int, int, int]] = {}
    deadline = time.monotonic() + seconds
    n = 0
    while time.monotonic() < deadline:
        n += 1
        try:
            sessions = client.list_all() if n % 8 == 0 else [client.get(IDS[n % len(IDS)])]
        except shmstore.ShmstoreError:  # torn JSON, only without the sequence check
            counts["violations"] += 1
            continue
        for session in sessions:
            if session is not None:
                counts["reads"] += 1
                counts["violations"] += not _valid(session, last)
    return counts


def _valid(session: Session, last: dict[str, tuple[int, int, int]]) -> bool:
    usage = session.api_usage
    now = (session.revision, usage.input_tokens if usage else 0, usage.output_tokens if usage else 0)
    before = last.get(session.id, (0, 0, 0))
    last[session.id] = max(now, before)
    history_ok = not session.history or session.history[-1].to == session.status
    return history_ok and all(a >= b for a, b in zip(now, before, strict=True))


def main() -> None:
    mode, address, key, seconds, *check = sys.argv[1:]
    before = len(os.listdir("/proc/self/fd"))
    with shmstore.Client(address, bytes.fromhex(key), shared_memory=mode == "reader") as client:
        if check == ["0"]:
            assert client._shared is not None
            client._shared._check_sequence = False
        result = writer(client, float(seconds)) if mode == "writer" else reader(client, float(seconds))
        if mode == "reader":
            assert client._shared is not None
            result["attached"] = client._shared._reader is not None
    result.update(fds_before=before, fds_after=len(os.listdir("/proc/self/fd")))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
