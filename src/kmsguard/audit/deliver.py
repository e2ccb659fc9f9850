"""The deliverer: reads spooled facts, chains them into records and stores them in the sink.

It runs either as a thread of the writing process (``[audit] delivery = "thread"``,
what one-shot CLI commands use) or as a child process (``"process"``, the default for
services): the chain's HMACs, the JSON encoding and the sink's driver then run on
another core instead of under the application's GIL, and the application's only
per-operation audit cost is the spool append.

Either way it delivers its own writer's records in order, and also, on its first pass and
every ORPHANS_EVERY seconds, the spools of writers on this host that died or could not
finish (their lock is free; a forked child that exited without closing, say):
it resumes each chain from the sink's last record of that writer, so every record is
stored exactly once, in order, whatever crashed when.

The child is ``python -m kmsguard.audit`` (see __main__.py). Its protocol: lines on
stdin (``flush``; end of file = the writer closed or died: deliver everything
if delivery is working, clean up, exit) and on stdout (``P <seq>`` delivered up to,
``F sink|key`` a pass failed, ``H`` delivering again, ``L <level> <message>`` a log
record, which the writer logs through the application's ``logging``).

Obtaining the audit key (which may call KMS) is the deliverer's first job, never the
application's: while it cannot be had, delivery waits (``F key``, logged as "audit
delivery waiting for the audit key"), the records stay spooled, and the sink is not
reported as down.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

from kmsguard.audit.chain import AuditKeys, Chain
from kmsguard.audit.facts import Hits
from kmsguard.audit.record import AuditRun
from kmsguard.audit.sink import Sink
from kmsguard.audit.spool import Entry, SegmentReader, remove_writer, try_lock, writers

log = logging.getLogger("kmsguard.audit")
MAX_BACKOFF = 5.0
#: Seconds between looks for spools that dead writers left (see Deliverer.run_once).
ORPHANS_EVERY = 10.0
Progress = Callable[[int], None]


class KeyWait(Exception):
    """The audit key could not be obtained (its cause says why): delivery waits for it."""


def _describe(exc: BaseException | None) -> str:
    """``CODE: first line`` of a kmsguard error, ``Type: first line`` of any other."""
    if exc is None:
        return "unknown error"
    text = str(getattr(exc, "message", "") or exc)
    first = text.splitlines()[0] if text else ""
    return f"{getattr(exc, 'code', None) or type(exc).__name__}: {first}"


class Deliverer:
    """Delivers one live writer's spool, and orphaned spools, to a sink."""

    def __init__(
        self,
        sink: Sink,
        keys: Callable[[], AuditKeys],
        directory: Path,
        writer_id: str,
        batch_bytes: int = 1 << 20,
        on_progress: Progress = lambda seq: None,
    ) -> None:
        self.sink = sink
        self.directory = directory
        self.writer_id = writer_id
        self.batch_bytes = batch_bytes
        self.on_progress = on_progress
        self._key_source = keys
        self._keys: AuditKeys | None = None
        self._reader = SegmentReader(directory, writer_id)
        self._chain: Chain | None = None
        self.healthy = True
        self.failures = 0
        #: Why the last pass failed: "sink", "key" (the audit key could not be obtained), or None.
        self.failure: str | None = None
        self._orphans_at = 0.0

    def run_once(self, writer_alive: bool = True) -> bool:
        """One delivery pass; False if it failed (the caller backs off and retries).

        Spools left by writers that died (or forked children that exited) are looked for
        on the first pass and every ORPHANS_EVERY seconds after.
        """
        try:
            if time.monotonic() >= self._orphans_at:
                self._deliver_orphans()
                self._orphans_at = time.monotonic() + ORPHANS_EVERY
            self._deliver_own(writer_alive)
        except KeyWait as exc:
            self._fail("key", exc.__cause__)
            return False
        except Exception as exc:
            self._fail("sink", exc)
            return False
        self._health(True)
        return True

    def _fail(self, failure: str, exc: BaseException | None) -> None:
        self.failures += 1
        changed = failure != self.failure
        self.failure = failure
        self._health(False, exc, changed)

    def finish(self) -> bool:
        """The writer is gone: deliver the rest (and any orphan) and remove its files. False if delivery failed."""
        self._orphans_at = 0.0
        if not self.run_once(writer_alive=False):
            return False
        lock = try_lock(self.directory, self.writer_id)
        if lock is not None:
            remove_writer(self.directory, self.writer_id, lock)
        return True

    def _health(self, healthy: bool, exc: BaseException | None = None, changed: bool = False) -> None:
        if healthy and not self.healthy:
            log.warning("audit delivery to %s resumed; delivering spooled records", self.sink.name)
            self.failure = None
        elif not healthy and (self.healthy or changed):
            # The error's first line only: records never go to the log.
            if self.failure == "key":
                log.warning("audit delivery waiting for the audit key: %s", _describe(exc))
            else:
                log.warning("audit sink %s unavailable, spooling locally (%s)", self.sink.name, _describe(exc))
        self.healthy = healthy

    def _audit_keys(self) -> AuditKeys:
        """The audit key, obtained once; a failure (the key service, or the sink that stores the
        wrapped key) is a KeyWait: delivery waits for it, the records stay spooled."""
        if self._keys is None:
            try:
                self._keys = self._key_source()
            except Exception as exc:
                raise KeyWait() from exc
        return self._keys

    def _resume(self, writer_id: str) -> Chain:
        head = self.sink.head(writer_id)
        keys = self._audit_keys()
        return Chain(keys, writer_id, *head) if head else Chain(keys, writer_id)

    def _deliver_own(self, writer_alive: bool) -> None:
        if self._chain is None:
            self._chain = self._resume(self.writer_id)
        self._drain(self._reader, self._chain, writer_alive, report=True)

    def _drain(self, reader: SegmentReader, chain: Chain, writer_alive: bool, report: bool) -> None:
        """Deliver what is spooled, a batch at a time; for a live writer, only up to where it was.

        A pass that chased a live writer's tail would deliver a few records at a time, each
        batch a transaction of its own and a progress report that wakes a thread of the
        application (which then competes with it for the GIL): what arrives during a pass
        waits for the next one, one ``flush_interval`` later.
        """
        while True:
            entries, used = reader.read(self.batch_bytes, writer_alive)
            if not entries:
                return
            self._deliver(chain, entries)
            reader.advance(used)
            if report:
                self.on_progress(chain.last_seq)  # a run's last record, not the first
            if writer_alive and reader.caught_up:
                return

    def _deliver_orphans(self) -> None:
        for writer_id in sorted(writers(self.directory) - {self.writer_id}):
            lock = try_lock(self.directory, writer_id)
            if lock is None:
                continue  # alive, or being delivered by another process
            try:
                chain = self._resume(writer_id)
                before = chain.last_seq
                self._drain(SegmentReader(self.directory, writer_id), chain, writer_alive=False, report=False)
            except BaseException:
                os.close(lock)
                raise
            if chain.last_seq > before:
                log.warning("audit: delivered %d records left by writer %s", chain.last_seq - before, writer_id)
            remove_writer(self.directory, writer_id, lock)

    def _deliver(self, chain: Chain, entries: list[Entry]) -> None:
        """Link and store one batch; the chain advances only if the sink took it."""
        saved = (chain.last_seq, chain.last_hash)
        try:
            rows = link_batch(chain, entries)
            if rows:
                self.sink.write(rows)
        except BaseException:
            chain.last_seq, chain.last_hash = saved
            raise


def link_batch(chain: Chain, entries: list[Entry]) -> list[AuditRun]:
    """The sink rows of a batch of spooled entries, linked onto ``chain``.

    Entries the chain already holds are skipped (a retry after a lost acknowledgement,
    or a restarted deliverer that reads a segment again). A run of hit frames (Hits, as
    the reader takes them) is one row and one chain link, as a lone record is.
    """
    rows = []
    for seq, entry in entries:
        held = chain.last_seq + 1 - seq
        if isinstance(entry, Hits):
            if held >= len(entry):
                continue
            if held > 0:
                entry, seq = entry.after(held), seq + held
        elif held > 0:
            continue
        rows.append(chain.link(seq, entry))
    return rows
