"""``kmsguard audit verify``: check every writer's chain and name the first broken record.

For each writer, in sequence order, a record must (1) carry the next sequence number,
(2) carry the previous record's hash, and (3) hash, under the chain key, to its stored
hash. A record whose MAC fails is *altered* — unless it verifies at another sequence
number, in which case it was *moved* (reordered, or renumbered to hide a deletion). A
gap in the numbers means records were *removed*. Anything after a ``writer-closed``
record, or a chain missing its first records, is reported the same way. A stored run
(record.AuditRun) is one link: its MAC covers all its records, and a problem anywhere in
it is reported at its first record.

A chain without a ``writer-closed`` record is *open*: its writer is running, or died
(its spool is delivered by the next writer on that host). That is reported, not an
error: the tail of an open chain is the one thing a hash chain cannot vouch for.

Nor can a chain vouch for its own existence: whoever may delete rows can delete a
writer's every record, or cut an open chain's tail. An **anchor** closes that gap: the
chain heads (last sequence number and hash per writer) of an earlier intact verify,
kept where the database's administrators cannot change them (``kmsguard audit verify
--save-anchor``). Verified against it (``--anchor``), every anchored writer must still
hold its anchored record, byte for byte; a chain that lost it, or is gone, is reported
*removed*. The heads are keyed hashes, so nobody without the audit key can forge a
chain that matches them.
"""

from __future__ import annotations

import hmac
import json
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from itertools import groupby
from pathlib import Path

from kmsguard.audit.chain import AuditKeys
from kmsguard.audit.record import CLOSE_OPERATION, GENESIS, AuditRecord, AuditRun, format_time
from kmsguard.errors import InvalidInput


@dataclass(frozen=True)
class Problem:
    writer_id: str
    seq: int
    kind: str  # altered | moved | removed | after-close
    detail: str

    def __str__(self) -> str:
        return f"writer {self.writer_id} record {self.seq}: {self.kind}: {self.detail}"


#: Writer id -> (sequence number, hash) of its last record when anchored.
Heads = dict[str, tuple[int, str]]


@dataclass
class Report:
    key_fingerprint: str = ""
    writers: int = 0
    records: int = 0
    open_writers: list[str] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    #: Every writer's last record: what ``--save-anchor`` keeps.
    heads: Heads = field(default_factory=dict)

    @property
    def intact(self) -> bool:
        return not self.problems


def verify(
    records: Iterable[AuditRecord], keys: AuditKeys, anchor: Heads | None = None, *, window: bool = False
) -> Report:
    """Check records ordered by (writer_id, seq); report the first problem of each writer.

    Streams: one record at a time, so a chain of millions is checked in constant memory.
    With an ``anchor`` (see the module docstring), each anchored record must still be there.
    With ``window``, the records are a slice of each chain (a query since some time): each
    writer's chain is checked from its first record given, whatever its number, so what
    came before the slice is not reported missing; everything within it is checked as usual.
    """
    anchor = anchor or {}
    report = Report(key_fingerprint=keys.fingerprint)
    for writer_id, group in groupby(records, key=lambda r: r.writer_id):
        report.writers += 1
        state = _ChainCheck(writer_id, keys, anchor.get(writer_id), window)
        for record in group:
            report.records += 1
            if state.problem is None:
                state.check(record)
        problem = state.problem or state.anchor_problem()
        if problem is not None:
            report.problems.append(problem)
        elif not state.closed:
            report.open_writers.append(writer_id)
        report.heads[writer_id] = (state.expected_seq - 1, state.prev_hash)
    for writer_id in sorted(anchor.keys() - report.heads.keys()):
        seq = anchor[writer_id][0]
        report.problems.append(Problem(writer_id, seq, "removed", f"its {seq} anchored records are all gone"))
    return report


def save_anchor(path: Path, report: Report) -> None:
    """Write an intact report's chain heads to ``path`` (replaced atomically)."""
    if not report.intact:
        raise InvalidInput("a broken trail cannot be an anchor")
    doc = {
        "kmsguard_audit_anchor": 1,
        "audit_key": report.key_fingerprint,
        "time": format_time(time.time()),
        "writers": {w: {"seq": seq, "hash": h} for w, (seq, h) in sorted(report.heads.items())},
    }
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(doc, indent=1) + "\n")
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise InvalidInput(f"cannot write the anchor {path}: {exc.strerror}") from None


def load_anchor(path: Path, keys: AuditKeys) -> Heads:
    """The chain heads saved in ``path``; it must have been saved under the same audit key."""
    not_an_anchor = InvalidInput(f"{path} is not an audit anchor (kmsguard audit verify --save-anchor)")
    try:
        doc = json.loads(path.read_text())
        if not isinstance(doc, dict) or doc.get("kmsguard_audit_anchor") != 1:
            raise not_an_anchor
        heads = {str(w): (int(h["seq"]), str(h["hash"])) for w, h in doc["writers"].items()}
        fingerprint = str(doc["audit_key"])
    except OSError as exc:
        raise InvalidInput(f"cannot read the anchor {path}: {exc.strerror}") from None
    except (ValueError, KeyError, TypeError, AttributeError):  # not JSON, or not of an anchor's shape
        raise not_an_anchor from None
    if fingerprint != keys.fingerprint:
        raise InvalidInput(f"the anchor {path} was saved under another audit key ({fingerprint})")
    return heads


class _ChainCheck:
    """One writer's chain, checked record by record."""

    #: How far beyond its position a moved record's true sequence number is searched.
    MOVE_WINDOW = 10_000

    def __init__(
        self, writer_id: str, keys: AuditKeys, anchored: tuple[int, str] | None = None, window: bool = False
    ) -> None:
        self.writer_id = writer_id
        self.window = window  # the chain is checked from the first record given (see verify)
        self.keys = keys
        self.expected_seq = 1
        self.prev_hash = GENESIS
        self.closed = False
        self.problem: Problem | None = None
        self.anchored = anchored
        self.anchor_seen = False  # the anchored record, unchanged

    def check(self, r: AuditRecord) -> None:
        # A stored run is one chain link: checked as a whole at its first record. Its
        # other records are read out of that row, so they follow it by construction.
        if self.window:  # the slice's first record (or the run holding it) starts the chain
            self.window = False
            first = r.run or r
            self.expected_seq, self.prev_hash = first.seq, first.prev_hash
            self.problem = self._problem(first)
        elif r.run is None or r.seq == r.run.seq:
            self.problem = self._problem(r.run or r)
        self.expected_seq, self.prev_hash = r.seq + 1, r.hash
        self.closed = r.operation == CLOSE_OPERATION
        if self.anchored is not None and r.seq == self.anchored[0]:
            self.anchor_seen = hmac.compare_digest(r.hash, self.anchored[1])

    def anchor_problem(self) -> Problem | None:
        """An intact chain that no longer holds its anchored record was cut short (or replaced)."""
        if self.anchored is None or self.anchor_seen:
            return None
        seq = self.anchored[0]
        return Problem(self.writer_id, seq, "removed", f"the chain no longer holds anchored record {seq}")

    def _problem(self, r: AuditRecord | AuditRun) -> Problem | None:
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


def _seqs_that_verify(r: AuditRecord | AuditRun, upper: int, keys: AuditKeys) -> Iterator[int]:
    """Sequence numbers at which this record's (or run's) content would verify (a moved one has one)."""
    for seq in range(1, upper + 1):
        if keys.chain_hash(r.renumbered(seq).canonical()) == r.hash:
            yield seq
