"""The local spool: append-only segment files per writer that every audit record passes through.

The caller's thread appends the operation's facts (one framed ``marshal`` tuple, copied
into a shared memory map of the segment file) before the operation returns, so a killed
process loses nothing: the bytes are in the kernel's page cache, and a deliverer takes
them to the sink. While the sink is
down the segments simply accumulate (up to ``max_bytes``) and drain in order when it
returns. The writer only ever appends to its newest segment; the deliverer deletes a
segment once it is delivered and a newer one exists, so the two never race on a file.

Durability against a power loss needs ``fdatasync``. Strict operations wait for it
(group commit: one sync covers every record written before it started, so concurrent
callers share it); other records are synced by the writer's timer within one flush
interval.

A live writer holds an exclusive ``flock`` on ``<writer>.lock``; segments whose lock
nobody holds belong to a writer that died or closed, and any deliverer may claim and
deliver them (``claim_orphans``).

Files: ``<writer>.lock`` and ``<writer>.<segment:08d>.spool`` (preallocated). Frame:
``u32 length | u32 crc32(payload) | payload``, payload ``marshal((seq, *fields))``. A
torn tail (a crash mid-write) fails its CRC and ends the readable part of a segment, as
a zero length does (the unwritten rest of a preallocated segment).
"""

from __future__ import annotations

import contextlib
import fcntl
import marshal
import mmap
import os
import re
import struct
import threading
import zlib
from pathlib import Path
from typing import Any

from kmsguard.errors import AuditUnavailable

_HEADER = struct.Struct(">II")
_SEGMENT_RE = re.compile(r"(.+)\.(\d{8})\.spool")
LOCK_SUFFIX = ".lock"
Entry = tuple[int, tuple[Any, ...]]


class SpoolFull(AuditUnavailable):
    """The spool reached its size limit (the sink has been down too long)."""

    default_message = "the audit spool is full; the audit sink has been unavailable too long"


def decode(data: bytes) -> tuple[list[Entry], int]:
    """Every whole, intact frame at the start of ``data`` and the number of bytes they take."""
    out: list[Entry] = []
    pos, size = 0, len(data)
    while pos + _HEADER.size <= size:
        length, crc = _HEADER.unpack_from(data, pos)
        if length == 0:
            break  # the unwritten (zeroed) rest of a segment
        end = pos + _HEADER.size + length
        if end > size:
            break
        payload = data[pos + _HEADER.size : end]
        if zlib.crc32(payload) != crc:
            break
        item = marshal.loads(payload)  # noqa: S302 - our own 0600 file, CRC-checked
        out.append((item[0], item[1:]))
        pos = end
    return out, pos


def segment_path(directory: Path, writer_id: str, number: int) -> Path:
    return directory / f"{writer_id}.{number:08d}.spool"


def segments(directory: Path, writer_id: str) -> list[int]:
    """The writer's segment numbers, oldest first."""
    out = []
    for path in directory.glob(f"{glob_escape(writer_id)}.*.spool"):
        m = _SEGMENT_RE.fullmatch(path.name)
        if m and m[1] == writer_id:
            out.append(int(m[2]))
    return sorted(out)


def glob_escape(text: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", text)


def writers(directory: Path) -> set[str]:
    """Every writer with a lock file or a segment in ``directory``."""
    if not directory.is_dir():
        return set()
    out = set()
    for path in directory.iterdir():
        if path.name.startswith("."):
            continue  # a lock being created
        if path.name.endswith(LOCK_SUFFIX):
            out.add(path.name.removesuffix(LOCK_SUFFIX))
        elif m := _SEGMENT_RE.fullmatch(path.name):
            out.add(m[1])
    return out


def create_lock(directory: Path, writer_id: str) -> int:
    """Create and hold a new writer's lock file, atomically.

    The file is locked under a temporary name and then linked into place, so no
    deliverer can ever see an unheld lock of a live writer (and take its spool).
    """
    tmp = directory / f".{writer_id}.{os.urandom(4).hex()}.tmp"
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.link(tmp, directory / f"{writer_id}{LOCK_SUFFIX}")
    except OSError:
        os.close(fd)
        raise
    finally:
        tmp.unlink(missing_ok=True)
    return fd


def try_lock(directory: Path, writer_id: str) -> int | None:
    """Take a writer's existing lock; its fd, or None if a live process holds it (or it is gone)."""
    try:
        fd = os.open(directory / f"{writer_id}{LOCK_SUFFIX}", os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def remove_writer(directory: Path, writer_id: str, lock_fd: int) -> None:
    """Delete a fully delivered writer's files; the lock file last, while still held."""
    for number in segments(directory, writer_id):
        segment_path(directory, writer_id, number).unlink(missing_ok=True)
    (directory / f"{writer_id}{LOCK_SUFFIX}").unlink(missing_ok=True)
    os.close(lock_fd)


class Spool:
    """One writer's appending side. ``append`` is called from any thread.

    Segments are preallocated (``posix_fallocate``, so a full disk fails at rotation, not
    as a SIGBUS mid-write) and memory-mapped shared: an append is a copy into the page
    cache, with no system call, and a killed process leaves its bytes behind for the
    deliverer exactly as a ``write(2)`` would. The payload is copied before its header,
    so a reader (or a crash) sees a whole frame or none; a zero header ends a segment.
    """

    def __init__(self, directory: Path, writer_id: str, max_bytes: int, segment_bytes: int = 1 << 20) -> None:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.directory = directory
        self.writer_id = writer_id
        self.max_bytes = max_bytes
        self.segment_bytes = max(64 << 10, min(segment_bytes, max_bytes // 4))
        try:
            self._lock_fd: int | None = create_lock(directory, writer_id)
        except OSError:
            raise AuditUnavailable(f"cannot create the audit spool in {directory}") from None
        self._lock = threading.Lock()
        self.segment = 1
        try:
            self._fd, self._map = self._open(self.segment)
        except OSError:
            os.close(self._lock_fd)
            raise AuditUnavailable(f"cannot create the audit spool in {directory}") from None
        self._pos = 0  # where the next frame goes in the current segment
        self.seq = 0  # last sequence number written
        self.written = 0  # bytes ever written (never reset): the group-commit clock
        self.on_disk = 0  # undelivered bytes when last measured
        self._written_at_measure = 0
        self._synced = 0
        self._sync_cond = threading.Condition()
        self._syncing = False

    def _open(self, number: int) -> tuple[int, mmap.mmap]:
        """Create, allocate and map a segment; its size and directory entry are made durable."""
        path = segment_path(self.directory, self.writer_id, number)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.posix_fallocate(fd, 0, self.segment_bytes)
            os.fsync(fd)
            dir_fd = os.open(self.directory, os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
            return fd, mmap.mmap(fd, self.segment_bytes)
        except OSError:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise

    def append(self, fields: tuple[Any, ...], durable: bool) -> int:
        """Write one record; with ``durable``, return only once it is on disk. Returns its seq.

        Raises SpoolFull or AuditUnavailable (no room for a segment, or a sync failed).
        """
        with self._lock:
            seq = self.seq + 1
            payload = marshal.dumps((seq, *fields))
            size = _HEADER.size + len(payload)
            if self.pending_bytes() + size > self.max_bytes:
                raise SpoolFull()
            pos = self._pos
            if pos + size > self.segment_bytes:
                if size > self.segment_bytes:
                    raise AuditUnavailable("an audit record is larger than a spool segment")
                try:
                    self._rotate()
                except OSError:
                    raise AuditUnavailable("the audit spool cannot be written") from None
                pos = 0
            mapped = self._map
            mapped[pos + _HEADER.size : pos + size] = payload
            mapped[pos : pos + _HEADER.size] = _HEADER.pack(len(payload), zlib.crc32(payload))
            self._pos = pos + size
            self.seq = seq
            self.written += size
            mark = self.written
        if durable:
            self.sync(mark)
        return seq

    def _rotate(self) -> None:
        """Start the next segment (under the lock); the full one is synced first, so strict records stay durable."""
        fd, mapped = self._open(self.segment + 1)
        old_fd, old_map = self._fd, self._map
        os.fdatasync(old_fd)
        self._fd, self._map = fd, mapped
        self.segment += 1
        self._pos = 0
        old_map.close()
        os.close(old_fd)

    def sync(self, mark: int | None = None) -> None:
        """Make every byte written up to ``mark`` (default: all so far) durable; one sync serves many callers.

        ``fdatasync`` writes back the mapping's dirty pages too (Linux), and unlike
        ``mmap.flush`` it lets other threads run while it waits for the disk.
        """
        target = self.written if mark is None else mark
        with self._sync_cond:
            while self._synced < target:
                if self._syncing:
                    self._sync_cond.wait()
                    continue
                self._syncing = True
                upto = self.written
                self._sync_cond.release()
                try:
                    with self._lock:
                        fd = os.dup(self._fd)  # appends go on while it syncs
                    try:
                        os.fdatasync(fd)
                    finally:
                        os.close(fd)
                except OSError:
                    raise AuditUnavailable("the audit spool cannot be synced to disk") from None
                finally:
                    self._sync_cond.acquire()
                    self._syncing = False
                    self._sync_cond.notify_all()
                self._synced = max(self._synced, upto)

    def pending_bytes(self) -> int:
        """Undelivered bytes, near enough: full older segments still on disk at the last measure, plus writes since."""
        return self.on_disk + self.written - self._written_at_measure

    def measure(self) -> None:
        """Count the older segments still on disk (the deliverer deletes whole segments as it goes)."""
        with self._lock:
            current, position, written = self.segment, self._pos, self.written
        older = sum(1 for n in segments(self.directory, self.writer_id) if n < current)
        with self._lock:
            self.on_disk, self._written_at_measure = older * self.segment_bytes + position, written

    def close(self) -> None:
        """Stop appending and release the writer lock: the files are now anyone's to deliver."""
        with self._lock:
            with contextlib.suppress(OSError):
                os.fdatasync(self._fd)
            self._map.close()
            os.close(self._fd)
            if self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None


class SegmentReader:
    """Reads one writer's records in order across its segments; deletes what was delivered."""

    def __init__(self, directory: Path, writer_id: str) -> None:
        self.directory = directory
        self.writer_id = writer_id
        self.segment = 0
        self.offset = 0

    def read(self, max_bytes: int, writer_alive: bool) -> tuple[list[Entry], int]:
        """The next entries (about ``max_bytes``) and the position token to pass to ``advance``."""
        while True:
            numbers = [n for n in segments(self.directory, self.writer_id) if n >= self.segment]
            if not numbers:
                return [], 0
            if self.segment not in numbers:
                self.segment, self.offset = numbers[0], 0
            path = segment_path(self.directory, self.writer_id, self.segment)
            try:
                with open(path, "rb") as fh:
                    fh.seek(self.offset)
                    data = fh.read(max_bytes)
                    if len(data) == max_bytes:
                        data += _rest_of_frame(fh, data)
            except FileNotFoundError:
                continue
            entries, used = decode(data)
            if entries:
                return entries, used
            newer = len(numbers) > 1
            if newer or not writer_alive:
                # This segment is complete (the writer moved on, or is gone): drop it.
                path.unlink(missing_ok=True)
                if not newer:
                    return [], 0
                self.segment, self.offset = numbers[1], 0
                continue
            return [], 0

    def advance(self, used: int) -> None:
        self.offset += used


def _rest_of_frame(fh: Any, data: bytes) -> bytes:
    """Enough more bytes that a frame cut by the read size is whole."""
    _entries, used = decode(data)
    tail = data[used:]
    if len(tail) < _HEADER.size:
        more = fh.read(_HEADER.size - len(tail))
        tail += more
        extra = more
    else:
        extra = b""
    if len(tail) >= _HEADER.size:
        length, _crc = _HEADER.unpack_from(tail, 0)
        need = _HEADER.size + length - len(tail)
        if need > 0:
            extra += fh.read(need)
    return bytes(extra)
