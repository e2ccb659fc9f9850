"""AuditObserver: records every Guard operation, off the caller's path unless strict.

The caller's thread does the least that keeps the record safe: it appends the
operation's facts to this process's spool (a copy into a shared memory map of the spool
file, see spool.py) — for an operation of a kind seen before, a 56-byte frame naming a
template of what that kind shares (frames.py). Everything expensive — HMAC of context
values, the chain hash, serialization, the sink's transaction — is the deliverer's
(deliver.py), in a child process (``delivery = "process"``, the default) or a thread
(``"thread"``), which wakes every ``flush_interval`` and delivers what accumulated as
one batch.

Guarantees (documented in docs/audit.md):

- **non-strict** (default for general and pii): when an operation returns, its record
  is in the spool file in the kernel; a killed or crashed process loses nothing (the
  next writer to start delivers its spool). The spool is fsync'd at least every
  ``flush_interval``, so only an operating-system crash or power loss can lose records,
  at most that interval's worth.
- **strict** (default for payment, or ``[audit] strict = true``): the record is
  fsync'd to the spool before the operation returns (group commit: concurrent callers
  share one fsync). If it cannot be — disk full, spool over its limit after a long sink
  outage — the operation fails with AUDIT_UNAVAILABLE.
- **delivery**: records reach the sink in order, per writer, exactly once (idempotent
  inserts keyed by writer and sequence); a sink outage only delays them.
- **a full spool** (``max_spool_mb``): while the sink takes records, callers wait for
  the deliverer to make room, slowing to the sink's pace; only with the sink down are
  non-strict records dropped (counted) and strict operations refused.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import logging
import os
import re
import socket
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from kmsguard import operation
from kmsguard.audit.chain import AuditKeys
from kmsguard.audit.deliver import MAX_BACKOFF, Deliverer
from kmsguard.audit.facts import Spooled
from kmsguard.audit.frames import NOT_WRITTEN, CallerKind, HitWriter
from kmsguard.audit.record import CLOSE_OPERATION
from kmsguard.audit.sink import Sink
from kmsguard.audit.spool import NotDurable, Spool, SpoolFull, remove_writer, try_lock
from kmsguard.errors import AuditUnavailable
from kmsguard.fastpath import OperationEvent
from kmsguard.operation import EventKind
from kmsguard.telemetry import NULL_TELEMETRY, Telemetry

log = logging.getLogger("kmsguard.audit")
_HOST_RE = re.compile(r"[^A-Za-z0-9.-]+")
_MAX_TEMPLATES = 10_000
#: Seconds a full spool waits on a sink that reports healthy but delivers nothing.
_STALL = 10.0
#: Seconds between counts of the spool's files (see AuditObserver._tick).
_MEASURE_EVERY = 1.0
#: Seconds a closing writer gives its deliverer to finish before stopping it: at interpreter
#: exit the whole wait (every record is in the spool; a deliverer stuck on the network is killed).
EXIT_GRACE = 0.5
_BLOCKED_GRACE = 0.1
#: Every writer of this process, for the fork handler.
_live: weakref.WeakSet[AuditObserver] = weakref.WeakSet()


def new_writer_id() -> str:
    """``<host>-<pid>-<random>``: names the process in records; random because pids recur."""
    host = _HOST_RE.sub("-", socket.gethostname())[:40] or "host"
    return f"{host}-{os.getpid()}-{os.urandom(4).hex()}"


class AuditObserver:
    """An operation.Observer that writes hash-chained audit records to a sink."""

    def __init__(
        self,
        sink: Sink | None,
        keys: Callable[[], AuditKeys],
        spool_dir: Path,
        *,
        delivery: str = "thread",
        env: Mapping[str, str] | None = None,
        flush_interval: float = 0.2,
        max_spool_bytes: int = 256 << 20,
        principal: str = "unknown",
        telemetry: Telemetry = NULL_TELEMETRY,
        writer_id: str | None = None,
        close_timeout: float = 10.0,
    ) -> None:
        """``delivery = "process"`` runs the deliverer as a child built from ``env`` (the Settings' environment).

        ``keys`` is called by the thread deliverer when first needed (it may call KMS or
        the sink; a failure is a delivery delay, retried); ``sink`` is used only by the
        thread deliverer. The process deliverer starts with the first record, so a writer
        that records nothing costs no process.
        """
        self.writer_id = writer_id or new_writer_id()
        self.spool_dir = Path(spool_dir)
        self.flush_interval = flush_interval
        self.close_timeout = close_timeout
        self.principal = principal
        self.telemetry = telemetry
        self._spool = Spool(self.spool_dir, self.writer_id, max_spool_bytes)
        self._templates: dict[object, int] = {}  # EventKind (or CallerKind) -> its template id (see frames.py)
        self._seen: set[object] = set()  # shapes (or CallerKinds) spooled once in full (see _compact)
        self._template_ids = itertools.count(1)
        self._hits = HitWriter(self._spool.frames, self._templates, self._hit_slow)
        self.delivered_seq = 0
        self._delivered_at = time.monotonic()  # the deliverer's last progress (for the delivery lag)
        self._waiting_since: float | None = None  # since when records have been waiting
        self.dropped = 0
        self.sink_healthy = True
        #: Why the last delivery pass failed: "sink", "key" (no audit key yet), or None.
        self.blocked_on: str | None = None
        self.key_failures = 0
        self._done = threading.Condition()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._finishing = threading.Event()  # the spool is closed: the thread deliverer's last pass
        self._child_failures = 0
        self.closed = False
        #: Guards sharing this writer (see lifecycle.py); the last one's close() closes it.
        self.users = 1
        self._users_lock = threading.Lock()
        #: In a forked child: the writer that takes over this one's records (see _successor).
        self.rebuild: Callable[[], AuditObserver] | None = None
        self._inherited = False
        self._next: AuditObserver | None = None
        self._next_lock = threading.Lock()
        self._deliverer: Deliverer | None = None
        self.sink = sink
        self._keys = keys
        self._delivery = delivery
        self._child_env = {**os.environ, **(env or {})}
        self._child: subprocess.Popen[str] | None = None
        self._child_pipe = threading.Lock()  # one writer of the child's stdin at a time; its replacement
        self._thread: threading.Thread | None = None
        self._timer: threading.Thread | None = None
        self._start_lock = threading.Lock()
        _live.add(self)
        atexit.register(self._at_exit)
        if delivery == "thread":
            # A thread costs no process, and started now it obtains the audit key while
            # the first operation runs: a one-shot command then never waits for it.
            self._start()

    def _start(self) -> None:
        """Start the deliverer and the timer, once (on the first record, or at once for a thread)."""
        with self._start_lock:
            if self._thread is not None or self.closed or self._inherited:
                return  # an inherited writer's records are its successor's, or refused (no rebuild)
            if self._delivery == "process":
                self._child = self._spawn(self._child_env)
                target: Callable[[], None] = self._read_child
            else:
                assert self.sink is not None
                self._deliverer = Deliverer(
                    self.sink, self._keys, self.spool_dir, self.writer_id, on_progress=self._progress
                )
                target = self._run_thread
            self._thread = threading.Thread(target=target, name=f"kmsguard-audit-{self.writer_id}", daemon=True)
            self._thread.start()
            self._timer = threading.Thread(target=self._tick, name="kmsguard-audit-sync", daemon=True)
            self._timer.start()

    # ------------------------------------------------------------------ hot path

    def observe(self, event: OperationEvent) -> None:
        if self._thread is None:
            if self._inherited and self.rebuild is not None:
                self._successor().observe(event)
                return
            self._start()
        if not event.strict:
            shape = event.kind.shape
            kind = shape if event.caller_id is None else CallerKind(shape, event.caller_id)
            self._compact(kind, event.started_at, event.duration, event.size, event.request)
            return
        # Strict, in full: the record is synced before the operation returns, and a
        # refusal must be able to follow it.
        facts = Spooled.of(event.kind.shape, event.started_at, event.duration, event.size, event.request_id)
        try:
            self._with_room(self._spool.append, facts, True)
        except NotDurable:
            # The record is in the spool and may yet be delivered, but Guard refuses the
            # operation: follow it with the refusal (same request id), so the trail never
            # shows as done what the caller was told failed.
            if event.outcome == "ok":
                self._append_quietly(facts._replace(outcome="error", error_code=NotDurable.code))
            raise

    def _append_quietly(self, facts: Spooled) -> None:
        try:
            self._with_room(self._spool.append, facts, False)
        except AuditUnavailable:
            self._drop()

    def _with_room(self, write: Callable[..., int], *args: Any) -> int:
        """``write(*args)`` to the spool; while it is full but the sink is taking records,
        wait for the deliverer to make room instead of losing the record.

        A caller that outruns a working sink is slowed to the sink's pace; only a sink that
        is down (or delivery that makes no progress for ``_STALL`` seconds) lets SpoolFull
        through: the record is then dropped, or a strict operation refused.
        """
        while True:
            try:
                return write(*args)
            except SpoolFull:
                if not self._await_room():
                    raise

    def _await_room(self) -> bool:
        """Wait until the deliverer frees some of the spool; False if the sink is down or stalled."""
        written, delivered, progress_at = self._spool.written, self.delivered_seq, time.monotonic()
        while self.sink_healthy and not self._stopping.is_set():
            self._kick()
            with self._done:
                self._done.wait(0.01)  # woken by delivery progress
            self._spool.measure()
            if self._spool.frames.limit > written:
                return True
            if self.delivered_seq != delivered:
                delivered, progress_at = self.delivered_seq, time.monotonic()
            elif time.monotonic() - progress_at > _STALL:
                return False
        return False

    def hit_recorder(self) -> HitWriter:
        """Cache hits (kmsguard.operation.EventKind) as compact hit frames: see frames.py.

        Hits are never strict (Guard reports only non-strict operations this way), so a
        hit that cannot be spooled is dropped and counted, as a non-strict record is.
        """
        return self._hits

    def _compact(self, kind: object, started_at: float, duration: float, size: int, request: int) -> None:
        """A non-strict operation (its shape, or a CallerKind of it) as a hit frame, once its
        kind has been seen before.

        The first operation of a kind is spooled in full and only remembered: a kind that
        never recurs (a context value unique to each call, a caller's id unique to each
        request) would otherwise cost a template as well as a frame.
        """
        template = self._templates.get(kind)
        at, took = round(started_at * 1e6), round(duration * 1e9)
        if template is not None and self._spool.frames.hit(template, at, took, size, request) != NOT_WRITTEN:
            return
        if template is None and kind not in self._seen:
            if len(self._seen) >= _MAX_TEMPLATES:
                self._seen.clear()
            self._seen.add(kind)
            shape, prefix = _template_of(kind)
            request_id = operation.request_id_of(request) if request else prefix
            self._append_quietly(Spooled.of(shape, started_at, duration, size, request_id))
            return
        self._hit_slow(kind, at, took, size, request)

    def _hit_slow(self, kind: object, started: int, duration: int, size: int, request: int) -> None:
        """A template to write first (a new kind, or a new segment), a segment to start, or no room."""
        if self._thread is None:
            if self._inherited and self.rebuild is not None:
                self._successor()._hit_slow(kind, started, duration, size, request)
                return
            self._start()
        template = self._templates.get(kind)
        if template is None:
            template = next(self._template_ids)
        shape, prefix = _template_of(kind)
        try:
            self._with_room(self._spool.hit, template, shape, prefix, started, duration, size, request)
        except AuditUnavailable:
            self._drop()
            return
        if len(self._templates) >= _MAX_TEMPLATES:
            self._templates.clear()  # ids are never reused, so stale ones in the spool stay valid
        self._templates[kind] = template

    def _drop(self) -> None:
        self.dropped += 1
        if self.dropped == 1 or self.dropped % 10_000 == 0:
            log.error("audit spool unusable: %d non-strict records dropped so far", self.dropped)

    # ------------------------------------------------------------------ state

    @property
    def queue_depth(self) -> int:
        """Records written but not yet delivered to the sink."""
        return self._spool.seq - self.delivered_seq

    @property
    def spool_bytes(self) -> int:
        return self._spool.pending_bytes()

    @property
    def failures(self) -> int:
        return self._deliverer.failures if self._deliverer is not None else self._child_failures

    def _progress(self, seq: int) -> None:
        with self._done:
            self.delivered_seq = max(self.delivered_seq, seq)
            self._delivered_at = time.monotonic()
            self._done.notify_all()

    # ------------------------------------------------------------------ control

    def flush(self, timeout: float = 30.0, until_failing: bool = False) -> bool:
        """Deliver everything written so far; False if the sink did not take it within ``timeout``.

        With ``until_failing``, stop waiting as soon as delivery is failing (the sink down,
        or no audit key yet): what is spooled then waits for the deliverer's next try.
        """
        if self._inherited and self.rebuild is not None:
            return self._successor().flush(timeout, until_failing)
        target = self._spool.seq
        if self.delivered_seq >= target:
            return True
        self._start()
        if self._thread is None:
            return False  # closed, or inherited from a parent process
        deadline = time.monotonic() + timeout
        next_kick = 0.0
        while self.delivered_seq < target and self._thread.is_alive():
            if until_failing and self.blocked_on is not None:
                return False
            now = time.monotonic()
            if now >= deadline:
                return False
            if now >= next_kick:  # outside the condition: a write to the child's pipe may block
                self._kick()
                next_kick = now + 0.5
            with self._done:
                if self.delivered_seq < target:
                    self._done.wait(min(deadline - now, 0.05))
        return self.delivered_seq >= target

    def close(self, timeout: float | None = None) -> None:
        """One Guard is done with this writer: deliver what it wrote, waiting at most ``timeout``
        (default ``close_timeout``), and not at all while delivery is failing.

        The last Guard's close also ends the chain with a ``writer-closed`` record and
        stops the deliverer. What the sink did not take stays in the spool, which the next
        process that opens it delivers.
        """
        if self._inherited:
            if self._next is not None:
                self._next.close(timeout)
            return
        timeout = self.close_timeout if timeout is None else timeout
        with self._users_lock:
            if self.closed:
                return
            self.users -= 1
            last = self.users <= 0
            if last:
                self.closed = True
        if not last:
            self.flush(timeout, until_failing=True)
            return
        self._stop(timeout, deliver=True)

    def _at_exit(self) -> None:
        """At interpreter exit: every record is in the spool already, so exit waits on no sink
        and no key service, only for the deliverer to stop (within EXIT_GRACE)."""
        with self._users_lock:
            if self.closed or self._inherited:
                return
            self.closed = True
        self._stop(0.0, deliver=False)

    def _stop(self, timeout: float, deliver: bool) -> None:
        """Close the spool and stop the deliverer; waits for delivery up to ``timeout`` if ``deliver``."""
        deadline = time.monotonic() + timeout
        atexit.unregister(self._at_exit)
        if self._spool.seq:
            closed = Spooled(time=time.time(), operation=CLOSE_OPERATION, classification=None, key_refs=(), regions=(),
                             principal=self.principal, outcome="ok", error_code=None, duration=0.0, kms_calls=0,
                             cache_hit=None, size=0, request_id=None, context=())
            try:
                self._spool.append(closed, durable=True)
            except AuditUnavailable:
                log.error("audit: could not write the writer-closed record")
        if deliver and self._thread is not None:
            self.flush(max(0.0, deadline - time.monotonic()), until_failing=True)
        self._stopping.set()
        if self._timer is not None:
            self._timer.join(EXIT_GRACE)  # it syncs the local spool only
        self._spool.close()  # releases the writer lock: the deliverer may now remove the files
        # A deliverer of a writer that recorded nothing (it has only files to remove), or
        # whose last pass failed (it is likely inside another: a call to a key service
        # that does not answer), gets a moment, not the whole grace.
        stuck = self.blocked_on is not None or not self._spool.seq
        grace = _BLOCKED_GRACE if stuck else max(deadline - time.monotonic(), EXIT_GRACE)
        if self._thread is None:  # nothing was ever written: no deliverer to stop
            lock = try_lock(self.spool_dir, self.writer_id)
            if lock is not None:
                remove_writer(self.spool_dir, self.writer_id, lock)
            return
        if self._child is not None:
            self._close_stdin(self._child)  # end of file: the child delivers the rest if it can, and exits
            try:
                self._child.wait(grace)
            except subprocess.TimeoutExpired:
                self._child.kill()  # stuck on the network: its records stay spooled
                self._child.wait()
        else:
            self._finishing.set()  # the thread makes its last pass and closes the sink (_run_thread)
            self._wake.set()
        self._thread.join(grace if self._child is None else _BLOCKED_GRACE)  # the child's reports, once it ended
        waiting = self._spool.seq - self.delivered_seq
        if waiting > 0:
            log.warning(
                "audit: %d record(s) wait in the spool %s; the next process that opens it delivers them",
                waiting,
                self.spool_dir,
            )

    def _successor(self) -> AuditObserver:
        """In a forked child: this process's own writer (own spool and chain), made on first use.

        The Guards of the child still hold the parent's writer; its records go to the
        successor, and so do its cache hits (the HitWriter the plans hold is pointed at the
        successor's spool).
        """
        with self._next_lock:
            successor = self._next
            if successor is None or successor.closed:
                assert self.rebuild is not None
                successor = self._next = self.rebuild()
                self._hits.retarget(successor._spool.frames, successor._templates, successor._hit_slow)
            return successor

    def _forked(self) -> None:
        """In a forked child: this writer, its threads and its deliverer are the parent's.

        Locks another thread held at the fork would never be released here, so they are
        replaced; the parent's child process and pipes are let go without touching them.
        """
        self._inherited = True
        self._users_lock, self._next_lock, self._start_lock = threading.Lock(), threading.Lock(), threading.Lock()
        self._child_pipe, self._done = threading.Lock(), threading.Condition()
        self._thread = self._timer = None
        child, self._child = self._child, None
        if child is not None:
            child.returncode = 0  # not ours to wait for: Popen must not warn that it still runs
            for pipe in (child.stdin, child.stdout):  # no thread blocks holding their locks (_read_child)
                if pipe is not None:
                    with contextlib.suppress(OSError, ValueError):
                        pipe.close()
        atexit.unregister(self._at_exit)

    # ------------------------------------------------------------------ background

    def _kick(self) -> None:
        if self._child is not None:
            # A child that has exited (its pipe closed) is restarted by _read_child.
            with self._child_pipe, contextlib.suppress(OSError, ValueError):
                assert self._child.stdin is not None
                self._child.stdin.write("flush\n")
                self._child.stdin.flush()
        else:
            self._wake.set()

    def _tick(self) -> None:
        """Sync the spool every interval (the non-strict durability bound) and report levels.

        The spool is measured (a listing of its directory) once a second, not every
        interval: the level serves only the gauges and the full-spool check, and this
        thread's Python competes with the application's for the GIL. Between measures
        the level is an estimate that can only be high, and a spool that seems full is
        measured at once (_await_room).
        """
        ticks = 0
        every = max(1, round(_MEASURE_EVERY / self.flush_interval))
        while not self._stopping.wait(self.flush_interval):
            try:
                self._spool.sync()
            except AuditUnavailable:
                log.error("audit: the spool cannot be synced to disk")
            ticks += 1
            if ticks % every == 0:
                self._spool.measure()
            self.telemetry.gauge("audit_queue_depth", self.queue_depth)
            self.telemetry.gauge("audit_spool_bytes", self.spool_bytes)
            self.telemetry.gauge("audit_delivery_lag_seconds", self.delivery_lag())
            self.telemetry.gauge("audit_dropped_records", self.dropped)
            self.telemetry.gauge("audit_key_failures", self.key_failures)

    def delivery_lag(self) -> float:
        """Seconds records have waited with no delivery progress (0 when none wait): a stalled sink's clock.

        A sink taking records keeps this near the flush interval however deep the
        queue; one that is down makes it grow from the moment records began to wait.
        """
        now = time.monotonic()
        if self.queue_depth <= 0:
            self._waiting_since = None
            return 0.0
        if self._waiting_since is None:
            self._waiting_since = now
        return now - max(self._waiting_since, self._delivered_at)

    def _run_thread(self) -> None:
        """Deliver every interval (or when kicked), backing off while delivery fails; once
        the spool is closed (_stop), one last pass that also removes the writer's files."""
        deliverer = self._deliverer
        assert deliverer is not None
        backoff = self.flush_interval
        while not self._finishing.is_set():
            self._wake.wait(backoff)
            self._wake.clear()
            if self._finishing.is_set():
                break
            ok = deliverer.run_once()
            self._note_pass(deliverer.failure)
            backoff = self.flush_interval if ok else min(MAX_BACKOFF, max(backoff * 2, 0.05))
        if self.blocked_on is None:  # delivering: the rest; a failing sink or key is not retried at close
            deliverer.finish()
            self._note_pass(deliverer.failure)
        deliverer.sink.close()

    def _note_pass(self, failure: str | None) -> None:
        """A delivery pass ended: ``failure`` is None (delivered), "sink" or "key"."""
        self.sink_healthy = failure is None
        self.blocked_on = failure
        if failure == "key":
            self.key_failures += 1
        elif failure == "sink":
            self._child_failures += 1
        with self._done:
            self._done.notify_all()

    def _spawn(self, env: dict[str, str]) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "kmsguard.audit",
                str(self.spool_dir),
                self.writer_id,
                str(self.flush_interval),
            ],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )

    def _read_child(self) -> None:
        """Follow the child's reports; if it dies while we write, log it and start another.

        The pipe is read with os.read, never through its buffered file object: a thread
        blocked inside that object's read holds its lock, which a forked child of this
        process would then find held forever (and hang closing it).
        """
        while True:
            child = self._child
            assert child is not None and child.stdout is not None
            fd, pending = child.stdout.fileno(), b""
            while chunk := _read_quietly(fd):
                *lines, pending = (pending + chunk).split(b"\n")
                for line in lines:
                    self._report(line.decode("utf-8", "replace"))
            with contextlib.suppress(OSError):
                child.stdout.close()  # at its end; this thread is its only reader
            with self._done:
                self._done.notify_all()
            if self._stopping.wait(1.0):
                return
            log.error("audit deliverer exited with status %s; records stay spooled; restarting it", child.wait())
            self._close_stdin(child)
            with self._child_pipe:
                self._child = self._spawn(self._child_env)

    def _report(self, line: str) -> None:
        """One line of the child's protocol (see __main__.py)."""
        kind, _, rest = line.partition(" ")
        if kind == "P":
            self._progress(int(rest))
        elif kind == "F":
            self._note_pass(rest)
        elif kind == "H":
            self._note_pass(None)
        elif kind == "L":
            level, _, message = rest.partition(" ")
            log.log(int(level), "%s", message)

    def _close_stdin(self, child: subprocess.Popen[str]) -> None:
        """Close our end of a child's stdin, which may hold a "flush" the child never read.

        Closing writes that buffered request first, and to a child that has died the write
        fails with BrokenPipeError. Left to the garbage collector instead, the pipe would
        raise it from a finalizer, where nobody can handle it, and hold its descriptor
        until then. The child has nothing left to read: the error is expected, and the
        pipe is closed either way.
        """
        assert child.stdin is not None
        with self._child_pipe, contextlib.suppress(BrokenPipeError):
            child.stdin.close()


def _read_quietly(fd: int) -> bytes:
    try:
        return os.read(fd, 65536)
    except OSError:
        return b""


def _template_of(kind: object) -> tuple[tuple[Any, ...], str]:
    """The shape and request-id prefix of a kind's template: a caller's id (CallerKind) is its own prefix."""
    prefix = operation.REQUEST_PREFIX
    if type(kind) is CallerKind:
        kind, prefix = kind
    shape = kind.shape if isinstance(kind, EventKind) else kind
    assert isinstance(shape, tuple)
    return shape, prefix


class DisabledAudit:
    """``[audit] sink = "none"``: nothing is recorded, so strict operations are refused."""

    def hit_recorder(self) -> None:
        """Hits are non-strict operations, which a disabled audit lets through unrecorded."""
        return None

    def observe(self, event: OperationEvent) -> None:
        if event.strict:
            raise AuditUnavailable('audit is disabled ([audit] sink = "none") and this classification is strict')


def _after_fork_in_child() -> None:
    for writer in list(_live):
        writer._forked()


os.register_at_fork(after_in_child=_after_fork_in_child)
