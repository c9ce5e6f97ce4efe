"""The shared-memory segment: its API in-process, and its fd passed to and used by other
processes (segment_worker.py), with nothing leaked after they close or are killed. The
stress test against a writer at full speed is in test_segment_stress.py."""

from __future__ import annotations

import gc
import json
import mmap
import os
import platform
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import dev_shm
import pytest
from helpers import PYTHON

from shmstore import StoreUnavailableError, ValidationError
from shmstore.transport import segment as seg
from shmstore.transport.segment import (
    Mark,
    Reader,
    Segment,
    SegmentBusyError,
    SegmentError,
    SegmentFullError,
    SegmentMovedError,
)

WORKER = str(Path(__file__).with_name("segment_worker.py"))
EPOCH = b"epoch-01"


def open_fds() -> int:
    # Collected first: an earlier test's dropped socket, closed by the collector between two
    # counts, made a count fall (20 -> 18) with nothing of this test's leaked or closed.
    gc.collect()
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def writer() -> Iterator[Segment]:
    with Segment(8, 256, EPOCH) as segment:
        yield segment


@pytest.fixture
def reader(writer: Segment) -> Iterator[Reader]:
    with Reader(writer.fd, EPOCH) as reader:
        yield reader


def test_a_record_put_is_read_back_by_id_with_its_revision(writer: Segment, reader: Reader) -> None:
    writer.put("s1", b"one", 5)
    writer.put("s2", b"two", 6)
    assert (reader.read("s1"), reader.read("s2")) == (b"one", b"two")
    record = reader.read_record("s2")
    assert record is not None
    assert (record.id, record.revision, record.seq % 2) == ("s2", 6, 0)


def test_an_id_never_put_reads_as_none(writer: Segment, reader: Reader) -> None:
    writer.put("s1", b"one", 1)
    assert reader.read("s2") is None
    assert reader.read("") is None


def test_a_put_of_an_existing_id_replaces_its_record_in_the_same_slot(writer: Segment, reader: Reader) -> None:
    writer.put("s1", b"one", 1)
    first = reader.read_record("s1")
    writer.put("s1", b"a longer record", 2)
    second = reader.read_record("s1")
    assert first is not None
    assert second is not None
    assert (second.data, second.slot, second.seq) == (b"a longer record", first.slot, first.seq + 2)
    assert len(writer) == 1


def test_a_record_too_big_for_its_slot_reads_as_too_big(writer: Segment, reader: Reader) -> None:
    writer.put("big", b"x" * 256, 1)
    assert reader.read("big") is Mark.TOO_BIG
    writer.put("big", b"small now", 2)
    assert reader.read("big") == b"small now"


def test_a_deleted_record_reads_as_none_and_its_slot_is_reused(writer: Segment, reader: Reader) -> None:
    writer.put("s1", b"one", 1)
    slot = reader.read_record("s1").slot  # type: ignore[union-attr]
    assert writer.delete("s1", 2) is True
    assert reader.read("s1") is None
    assert writer.delete("s1", 3) is False
    writer.put("s2", b"two", 4)
    assert reader.read_record("s2").slot == slot  # type: ignore[union-attr]
    assert reader.read_all().revision == 4


def test_many_ids_colliding_in_the_index_are_each_found_after_deletions() -> None:
    with Segment(200, 64, EPOCH) as writer, Reader(writer.fd) as reader:
        ids = [f"id-{n}" for n in range(200)]
        for n, id in enumerate(ids):
            writer.put(id, b"%d" % n, n)
        for id in ids[::2]:
            writer.delete(id, 1000)
        assert [reader.read(id) for id in ids] == [None if n % 2 == 0 else b"%d" % n for n in range(200)]


def test_an_id_over_256_bytes_is_refused_and_nothing_changes(writer: Segment, reader: Reader) -> None:
    with pytest.raises(ValidationError, match="257 bytes"):
        writer.put("é" * 128 + "x", b"r", 1)
    assert reader.read_all() == seg.Scan(0, True, [], [], [])


def test_a_full_segment_refuses_a_new_id_and_changes_nothing(writer: Segment, reader: Reader) -> None:
    for n in range(8):
        writer.put(f"s{n}", b"r", n)
    assert writer.full
    with pytest.raises(SegmentFullError):
        writer.put("s8", b"r", 9)
    writer.put("s0", b"still writable", 10)  # an id it holds is not a new one
    assert [r.id for r in reader.read_all().records] == [f"s{n}" for n in range(8)]


def test_grow_copies_every_record_into_a_segment_twice_the_size_and_moves_readers(
    writer: Segment, reader: Reader
) -> None:
    for n in range(8):
        writer.put(f"s{n}", b"x" * 40 * n, n + 1)  # 6 and 7 too big for a slot
    new = writer.grow()
    with new, Reader(new.fd, EPOCH) as moved:
        with pytest.raises(SegmentMovedError) as raised:
            reader.read("s0")
        assert raised.value.state == seg.MOVED
        assert (new.slot_count, new.generation, moved.generation) == (16, 1, 1)
        scan = moved.read_all()
        assert scan.revision == 8
        assert [(r.id, r.revision, r.data) for r in scan.records] == [
            (f"s{n}", n + 1, Mark.TOO_BIG if n > 5 else b"x" * 40 * n) for n in range(8)
        ]
        new.put("s8", b"new", 9)
        assert moved.read("s8") == b"new"


def test_grow_after_many_deletions_keeps_the_size_and_clears_the_tombstones(writer: Segment) -> None:
    for n in range(100):  # 8 slots, 16 index entries: tombstones fill the index
        writer.put(f"s{n}", b"r", n)
        if writer.full:
            break
        writer.delete(f"s{n}", n)
    assert writer.full
    assert len(writer) == 1
    with writer.grow() as new:
        assert (new.slot_count, len(new), new.full) == (8, 1, False)


def test_closing_the_writer_tells_its_readers(writer: Segment, reader: Reader) -> None:
    writer.put("s1", b"one", 1)
    writer.close()
    with pytest.raises(SegmentMovedError) as raised:
        reader.read("s1")
    assert raised.value.state == seg.CLOSED


def test_read_all_copies_only_the_slots_changed_since_the_sequences_the_caller_knows(
    writer: Segment, reader: Reader
) -> None:
    for n in range(4):
        writer.put(f"s{n}", b"r%d" % n, n)
    first = reader.read_all()
    assert (first.changed, len(first.sequences)) == ([0, 1, 2, 3], 4)
    assert reader.read_all(first.sequences).records == []
    writer.put("s1", b"R1", 5)
    writer.put("s4", b"r4", 6)
    writer.delete("s2", 7)
    again = reader.read_all(first.sequences)
    assert again.changed == [1, 2, 4]  # s2's slot now empty: the caller drops its copy
    assert [(r.slot, r.id, r.data) for r in again.records] == [(1, "s1", b"R1"), (4, "s4", b"r4")]


def test_read_all_says_whether_a_change_happened_during_the_scan(writer: Segment, reader: Reader) -> None:
    writer.put("s1", b"one", 1)
    assert reader.read_all().consistent
    writer._begin()  # as if a change were under way
    assert not reader.read_all().consistent
    writer._end(2)
    assert reader.read_all().consistent


def test_a_slot_left_mid_write_is_busy_and_never_read(writer: Segment, reader: Reader) -> None:
    writer.put("s1", b"one", 1)
    word = writer._slots // 8
    writer._words[word] += 1  # odd: a writer killed inside put leaves it so
    with pytest.raises(SegmentBusyError, match="slot 0"):
        reader.read("s1")
    with pytest.raises(SegmentBusyError):
        reader.read_all()


def test_the_segment_fd_readers_get_can_neither_map_writable_nor_write_nor_resize(writer: Segment) -> None:
    with pytest.raises(PermissionError):
        mmap.mmap(writer.fd, writer.size)  # shared and writable
    with pytest.raises(PermissionError):
        os.pwrite(writer.fd, b"x", 0)
    with pytest.raises(PermissionError):
        os.ftruncate(writer.fd, 64)


def test_a_reader_refuses_a_segment_of_another_epoch_or_an_fd_that_is_not_one(writer: Segment) -> None:
    before = open_fds()
    with pytest.raises(SegmentError, match="epoch"):
        Reader(writer.fd, b"other-ep")
    with open(__file__, "rb") as source, pytest.raises(SegmentError, match="magic"):
        Reader(source.fileno())
    assert open_fds() == before


def test_a_bad_shape_is_refused(writer: Segment) -> None:
    with pytest.raises(ValidationError, match="bad shape"):
        Segment(8, 100, EPOCH)


def test_supported_only_on_x86_64(monkeypatch: pytest.MonkeyPatch) -> None:
    assert seg.supported() is (platform.machine() == "x86_64")
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    assert seg._supported.__wrapped__() is False


def test_no_name_appears_in_dev_shm() -> None:
    before = dev_shm.held()
    with Segment(8, 256, EPOCH) as writer, Reader(writer.fd):
        assert dev_shm.held() == before
        assert os.readlink(f"/proc/self/fd/{writer.fd}").startswith("/memfd:shmstore")


# -- across processes: the fd passed over a unix socket ------------------------------------


@pytest.fixture
def holder() -> Iterator[tuple[subprocess.Popen[str], socket.socket]]:
    """A writer process that sent a segment of RECORDS records over a socket, then waits."""
    ours, theirs = socket.socketpair()
    with subprocess.Popen(
        [PYTHON, WORKER, "hold", str(theirs.fileno())], pass_fds=[theirs.fileno()], stdout=subprocess.PIPE, text=True
    ) as proc:
        theirs.close()
        try:
            yield proc, ours
        finally:
            proc.kill()
            ours.close()


def test_a_segment_sent_to_another_process_is_read_there_and_closes_without_a_leak(
    holder: tuple[subprocess.Popen[str], socket.socket],
) -> None:
    _, sock = holder
    before = open_fds()
    with seg.receive_segment(sock, time.monotonic() + 30, EPOCH) as reader:
        assert len(reader.read_all().records) == 20
        assert reader.read("s7") is not None
        with pytest.raises(TypeError):  # a read-only map
            reader._map[0:4] = b"XXXX"
    assert open_fds() == before


def test_after_the_writer_is_killed_its_readers_still_read_its_last_records(
    holder: tuple[subprocess.Popen[str], socket.socket],
) -> None:
    proc, sock = holder
    before = open_fds()
    reader = seg.receive_segment(sock, time.monotonic() + 30, EPOCH)
    assert proc.stdout is not None
    assert "pid" in json.loads(proc.stdout.readline())
    records = reader.read_all()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    # The map stays valid and says "live": liveness is the caller's to check on its socket.
    assert reader.read_all() == records
    assert len(records.records) == 20
    reader.close()
    assert open_fds() == before


def test_receive_segment_gives_up_at_its_deadline() -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        started = time.monotonic()
        with pytest.raises(StoreUnavailableError, match="deadline"):
            seg.receive_segment(ours, started + 0.2)
        assert time.monotonic() - started < 5
        assert ours.gettimeout() is None


def test_receive_segment_refuses_a_message_without_an_fd_or_a_closed_connection() -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        theirs.sendall(b"x" * 32)
        with pytest.raises(SegmentError, match="not a segment message"):
            seg.receive_segment(ours, time.monotonic() + 5)
        theirs.close()
        with pytest.raises(StoreUnavailableError, match="closed"):
            seg.receive_segment(ours, time.monotonic() + 5)
