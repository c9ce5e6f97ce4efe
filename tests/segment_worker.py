"""Processes for the segment tests, run as ``python segment_worker.py MODE SOCKET_FD ...``;
each talks to its peer over the unix socket inherited as SOCKET_FD and prints one JSON line.

- ``writer SECONDS FD...``: sends a new segment to every socket, then puts checksummed
  records of varying length (and deletes some) at full speed for SECONDS, then closes it.
- ``reader SECONDS CHECK FD``: receives a segment and validates every record it reads until
  the writer closes it (CHECK 0: without the seqlock's sequence check, to show torn reads).
- ``hold FD``: sends a segment of RECORDS records, says so, and waits to be killed.

Each prints its open fd count before and after, so the tests can see nothing leaked.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sys
import time

import dev_shm

from shmstore.transport.segment import Mark, Segment, SegmentBusyError, SegmentMovedError, receive_segment, send_segment

EPOCH = b"epoch-01"
IDS = [f"session-{n:02d}" for n in range(8)]  # few, so the readers often meet a slot being written
RECORDS = 20


def record(id: str, n: int) -> bytes:
    body = b"%s|%d|" % (id.encode(), n) + bytes([n % 251]) * ((n * 37) % 2100)
    return hashlib.blake2b(body, digest_size=16).digest() + body


def valid(id: str, data: bytes) -> bool:
    body = data[16:]
    return hashlib.blake2b(body, digest_size=16).digest() == data[:16] and body.startswith(id.encode() + b"|")


def fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def writer(seconds: float, socks: list[socket.socket]) -> dict[str, int]:
    writes = 0
    with Segment(16, 2048, EPOCH) as segment:
        for n, id in enumerate(IDS):
            segment.put(id, record(id, n), n)
        for sock in socks:
            send_segment(sock, segment)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            for _ in range(100):
                writes += 1
                id = IDS[writes % len(IDS)]
                if writes % 13 == 0:  # a delete, then a put in the lowest free slot: slots change hands
                    segment.delete(id, writes)
                segment.put(id, record(id, writes), writes)
    return {"writes": writes}


def reader(seconds: float, check: bool, sock: socket.socket) -> dict[str, int]:
    counts = dict.fromkeys(("reads", "torn", "busy", "missing", "too_big", "scans"), 0)
    with receive_segment(sock, time.monotonic() + 30, EPOCH) as segment:
        segment._check = check
        deadline = time.monotonic() + seconds
        n = 0
        while time.monotonic() < deadline:
            n += 1
            try:
                if n % 16:
                    id = IDS[n % len(IDS)]
                    _tally(counts, id, segment.read(id))
                else:
                    counts["scans"] += 1
                    for slot in segment.read_all().records:
                        _tally(counts, slot.id, slot.data)
            except UnicodeDecodeError:  # an id torn (only without the sequence check)
                counts["torn"] += 1
            except SegmentBusyError:
                counts["busy"] += 1
            except SegmentMovedError:
                break  # the writer closed it: done
    return counts


def _tally(counts: dict[str, int], id: str, data: bytes | Mark | None) -> None:
    if data is None:
        counts["missing"] += 1
    elif data is Mark.TOO_BIG:
        counts["too_big"] += 1
    else:
        counts["reads"] += 1
        counts["torn"] += not valid(id, data)  # type: ignore[arg-type]


def hold(sock: socket.socket) -> None:
    segment = Segment(RECORDS, 2048, EPOCH)
    for n in range(RECORDS):
        segment.put(f"s{n}", record(f"s{n}", n), n + 1)
    send_segment(sock, segment)
    print(json.dumps({"pid": os.getpid()}), flush=True)
    time.sleep(60)


def main() -> None:
    mode, *args = sys.argv[1:]
    before = fds()
    if mode == "hold":
        hold(socket.socket(fileno=int(args[0])))
        return
    socks = [socket.socket(fileno=int(fd)) for fd in args[-1 if mode == "reader" else 1 :]]
    result = writer(float(args[0]), socks) if mode == "writer" else reader(float(args[0]), args[1] == "1", socks[0])
    result.update(fds_before=before, fds_after=fds(), dev_shm=dev_shm.held())
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
