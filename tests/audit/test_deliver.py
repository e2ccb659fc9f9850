"""The deliverer's passes: a live writer's spool up to where it was, a finished one to its end."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kmsguard.audit.chain import AuditKeys
from kmsguard.audit.deliver import Deliverer
from kmsguard.audit.spool import SegmentReader, Spool
from kmsguard.audit.sqlite import SqliteSink

from .test_spool import FACTS, SEGMENT, fill


class WritingSink(SqliteSink):
    """A sink during whose first two writes the application appends ``more`` records each."""

    def __init__(self, path: Path, spool: Spool, more: int) -> None:
        super().__init__(path)
        self.spool, self.more, self.batches = spool, more, 0

    def write(self, records: Sequence[Sequence[Any]]) -> None:
        super().write(records)
        self.batches += 1
        for _ in range(self.more if self.batches <= 2 else 0):
            self.spool.append(FACTS, durable=False)


def deliverer(tmp_path: Path, sink: SqliteSink) -> Deliverer:
    return Deliverer(sink, lambda: AuditKeys(os.urandom(32)), tmp_path / "spool", "w", batch_bytes=SEGMENT)


def test_a_pass_delivers_what_was_spooled_when_it_began_not_what_arrives_during_it(tmp_path: Path) -> None:
    # Chasing the tail would be a transaction, and a report to the application, per few records.
    spool = Spool(tmp_path / "spool", "w", 1 << 30)
    for _ in range(10):
        spool.append(FACTS, durable=False)
    sink = WritingSink(tmp_path / "audit.db", spool, more=3)
    progress: list[int] = []
    d = deliverer(tmp_path, sink)
    d.on_progress = progress.append
    assert d.run_once()
    assert (sink.batches, progress) == (1, [10])
    assert d.run_once()  # the next pass takes what arrived during the first
    assert (sink.batches, progress) == (2, [10, 13])
    spool.close()
    assert d.finish()
    assert progress[-1] == spool.seq == 16
    sink.close()


def test_a_pass_goes_on_past_full_batches_and_finished_segments(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", "w", 1 << 30, segment_bytes=SEGMENT)
    count = fill(spool, 3) + 2
    for _ in range(2):
        spool.append(FACTS, durable=False)
    sink = WritingSink(tmp_path / "audit.db", spool, more=0)
    d = deliverer(tmp_path, sink)
    assert d.run_once()
    assert sink.head("w") is not None and sink.head("w")[0] == count  # type: ignore[index]
    assert sink.batches >= 4  # a batch (at most) per segment: it went on after each one
    spool.close()
    sink.close()


def test_the_reader_says_when_it_reached_the_writers_end(tmp_path: Path) -> None:
    spool = Spool(tmp_path, "w", 1 << 30, segment_bytes=SEGMENT)
    for _ in range(100):
        spool.append(FACTS, durable=False)
    reader = SegmentReader(tmp_path, "w")
    entries, used = reader.read(100, writer_alive=True)  # a read ends on a whole frame, and there are more
    assert entries and not reader.caught_up
    reader.advance(used)
    entries, used = reader.read(1 << 20, writer_alive=True)
    assert [seq for seq, _ in entries][-1] == 100 and reader.caught_up
    reader.advance(used)
    assert reader.read(1 << 20, writer_alive=True) == ([], 0)
    fill(spool, 1)
    entries, _ = reader.read(1 << 20, writer_alive=True)  # the rest of a segment the writer left
    assert entries and not reader.caught_up
    spool.close()
