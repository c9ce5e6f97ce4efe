"""Reader processes against a writer process at full speed: every record read is checked
against the checksum inside it. With the seqlock no read is torn; without its sequence check
the same readers do see torn records, so the test can fail. A few seconds each."""

from __future__ import annotations

import json
import socket
import subprocess
from pathlib import Path

from helpers import PYTHON

WORKER = str(Path(__file__).with_name("segment_worker.py"))
SECONDS = 3.0
READERS = 2


def race(check: bool) -> tuple[dict[str, int], list[dict[str, int]]]:
    """Run one writer and READERS readers, each a process of its own; their reports."""
    pairs = [socket.socketpair() for _ in range(READERS)]
    theirs = [b.fileno() for _, b in pairs]
    readers = [
        subprocess.Popen(
            [PYTHON, WORKER, "reader", str(SECONDS + 5), "1" if check else "0", str(a.fileno())],
            pass_fds=[a.fileno()],
            stdout=subprocess.PIPE,
            text=True,
        )
        for a, _ in pairs
    ]
    writer = subprocess.Popen(
        [PYTHON, WORKER, "writer", str(SECONDS), *map(str, theirs)], pass_fds=theirs, stdout=subprocess.PIPE, text=True
    )
    for a, b in pairs:
        a.close()
        b.close()
    reports = [json.loads(proc.communicate(timeout=SECONDS + 30)[0]) for proc in [writer, *readers]]
    assert [proc.returncode for proc in [writer, *readers]] == [0] * (READERS + 1)
    assert [report["dev_shm"] for report in reports] == [[]] * (READERS + 1)
    return reports[0], reports[1:]


def test_reader_processes_never_see_a_torn_record_from_a_writer_at_full_speed() -> None:
    writer, readers = race(check=True)
    assert writer["writes"] > 1000
    for reader in readers:
        assert reader["torn"] == 0, reader
        assert reader["reads"] > 1000, reader
        assert reader["scans"] > 50, reader
        assert reader["fds_after"] == reader["fds_before"], reader
    assert writer["fds_after"] == writer["fds_before"]


def test_readers_without_the_sequence_check_do_see_torn_records() -> None:
    _, readers = race(check=False)
    assert sum(reader["torn"] for reader in readers) > 0, readers
