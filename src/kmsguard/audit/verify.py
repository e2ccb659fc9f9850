"""``kmsguard audit verify``: check every writer's chain and name the first broken record.

For each writer, in sequence order, a record must (1) carry the next sequence number,
(2) carry the previous record's hash, and (3) hash, under the chain key, to its stored
hash. A record whose MAC fails is *altered* — unless it verifies at another sequence
number, in which case it was *moved* (reordered, or renumbered to hide a deletion). A
gap in the numbers means records were *removed*. Anything after a ``writer-closed``
record, or a chain missing its first records, is reported the same way.

A chain without a ``writer-closed`` record is *open*: its writer is running, or died
(its spool is delivered by the next writer on that host). That is reported, not an
error: the tail of an open chain is the one thing a hash chain cannot vouch for.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from itertools import groupby

from kmsguard.audit.record import CLOSE_OPERATION, GENESIS, AuditKeys, AuditRecord


@dataclass(frozen=True)
class Problem:
    writer_id: str
    seq: int
    kind: str  # altered | moved | removed | after-close
    detail: str

    def __str__(self) -> str:
        return f"writer {self.writer_id} record {self.seq}: {self.kind}: {self.detail}"


@dataclass
class Report:
    key_fingerprint: str = ""
    writers: int = 0
    records: int = 0
    open_writers: list[str] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)

    @property
    def intact(self) -> bool:
        return not self.problems


def verify(records: Iterable[AuditRecord], keys: AuditKeys) -> Report:
    """Check records ordered by (writer_id, seq); report the first problem of each writer.

    Streams: one record at a time, so a chain of millions is checked in constant memory.
    """
    report = Report(key_fingerprint=keys.fingerprint)
    for writer_id, group in groupby(records, key=lambda r: r.writer_id):
        report.writers += 1
        state = _ChainCheck(writer_id, keys)
        for record in group:
            report.records += 1
            if state.problem is None:
                state.check(record)
        if state.problem is not None:
            report.problems.append(state.problem)
        elif not state.closed:
            report.open_writers.append(writer_id)
    return report


class _ChainCheck:
    """One writer's chain, checked record by record."""

    #: How far beyond its position a moved record's true sequence number is searched.
    MOVE_WINDOW = 10_000

    def __init__(self, writer_id: str, keys: AuditKeys) -> None:
        self.writer_id = writer_id
        self.keys = keys
        self.expected_seq = 1
        self.prev_hash = GENESIS
        self.closed = False
        self.problem: Problem | None = None

    def check(self, r: AuditRecord) -> None:
        self.problem = self._problem(r)
        self.expected_seq, self.prev_hash = r.seq + 1, r.hash
        self.closed = r.operation == CLOSE_OPERATION

    def _problem(self, r: AuditRecord) -> Problem | None:
        if self.keys.chain_hash(r.canonical()) != r.hash:
            upper = max(r.seq, self.expected_seq) + self.MOVE_WINDOW
            true_seq = next(_seqs_that_verify(r, upper, self.keys), None)
            if true_seq is not None and true_seq != r.seq:
                return Problem(self.writer_id, r.seq, "moved", f"this record was written as record {true_seq}")
            return Problem(self.writer_id, r.seq, "altered", "its content does not match its hash")
        if self.closed:
            return Problem(self.writer_id, r.seq, "after-close", "a record follows the writer-closed record")
        if r.seq != self.expected_seq:
            first, last = self.expected_seq, r.seq - 1
            missing = f"{first}" if first == last else f"{first}-{last}"
            return Problem(self.writer_id, r.seq, "removed", f"record(s) {missing} are missing before it")
        if r.prev_hash != self.prev_hash:
            return Problem(self.writer_id, r.seq, "removed", "it does not follow the record before it")
        return None


def _seqs_that_verify(r: AuditRecord, upper: int, keys: AuditKeys) -> Iterator[int]:
    """Sequence numbers at which this record's content would verify (a moved record has one)."""
    for seq in range(1, upper + 1):
        if keys.chain_hash(replace(r, seq=seq).canonical()) == r.hash:
            yield seq
