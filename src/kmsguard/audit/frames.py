"""Where the spool's next frame goes, and the compact frame that records most operations.

Every frame is ``u32 length | u32 check | payload`` (big-endian), written payload
first and header last, so a reader, or a process killed mid-write, sees a whole frame
or none (see spool.py). Three kinds:

* a **record**: payload ``marshal((seq, *facts))`` (kmsguard.audit.facts.Spooled),
  check its CRC-32 (spool.py): a strict operation, or the first of its kind;
* a **template**: payload ``marshal(("T", template_id, shape, request_prefix))``,
  check its CRC-32, no sequence number. ``shape`` is what every operation of one kind
  shares (kmsguard.operation.EventKind.shape: operation, classification, keys,
  principal, outcome, KMS calls, cache hit, context...). It is written into a segment
  before the first hit frame of that segment that names it, so each segment reads on
  its own;
* a **hit** (a compact record): ``length`` is ``HIT_FLAG | 48`` and the payload six
  u64: seq, template id, start time (microseconds since the epoch), duration
  (nanoseconds), size, request number (the ``_AT_*`` offsets below); the check is
  :func:`hit_check` of the six. The last four are one run item (record.RUN_ITEM).
  Guard's plans' lanes (kmsguard.plans) record cache hits this way, and the audit writer
  every other non-strict operation whose kind it has seen before.

:meth:`Frames.hit` writes a hit frame with no Python in between: compiled (Cython,
``frames.pxd``), it is a few dozen C stores under the Frames' spin lock. That is the whole audit cost
of a cache hit in the caller's thread; the deliverer expands the frame into the same
record the full path would have spooled.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

from kmsguard.errors import AuditUnavailable
from kmsguard.fastpath import HitSink, Mutexed, _plain_free, _plain_hold, _plain_lookup, _plain_new_mutex

#: True when this module runs compiled.
COMPILED = not __file__.endswith(".py")
# Compiled, C functions from kmsguard/fastpath.pxd; interpreted, these stand-ins.
globals().update(_hold=_plain_hold, _free=_plain_free, _new_mutex=_plain_new_mutex, _lookup=_plain_lookup)
HIT_FLAG = 0x80000000
HIT_PAYLOAD = 48
HIT_FRAME = 8 + HIT_PAYLOAD
# Byte offsets of a hit frame's fields (FORMAT.md, "Hit frame"); _AT_ITEM starts the
# _ITEM bytes that are one run item (record.RUN_ITEM), as a stored run keeps them.
_AT_CHECK = 4
_AT_SEQ = 8
_AT_TEMPLATE = 16
_AT_STARTED = _AT_ITEM = 24
_AT_DURATION = 32
_AT_SIZE = 40
_AT_REQUEST = 48
_ITEM = 32
#: What Frames.hit returns when it wrote nothing (sequence numbers start at 1).
NOT_WRITTEN = 0
TEMPLATE = "T"
_M64 = 0xFFFFFFFFFFFFFFFF
_M32 = 0xFFFFFFFF
_FNV_OFFSET = 0xCBF29CE484222325
_FNV_PRIME = 0x100000001B3
# C copies of the constants for hit() (frames.pxd), which must not box a number to compare it.
_FRAME = HIT_FRAME
_HEADER_WORD = HIT_FLAG | HIT_PAYLOAD
_NOT_WRITTEN = NOT_WRITTEN
#: HitWriter.last before any kind (an object no caller's kind is).
_NO_KIND = (object(), None, 0)


def hit_check(seq: int, template: int, started: int, duration: int, size: int, request: int) -> int:
    """FNV-1a over the six values, 32 bits: catches a torn or stale hit frame (as CRC-32 does a record's)."""
    h = _FNV_OFFSET
    h = ((h ^ seq) * _FNV_PRIME) & _M64
    h = ((h ^ template) * _FNV_PRIME) & _M64
    h = ((h ^ started) * _FNV_PRIME) & _M64
    h = ((h ^ duration) * _FNV_PRIME) & _M64
    h = ((h ^ size) * _FNV_PRIME) & _M64
    h = ((h ^ request) * _FNV_PRIME) & _M64
    return h & _M32


def _put(view: Any, at: int, value: int, width: int) -> None:
    view[at : at + width] = value.to_bytes(width, "big")


# Compiled, _put64/_put32 and _get64/_get32 are single big-endian word stores and loads,
# and _copy a memcpy (frames.pxd); interpreted, these stand-ins. Set through globals()
# because Cython would compile a def of the same name.
globals()["_put64"] = lambda view, at, value: _put(view, at, value, 8)
globals()["_put32"] = lambda view, at, value: _put(view, at, value, 4)
globals()["_get64"] = lambda view, at: int.from_bytes(view[at : at + 8], "big")
globals()["_get32"] = lambda view, at: int.from_bytes(view[at : at + 4], "big")
globals()["_copy"] = lambda out, to, view, at, n: out.__setitem__(slice(to, to + n), view[at : at + n])


def take_hits(data: bytes, pos: int, seq: int, template: int, limit: int) -> tuple[int, bytes, int]:
    """The intact hit frames at ``pos`` in ``data`` that are numbered ``seq``, ``seq + 1``...
    and name ``template``, at most ``limit``: (how many, their items, the latest start).

    The items are what a stored run keeps per record (kmsguard.audit.record.RUN_ITEM):
    each frame's start, duration, size and request number, as the frame has them. The
    deliverer's reader takes a cache-hit loop's frames thousands at a time this way.
    """
    view = data  # compiled: a pointer into the bytes, no buffer to acquire
    size = len(data)
    room = min(limit, (size - pos) // _FRAME) if size > pos else 0
    count = 0
    latest = 0
    at = pos
    while count < room:
        if _get32(view, at) != _HEADER_WORD:  # type: ignore[name-defined]  # noqa: F821
            break
        number = _get64(view, at + _AT_SEQ)  # type: ignore[name-defined]  # noqa: F821
        named = _get64(view, at + _AT_TEMPLATE)  # type: ignore[name-defined]  # noqa: F821
        if number != seq + count or named != template:
            break
        started = _get64(view, at + _AT_STARTED)  # type: ignore[name-defined]  # noqa: F821
        duration = _get64(view, at + _AT_DURATION)  # type: ignore[name-defined]  # noqa: F821
        nbytes = _get64(view, at + _AT_SIZE)  # type: ignore[name-defined]  # noqa: F821
        request = _get64(view, at + _AT_REQUEST)  # type: ignore[name-defined]  # noqa: F821
        if hit_check(number, named, started, duration, nbytes, request) != _get32(view, at + _AT_CHECK):  # type: ignore[name-defined]  # noqa: F821
            break
        if started > latest:
            latest = started
        count += 1
        at += _FRAME
    if count < 2:  # a lone hit (kinds taking turns): no buffer to build
        return count, data[pos + _AT_ITEM : pos + _AT_ITEM + _ITEM * count], latest
    out = bytearray(count * _ITEM)
    for k in range(count):
        _copy(out, k * _ITEM, view, pos + k * _FRAME + _AT_ITEM, _ITEM)  # type: ignore[name-defined]  # noqa: F821
    return count, bytes(out), latest


class Frames(Mutexed):
    """The write position in the current segment's memory map, shared by spool.py and hits.

    spool.py changes these fields only under its lock and with ``busy`` set (see
    :meth:`exclusive`); ``limit`` is the value of ``written`` past which the spool is
    full, ``emitted`` the template ids already written into the current segment.

    :meth:`hit` reads ``busy`` and writes its frame under this object's own lock
    (kmsguard.fastpath.Mutexed: a spin lock held for a few C stores when compiled, a
    threading.Lock as plain Python), never the spool's; spool.py sets and clears ``busy``
    under it too (:meth:`enter`, :meth:`leave`), so a hit runs entirely before or after
    spool.py's change. While spool.py is busy a hit steps aside (returns 0) and the caller
    takes the spool's lock instead.
    """

    def __init__(self, lock: threading.Lock, segment_bytes: int, limit: int) -> None:
        _new_mutex(self)  # type: ignore[name-defined]  # noqa: F821
        self.lock = lock
        self.size = segment_bytes
        self.limit = limit
        self.pos = 0
        self.seq = 0
        self.written = 0
        self.busy = False
        self.closed = False
        self.emitted: set[int] = set()
        #: A template id known to be in ``emitted`` (0: none, ids start at 1), so a loop of one kind skips the set.
        self.last_emitted = 0
        self.view: Any = None

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[Frames]:
        """The lock, and no hit written until it is released: for spool.py's multi-step changes."""
        with self.lock:
            self.enter()
            try:
                yield self
            finally:
                self.leave()

    def enter(self) -> None:
        """Hits step aside from now on (the caller holds ``lock``)."""
        _hold(self)  # type: ignore[name-defined]  # noqa: F821
        self.busy = True
        _free(self)  # type: ignore[name-defined]  # noqa: F821

    def leave(self) -> None:
        """Hits write again, unless closed (the caller holds ``lock``)."""
        _hold(self)  # type: ignore[name-defined]  # noqa: F821
        self.busy = self.closed
        _free(self)  # type: ignore[name-defined]  # noqa: F821

    def attach(self, mapped: Any) -> None:
        """Write into ``mapped`` (a new segment) from its start. Exclusive."""
        if len(mapped) < self.size:  # hits write anywhere below size, unchecked when compiled
            raise AuditUnavailable("a spool segment's map is smaller than the segment size")
        self.view = mapped if COMPILED else memoryview(mapped).cast("B")
        self.pos = 0
        self.emitted = set()
        self.last_emitted = 0

    def detach(self) -> None:
        """Let go of the map (it cannot be closed while a view of it exists). Exclusive."""
        self.view = None

    def close(self) -> None:
        """No more frames: hits step aside for good (to a slow path that refuses). Under the lock."""
        _hold(self)  # type: ignore[name-defined]  # noqa: F821
        self.closed = self.busy = True
        _free(self)  # type: ignore[name-defined]  # noqa: F821
        self.view = None

    def renew_lock(self) -> None:
        """In a forked child: a lock no thread holds (the parent's may have been held at the fork)."""
        _new_mutex(self)  # type: ignore[name-defined]  # noqa: F821

    def hit(self, template: int, started: int, duration: int, size: int, request: int) -> int:
        """Append a hit frame and return its seq; or return NOT_WRITTEN, and the caller takes
        spool.py's slow path (Spool.hit), which finds out why: spool.py is busy, the
        template is not in this segment yet, the segment has no room left, or the spool
        is full (which Spool.hit raises as SpoolFull)."""
        _hold(self)  # type: ignore[name-defined]  # noqa: F821
        try:
            return _NOT_WRITTEN if self.busy else self._hit(template, started, duration, size, request)
        finally:
            _free(self)  # type: ignore[name-defined]  # noqa: F821

    def write_hit(self, template: int, started: int, duration: int, size: int, request: int) -> int:
        """:meth:`hit` for spool.py, which holds the spool exclusively."""
        return self._hit(template, started, duration, size, request)

    def _hit(self, template: int, started: int, duration: int, size: int, request: int) -> int:
        if self.closed:  # no map to write into
            return _NOT_WRITTEN
        if template != self.last_emitted:
            if template not in self.emitted:
                return _NOT_WRITTEN
            self.last_emitted = template
        pos = self.pos
        if pos + _FRAME > self.size or self.written + _FRAME > self.limit:
            return _NOT_WRITTEN
        seq = self.seq + 1
        view = self.view
        _put64(view, pos + _AT_SEQ, seq)  # type: ignore[name-defined]  # noqa: F821
        _put64(view, pos + _AT_TEMPLATE, template)  # type: ignore[name-defined]  # noqa: F821
        _put64(view, pos + _AT_STARTED, started)  # type: ignore[name-defined]  # noqa: F821
        _put64(view, pos + _AT_DURATION, duration)  # type: ignore[name-defined]  # noqa: F821
        _put64(view, pos + _AT_SIZE, size)  # type: ignore[name-defined]  # noqa: F821
        _put64(view, pos + _AT_REQUEST, request)  # type: ignore[name-defined]  # noqa: F821
        check = hit_check(seq, template, started, duration, size, request)
        _put32(view, pos + _AT_CHECK, check)  # type: ignore[name-defined]  # noqa: F821
        _put32(view, pos, _HEADER_WORD)  # type: ignore[name-defined]  # noqa: F821  # last: now the frame exists
        self.pos = pos + _FRAME
        self.seq = seq
        self.written += _FRAME
        return seq


class CallerKind(NamedTuple):
    """A kind of operation (an EventKind or a shape) under a caller's own request id.

    Its hits get a template of their own whose prefix is that id, and request number 0
    (FORMAT.md, "Hit frame"): every record of the kind in that request carries the id.
    """

    kind: object
    request_id: str


class HitWriter(HitSink):
    """The audit side of a cache hit: a hit frame, or the spool's slow path when it cannot.

    ``templates`` maps an EventKind (or a shape) to its template id once the spool has one for it;
    ``slow(kind, started, duration, size, request)`` handles everything else (a new
    kind, a template to write into a new segment, a segment to start, a full spool).

    Each hit comes with its request (kmsguard.plans reads it once for every sink): a
    number, or, for a caller's own id, number 0 and that id, recorded as a
    :class:`CallerKind` of the kind.

    ``last`` is the last (kind, caller's id or None, template id) found: a loop of one kind
    skips the dictionary. The slow path may give a kind another id, so it forgets it.
    ``last`` and the three targets (which :meth:`retarget` replaces in a forked child) are
    read and replaced under the writer's lock, as every thread's hits read them.
    """

    def __init__(
        self,
        frames: Frames,
        templates: dict[object, int],
        slow: Callable[[object, int, int, int, int], None],
    ) -> None:
        _new_mutex(self)  # type: ignore[name-defined]  # noqa: F821
        self.frames = frames
        self.templates = templates
        self.slow = slow
        self.last: tuple[Any, Any, int] = _NO_KIND

    def retarget(
        self, frames: Frames, templates: dict[object, int], slow: Callable[[object, int, int, int, int], None]
    ) -> None:
        """Write hits from now on through ``frames``, ``templates`` and ``slow`` (another spool's)."""
        _hold(self)  # type: ignore[name-defined]  # noqa: F821
        old = (self.frames, self.templates, self.slow, self.last)  # dropped after the lock is let go
        self.frames, self.templates, self.slow, self.last = frames, templates, slow, _NO_KIND
        _free(self)  # type: ignore[name-defined]  # noqa: F821
        del old

    def record(self, kind: Any, started: float, duration: float, size: int, request: int, caller_id: Any) -> None:
        at = int(started * 1e6)
        took = int(duration * 1e9)
        _hold(self)  # type: ignore[name-defined]  # noqa: F821
        last = self.last
        frames = self.frames
        _free(self)  # type: ignore[name-defined]  # noqa: F821
        if last[0] is kind and last[1] is caller_id:
            template = last[2]
        else:
            key = kind if caller_id is None else CallerKind(kind, caller_id)
            _hold(self)  # type: ignore[name-defined]  # noqa: F821
            templates = self.templates
            _free(self)  # type: ignore[name-defined]  # noqa: F821
            found = _lookup(templates, key)  # type: ignore[name-defined]  # noqa: F821
            if found is None:
                self._slow(key, at, took, size, request)
                return
            template = found
            self._remember((kind, caller_id, template))
        if frames.hit(template, at, took, size, request) == _NOT_WRITTEN:
            self._remember(_NO_KIND)
            self._slow(kind if caller_id is None else CallerKind(kind, caller_id), at, took, size, request)

    def _remember(self, last: tuple[Any, Any, int]) -> None:
        _hold(self)  # type: ignore[name-defined]  # noqa: F821
        old = self.last  # dropped after the lock is let go
        self.last = last
        _free(self)  # type: ignore[name-defined]  # noqa: F821
        del old

    def _slow(self, key: object, at: int, took: int, size: int, request: int) -> None:
        _hold(self)  # type: ignore[name-defined]  # noqa: F821
        slow = self.slow
        _free(self)  # type: ignore[name-defined]  # noqa: F821
        slow(key, at, took, size, request)
