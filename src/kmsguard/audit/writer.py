"""AuditObserver: records every Guard operation, off the caller's path unless strict.

The caller's thread does the least that keeps the record safe: it copies the
operation's facts into a tuple and appends it to this process's spool file (one
``write(2)``, see spool.py). Everything expensive — HMAC of context values, the chain
hash, serialization, the sink's transaction — happens in one background thread that
wakes every ``flush_interval`` and delivers what accumulated as one batch.

Guarantees (documented in the README):

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
"""

from __future__ import annotations

import atexit
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kmsguard.audit.record import CLOSE_OPERATION, AuditKeys, Chain
from kmsguard.audit.sink import Sink
from kmsguard.audit.spool import Entry, Orphan, Spool, orphans
from kmsguard.errors import AuditUnavailable
from kmsguard.operation import Operation
from kmsguard.telemetry import NULL_TELEMETRY, Telemetry

log = logging.getLogger("kmsguard.audit")
_HOST_RE = re.compile(r"[^A-Za-z0-9.-]+")
_MAX_BACKOFF = 5.0


def new_writer_id() -> str:
    """``<host>-<pid>-<random>``: names the process in records; random because pids recur."""
    host = _HOST_RE.sub("-", socket.gethostname())[:40] or "host"
    return f"{host}-{os.getpid()}-{os.urandom(4).hex()}"


class AuditObserver:
    """An operation.Observer that writes hash-chained audit records to a sink."""

    def __init__(
        self,
        sink: Sink,
        keys: Callable[[], AuditKeys],
        spool_dir: Path,
        *,
        strict: bool | None = None,
        flush_interval: float = 0.2,
        batch_bytes: int = 1 << 20,
        max_spool_bytes: int = 256 << 20,
        principal: str = "unknown",
        telemetry: Telemetry = NULL_TELEMETRY,
        writer_id: str | None = None,
    ) -> None:
        """``keys`` is called once, in the writer thread, when first needed (it may call KMS or the sink)."""
        self.sink = sink
        self.writer_id = writer_id or new_writer_id()
        self.spool_dir = Path(spool_dir)
        self.strict = strict
        self.flush_interval = flush_interval
        self.batch_bytes = batch_bytes
        self.principal = principal
        self.telemetry = telemetry
        self._spool = Spool(self.spool_dir, self.writer_id, max_spool_bytes)
        self._key_source = keys
        self._keys: AuditKeys | None = None
        self._chain: Chain | None = None
        self.delivered_seq = 0
        self.dropped = 0
        self.failures = 0  # failed delivery attempts (the sink was down)
        self.sink_healthy = True
        self._orphans_pending = True
        self._wake = threading.Event()
        self._done = threading.Condition()
        self._stopping = False
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=f"kmsguard-audit-{self.writer_id}", daemon=True)
        self._thread.start()
        atexit.register(self.close)

    # ------------------------------------------------------------------ hot path

    def operation_finished(self, op: Operation) -> None:
        strict = op.strict_audit if self.strict is None else self.strict
        if strict and not op.strict_audit:
            op.strict_audit = True  # [audit] strict = true: Guard must refuse what cannot be recorded
        fields = (
            op.started_at,
            op.name,
            op.classification,
            tuple(op.key_refs),
            tuple(op.regions),
            op.principal,
            op.outcome,
            op.error_code,
            op.duration,
            op.kms_calls,
            op.cache_hit,
            op.size,
            op.request_id,
            tuple(op.context.items()),
        )
        try:
            self._spool.append(fields, strict)
        except AuditUnavailable:
            if strict:
                raise
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 10_000 == 0:
                log.error("audit spool unusable: %d non-strict records dropped so far", self.dropped)

    # ------------------------------------------------------------------ control

    @property
    def queue_depth(self) -> int:
        """Records written but not yet delivered to the sink."""
        return self._spool.seq - self.delivered_seq

    @property
    def spool_bytes(self) -> int:
        return self._spool.pending()

    def flush(self, timeout: float = 30.0) -> bool:
        """Deliver everything written so far; False if the sink did not take it within ``timeout``."""
        target = self._spool.seq
        deadline = time.monotonic() + timeout
        with self._done:
            while self.delivered_seq < target and self._thread.is_alive():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._wake.set()
                self._done.wait(min(remaining, 0.05))
        return self.delivered_seq >= target

    def close(self, timeout: float = 10.0) -> None:
        """End the chain with a ``writer-closed`` record and deliver what is left.

        What the sink does not take within ``timeout`` stays in the spool file, which
        the next writer on this host delivers.
        """
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        if self._spool.seq:
            fields = (time.time(), CLOSE_OPERATION, None, (), (), self.principal, "ok", None, 0.0, 0, None, 0, None, ())
            try:
                self._spool.append(fields, durable=True)
            except AuditUnavailable:
                log.error("audit: could not write the writer-closed record")
        delivered = self.flush(timeout)
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout)
        self._spool.close(remove=delivered and not self._thread.is_alive())
        self.sink.close()

    # ------------------------------------------------------------------ writer thread

    def _run(self) -> None:
        backoff = self.flush_interval
        while True:
            self._wake.wait(backoff)
            self._wake.clear()
            stopping = self._stopping
            try:
                self._spool.sync()
                self._deliver_orphans()
                self._deliver_own()
                backoff = self.flush_interval
                self._set_healthy(True)
            except Exception as exc:
                self.failures += 1
                self._set_healthy(False, exc)
                backoff = min(_MAX_BACKOFF, max(backoff * 2, 0.05))
            self.telemetry.gauge("audit_queue_depth", self.queue_depth)
            self.telemetry.gauge("audit_spool_bytes", self.spool_bytes)
            with self._done:
                self._done.notify_all()
            if stopping:
                return

    def _set_healthy(self, healthy: bool, exc: BaseException | None = None) -> None:
        if healthy and not self.sink_healthy:
            log.warning("audit sink %s is back; delivering spooled records", self.sink.name)
        elif not healthy and self.sink_healthy:
            # Only the exception's type and first line: the records themselves never go to the log.
            detail = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            log.warning("audit sink %s unavailable, spooling records locally (%s)", self.sink.name, detail)
        self.sink_healthy = healthy

    def _audit_keys(self) -> AuditKeys:
        if self._keys is None:
            self._keys = self._key_source()
        return self._keys

    def _deliver_own(self) -> None:
        if self._chain is None:
            self._chain = self._resume(self.writer_id)
        while self._spool.pending():
            entries, offset = self._spool.read(self.batch_bytes)
            if not entries:
                return
            self._deliver(self._chain, entries)
            self._spool.ack(offset)
            with self._done:
                self.delivered_seq = entries[-1][0]
                self._done.notify_all()

    def _deliver_orphans(self) -> None:
        """Deliver the spools of writers that died on this host (once per process, until it succeeds)."""
        if not self._orphans_pending:
            return
        for orphan in orphans(self.spool_dir, self._spool.path):
            try:
                self._deliver_orphan(orphan)
            except BaseException:
                orphan.release()
                raise
        self._orphans_pending = False

    def _deliver_orphan(self, orphan: Orphan) -> None:
        chain = self._resume(orphan.writer_id)
        entries = [e for e in orphan.entries() if e[0] > chain.last_seq]
        for start in range(0, len(entries), 1000):
            self._deliver(chain, entries[start : start + 1000])
        if entries:
            log.warning("audit: delivered %d records left by writer %s", len(entries), orphan.writer_id)
        orphan.remove()

    def _resume(self, writer_id: str) -> Chain:
        head = self.sink.head(writer_id)
        keys = self._audit_keys()
        return Chain(keys, writer_id, *head) if head else Chain(keys, writer_id)

    def _deliver(self, chain: Chain, entries: list[Entry]) -> None:
        """Link and store one batch; the chain advances only if the sink took it."""
        saved = (chain.last_seq, chain.last_hash)
        records: list[list[Any]] = []
        try:
            for seq, fields in entries:
                if seq <= chain.last_seq:
                    continue  # already stored (a retry after a lost acknowledgement)
                records.append(chain.link(seq, fields))
            if records:
                self.sink.write(records)
        except BaseException:
            chain.last_seq, chain.last_hash = saved
            raise


class DisabledAudit:
    """``[audit] sink = "none"``: nothing is recorded, so strict classifications are refused."""

    def __init__(self, strict: bool | None = None) -> None:
        self.strict = strict

    def operation_finished(self, op: Operation) -> None:
        if self.strict is False:
            return
        if op.strict_audit or self.strict:
            op.strict_audit = True
            raise AuditUnavailable("audit is disabled ([audit] sink = \"none\") and this classification is strict")

