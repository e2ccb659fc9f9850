"""Where audit records end up: the sink protocol, the query filter, and the JSON lines sink.

Every sink stores rows (record.AuditRun: a record's fields as they are, lists and the
hashed context as canonical JSON text, then ``last_seq`` and ``items``), so ``verify``
can rebuild the exact canonical bytes the chain hash covers; reading gives a run's
records one by one, each pointing at the run. ``write`` is idempotent on (writer_id,
seq): a batch delivered twice, after a lost acknowledgement or a crash, is stored once.
"""

from __future__ import annotations

import base64
import json
import os
import re
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from kmsguard.audit.record import AuditRecord, AuditRun, records_from_columns, to_json


@dataclass(frozen=True)
class Query:
    """Filters for ``audit tail`` and ``audit query``; ``limit`` keeps the newest records."""

    since: str | None = None
    classification: str | None = None
    operation: str | None = None
    outcome: str | None = None
    principal: str | None = None
    request_id: str | None = None
    limit: int | None = None

    def matches(self, r: AuditRecord) -> bool:
        return (
            (self.since is None or r.time >= self.since)
            and (self.classification is None or r.classification == self.classification)
            and (self.operation is None or r.operation == self.operation)
            and (self.outcome is None or r.outcome == self.outcome)
            and (self.principal is None or r.principal == self.principal)
            and (self.request_id is None or r.request_id == self.request_id)
        )

    @property
    def row_limit(self) -> int | None:
        """Rows the SQL sinks may stop at: a row holds at least one record matching sql_where,
        except for a request id, where it may only be a run whose other records have it."""
        return None if self.request_id is not None else self.limit

    def sql_where(self, placeholder: str) -> tuple[str, list[Any]]:
        """A WHERE clause (or "") and its parameters, for the SQL sinks."""
        clauses, params = [], []
        for column, value, op in (
            ("time", self.since, ">="),
            ("classification", self.classification, "="),
            ("operation", self.operation, "="),
            ("outcome", self.outcome, "="),
            ("principal", self.principal, "="),
        ):
            if value is not None:
                clauses.append(f"{column} {op} {placeholder}")
                params.append(value)
        if self.request_id is not None:
            # The row's own id is its first record's; a run of kmsguard's own ids
            # (<prefix><10 hex digits>, record.AuditRun) holds others with the same prefix.
            clause = f"request_id = {placeholder}"
            params.append(self.request_id)
            if _MADE_ID.fullmatch(self.request_id):
                clause = f"({clause} OR (last_seq > seq AND request_id LIKE {placeholder} ESCAPE '!'))"
                params.append(self.request_id[:-10].replace("_", "!_") + "_" * 10)
            clauses.append(clause)
        return (" WHERE " + " AND ".join(clauses)) if clauses else "", params


#: A request id that may be one of kmsguard's own, numbered in a run.
_MADE_ID = re.compile(r".+[0-9a-f]{10}")


class Sink(Protocol):
    """A store of audit records."""

    name: str

    def write(self, rows: Sequence[AuditRun]) -> None:
        """Store a batch atomically; rows already stored are skipped."""

    def head(self, writer_id: str) -> tuple[int, str] | None:
        """The last stored (seq, hash) of a writer (a run's last seq), or None."""

    def records(self) -> Iterator[AuditRecord]:
        """Every record, ordered by writer and sequence (for verify); runs one record at a time."""

    def query(self, query: Query) -> list[AuditRecord]:
        """Matching records, oldest first (the newest ``limit`` of them)."""

    def load_key(self) -> str | None:
        """The stored wrapped audit key, if any (see audit.keys)."""

    def store_key(self, blob: str) -> str:
        """Store a wrapped audit key unless one exists; return the one stored (first writer wins)."""

    def close(self) -> None: ...


def newest(records: Iterable[AuditRecord], query: Query) -> list[AuditRecord]:
    """Matching records in time order, cut to the newest ``query.limit``."""
    out = sorted((r for r in records if query.matches(r)), key=lambda r: (r.time, r.writer_id, r.seq))
    return out[-query.limit :] if query.limit else out


class JsonLinesSink:
    """One JSON object per line in a file (fsync'd per batch), for log shippers and simple setups.

    The wrapped audit key, when the keyring has no secret store, sits beside it in
    ``<file>.key``.
    """

    name = "jsonl"

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._lock = threading.Lock()
        self._heads: dict[str, int] = {}

    def write(self, rows: Sequence[AuditRun]) -> None:
        with self._lock:
            fresh = [r for r in rows if r.seq > self._heads.get(r.head.writer_id, 0)]
            if not fresh:
                return
            data = "".join(to_json(_line_of(r)) + "\n" for r in fresh).encode()
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            for r in fresh:
                self._heads[r.head.writer_id] = r.last_seq

    def head(self, writer_id: str) -> tuple[int, str] | None:
        last = None
        for r in self._read():
            if r.writer_id == writer_id and (last is None or r.seq > last.seq):
                last = r
        with self._lock:
            self._heads[writer_id] = last.seq if last else 0
        return (last.seq, last.hash) if last else None

    def records(self) -> Iterator[AuditRecord]:
        return iter(sorted(self._read(), key=lambda r: (r.writer_id, r.seq)))

    def query(self, query: Query) -> list[AuditRecord]:
        return newest(self._read(), query)

    def _read(self) -> list[AuditRecord]:
        try:
            with open(self.path, encoding="utf-8") as fh:
                return [r for line in fh if line.strip() for r in records_from_columns(_from_line(json.loads(line)))]
        except FileNotFoundError:
            return []

    def load_key(self) -> str | None:
        try:
            return self.path.with_name(self.path.name + ".key").read_text().strip() or None
        except FileNotFoundError:
            return None

    def store_key(self, blob: str) -> str:
        key_path = self.path.with_name(self.path.name + ".key")
        try:
            fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except FileExistsError:
            return key_path.read_text().strip()
        with os.fdopen(fd, "w") as fh:
            fh.write(blob)
            fh.flush()
            os.fsync(fh.fileno())
        return blob

    def close(self) -> None:
        """Nothing to release: every write opens and closes the file itself."""


def _line_of(row: AuditRun) -> dict[str, Any]:
    """A JSON lines object: the record's fields by name, ``last_seq`` and ``items`` (base64)."""
    line = row.head.to_dict()
    line["last_seq"] = row.last_seq
    line["items"] = base64.b64encode(row.items).decode("ascii")
    return line


def _from_line(line: dict[str, Any]) -> dict[str, Any]:
    """The columns of a line; one written before runs existed has no ``last_seq``."""
    if line.get("last_seq") is not None:
        try:
            line["items"] = base64.b64decode(line["items"], validate=True)
        except (ValueError, TypeError):
            line["items"] = b""  # not base64: the run's records cannot be read back, and verify says altered
    return line
