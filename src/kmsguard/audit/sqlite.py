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

from kmsguard.audit.record import COLUMNS, AuditRecord, AuditRun, records_from_row, row_values
from kmsguard.audit.schema import RECORDS, added_columns, create_statements
from kmsguard.audit.sink import Query, newest

_COLUMNS = ", ".join(COLUMNS)


class SqliteSink:
    name = "sqlite"

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        # Created 0600 before SQLite opens it: its -wal and -shm files take the same mode.
        os.close(os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, timeout=30, check_same_thread=False, isolation_level=None)
        try:
            self._prepare()
        except BaseException:
            self._db.close()  # not a database, or locked too long: the caller gets no sink to close
            raise

    def _prepare(self) -> None:
        """WAL, durable commits, and the tables, with any columns added since they were made."""
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        for statement in create_statements("sqlite"):
            self._db.execute(statement)
        # A table from before runs were stored gets their columns, under the write lock, so
        # processes opening a new file at once add them once.
        self._db.execute("BEGIN IMMEDIATE")
        try:
            columns = {row[1] for row in self._db.execute(f"PRAGMA table_info({RECORDS})")}
            for name, definition in added_columns("sqlite"):
                if name not in columns:
                    self._db.execute(f"ALTER TABLE {RECORDS} ADD COLUMN {definition}")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def write(self, rows: Sequence[AuditRun]) -> None:
        values = [row_values(r) for r in rows]
        marks = ", ".join("?" * len(COLUMNS))
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany(f"INSERT OR IGNORE INTO audit_records ({_COLUMNS}) VALUES ({marks})", values)  # noqa: S608 - constant columns
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
                yield from records_from_row(row)
        finally:
            db.close()

    def query(self, query: Query) -> list[AuditRecord]:
        where, params = query.sql_where("?")
        # A run's row has its latest record's time, so the newest ``limit`` rows hold the
        # newest ``limit`` records (each row holds at least one at its time): expanded and
        # filtered again per record, they give exactly those. Constant columns; the
        # filter values are bound parameters.
        sql = f"SELECT {_COLUMNS} FROM audit_records{where} ORDER BY time DESC, writer_id DESC, seq DESC"  # noqa: S608
        if query.row_limit:
            sql += f" LIMIT {int(query.row_limit)}"
        with self._lock:
            rows = self._db.execute(sql, params).fetchall()
        return newest((r for row in rows for r in records_from_row(row)), query)

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
