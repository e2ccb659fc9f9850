"""The shared sink: PostgreSQL through psycopg 3, for many service processes and hosts.

The schema (``[audit] schema``, default ``kmsguard``) and its tables are created if
missing, under an advisory lock so writers starting together do not race. Each writer
process has its own chain, so writers never contend for rows; inserts are
``ON CONFLICT (writer_id, seq) DO NOTHING``, which makes redelivery after an outage or
a crash store each record exactly once.

The connection is opened lazily and dropped on any error: a database that is down
costs the writer thread a failed attempt per retry, never the caller anything.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import psycopg
from psycopg import sql

from kmsguard.audit.record import COLUMNS, AuditRecord, AuditRun, records_from_row, row_values
from kmsguard.audit.schema import added_columns, create_statements
from kmsguard.audit.sink import Query, newest
from kmsguard.errors import ConfigurationError

_FEW_ROWS = 64
SCHEMA_RE = re.compile(r"[a-z_][a-z0-9_]{0,62}")


class PostgresSink:
    name = "postgres"

    def __init__(self, dsn: str, schema: str = "kmsguard", connect_timeout: float = 5.0) -> None:
        if not SCHEMA_RE.fullmatch(schema):
            raise ConfigurationError("audit.schema: must be a lower-case SQL identifier")
        self.dsn = dsn
        self.schema = schema
        self.connect_timeout = connect_timeout
        self._lock = threading.Lock()
        self._conn: psycopg.Connection[Any] | None = None
        self._schema_ready = False
        ident = sql.Identifier(schema)
        self._table = sql.SQL("{}.audit_records").format(ident)
        self._keys = sql.SQL("{}.audit_keys").format(ident)
        self._columns = sql.SQL(", ").join(sql.Identifier(f) for f in COLUMNS)

    # ------------------------------------------------------------------ connection

    def _connection(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed:
            self._conn = psycopg.connect(
                self.dsn,
                autocommit=True,
                connect_timeout=max(1, round(self.connect_timeout)),
                application_name=f"kmsguard audit {self.schema}"[:63],
            )
            self._schema_ready = self._schema_ready and self._has_run_columns(self._conn)
        if not self._schema_ready:
            self._create_schema(self._conn)
            self._schema_ready = True
        return self._conn

    def _has_run_columns(self, conn: psycopg.Connection[Any]) -> bool:
        """The table exists, with the columns of runs (a table from before them is migrated)."""
        row = conn.execute(
            "SELECT 1 FROM information_schema.columns"
            " WHERE table_schema = %s AND table_name = 'audit_records' AND column_name = 'items'",
            (self.schema,),
        ).fetchone()
        return row is not None

    def _create_schema(self, conn: psycopg.Connection[Any]) -> None:
        ident = sql.Identifier(self.schema)
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(hashtext('kmsguard audit schema'))")
            conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(ident))
            new = not self._has_run_columns(conn)  # no table yet, or one from before runs were stored
            for statement in create_statements("postgres", prefix="{schema}."):
                conn.execute(sql.SQL(statement).format(schema=ident))
            # Only for a new or old table: an ALTER TABLE waits for every reader (a long
            # verify). A run's items are stored uncompressed: pglz made storing a run
            # several times slower.
            if new:
                for _name, definition in added_columns("postgres"):
                    add = f"ALTER TABLE {{schema}}.audit_records ADD COLUMN IF NOT EXISTS {definition}"
                    conn.execute(sql.SQL(add).format(schema=ident))
                storage = "ALTER TABLE {schema}.audit_records ALTER COLUMN items SET STORAGE EXTERNAL"
                conn.execute(sql.SQL(storage).format(schema=ident))

    def _run(self, fn: Any) -> Any:
        """Run ``fn(conn)``; on any failure drop the connection so the next call reconnects."""
        with self._lock:
            try:
                return fn(self._connection())
            except BaseException:
                conn, self._conn = self._conn, None
                if conn is not None:
                    conn.close()
                raise

    # ------------------------------------------------------------------ Sink

    def write(self, records: Sequence[AuditRun]) -> None:
        """COPY the batch into a session-temporary table, then insert what is not stored yet.

        COPY moves a batch in one stream (several times faster than row inserts); the
        INSERT ... ON CONFLICT DO NOTHING keeps redelivery idempotent. One transaction.
        A batch of a few rows (runs, mostly) is inserted directly, binary: as COPY text a
        run's items were hex-encoded and written twice.
        """
        rows = [row_values(r) for r in records]
        create = sql.SQL("CREATE TEMP TABLE IF NOT EXISTS kmsguard_audit_batch (LIKE {}) ON COMMIT DELETE ROWS").format(
            self._table
        )
        copy = sql.SQL("COPY kmsguard_audit_batch ({}) FROM STDIN").format(self._columns)
        insert = sql.SQL(
            "INSERT INTO {} ({}) SELECT {} FROM kmsguard_audit_batch ON CONFLICT (writer_id, seq) DO NOTHING"
        ).format(self._table, self._columns, self._columns)

        direct = sql.SQL("INSERT INTO {} ({}) VALUES ({}) ON CONFLICT (writer_id, seq) DO NOTHING").format(
            self._table, self._columns, sql.SQL(", ").join(sql.Placeholder() * len(COLUMNS))
        )

        def insert_batch(conn: psycopg.Connection[Any]) -> None:
            with conn.transaction(), conn.cursor(binary=True) as cur:
                if len(rows) <= _FEW_ROWS:  # runs, mostly: a few large rows, sent binary
                    cur.executemany(direct, rows)
                    return
                cur.execute(create)
                with cur.copy(copy) as stream:
                    for row in rows:
                        stream.write_row(row)
                cur.execute(insert)

        self._run(insert_batch)

    def head(self, writer_id: str) -> tuple[int, str] | None:
        last = "SELECT COALESCE(last_seq, seq), hash FROM {} WHERE writer_id = %s ORDER BY seq DESC LIMIT 1"
        stmt = sql.SQL(last).format(self._table)
        row = self._run(lambda conn: conn.execute(stmt, (writer_id,)).fetchone())
        return (int(row[0]), str(row[1])) if row else None

    def records(self) -> Iterator[AuditRecord]:
        """Streamed through a server-side cursor on a connection of its own (constant memory)."""
        stmt = sql.SQL("SELECT {} FROM {} ORDER BY writer_id, seq").format(self._columns, self._table)
        with (
            psycopg.connect(self.dsn, connect_timeout=max(1, round(self.connect_timeout))) as conn,
            conn.cursor(name="kmsguard_audit_verify") as cur,
        ):
            cur.itersize = 5000
            cur.execute(stmt)
            for row in cur:
                yield from records_from_row(row)

    def query(self, query: Query) -> list[AuditRecord]:
        where, params = query.sql_where("%s")
        # Constant columns; the filter values are bound parameters.
        text = "SELECT {} FROM {}" + where + " ORDER BY time DESC, writer_id DESC, seq DESC"  # noqa: S608
        if query.row_limit:
            text += f" LIMIT {int(query.row_limit)}"
        stmt = sql.SQL(text).format(self._columns, self._table)
        rows = self._run(lambda conn: conn.execute(stmt, params).fetchall())
        return newest((r for row in rows for r in records_from_row(row)), query)  # exact: see SqliteSink.query

    def load_key(self) -> str | None:
        stmt = sql.SQL("SELECT blob FROM {} WHERE name = 'audit'").format(self._keys)
        row = self._run(lambda conn: conn.execute(stmt).fetchone())
        return str(row[0]) if row else None

    def store_key(self, blob: str) -> str:
        stmt = sql.SQL("INSERT INTO {} (name, blob) VALUES ('audit', %s) ON CONFLICT (name) DO NOTHING").format(
            self._keys
        )
        self._run(lambda conn: conn.execute(stmt, (blob,)))
        stored = self.load_key()
        assert stored is not None
        return stored

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
