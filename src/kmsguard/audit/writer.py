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
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from kmsguard import operation
from kmsguard.audit.chain import AuditKeys
from kmsguard.audit.deliver import MAX_BACKOFF, Deliverer
from kmsguard.audit.facts import Spooled
from kmsguard.audit.frames import NOT_WRITTEN, HitWriter
from kmsguard.audit.record import CLOSE_OPERATION
from kmsguard.audit.sink import Sink
from kmsguard.audit.spool import NotDurable, Spool, SpoolFull
from kmsguard.errors import AuditUnavailable
from kmsguard.operation import HitKind, Operation
from kmsguard.telemetry import NULL_TELEMETRY, Telemetry

log = logging.getLogger("kmsguard.audit")
_HOST_RE = re.compile(r"[^A-Za-z0-9.-]+")
_MAX_TEMPLATES = 10_000
#: Seconds a full spool waits on a sink that reports healthy but delivers nothing.
_STALL = 10.0
#: Seconds between counts of the spool's files (see AuditObserver._tick).
_MEASURE_EVERY = 1.0


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
        strict: bool | None = None,
        delivery: str = "thread",
        env: Mapping[str, str] | None = None,
        flush_interval: float = 0.2,
        max_spool_bytes: int = 256 << 20,
        principal: str = "unknown",
        telemetry: Telemetry = NULL_TELEMETRY,
        writer_id: str | None = None,
    ) -> None:
        """``delivery = "process"`` runs the deliverer as a child built from ``env`` (the Settings' environment).

        ``keys`` is called once, by the thread deliverer, when first needed (it may call
        KMS or the sink); ``sink`` is used only by the thread deliverer.
        """
        self.writer_id = writer_id or new_writer_id()
        self.spool_dir = Path(spool_dir)
        self.strict = strict
        self.flush_interval = flush_interval
        self.principal = principal
        self.telemetry = telemetry
        self._spool = Spool(self.spool_dir, self.writer_id, max_spool_bytes)
        self._templates: dict[object, int] = {}  # HitKind or shape -> its template id (see frames.py)
        self._seen: set[tuple[Any, ...]] = set()  # shapes spooled once in full (see _compact)
        self._template_ids = itertools.count(1)
        self.delivered_seq = 0
        self.dropped = 0
        self.sink_healthy = True
        self._done = threading.Condition()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._child_failures = 0
        self._closed = False
        self._deliverer: Deliverer | None = None
        self.sink = sink
        self._child: subprocess.Popen[str] | None = None
        self._child_pipe = threading.Lock()  # one writer of the child's stdin at a time; its replacement
        if delivery == "process":
            self._child_env = {**os.environ, **(env or {})}
            self._child = self._spawn(self._child_env)
            target: Callable[[], None] = self._read_child
        else:
            assert sink is not None
            self._deliverer = Deliverer(sink, keys, self.spool_dir, self.writer_id, on_progress=self._progress)
            target = self._run_thread
        self._thread = threading.Thread(target=target, name=f"kmsguard-audit-{self.writer_id}", daemon=True)
        self._thread.start()
        self._timer = threading.Thread(target=self._tick, name="kmsguard-audit-sync", daemon=True)
        self._timer.start()
        atexit.register(self.close)

    # ------------------------------------------------------------------ hot path

    def operation_finished(self, op: Operation) -> None:
        strict = op.strict_audit if self.strict is None else self.strict
        if strict and not op.strict_audit:
            op.strict_audit = True  # [audit] strict = true: Guard must refuse what cannot be recorded
        if not strict:
            self._compact(op.shape(), op.started_at, op.duration, op.size, op.request_number())
            return
        # Strict, in full: the record is synced before the operation returns, and a
        # refusal must be able to follow it.
        facts = Spooled.of(op.shape(), op.started_at, op.duration, op.size, op.request_id)
        try:
            self._with_room(self._spool.append, facts, True)
        except NotDurable:
            # The record is in the spool and may yet be delivered, but Guard refuses the
            # operation: follow it with the refusal (same request id), so the trail never
            # shows as done what the caller was told failed.
            if op.outcome == "ok":
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
        """Cache hits (kmsguard.operation.HitKind) as compact hit frames: see frames.py.

        Hits are never strict (Guard reports only non-strict operations this way), so a
        hit that cannot be spooled is dropped and counted, as a non-strict record is.
        """
        return HitWriter(self._spool.frames, self._templates, self._hit_slow)

    def _compact(self, shape: tuple[Any, ...], started_at: float, duration: float, size: int, request: int) -> None:
        """A non-strict operation as a hit frame, once its shape has been seen before.

        The first operation of a shape is spooled in full and only remembered: a shape
        that never recurs (a context value unique to each call) would otherwise cost a
        template as well as a frame.
        """
        template = self._templates.get(shape)
        at, took = round(started_at * 1e6), round(duration * 1e9)
        if template is not None and self._spool.frames.hit(template, at, took, size, request) != NOT_WRITTEN:
            return
        if template is None and shape not in self._seen:
            if len(self._seen) >= _MAX_TEMPLATES:
                self._seen.clear()
            self._seen.add(shape)
            self._append_quietly(Spooled.of(shape, started_at, duration, size, operation.request_id_of(request)))
            return
        self._hit_slow(shape, at, took, size, request)

    def _hit_slow(self, kind: object, started: int, duration: int, size: int, request: int) -> None:
        """A template to write first (a new kind, or a new segment), a segment to start, or no room."""
        template = self._templates.get(kind)
        if template is None:
            template = next(self._template_ids)
        shape = kind.shape if isinstance(kind, HitKind) else kind
        assert isinstance(shape, tuple)
        try:
            prefix = operation.REQUEST_PREFIX
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
            self._done.notify_all()

    # ------------------------------------------------------------------ control

    def flush(self, timeout: float = 30.0) -> bool:
        """Deliver everything written so far; False if the sink did not take it within ``timeout``."""
        target = self._spool.seq
        deadline = time.monotonic() + timeout
        next_kick = 0.0
        while self.delivered_seq < target and self._thread.is_alive():
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

    def close(self, timeout: float = 10.0) -> None:
        """End the chain with a ``writer-closed`` record and deliver what is left.

        What the sink does not take within ``timeout`` stays in the spool, which the next
        writer on this host delivers.
        """
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        if self._spool.seq:
            closed = Spooled(time=time.time(), operation=CLOSE_OPERATION, classification=None, key_refs=(), regions=(),
                             principal=self.principal, outcome="ok", error_code=None, duration=0.0, kms_calls=0,
                             cache_hit=None, size=0, request_id=None, context=())
            try:
                self._spool.append(closed, durable=True)
            except AuditUnavailable:
                log.error("audit: could not write the writer-closed record")
        self.flush(timeout)
        self._stopping.set()
        self._timer.join(timeout)
        self._spool.close()  # releases the writer lock: the deliverer may now remove the files
        if self._child is not None:
            self._close_stdin(self._child)  # end of file: the child delivers the rest, cleans up, exits
            try:
                self._child.wait(timeout)
            except subprocess.TimeoutExpired:
                self._child.kill()
                self._child.wait()  # reaped: a killed child left unwaited is a zombie until exit
        else:
            self._kick()
            self._thread.join(timeout)
            if self._thread.is_alive():  # still delivering: two deliverers must never share a chain
                log.warning("audit: delivery did not finish in %.0f s; the rest stays spooled", timeout)
                return
            assert self._deliverer is not None
            self._deliverer.finish()
            self._deliverer.sink.close()

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

    def _run_thread(self) -> None:
        assert self._deliverer is not None
        backoff = self.flush_interval
        while not self._stopping.is_set():
            self._wake.wait(backoff)
            self._wake.clear()
            ok = self._deliverer.run_once()
            self.sink_healthy = ok
            backoff = self.flush_interval if ok else min(MAX_BACKOFF, max(backoff * 2, 0.05))
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
        """Follow the child's reports; if it dies while we write, log it and start another."""
        while True:
            child = self._child
            assert child is not None and child.stdout is not None
            for line in child.stdout:
                kind, *args = line.split()
                if kind == "P":
                    self._progress(int(args[0]))
                elif kind == "H":
                    self.sink_healthy = args[0] == "1"
                    if not self.sink_healthy:
                        self._child_failures += 1
            child.stdout.close()  # at its end; this thread is its only reader
            with self._done:
                self._done.notify_all()
            if self._stopping.wait(1.0):
                return
            log.error("audit deliverer exited with status %s; records stay spooled; restarting it", child.wait())
            self._close_stdin(child)
            with self._child_pipe:
                self._child = self._spawn(self._child_env)

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


class DisabledAudit:
    """``[audit] sink = "none"``: nothing is recorded, so strict classifications are refused."""

    def __init__(self, strict: bool | None = None) -> None:
        self.strict = strict

    def hit_recorder(self) -> None:
        """Hits are non-strict operations, which a disabled audit lets through unrecorded."""
        return None

    def operation_finished(self, op: Operation) -> None:
        if self.strict is False:
            return
        if op.strict_audit or self.strict:
            op.strict_audit = True
            raise AuditUnavailable('audit is disabled ([audit] sink = "none") and this classification is strict')
