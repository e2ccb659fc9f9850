"""The local spool: append-only segment files per writer that every audit record passes through.

The caller's thread appends the operation's facts (a frame, copied into a shared memory
map of the segment file) before the operation returns, so a killed process loses
nothing: the bytes are in the kernel's page cache, and a deliverer takes them to the
sink. While the sink is down the segments simply accumulate (up to ``max_bytes``) and
drain in order when it returns. The writer only ever appends to its newest segment; the
deliverer deletes a segment once it is delivered and a newer one exists, so the two
never race on a file.

Durability against a power loss needs ``fdatasync``. Strict operations wait for it
(group commit: one sync covers every record written before it started, so concurrent
callers share it); other records are synced by the writer's timer within one flush
interval.

A live writer holds an exclusive ``flock`` on ``<writer>.lock``; segments whose lock
nobody holds belong to a writer that died or closed, and any deliverer may claim and
deliver them (``claim_orphans``).

Files: ``<writer>.lock``, ``<writer>.<segment:08d>.spool`` (preallocated) and
``.<writer>.spare`` (the next segment, prepared ahead). Frame:
``u32 length | u32 check | payload``: a record (``marshal((seq, *facts))``), a
template, or a compact hit frame naming a template (FORMAT.md and frames.py document all three). A
torn tail (a crash mid-write) fails its check and ends the readable part of a segment,
as a zero length does (the unwritten rest of a preallocated segment).
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
import weakref
import zlib
from pathlib import Path
from typing import Any, BinaryIO

from kmsguard.audit.facts import Hits, Shape, Spooled, Template
from kmsguard.audit.frames import HIT_FLAG, HIT_FRAME, HIT_PAYLOAD, TEMPLATE, Frames, take_hits
from kmsguard.audit.record import MAX_RUN
from kmsguard.errors import AuditUnavailable

_HEADER = struct.Struct(">II")
_SEGMENT_RE = re.compile(r"(.+)\.(\d{8})\.spool")
LOCK_SUFFIX = ".lock"
_HIT_NAMES = struct.Struct(">QQ")  # a hit frame's seq and template id
#: (seq, a record's facts, or a run of hit frames of one template).
Entry = tuple[int, Spooled | Hits]
#: The templates of a segment by id (see frames.py).
Templates = dict[int, Template]


class SpoolFull(AuditUnavailable):
    """The spool reached its size limit: the sink is down, or slower than the writer (see AuditObserver._with_room)."""

    default_message = "the audit spool is full; the audit sink has been unavailable too long"


class NotDurable(AuditUnavailable):
    """What was written could not be synced to disk: it is in the spool, but not durably."""

    default_message = "the audit spool cannot be synced to disk"


def decode(data: bytes, templates: Templates) -> tuple[list[Entry], int]:
    """Every whole, intact record at the start of ``data`` and the number of bytes they take.

    Template frames go into ``templates`` (the reader's, per segment); hit frames come
    out as Hits naming their template, consecutive ones of one template as one Hits (up
    to MAX_RUN), taken in compiled code.
    """
    out: list[Entry] = []
    pos, size = 0, len(data)
    while pos + _HEADER.size <= size:
        length, check = _HEADER.unpack_from(data, pos)
        if length == 0:
            break  # the unwritten (zeroed) rest of a segment
        if length & HIT_FLAG:
            if length != HIT_FLAG | HIT_PAYLOAD or pos + HIT_FRAME > size:
                break
            seq, template = _HIT_NAMES.unpack_from(data, pos + _HEADER.size)
            known = templates.get(template)
            if known is None:
                break
            # The frames' checks are take_hits' (compiled): this one and any that follow it.
            count, items, latest = take_hits(data, pos, seq, template, MAX_RUN)
            if count == 0:
                break
            out.append((seq, Hits(known, items, latest)))
            pos += count * HIT_FRAME
            continue
        end = pos + _HEADER.size + length
        if end > size:
            break
        payload = data[pos + _HEADER.size : end]
        if zlib.crc32(payload) != check:
            break
        item = marshal.loads(payload)  # noqa: S302 - our own 0600 file, CRC-checked
        if item[0] == TEMPLATE:
            templates[item[1]] = Template(_shape_of(tuple(item[2])), item[3])
        else:
            out.append((item[0], Spooled._make(item[1:])))
        pos = end
    return out, pos


def _shape_of(shape: tuple[Any, ...]) -> Shape:
    """A template's shape; one written by release 0.1.0's first spools held six fields
    (no outcome, error, KMS calls or cache hit: it was always a successful cache hit)."""
    if len(shape) == 6:
        operation, classification, key_refs, regions, principal, context = shape
        return Shape(operation, classification, key_refs, regions, principal, outcome="ok", error_code=None,
                     kms_calls=0, cache_hit=True, context=context)
    return Shape._make(shape)


def segment_path(directory: Path, writer_id: str, number: int) -> Path:
    return directory / f"{writer_id}.{number:08d}.spool"


def spare_path(directory: Path, writer_id: str) -> Path:
    """The next segment being prepared (see Spool); hidden, so no reader takes it for a segment."""
    return directory / f".{writer_id}.spare"


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
    spare_path(directory, writer_id).unlink(missing_ok=True)  # left by a writer that died
    (directory / f"{writer_id}{LOCK_SUFFIX}").unlink(missing_ok=True)
    os.close(lock_fd)


#: Every live spool. A forked child inherits their shared maps and would write over its
#: parent's records, so in the child they all refuse (build a Guard after a fork).
_open_spools: weakref.WeakSet[Spool] = weakref.WeakSet()


def _close_in_child() -> None:
    """In a forked child: every inherited spool refuses from now on, and is never a deadlock.

    Another thread of the parent may have held a spool's lock at the moment of the fork;
    that thread does not exist in the child, so the lock would never be released, and the
    child's first record (or its atexit close) would wait forever. The child gets fresh
    locks, taken by nobody, before anything can touch them.
    """
    for spool in list(_open_spools):
        spool._lock = spool.frames.lock = threading.Lock()
        spool.frames.renew_lock()
        spool._sync_cond = threading.Condition()
        spool._syncing = False
        spool.frames.close()


os.register_at_fork(after_in_child=_close_in_child)


class Spool:
    """One writer's appending side. ``append`` is called from any thread.

    Segments are preallocated (written full of zeros, so a full disk fails at rotation, not
    as a SIGBUS mid-write) and memory-mapped shared: an append is a copy into the page
    cache, with no system call, and a killed process leaves its bytes behind for the
    deliverer exactly as a ``write(2)`` would. The payload is copied before its header,
    so a reader (or a crash) sees a whole frame or none; a zero header ends a segment.

    The next segment is prepared ahead by a thread of its own, as the hidden file
    ``.<writer>.spare``: filling and syncing 4 MiB takes milliseconds, which the caller
    whose record fills a segment would otherwise wait out. Rotating renames the spare
    into place; the directory entry is synced by the next :meth:`sync`.
    """

    def __init__(self, directory: Path, writer_id: str, max_bytes: int, segment_bytes: int = 4 << 20) -> None:
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
        #: Position, last seq and bytes ever written (the group-commit clock), shared with hits.
        self.frames = Frames(self._lock, self.segment_bytes, max_bytes)
        self.segment = 1
        try:
            self._fd, self._map = self._create(segment_path(directory, writer_id, self.segment))
        except OSError:
            os.close(self._lock_fd)
            raise AuditUnavailable(f"cannot create the audit spool in {directory}") from None
        self.frames.attach(self._map)
        self._unsynced: list[int] = []  # descriptors of full segments not yet synced
        _open_spools.add(self)
        self.on_disk = 0  # undelivered bytes when last measured
        self._written_at_measure = 0
        self._synced = 0
        self._sync_cond = threading.Condition()
        self._syncing = False
        self._renames = self._renames_synced = 0  # spares renamed into place; as of the last sync
        self._pid = os.getpid()
        self._spare: tuple[int, mmap.mmap] | None = None
        self._spare_wanted = threading.Event()
        self._spare_wanted.set()
        self._spare_maker = threading.Thread(target=self._make_spares, name="kmsguard-audit-spare", daemon=True)
        self._spare_maker.start()

    def _make_spares(self) -> None:
        """Keep one spare segment ready (see the class docstring) until the spool closes."""
        path = spare_path(self.directory, self.writer_id)
        while True:
            self._spare_wanted.wait()
            self._spare_wanted.clear()
            if self.frames.closed:
                return
            try:
                spare = self._create(path)
            except OSError:
                continue  # the rotation that needs it tries itself, and reports a failure
            with self._lock:
                if not self.frames.closed:
                    self._spare = spare
                    continue
            os.close(spare[0])
            spare[1].close()
            path.unlink(missing_ok=True)
            return

    def _create(self, path: Path) -> tuple[int, mmap.mmap]:
        """Create, allocate and map a segment file; its size and directory entry are made durable.

        The segment is written full of zeros rather than ``posix_fallocate``'d: both
        reserve the disk space, but a page of an allocated-but-unwritten extent costs a
        filesystem extent conversion the first time a record lands in it (about three
        times the page fault of a written page, measured), and that is on the caller's path.
        """
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            zeros, remaining = bytes(1 << 20), self.segment_bytes
            while remaining:
                remaining -= os.write(fd, zeros[:remaining])
            os.fsync(fd)
            self._sync_directory()
            return fd, mmap.mmap(fd, self.segment_bytes)
        except OSError:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise

    def _sync_directory(self) -> None:
        fd = os.open(self.directory, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    @property
    def seq(self) -> int:
        """The last sequence number written."""
        return self.frames.seq

    @property
    def written(self) -> int:
        return self.frames.written

    def append(self, facts: Spooled, durable: bool) -> int:
        """Write one record; with ``durable``, return only once it is on disk. Returns its seq.

        Raises SpoolFull or AuditUnavailable (no room for a segment, or a sync failed).
        """
        frames = self.frames
        with self._lock:  # frames.exclusive(), without a generator's cost on every full record
            frames.enter()
            try:
                seq = frames.seq + 1
                self._put(marshal.dumps((seq, *facts)))
                frames.seq = seq
                mark = frames.written
            finally:
                frames.leave()
        if durable:
            self.sync(mark)
        return seq

    def hit(self, template: int, shape: tuple[Any, ...], prefix: str, started: int, duration: int, size: int,
            request: int) -> int:
        """Write a hit frame (see frames.py) when Frames.hit could not: a template to write
        first, or a segment to start. Returns its seq; raises as :meth:`append` does."""
        with self.frames.exclusive() as frames:
            if frames.closed:
                raise AuditUnavailable("the audit spool is closed")
            while True:
                if frames.written + HIT_FRAME > frames.limit:
                    raise SpoolFull()
                seq = frames.write_hit(template, started, duration, size, request)
                if seq:
                    return seq
                # Not in this segment yet, or no room: the template first (starting the
                # next segment if the hit would not fit after it), then the hit.
                self._put(marshal.dumps((TEMPLATE, template, tuple(shape), prefix)), reserve=HIT_FRAME)
                frames.emitted.add(template)

    def _put(self, payload: bytes, reserve: int = 0) -> None:
        """Append one frame to the current segment, starting the next if it does not fit. Exclusive."""
        if self.frames.closed:
            raise AuditUnavailable("the audit spool is closed")
        frames = self.frames
        size = _HEADER.size + len(payload)
        if frames.written + size > frames.limit:
            raise SpoolFull()
        pos = frames.pos
        if pos + size + reserve > self.segment_bytes:
            if size + reserve > self.segment_bytes:
                raise AuditUnavailable("an audit record is larger than a spool segment")
            try:
                self._rotate()
            except OSError:
                raise AuditUnavailable("the audit spool cannot be written") from None
            pos = 0
        mapped = self._map
        mapped[pos + _HEADER.size : pos + size] = payload
        mapped[pos : pos + _HEADER.size] = _HEADER.pack(len(payload), zlib.crc32(payload))
        frames.pos = pos + size
        frames.written += size

    def _rotate(self) -> None:
        """Start the next segment (exclusive). The full one, and the new name in the directory,
        are synced by the next :meth:`sync` (the timer's, or a strict caller's), not here:
        the caller that fills a segment does not wait for the disk unless it asked to."""
        path = segment_path(self.directory, self.writer_id, self.segment + 1)
        if self._spare is not None:
            fd, mapped = self._spare
            self._spare = None
            os.rename(spare_path(self.directory, self.writer_id), path)
            self._renames += 1
        else:
            fd, mapped = self._create(path)
        self._spare_wanted.set()
        old_fd, old_map = self._fd, self._map
        self._fd, self._map = fd, mapped
        self.segment += 1
        self.frames.detach()
        self.frames.attach(mapped)
        old_map.close()  # its dirty pages stay in the page cache, for the sync of old_fd
        self._unsynced.append(old_fd)

    def sync(self, mark: int | None = None) -> None:
        """Make every byte written up to ``mark`` (default: all so far) durable; one sync serves many callers.

        ``fdatasync`` writes back the mapping's dirty pages too (Linux), and unlike
        ``mmap.flush`` it lets other threads run while it waits for the disk.
        """
        target = self.frames.written if mark is None else mark
        with self._sync_cond:
            while self._synced < target:
                if self._syncing:
                    self._sync_cond.wait()
                    continue
                self._syncing = True
                upto = self.frames.written
                self._sync_cond.release()
                try:
                    with self._lock:
                        full = list(self._unsynced)
                        fd = os.dup(self._fd)  # appends go on while it syncs
                        renames = self._renames
                    try:
                        for older in full:
                            os.fdatasync(older)
                        os.fdatasync(fd)
                        if renames > self._renames_synced:
                            self._sync_directory()
                            self._renames_synced = renames
                    finally:
                        os.close(fd)
                    with self._lock:
                        for older in full:
                            self._unsynced.remove(older)
                            os.close(older)
                except OSError:
                    raise NotDurable() from None
                finally:
                    self._sync_cond.acquire()
                    self._syncing = False
                    self._sync_cond.notify_all()
                self._synced = max(self._synced, upto)

    def pending_bytes(self) -> int:
        """Undelivered bytes, near enough: full older segments still on disk at the last measure, plus writes since."""
        return self.on_disk + self.frames.written - self._written_at_measure

    def measure(self) -> None:
        """Count the older segments still on disk (the deliverer deletes whole segments as it goes)."""
        with self.frames.exclusive():
            current, position, written = self.segment, self.frames.pos, self.frames.written
        older = sum(1 for n in segments(self.directory, self.writer_id) if n < current)
        with self.frames.exclusive():
            self.on_disk, self._written_at_measure = older * self.segment_bytes + position, written
            self.frames.limit = written + self.max_bytes - self.on_disk

    def close(self) -> None:
        """Stop appending and release the writer lock: the files are now anyone's to deliver."""
        with self._lock:
            self.frames.close()
            spare, self._spare = self._spare, None
        self._spare_wanted.set()
        if os.getpid() == self._pid:  # not in a forked child: the spare file is its parent's
            self._spare_maker.join(10.0)  # a spare being made; if the disk hangs, remove_writer cleans up
            spare_path(self.directory, self.writer_id).unlink(missing_ok=True)
        if spare is not None:
            os.close(spare[0])
            spare[1].close()
        with self._lock:
            for older in self._unsynced:
                with contextlib.suppress(OSError):
                    os.fdatasync(older)
                os.close(older)
            self._unsynced.clear()
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
        self.templates: Templates = {}  # of the current segment
        #: The last read reached what the writer had written so far (its newest segment's end).
        self.caught_up = False

    def read(self, max_bytes: int, writer_alive: bool) -> tuple[list[Entry], int]:
        """The next entries (about ``max_bytes``) and the position token to pass to ``advance``."""
        self.caught_up = True
        while True:
            numbers = [n for n in segments(self.directory, self.writer_id) if n >= self.segment]
            if not numbers:
                return [], 0
            if self.segment not in numbers:
                self.segment, self.offset, self.templates = numbers[0], 0, {}
            path = segment_path(self.directory, self.writer_id, self.segment)
            try:
                with open(path, "rb") as fh:
                    fh.seek(self.offset)
                    data = fh.read(max_bytes)
                    if len(data) == max_bytes:
                        data += _rest_of_frame(fh, data)
            except FileNotFoundError:
                continue
            entries, used = decode(data, self.templates)
            if entries:
                # A read ends on a whole frame (see _rest_of_frame), so decoding stops short
                # of its end only at the unwritten rest of the segment, or a frame being written.
                self.caught_up = used < len(data) and len(numbers) == 1
                return entries, used
            newer = len(numbers) > 1
            if newer or not writer_alive:
                # This segment is complete (the writer moved on, or is gone): drop it.
                path.unlink(missing_ok=True)
                if not newer:
                    return [], 0
                self.segment, self.offset, self.templates = numbers[1], 0, {}
                continue
            return [], 0

    def advance(self, used: int) -> None:
        self.offset += used


def _rest_of_frame(fh: BinaryIO, data: bytes) -> bytes:
    """Enough more bytes that a frame cut by the read size is whole (walks headers only)."""
    pos, size = 0, len(data)
    while True:
        if pos + _HEADER.size > size:
            header = data[pos:] + fh.read(pos + _HEADER.size - size)
            extra = header[size - pos :]
            if len(header) < _HEADER.size:
                return extra
            length, _check = _HEADER.unpack_from(header, 0)
            return extra + (fh.read(_frame_length(length)) if length else b"")
        length, _check = _HEADER.unpack_from(data, pos)
        if length == 0:
            return b""
        end = pos + _HEADER.size + _frame_length(length)
        if end > size:
            return bytes(fh.read(end - size))
        pos = end


def _frame_length(length: int) -> int:
    return HIT_PAYLOAD if length & HIT_FLAG else length
