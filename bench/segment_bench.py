#!/usr/bin/env python3
"""Measure the shared-memory segment (shmstore/segment.py) beside a socket get of a real manager.

    python bench/segment_bench.py [--quick]

Every row is measured in the same phase as the socket get it is compared with: first with
this process and the manager pinned to one CPU, then on every CPU. Wall-clock and CPU time
(this process and the manager, less what reading it costs: the "nothing" row) per op are
both printed: on a loaded machine wall time swings,
CPU time holds. Records are bench.py's ~1.2 KB session.
"""

from __future__ import annotations

import argparse
import os
import select
import socket
import sys
import tempfile
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).parent))
from bench import IDS, interleaved_us, make_session, shmstore_server
from shmstore.record import session_from_store
from shmstore.transport.segment import Reader, Segment


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer iterations")
    n, rounds = (500, 3) if parser.parse_args().quick else (3000, 5)
    data = make_session(IDS[0]).to_json()
    every_cpu = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(every_cpu)})  # the manager forked below inherits it
    with (
        tempfile.TemporaryDirectory(prefix="segbench-", dir="/tmp") as tmp,
        shmstore_server(Path(tmp)) as (_, store),
        Segment(256, 2048, os.urandom(8)) as segment,
        Reader(segment.fd) as reader,
        Segment(256, 2048, os.urandom(8)) as still,  # never written after: read_all finds nothing changed
        Reader(still.fd) as still_reader,
    ):
        for revision, id in enumerate(IDS, 1):
            segment.put(id, data, revision)
            still.put(id, data, revision)
        known, still_known = reader.read_all().sequences, still_reader.read_all().sequences
        ours, theirs = socket.socketpair()
        poller = select.poll()
        poller.register(ours, select.POLLIN)
        ops = {
            "nothing": lambda: None,  # what measuring costs: subtracted from the CPU figures
            "socket_get": lambda: store.get(IDS[0]),
            "shm_read_1.2KB": lambda: reader.read(IDS[0]),
            "shm_read_and_decode": lambda: session_from_store(reader.read(IDS[0])),  # type: ignore[arg-type]
            "shm_read_all_100": reader.read_all,
            "shm_read_all_100_unchanged": lambda: still_reader.read_all(still_known),
            "shm_put+read_all_1_changed": lambda: (segment.put(IDS[1], data, 1000), reader.read_all(known)),
            "shm_put_1.2KB": lambda: segment.put(IDS[1], data, 1000),
            "poll_socket_for_liveness": lambda: poller.poll(0),
        }
        for phase in ("pinned", "unpinned"):
            if phase == "unpinned":
                for process in [psutil.Process(), *psutil.Process().children(recursive=True)]:
                    os.sched_setaffinity(process.pid, every_cpu)
            cpu: dict[str, float] = {}
            wall = interleaved_us(ops, n, rounds, cpu)
            cpu = {name: value - cpu["nothing"] for name, value in cpu.items()}
            print(f"\n{phase:<28}{'wall us':>10}{'cpu us':>10}{'x get wall':>12}{'x get cpu':>11}")
            for name in ops:
                ratios = f"{wall[name] / wall['socket_get']:>12.3f}{cpu[name] / cpu['socket_get']:>11.3f}"
                print(f"{name:<28}{wall[name]:>10.2f}{cpu[name]:>10.2f}{ratios}")
        ours.close()
        theirs.close()


if __name__ == "__main__":
    main()
