"""Processes for the shared-read stress test, run as ``python shared_worker.py MODE ADDRESS
KEY_HEX SECONDS [CHECK]``; each prints one JSON line.

- ``manager``: serves a store at ADDRESS (says ``ready`` when it does) while a thread of its
  own writes to IDS at full speed until SIGTERM (status flips, token counts that only grow,
  a working dir whose length changes, so records change size): ~10 times the writes a
  client can make over the socket, so a reader without the sequence check meets torn
  records within seconds even on a loaded machine.
- ``reader``: reads the same sessions from shared memory (``get`` and ``list_all``) for
  SECONDS and validates every one it reads: it decodes, its history's last ``to`` is its
  status, its revision and token counts never go back. CHECK 0 turns the seqlock's
  sequence check off, to show that torn reads are then caught.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time

import dev_shm

import shmstore
from shmstore import Session
from shmstore.manager.lifecycle import serve

IDS = ["s0", "s1"]  # few, so the readers often meet a slot being written


def manager(address: str, key: bytes) -> dict[str, int]:
    store = shmstore.Store()
    stop = threading.Event()
    counts = {"writes": 0}

    def write() -> None:
        writes = 0
        while not stop.is_set():
            id = IDS[writes // 2 % len(IDS)]
            status = ("working", "attention", "question")[writes % 3]
            # Dirs of 0-399 characters: records of every length that still fits a slot (768
            # bytes; a record over it is read over the socket, where nothing can tear).
            try:
                store.report(id, status, "/home/dev/" + "x" * (writes * 131 % 400), session_id=f"r{writes}")
                store.add_usage(id, writes % 7, 1)
            except shmstore.StoreUnavailableError:
                break  # the manager is draining at SIGTERM: it refuses writes from then on
            writes += 2
        counts["writes"] = writes

    writer = threading.Thread(target=write)
    writer.start()
    try:
        serve(address, key, store=store, stop_event=stop, on_ready=lambda _: print("ready", flush=True))
    finally:
        stop.set()
        writer.join()
    return counts


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
    if mode == "manager":
        result = manager(address, bytes.fromhex(key))
    else:
        with shmstore.Client(address, bytes.fromhex(key)) as client:
            assert client._shared is not None
            client._shared._check_sequence = check != ["0"]
            result = reader(client, float(seconds))
            result["attached"] = client._shared._reader is not None
    result.update(fds_before=before, fds_after=len(os.listdir("/proc/self/fd")), dev_shm=dev_shm.held())
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
