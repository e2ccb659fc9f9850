"""The embedded default sink: a SQLite database in ``$KMSGUARD_HOME`` (WAL mode).

WAL lets ``kmsguard audit tail`` read while services write; several processes on one
host may share the file (SQLite locks it), each with its own chain. ``synchronous=FULL``
makes each committed batch survive a power loss, which matters because the spool is
emptied once the sink has a batch.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from kmsguard.audit.record import COLUMNS, AuditRecord
from kmsguard.audit.sink import Query, from_row, newest, to_row

_COLUMNS = ", ".join(COLUMNS)
_SCHEMA = """
CREATE TABLE IF NOT EXISTS audit_records (
    writer_id TEXT NOT NULL, seq INTEGER NOT NULL, prev_hash TEXT NOT NULL, time TEXT NOT NULL,
    operation TEXT NOT NULL, classification TEXT, key_refs TEXT NOT NULL, regions TEXT NOT NULL,
    principal TEXT NOT NULL, outcome TEXT NOT NULL, error_code TEXT, duration_us INTEGER NOT NULL,
    kms_calls INTEGER NOT NULL, cache_hit INTEGER, size INTEGER NOT NULL, request_id TEXT,
    context TEXT NOT NULL, hash TEXT NOT NULL,
    PRIMARY KEY (writer_id, seq)
);
CREATE INDEX IF NOT EXISTS audit_records_time ON audit_records (time);
CREATE TABLE IF NOT EXISTS audit_keys (name TEXT PRIMARY KEY, blob TEXT NOT NULL);
"""


class SqliteSink:
    name = "sqlite"

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        # Created 0600 before SQLite opens it: its -wal and -shm files take the same mode.
        os.close(os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, timeout=30, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        # The columns of runs: added to a new table as to one from before runs were stored,
        # under the write lock, so processes opening a new file at once add them once.
        self._db.execute("BEGIN IMMEDIATE")
        try:
            columns = {row[1] for row in self._db.execute("PRAGMA table_info(audit_records)")}
            for column, kind in (("last_seq", "INTEGER"), ("items", "BLOB")):
                if column not in columns:
                    self._db.execute(f"ALTER TABLE audit_records ADD COLUMN {column} {kind}")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def write(self, records: Sequence[Sequence[Any]]) -> None:
        rows = [to_row(r) for r in records]
        marks = ", ".join("?" * len(COLUMNS))
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany(f"INSERT OR IGNORE INTO audit_records ({_COLUMNS}) VALUES ({marks})", rows)  # noqa: S608 - constant columns
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def head(self, writer_id: str) -> tuple[int, str] | None:
        with self._lock:
            row = self._db.execute(
                "SELECT COALESCE(last_seq, seq), hash FROM audit_records WHERE writer_id = ? ORDER BY seq DESC LIMIT 1",
                (writer_id,),
            ).fetchone()
        return (int(row[0]), str(row[1])) if row else None

    def records(self) -> Iterator[AuditRecord]:
        """Streamed from a connection of its own (verify reads millions of rows in constant memory)."""
        db = sqlite3.connect(self.path, timeout=30)
        try:
            for row in db.execute(f"SELECT {_COLUMNS} FROM audit_records ORDER BY writer_id, seq"):  # noqa: S608
                yield from from_row(row)
        finally:
            db.close()

    def query(self, query: Query) -> list[AuditRecord]:
        where, params = query.sql_where("?")
        # A run's row has its latest record's time, so the newest ``limit`` rows hold the
        # newest ``limit`` records (each row holds at least one at its time): expanded and
        # filtered again per record, they give exactly those. Constant columns; the
        # filter values are bound parameters.
        sql = f"SELECT {_COLUMNS} FROM audit_records{where} ORDER BY time DESC, writer_id DESC, seq DESC"  # noqa: S608
        if query.limit:
            sql += f" LIMIT {int(query.limit)}"
        with self._lock:
            rows = self._db.execute(sql, params).fetchall()
        return newest((r for row in rows for r in from_row(row)), query)

    def load_key(self) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT blob FROM audit_keys WHERE name = 'audit'").fetchone()
        return str(row[0]) if row else None

    def store_key(self, blob: str) -> str:
        with self._lock:
            self._db.execute("INSERT OR IGNORE INTO audit_keys (name, blob) VALUES ('audit', ?)", (blob,))
        stored = self.load_key()
        assert stored is not None
        return stored

    def close(self) -> None:
        with self._lock:
            self._db.close()
