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
    writers: int = 0
    records: int = 0
    open_writers: list[str] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)

    @property
    def intact(self) -> bool:
        return not self.problems


def verify(records: Iterable[AuditRecord], keys: AuditKeys) -> Report:
    """Check records ordered by (writer_id, seq); report the first problem of each writer."""
    report = Report()
    for writer_id, group in groupby(records, key=lambda r: r.writer_id):
        chain = list(group)
        report.writers += 1
        report.records += len(chain)
        problem = _first_problem(writer_id, chain, keys)
        if problem is not None:
            report.problems.append(problem)
        elif chain[-1].operation != CLOSE_OPERATION:
            report.open_writers.append(writer_id)
    return report


def _first_problem(writer_id: str, chain: list[AuditRecord], keys: AuditKeys) -> Problem | None:
    expected_seq, prev_hash, closed = 1, GENESIS, False
    for r in chain:
        if keys.chain_hash(r.canonical()) != r.hash:
            true_seq = next(_seqs_that_verify(r, len(chain) + expected_seq, keys), None)
            if true_seq is not None and true_seq != r.seq:
                return Problem(writer_id, r.seq, "moved", f"this record was written as record {true_seq}")
            return Problem(writer_id, r.seq, "altered", "its content does not match its hash")
        if closed:
            return Problem(writer_id, r.seq, "after-close", "a record follows the writer-closed record")
        if r.seq != expected_seq:
            missing = f"{expected_seq}" if r.seq == expected_seq + 1 else f"{expected_seq}-{r.seq - 1}"
            return Problem(writer_id, r.seq, "removed", f"record(s) {missing} are missing before it")
        if r.prev_hash != prev_hash:
            return Problem(writer_id, r.seq, "removed", "it does not follow the record before it")
        expected_seq, prev_hash, closed = r.seq + 1, r.hash, r.operation == CLOSE_OPERATION
    return None


def _seqs_that_verify(r: AuditRecord, upper: int, keys: AuditKeys) -> Iterator[int]:
    """Sequence numbers at which this record's content would verify (a moved record has one)."""
    for seq in range(1, upper + 1):
        if keys.chain_hash(replace(r, seq=seq).canonical()) == r.hash:
            yield seq
