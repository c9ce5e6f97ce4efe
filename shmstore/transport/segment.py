"""A shared-memory segment of records: one writer (the manager), many read-only readers.

A record is opaque bytes keyed by a str id (at most 256 bytes of UTF-8). The writer is a
:class:`Segment`; a reader, in any process that was handed the segment's fd
(:func:`send_segment` / :func:`receive_segment`, SCM_RIGHTS over a unix socket), is a
:class:`Reader`, which reads a record with no round trip to the manager.

The segment is an anonymous ``memfd`` (``os.memfd_create``): no name in /dev/shm to leak or
squat, freed by the kernel when the last fd and the last map of it close, whoever dies. It is
sealed against shrinking (a reader's map can never fault), growing, and new writable maps
(``F_SEAL_FUTURE_WRITE``, Linux >= 5.1): only the writer's map, made before the seal, writes.

Layout (little-endian; offsets in bytes)::

    header, 128 bytes, one 8-byte word each:
      0 magic b"SHMS", layout version (u32)      40 state: 0 live, 1 moved, 2 closed
      8 header seqlock (odd while changing)      48 slot count (u32), slot size (u32)
     16 epoch (8 bytes, given by the store)      56 index size (a power of two)
     24 generation (+1 for each grow)            64 slots in use: slots [0, this) are scanned
     32 revision (the store's, of the last change)
    index at 128: index size x 8 bytes, open addressing, linear probing from crc32(id):
      0 empty; (crc32(id) << 32) | (slot + 1) in use; 0xFFFFFFFF a tombstone (deleted)
    slots after it: slot count x slot size bytes, each:
      0 seq (odd while being written)  8 revision  16 id length (u16)  18 flags (u16: 1 used,
      2 too big: read it over the socket)  20 record length (u32)  24 id, then record bytes

Locking: the writer's callers hold the store's lock for every call of a :class:`Segment`
(put, delete, set_revision, grow, close); it protects the writer-side bookkeeping (the id ->
slot map, the free list, the tombstone count) and makes the writer single. Readers take no
lock: each slot is a seqlock (the writer makes its seq odd, writes, makes it even; a reader
reads seq, copies, reads seq again and retries, at most :data:`SPINS` times, when it was odd
or changed), and the header seqlock wraps each whole change, so :meth:`Reader.read_all` can
tell the caller whether it saw one instant.

Memory ordering: a pure-Python seqlock is correct on x86-64 only. Every seq word is read and
written as one aligned 8-byte load/store (``memoryview.cast("Q")`` indexing: a memcpy of 8
bytes, one ``mov``), so it is never torn. x86's TSO keeps stores in program order (the odd
seq is visible before the data, the data before the even seq) and loads in program order
(the first seq before the copy, the copy before the second seq); the data copies are
memcpy of at most a slot (< 64 KiB: glibc uses weakly ordered non-temporal stores only for
copies of the order of the L3 size, and a rep-movs' stores, reordered among themselves, are
all visible before a later store: Intel SDM vol. 3 §8.2.2 and §8.2.4, AMD APM vol. 2 §7.2).
CPython cannot reorder either: each access is a separate
opaque C call from the interpreter loop, in bytecode order. ARM and POWER reorder loads and
stores, which would need barriers Python cannot issue: :func:`supported` is False there and
the caller reads over the socket.

A writer killed by SIGKILL leaves the map valid and the state "live": readers go on reading
its last records (one killed inside a write leaves that slot odd: :class:`SegmentBusyError`, never
a torn record). Liveness is the caller's to check, on its socket to the manager.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import fcntl
import functools
import heapq
import mmap
import os
import platform
import socket
import struct
import time
import zlib
from typing import Literal, NamedTuple

from ..errors import ShmstoreError, StoreUnavailableError, ValidationError

MAGIC = b"SHMS"
VERSION = 1
MAX_ID_BYTES = 256
#: Largest slot: well below glibc's non-temporal memcpy threshold (see the module docstring).
MAX_SLOT_SIZE = 2**16
#: Tries at a slot that is being written before :class:`SegmentBusyError`: a slot write is ~1 µs,
#: a try ~0.5 µs. Past 8 tries a reader yields its CPU, as the writer may be off CPU mid-write:
#: in the stress test (3 processes, 2 CPUs) that took busy reads from 1-2% of reads to none.
SPINS = 100
LIVE, MOVED, CLOSED = 0, 1, 2
_TRIES = range(SPINS)

HEADER = 128
_MAGIC, _HSEQ, _EPOCH, _GENERATION, _REVISION, _STATE, _SIZES, _INDEX, _HIGH = range(9)  # header words
_SLOT_META = struct.Struct("<QHHI")  # at slot + 8: revision, id length, flags, record length
_SLOT_DATA = 24
_USED, _TOO_BIG = 1, 2
_TOMB = 0xFFFFFFFF
_HELLO = struct.Struct("<4sI8sQQ")  # what travels with the fd: magic, version, epoch, generation, size
_F_SEAL_FUTURE_WRITE = 0x10  # linux/fcntl.h; Python's fcntl does not name it


class Mark(enum.Enum):
    TOO_BIG = "too big"  # the record did not fit its slot: read it over the socket


TOO_BIG = Mark.TOO_BIG  # a module constant: an enum member looked up on its class costs 0.1 µs


class SegmentError(ShmstoreError):
    """The shared segment cannot be used for this read: read over the socket instead."""


class SegmentBusyError(SegmentError):
    """A slot was being written for all of :data:`SPINS` tries (or its writer died mid-write)."""


class SegmentMovedError(SegmentError):
    """The writer grew the segment (``state`` moved) or closed it (closed): get the new one."""

    def __init__(self, message: str, *, state: int) -> None:
        super().__init__(message)
        self.state = state


class SegmentFullError(SegmentError):
    """No free slot or index entry for a new id: :meth:`Segment.grow` and put it again."""


class Record(NamedTuple):
    slot: int
    seq: int  # the slot's seq when read: (generation, slot, seq) keys a decode cache
    revision: int  # the store revision that wrote it
    id: str
    data: bytes | Mark


_Found = tuple[int, int, int, bytes, bytes | Mark]  # a Record with the id still bytes


class Scan(NamedTuple):
    revision: int
    consistent: bool  # no change at all during the scan: records and revision are one instant
    records: list[Record]  # of the changed slots that hold one, in slot order
    changed: list[int]  # slots read: a cached record of one not in records was deleted
    sequences: list[int]  # every slot's seq before the copies: the next scan's ``known``


def supported() -> bool:
    """Whether this machine can read records from a segment: x86-64 (see the module
    docstring on memory ordering) and a kernel with memfd sealing (Linux >= 5.1). A process
    out of fds or memory is told False for now, and asks again next time."""
    try:
        return _supported()
    except OSError:
        return False


#: What makes memfd_create or a map fail for now, not for good: not an answer to keep (the
#: first segment request of a manager out of fds turned its sharing off for its lifetime).
_PASSING = (errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.EAGAIN)


@functools.cache
def _supported() -> bool:
    """:func:`supported`, kept; raises OSError instead of keeping an answer of the moment."""
    if platform.machine() not in ("x86_64", "AMD64") or not hasattr(os, "memfd_create"):
        return False
    try:
        Segment(1, 64, b"\0" * 8).close()
    except OSError as exc:
        if exc.errno in _PASSING:
            raise
        return False
    return True


def _hash(key: bytes) -> int:
    return zlib.crc32(key)  # stable across processes, unlike hash(); 0.1 µs for an id


class _Map:
    """A mapped segment and the layout both sides read."""

    epoch: bytes
    generation: int
    slot_count: int
    slot_size: int
    index_size: int

    def __init__(self, fd: int, size: int, prot: int) -> None:
        self._map = mmap.mmap(fd, size, prot=prot)
        magic, version, _, self.epoch, self.generation = struct.unpack_from("<4sIQ8sQ", self._map)
        self.slot_count, self.slot_size, self.index_size = struct.unpack_from("<IIQ", self._map, _SIZES * 8)
        self._slots = HEADER + 8 * self.index_size
        if magic != MAGIC or version != VERSION or size != self._slots + self.slot_count * self.slot_size:
            self._map.close()
            raise SegmentError(f"not a segment of layout {VERSION}: magic {magic!r}, version {version}, {size} bytes")
        self._words = memoryview(self._map).cast("Q")  # seq and header words: one 8-byte access each

    def close(self) -> None:
        self._words.release()
        self._map.close()


class Segment(_Map):
    """The writer's side. Every method must be called with the store's lock held."""

    def __init__(self, slot_count: int, slot_size: int, epoch: bytes, generation: int = 0) -> None:
        if not 0 < slot_count < 2**31 or not 64 <= slot_size <= MAX_SLOT_SIZE or slot_size % 8 or len(epoch) != 8:
            raise ValidationError("segment", f"bad shape: {slot_count} slots of {slot_size} bytes, epoch {epoch!r}")
        index_size = 1 << (2 * slot_count - 1).bit_length()  # load <= 1/2 from live ids alone
        self.size = HEADER + 8 * index_size + slot_count * slot_size
        self.fd = os.memfd_create("shmstore", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(self.fd, self.size)
            fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
            header = mmap.mmap(self.fd, HEADER)
            struct.pack_into(
                "<4sIQ8sQQQII", header, 0, MAGIC, VERSION, 0, epoch, generation, 0, LIVE, slot_count, slot_size
            )
            struct.pack_into("<QQ", header, _INDEX * 8, index_size, 0)
            header.close()
            super().__init__(self.fd, self.size, mmap.PROT_READ | mmap.PROT_WRITE)
            fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, _F_SEAL_FUTURE_WRITE | fcntl.F_SEAL_SEAL)
        except BaseException:
            os.close(self.fd)
            raise
        self._where: dict[str, tuple[int, int]] = {}  # id -> (slot, index position)
        self._free: list[int] = []  # heap of free slots below the high mark: the lowest is reused first
        self._tombstones = 0
        self.closed = False

    def __enter__(self) -> Segment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __len__(self) -> int:
        return len(self._where)

    @property
    def full(self) -> bool:
        """No room for one more id: no free slot, or the index 3/4 used (tombstones count)."""
        no_slot = not self._free and self._words[_HIGH] == self.slot_count
        return no_slot or len(self._where) + self._tombstones + 1 > self.index_size * 3 // 4

    @property
    def load(self) -> float:
        return len(self._where) / self.slot_count

    def put(self, id: str, record: bytes, revision: int) -> None:
        """Store ``record`` under ``id`` at store revision ``revision``; one too big for a slot
        is marked so. Raises ValidationError (id) or SegmentFullError, changing nothing."""
        key = id.encode()
        if not 0 < len(key) <= MAX_ID_BYTES:
            raise ValidationError("id", f"is {len(key)} bytes of UTF-8; a segment takes 1 to {MAX_ID_BYTES}")
        if len(key) + len(record) <= self.slot_size - _SLOT_DATA:
            self._store(id, key, revision, _USED, len(record), key + record)
        else:
            self._store(id, key, revision, _USED | _TOO_BIG, len(record), key)

    def delete(self, id: str, revision: int) -> bool:
        """Remove ``id``'s record (False if there was none); the revision is the store's."""
        where = self._where.pop(id, None)
        self._begin()
        if where is not None:
            slot, position = where
            self._words[HEADER // 8 + position] = _TOMB  # the index first: readers stop finding it
            self._write_slot(slot, 0, 0, 0, b"")
            heapq.heappush(self._free, slot)
            self._tombstones += 1
        self._end(revision)
        return where is not None

    def set_revision(self, revision: int) -> None:
        """The store changed but not a record here (e.g. a closed session pruned)."""
        self._begin()
        self._end(revision)

    def grow(self, slot_count: int | None = None) -> Segment:
        """A new segment (default: room for twice the live ids, at least this many slots, and
        no tombstones) holding every record, generation + 1; this one is marked moved, so its
        readers re-attach, and closed here. The caller sends the new one to readers that ask."""
        count = slot_count or max(self.slot_count, 2 * len(self._where))
        new = Segment(count, self.slot_size, self.epoch, self.generation + 1)
        try:
            for id, (slot, _) in self._where.items():
                off = self._slots + slot * self.slot_size
                revision, id_len, flags, length = _SLOT_META.unpack_from(self._map, off + 8)
                data = self._map[off + _SLOT_DATA : off + _SLOT_DATA + id_len + (0 if flags & _TOO_BIG else length)]
                new._store(id, data[:id_len], revision, flags, length, data)
        except BaseException:
            new.close()
            raise
        new.set_revision(self._words[_REVISION])
        self._set_state(MOVED)
        return new

    def close(self) -> None:
        """Mark the segment closed (readers get SegmentMovedError) and let go of it; the kernel
        frees it when the last reader's map closes too."""
        if not self.closed:
            self._set_state(CLOSED)

    def _set_state(self, state: int) -> None:
        self._begin()  # under the header seqlock: a read_all in progress sees the change
        self._words[_STATE] = state
        self._end(self._words[_REVISION])
        super().close()
        os.close(self.fd)
        self.closed = True

    def _store(self, id: str, key: bytes, revision: int, flags: int, length: int, data: bytes) -> None:
        where = self._where.get(id)
        if where is None:
            where = self._place(key)
        self._begin()
        self._write_slot(where[0], revision, flags, length, data, len(key))
        if id not in self._where:  # the slot first, then the index entry that finds it
            self._words[HEADER // 8 + where[1]] = _hash(key) << 32 | (where[0] + 1)
            self._where[id] = where
        self._end(revision)

    def _place(self, key: bytes) -> tuple[int, int]:
        """A free slot and index position for a new id, taken from the bookkeeping."""
        if self.full:
            raise SegmentFullError(f"the segment holds {len(self._where)} of {self.slot_count} records and is full")
        mask = self.index_size - 1
        position = _hash(key) & mask
        while self._words[HEADER // 8 + position] not in (0, _TOMB):
            position = (position + 1) & mask
        self._tombstones -= self._words[HEADER // 8 + position] == _TOMB
        if self._free:
            return heapq.heappop(self._free), position
        self._words[_HIGH] += 1
        return self._words[_HIGH] - 1, position

    def _write_slot(self, slot: int, revision: int, flags: int, length: int, data: bytes, id_len: int = 0) -> None:
        off = self._slots + slot * self.slot_size
        seq = self._words[off // 8]
        self._words[off // 8] = seq + 1  # odd: readers wait or retry
        _SLOT_META.pack_into(self._map, off + 8, revision, id_len, flags, length)
        self._map[off + _SLOT_DATA : off + _SLOT_DATA + len(data)] = data
        self._words[off // 8] = seq + 2

    def _begin(self) -> None:
        self._words[_HSEQ] += 1

    def _end(self, revision: int) -> None:
        self._words[_REVISION] = revision
        self._words[_HSEQ] += 1


class Reader(_Map):
    """A read-only map of a segment, in any process. Reads take no lock (see the module
    docstring); each checks that the segment was not moved or closed before it reads.
    ``epoch``, when given, must be the segment's (the store the caller talks to): it is
    checked here once, as a segment's epoch never changes; a new store makes a new segment.
    On SegmentMovedError the caller closes this reader (the old segment is freed when the
    last reader lets go) and asks the manager for the new one."""

    def __init__(self, fd: int, epoch: bytes | None = None, *, _check_sequence: bool = True) -> None:
        size = os.fstat(fd).st_size
        if size < HEADER:
            raise SegmentError(f"a segment is at least {HEADER} bytes; this fd has {size}")
        super().__init__(fd, size, mmap.PROT_READ)
        self._check = _check_sequence  # False only to show that the stress test catches torn reads
        if epoch is not None and epoch != self.epoch:
            self.close()
            raise SegmentError(f"the segment is of epoch {self.epoch.hex()}, not {epoch.hex()}")

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def read(self, id: str) -> bytes | Literal[Mark.TOO_BIG] | None:
        """``id``'s record, None if there is none, or Mark.TOO_BIG (read it over the socket)."""
        found = self._find(id)
        return None if found is None else found[4]

    def read_record(self, id: str) -> Record | None:
        found = self._find(id)
        return None if found is None else Record(found[0], found[1], found[2], id, found[4])

    def sequence(self, slot: int) -> int:
        """Slot ``slot``'s seq now: one even and equal to a record's ``seq`` means that record
        is still there, unchanged (a decode cache's check, with no copy: ~0.5 µs)."""
        self._check_state()
        return int(self._words[(self._slots + slot * self.slot_size) >> 3])

    def read_all(self, known: list[int] | None = None) -> Scan:
        """The records of every slot whose seq is not the one in ``known`` (the ``sequences``
        of the caller's last scan; None: every slot), each consistent. ``consistent`` says
        whether nothing changed during the scan: the records and revision are one instant."""
        self._check_state()
        words, first, step = self._words, self._slots >> 3, self.slot_size >> 3
        before, revision = words[_HSEQ], words[_REVISION]
        high = min(words[_HIGH], self.slot_count)
        sequences = words[first : first + high * step : step].tolist()  # one C call, an 8-byte load each
        if known is None:
            changed = list(range(high))
        elif known == sequences:  # the common poll, in C: nothing changed
            changed = []
        else:
            changed = [slot for slot, seq, old in zip(range(high), sequences, known, strict=False) if seq != old]
            changed += range(len(known), high)
        records: list[Record] = []
        new = tuple.__new__  # Record(...) without its 0.2 µs of argument parsing
        for slot in changed:
            found = self._read_slot(slot, None)
            if found is not None:
                records.append(new(Record, (slot, found[1], found[2], found[3].decode(), found[4])))
        consistent = not before & 1 and words[_HSEQ] == before
        return Scan(revision, consistent, records, changed, sequences)

    def _check_state(self) -> None:
        state = self._words[_STATE]
        if state != LIVE:
            what = "moved" if state == MOVED else "closed"
            raise SegmentMovedError(f"the segment was {what} by its writer", state=state)

    def _find(self, id: str) -> _Found | None:
        """``id``'s slot, found through the index; the slot's own id decides."""
        self._check_state()
        try:
            key = id.encode()
        except UnicodeEncodeError:  # e.g. a lone surrogate: no id put can be this one
            return None
        h = _hash(key)
        mask, words = self.index_size - 1, self._words
        position = h & mask
        for _ in range(self.index_size):
            entry = words[HEADER // 8 + position]
            if entry == 0:
                return None
            if entry >> 32 == h and entry != _TOMB:
                found = self._read_slot((entry & 0xFFFFFFFF) - 1, key)
                if found is not None:
                    return found
            position = (position + 1) & mask
        return None

    def _read_slot(self, slot: int, key: bytes | None) -> _Found | None:
        """The slot's record (None: empty, or not ``key``'s), copied under its seqlock. The
        lengths read mid-write may be a mix of two values < 64 KiB: a copy stays that small."""
        off = self._slots + slot * self.slot_size
        word, words, m = off >> 3, self._words, self._map
        for tries in _TRIES:
            seq = words[word]
            if seq & 1 and self._check:
                if tries > 8:  # its writer may be off the CPU mid-write: let it run
                    os.sched_yield()
                continue
            revision, id_len, flags, length = _SLOT_META.unpack_from(m, off + 8)
            start = off + _SLOT_DATA + id_len
            found = m[off + _SLOT_DATA : start]
            data = TOO_BIG if flags & _TOO_BIG else m[start : start + length]
            if not self._check or words[word] == seq:
                if not flags & _USED or (key is not None and found != key):
                    return None
                return slot, seq, revision, found, data
        raise SegmentBusyError(f"slot {slot} was being written for {SPINS} tries")


def send_segment(sock: socket.socket, segment: Segment, fd: int | None = None) -> None:
    """Send ``segment``'s fd (SCM_RIGHTS; or ``fd``, a duplicate of it) with a 32-byte hello,
    as one message of its own."""
    hello = _HELLO.pack(MAGIC, VERSION, segment.epoch, segment.generation, segment.size)
    sent = socket.send_fds(sock, [hello], [segment.fd if fd is None else fd])
    sock.sendall(hello[sent:])


def receive_segment(sock: socket.socket, deadline: float, epoch: bytes | None = None) -> Reader:
    """Receive a segment sent by :func:`send_segment` by ``deadline`` (``time.monotonic()``) and
    map it read-only. The fd is close-on-exec and closed here once mapped."""
    timeout = sock.gettimeout()
    with contextlib.ExitStack() as closing:
        try:
            sock.settimeout(max(0.001, deadline - time.monotonic()))
            hello, fds, flags, _ = socket.recv_fds(sock, _HELLO.size, 1, socket.MSG_CMSG_CLOEXEC)
            for fd in fds:
                closing.callback(os.close, fd)
            while 0 < len(hello) < _HELLO.size:  # the fd came with the first byte
                sock.settimeout(max(0.001, deadline - time.monotonic()))
                more = sock.recv(_HELLO.size - len(hello))
                hello = hello + more if more else b""
        except TimeoutError:
            raise StoreUnavailableError("no segment arrived before the deadline") from None
        except OSError as error:
            raise StoreUnavailableError(f"receiving the segment failed: {error}") from error
        finally:
            sock.settimeout(timeout)
        if not hello:
            raise StoreUnavailableError("the connection closed before a segment arrived")
        magic, version, their_epoch, generation, _ = _HELLO.unpack(hello)
        if magic != MAGIC or version != VERSION or len(fds) != 1 or flags & socket.MSG_CTRUNC:
            raise SegmentError(f"not a segment message: {hello!r} with {len(fds)} fds")
        reader = Reader(fds[0], epoch)
        if (reader.epoch, reader.generation) != (their_epoch, generation):
            reader.close()
            raise SegmentError("the segment's header does not match the message it came with")
        return reader
