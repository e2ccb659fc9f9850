"""The local spool: an append-only file per writer that every audit record passes through.

The caller's thread appends the operation's facts (one framed ``marshal`` tuple, a
single ``write(2)``) before the operation returns, so a killed process loses nothing:
the bytes are in the kernel and the next process delivers them. A background thread
reads them back, chains them and hands them to the sink, then acknowledges; once
everything written is delivered the file is truncated. While the sink is down the
file simply grows (up to ``max_bytes``), and it drains in order when the sink returns.

Durability against a power loss needs ``fdatasync``. Strict operations wait for it
(group commit: one sync covers every record written before it started, so concurrent
callers share it); other records are synced by the background thread within one
flush interval.

A live writer holds an exclusive ``flock`` on its file; a file nobody holds belongs to
a writer that died, and any new writer may take it over and deliver it (``orphans``).

Frame: ``u32 length | u32 crc32(payload) | payload``, payload ``marshal((seq, *fields))``.
A torn tail (a crash mid-write) fails its CRC and ends the readable part of the file.
"""

from __future__ import annotations

import fcntl
import marshal
import os
import struct
import threading
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kmsguard.errors import AuditUnavailable

_HEADER = struct.Struct(">II")
SUFFIX = ".spool"
Entry = tuple[int, tuple[Any, ...]]


class SpoolFull(AuditUnavailable):
    """The spool reached its size limit (the sink has been down too long)."""

    default_message = "the audit spool is full; the audit sink has been unavailable too long"


def decode(data: bytes) -> tuple[list[Entry], int]:
    """Every whole, intact frame in ``data`` and the number of bytes they take."""
    out: list[Entry] = []
    pos, size = 0, len(data)
    while pos + _HEADER.size <= size:
        length, crc = _HEADER.unpack_from(data, pos)
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


class Spool:
    """One writer's spool file. ``append`` is called from any thread; the rest from the writer thread."""

    def __init__(self, directory: Path, writer_id: str, max_bytes: int) -> None:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.path = directory / f"{writer_id}{SUFFIX}"
        self.max_bytes = max_bytes
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self._lock = threading.Lock()
        self.seq = 0  # last sequence number written
        self.end = 0  # bytes in the file
        self.read_offset = 0  # bytes delivered (everything before it may be dropped)
        self._written = 0  # bytes ever written: the group-commit clock (never reset)
        self._synced = 0
        self._sync_cond = threading.Condition()
        self._syncing = False

    # ------------------------------------------------------------------ caller side

    def append(self, fields: tuple[Any, ...], durable: bool) -> int:
        """Write one record; with ``durable``, return only once it is on disk. Returns its seq.

        Raises SpoolFull or AuditUnavailable (an OSError writing or syncing).
        """
        with self._lock:
            seq = self.seq + 1
            payload = marshal.dumps((seq, *fields))
            frame = _HEADER.pack(len(payload), zlib.crc32(payload)) + payload
            if self.end + len(frame) > self.max_bytes:
                raise SpoolFull()
            try:
                os.write(self._fd, frame)
            except OSError:
                raise AuditUnavailable("the audit spool cannot be written") from None
            self.seq = seq
            self.end += len(frame)
            self._written += len(frame)
            mark = self._written
        if durable:
            self.sync(mark)
        return seq

    def sync(self, mark: int | None = None) -> None:
        """Make every byte written up to ``mark`` (default: all so far) durable; one sync serves many callers."""
        target = self._written if mark is None else mark
        with self._sync_cond:
            while self._synced < target:
                if self._syncing:
                    self._sync_cond.wait()
                    continue
                self._syncing = True
                upto = self._written
                self._sync_cond.release()
                try:
                    os.fdatasync(self._fd)
                except OSError:
                    raise AuditUnavailable("the audit spool cannot be synced to disk") from None
                finally:
                    self._sync_cond.acquire()
                    self._syncing = False
                    self._sync_cond.notify_all()
                self._synced = max(self._synced, upto)

    # ------------------------------------------------------------------ writer-thread side

    def pending(self) -> int:
        return self.end - self.read_offset

    def read(self, max_bytes: int) -> tuple[list[Entry], int]:
        """Undelivered entries (at most about ``max_bytes``) and the offset just past them."""
        upto = min(self.end, self.read_offset + max_bytes)
        data = os.pread(self._fd, upto - self.read_offset, self.read_offset)
        entries, used = decode(data)
        if not entries and self.end > self.read_offset:
            # One frame larger than max_bytes: read exactly it.
            (length, _crc) = _HEADER.unpack(os.pread(self._fd, _HEADER.size, self.read_offset))
            entries, used = decode(os.pread(self._fd, _HEADER.size + length, self.read_offset))
        return entries, self.read_offset + used

    def ack(self, offset: int) -> None:
        """Everything before ``offset`` reached the sink; empty the file once all of it has."""
        with self._lock:
            self.read_offset = offset
            if offset == self.end and offset > 0:
                os.ftruncate(self._fd, 0)
                self.end = self.read_offset = 0

    def close(self, remove: bool) -> None:
        with self._lock:
            if remove:
                self.path.unlink(missing_ok=True)
            os.close(self._fd)


class Orphan:
    """The spool file of a writer that died, locked by us while we deliver it."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self.writer_id = path.name.removesuffix(SUFFIX)
        self._fd = fd

    def entries(self) -> list[Entry]:
        size = os.fstat(self._fd).st_size
        return decode(os.pread(self._fd, size, 0))[0]

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
        os.close(self._fd)

    def release(self) -> None:
        os.close(self._fd)


def orphans(directory: Path, own: Path) -> Iterator[Orphan]:
    """Spool files in ``directory`` that no live writer holds."""
    if not directory.is_dir():
        return
    for path in sorted(directory.glob(f"*{SUFFIX}")):
        if path == own:
            continue
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)  # a live writer holds it
            continue
        if not path.exists():  # delivered and removed by another process between glob and lock
            os.close(fd)
            continue
        yield Orphan(path, fd)
