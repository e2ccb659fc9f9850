"""Table columns in PostgreSQL and SQLite: reading values, the job table, compare-and-set writes.

One class per database, with the same methods, so the runner does not care which it has.
Everything a batch does happens in one transaction: claiming the batch (PostgreSQL:
``FOR UPDATE SKIP LOCKED`` on its job-table row; SQLite: the database's write lock),
reading its rows, writing the changed values with
``UPDATE ... WHERE key = k AND column = old`` (a row the application changed meanwhile
keeps the application's value), and marking the batch done with its counts. A worker
that dies mid-batch leaves nothing behind: its transaction rolls back and the batch is
claimable again.

The job table ``kmsguard_rewrap`` lives next to the source table (same schema). One row
per batch: ``job`` (which operation over which source), ``run`` (a job's runs are
numbered; a finished run is followed by a new one), ``batch``, the key range
``(lo, hi]`` (NULL: unbounded), the rows seen when it was planned, its state
(``pending``/``done``), the worker (``host:pid``) that did it, and what it did.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import urllib.parse
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kmsguard.errors import InvalidInput, KmsGuardError
from kmsguard.rotation.sources import TableSource, Value, connection_url, sqlite_path

if TYPE_CHECKING:
    import psycopg

JOB_TABLE = "kmsguard_rewrap"

_COLUMNS = (
    "job TEXT NOT NULL, run INTEGER NOT NULL, batch INTEGER NOT NULL, lo {key}, hi {key}, "
    "planned INTEGER NOT NULL, state TEXT NOT NULL, worker TEXT, started {time}, finished {time}, "
    "rows INTEGER, changed INTEGER, current INTEGER, skipped INTEGER, failed INTEGER, "
    "key_calls INTEGER, failures TEXT, PRIMARY KEY (job, run, batch)"
)


class DatabaseError(KmsGuardError):
    """The database refused a statement; the message names its SQLSTATE, never row data."""

    code = "DATABASE_ERROR"
    http_status = 502
    default_message = "the database refused a statement"


@dataclass(frozen=True)
class Batch:
    """A claimed batch: its number and key range ``(lo, hi]``."""

    run: int
    number: int
    lo: Any
    hi: Any


@dataclass
class BatchResult:
    """What one batch did; ``failures`` holds (row key, error code), never a value."""

    rows: int = 0
    changed: int = 0
    current: int = 0
    skipped: int = 0
    failed: int = 0
    key_calls: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)

    def fail(self, key: Any, error: KmsGuardError) -> None:
        """Count a value that failed; it is recorded by its row key and error code only."""
        self.failed += 1
        self.failures.append((str(key), error.code))


def open_table(source: TableSource) -> contextlib.AbstractContextManager[PgTable | SqliteTable]:
    scheme = source.url.split(":", 1)[0].lower()
    return _opened(PgTable(source) if scheme.startswith("postgres") else SqliteTable(source))


@contextlib.contextmanager
def _opened(table: PgTable | SqliteTable) -> Iterator[PgTable | SqliteTable]:
    try:
        yield table
    finally:
        table.close()


class PgTable:
    """A PostgreSQL table column, read with server-side cursors, written in claimed batches."""

    def __init__(self, source: TableSource) -> None:
        import psycopg
        from psycopg import sql

        self.source = source
        self._sql = sql
        try:
            self.conn: psycopg.Connection[Any] = psycopg.connect(connection_url(source.url), autocommit=True)
        except psycopg.Error as exc:
            raise DatabaseError(f"cannot connect to {source.label.split('#')[0]}: {_pg_reason(exc)}") from None
        spec = source.spec
        schema, _, name = spec.table.rpartition(".")
        self.table = sql.Identifier(schema, name) if schema else sql.Identifier(name)
        self.jobs = sql.Identifier(schema, JOB_TABLE) if schema else sql.Identifier(JOB_TABLE)
        self.col = sql.Identifier(spec.column)
        self.key = sql.Identifier(spec.key)
        self.where = sql.SQL(f" AND ({spec.where})" if spec.where else "")
        try:
            self.key_type, self.col_type = self._types()
        except BaseException:
            self.conn.close()  # not a table of envelopes: the caller gets no table to close
            raise
        self.binary = self.col_type == "bytea"

    def close(self) -> None:
        self.conn.close()

    def _run(self, query: Any, params: Sequence[Any] | None = None) -> psycopg.Cursor[Any]:
        import psycopg

        try:
            return self.conn.execute(query, params)
        except psycopg.Error as exc:
            raise DatabaseError(_pg_reason(exc)) from None

    def _types(self) -> tuple[str, str]:
        spec = self.source.spec
        rel = self.table.as_string(self.conn)
        rows = self._run(
            "SELECT a.attname, format_type(a.atttypid, a.atttypmod) FROM pg_attribute a "
            "WHERE a.attrelid = to_regclass(%s) AND a.attname = ANY(%s) AND NOT a.attisdropped",
            (rel, [spec.key, spec.column]),
        ).fetchall()
        types = dict(rows)
        if spec.key not in types or spec.column not in types:
            raise InvalidInput(f"{self.source.label}: no such table, or no column {spec.key!r} / {spec.column!r}")
        return types[spec.key], types[spec.column]

    def _cast(self, type_name: str) -> Any:
        return self._sql.SQL(type_name)  # from format_type: the server's own spelling of a type

    # ------------------------------------------------------------------ reading

    def scan(self, batch: int) -> Iterator[list[Value]]:
        sql = self._sql
        query = sql.SQL("SELECT {c} FROM {t} WHERE {c} IS NOT NULL{w}").format(c=self.col, t=self.table, w=self.where)
        with self.conn.transaction(), self.conn.cursor(name="kmsguard_census", binary=True) as cur:
            cur.itersize = batch
            cur.execute(query)
            while rows := cur.fetchmany(batch):
                yield [r[0] for r in rows]

    def _keys(self, batch: int) -> Iterator[list[str]]:
        sql = self._sql
        query = sql.SQL("SELECT {k}::text AS _kmsguard_key FROM {t} WHERE {c} IS NOT NULL{w} ORDER BY {k}").format(
            k=self.key, c=self.col, t=self.table, w=self.where
        )
        with self.conn.cursor(name="kmsguard_plan") as cur:
            cur.itersize = max(batch, 1000)
            cur.execute(query)
            while rows := cur.fetchmany(batch):
                yield [r[0] for r in rows]

    def read(self, b: Batch, extra: Sequence[str] = ()) -> list[tuple[Any, Value, dict[str, Any]]]:
        """The batch's rows: (key, value, the ``extra`` columns by name), in key order."""
        sql = self._sql
        bounds = []
        params = []
        if b.lo is not None:
            bounds.append(sql.SQL(" AND {k} > %s::{kt}").format(k=self.key, kt=self._cast(self.key_type)))
            params.append(b.lo)
        if b.hi is not None:
            bounds.append(sql.SQL(" AND {k} <= %s::{kt}").format(k=self.key, kt=self._cast(self.key_type)))
            params.append(b.hi)
        more = sql.SQL("").join(sql.SQL(", {}").format(sql.Identifier(c)) for c in extra)
        query = sql.SQL("SELECT {k}, {c}{more} FROM {t} WHERE {c} IS NOT NULL{w}{b} ORDER BY {k}").format(
            k=self.key, c=self.col, more=more, t=self.table, w=self.where, b=sql.SQL("").join(bounds)
        )
        return [(r[0], r[1], dict(zip(extra, r[2:], strict=True))) for r in self._run(query, params).fetchall()]

    def compare_and_set(self, changes: Sequence[tuple[Any, Value, Value]]) -> set[Any]:
        """Write each (key, old, new) whose row still holds ``old``; the keys written."""
        if not changes:
            return set()
        sql = self._sql
        query = sql.SQL(
            "UPDATE {t} AS _t SET {c} = _v.new FROM unnest(%s::{kt}[], %s::{ct}[], %s::{ct}[]) AS _v(k, old, new) "
            "WHERE _t.{k} = _v.k AND _t.{c} = _v.old RETURNING _t.{k}"
        ).format(t=self.table, c=self.col, k=self.key, kt=self._cast(self.key_type), ct=self._cast(self.col_type))
        keys, olds, news = zip(*changes, strict=True)
        return {r[0] for r in self._run(query, (list(keys), list(olds), list(news))).fetchall()}

    # ------------------------------------------------------------------ the job table

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        with self.conn.transaction():
            yield

    def plan(self, job: str, batch: int) -> int:
        """The job's open run, or a new one planned in key ranges of ``batch`` rows; returns the run."""
        sql = self._sql
        with self.conn.transaction():
            self._run("SELECT pg_advisory_xact_lock(hashtext(%s))", (JOB_TABLE,))
            self._run(
                sql.SQL(
                    "CREATE TABLE IF NOT EXISTS {j} (" + _COLUMNS.format(key="TEXT", time="TIMESTAMPTZ") + ")"
                ).format(j=self.jobs)
            )
            row = self._run(sql.SQL("SELECT max(run) FROM {j} WHERE job = %s").format(j=self.jobs), (job,)).fetchone()
            last = row[0] if row and row[0] is not None else 0
            if last and self._pending(job, last):
                return int(last)
            run = last + 1
            ranges = list(_ranges(self._keys(batch)))
            with self.conn.cursor() as cur:
                cur.executemany(
                    sql.SQL(
                        "INSERT INTO {j} (job, run, batch, lo, hi, planned, state) "
                        "VALUES (%s, %s, %s, %s, %s, %s, 'pending')"
                    ).format(j=self.jobs),
                    [(job, run, n, lo, hi, count) for n, (lo, hi, count) in enumerate(ranges, 1)],
                )
            return run

    def _pending(self, job: str, run: int) -> bool:
        query = self._sql.SQL("SELECT 1 FROM {j} WHERE job = %s AND run = %s AND state = 'pending' LIMIT 1")
        return self._run(query.format(j=self.jobs), (job, run)).fetchone() is not None

    def claim(self, job: str, run: int) -> Batch | None:
        """Inside ``transaction()``: lock the next pending batch no other worker holds."""
        query = self._sql.SQL(
            "SELECT batch, lo, hi FROM {j} WHERE job = %s AND run = %s AND state = 'pending' "
            "ORDER BY batch LIMIT 1 FOR UPDATE SKIP LOCKED"
        ).format(j=self.jobs)
        row = self._run(query, (job, run)).fetchone()
        return None if row is None else Batch(run, row[0], row[1], row[2])

    def finish(self, job: str, b: Batch, worker: str, started: float, r: BatchResult) -> None:
        query = self._sql.SQL(
            "UPDATE {j} SET state = 'done', worker = %s, started = to_timestamp(%s), finished = now(), rows = %s, "
            "changed = %s, current = %s, skipped = %s, failed = %s, key_calls = %s, failures = %s "
            "WHERE job = %s AND run = %s AND batch = %s"
        ).format(j=self.jobs)
        self._run(query, (worker, started, *_counts(r), job, b.run, b.number))

    def summary(self, job: str, run: int) -> dict[str, Any]:
        return _summary(self._run(self._sql.SQL(_SUMMARY).format(j=self.jobs), (job, run)).fetchone())

    def failures(self, job: str, run: int) -> list[dict[str, str]]:
        query = self._sql.SQL(_FAILURES).format(j=self.jobs)
        return [f for (doc,) in self._run(query, (job, run)).fetchall() for f in json.loads(doc)]


class SqliteTable:
    """A SQLite table column. Batches take the database's write lock (``BEGIN IMMEDIATE``) in turn."""

    def __init__(self, source: TableSource) -> None:
        self.source = source
        path = sqlite_path(source.url)
        try:
            uri = f"file:{urllib.parse.quote(path)}?mode=rw"  # never create an empty database by mistake
            self.conn = sqlite3.connect(uri, uri=True, timeout=60, isolation_level=None)
        except sqlite3.Error as exc:
            raise DatabaseError(f"cannot open {path}: {exc}") from None
        spec = source.spec
        self.table = ".".join(_quote(p) for p in spec.table.split("."))
        schema = spec.table.rpartition(".")[0]
        self.jobs = (f"{_quote(schema)}." if schema else "") + _quote(JOB_TABLE)
        self.col, self.key = _quote(spec.column), _quote(spec.key)
        self.where = f" AND ({spec.where})" if spec.where else ""
        try:
            cols = {r[1]: str(r[2]).upper() for r in self._run(f"PRAGMA table_info({self.table})").fetchall()}
            if spec.key not in cols or spec.column not in cols:
                raise InvalidInput(f"{source.label}: no such table, or no column {spec.key!r} / {spec.column!r}")
        except BaseException:
            self.conn.close()  # not a table of envelopes: the caller gets no table to close
            raise
        self.binary = cols[spec.column] == "BLOB"

    def close(self) -> None:
        self.conn.close()

    def _run(self, query: str, params: Sequence[Any] = ()) -> sqlite3.Cursor:
        try:
            return self.conn.execute(query, params)
        except sqlite3.Error as exc:
            raise DatabaseError(f"{type(exc).__name__}: {exc}") from None

    def scan(self, batch: int) -> Iterator[list[Value]]:
        cur = self._run(f"SELECT {self.col} FROM {self.table} WHERE {self.col} IS NOT NULL{self.where}")
        while rows := cur.fetchmany(batch):
            yield [r[0] for r in rows]

    def read(self, b: Batch, extra: Sequence[str] = ()) -> list[tuple[Any, Value, dict[str, Any]]]:
        bounds, params = "", []
        if b.lo is not None:
            bounds += f" AND {self.key} > ?"
            params.append(b.lo)
        if b.hi is not None:
            bounds += f" AND {self.key} <= ?"
            params.append(b.hi)
        more = "".join(f", {_quote(c)}" for c in extra)
        query = (
            f"SELECT {self.key}, {self.col}{more} FROM {self.table} "
            f"WHERE {self.col} IS NOT NULL{self.where}{bounds} ORDER BY {self.key}"
        )
        return [(r[0], r[1], dict(zip(extra, r[2:], strict=True))) for r in self._run(query, params).fetchall()]

    def compare_and_set(self, changes: Sequence[tuple[Any, Value, Value]]) -> set[Any]:
        query = f"UPDATE {self.table} SET {self.col} = ? WHERE {self.key} = ? AND {self.col} = ?"
        return {key for key, old, new in changes if self._run(query, (new, key, old)).rowcount == 1}

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        self._run("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.conn.rollback()
            raise
        self._run("COMMIT")

    def plan(self, job: str, batch: int) -> int:
        with self.transaction():
            self._run(f"CREATE TABLE IF NOT EXISTS {self.jobs} (" + _COLUMNS.format(key="", time="REAL") + ")")
            row = self._run(f"SELECT max(run) FROM {self.jobs} WHERE job = ?", (job,)).fetchone()
            last = row[0] if row and row[0] is not None else 0
            pending = self._run(
                f"SELECT 1 FROM {self.jobs} WHERE job = ? AND run = ? AND state = 'pending' LIMIT 1", (job, last)
            ).fetchone()
            if last and pending:
                return int(last)
            run = last + 1
            cur = self._run(
                f"SELECT {self.key} FROM {self.table} WHERE {self.col} IS NOT NULL{self.where} ORDER BY {self.key}"
            )
            keys = iter(lambda: [r[0] for r in cur.fetchmany(batch)], [])
            self.conn.executemany(
                f"INSERT INTO {self.jobs} (job, run, batch, lo, hi, planned, state) "
                "VALUES (?, ?, ?, ?, ?, ?, 'pending')",
                [(job, run, n, lo, hi, count) for n, (lo, hi, count) in enumerate(_ranges(keys), 1)],
            )
            return run

    def claim(self, job: str, run: int) -> Batch | None:
        row = self._run(
            f"SELECT batch, lo, hi FROM {self.jobs} WHERE job = ? AND run = ? AND state = 'pending' "
            "ORDER BY batch LIMIT 1",
            (job, run),
        ).fetchone()
        return None if row is None else Batch(run, row[0], row[1], row[2])

    def finish(self, job: str, b: Batch, worker: str, started: float, r: BatchResult) -> None:
        self._run(
            f"UPDATE {self.jobs} SET state = 'done', worker = ?, started = ?, "
            "finished = (julianday('now') - 2440587.5) * 86400.0, rows = ?, "
            "changed = ?, current = ?, skipped = ?, failed = ?, key_calls = ?, failures = ? "
            "WHERE job = ? AND run = ? AND batch = ?",
            (worker, started, *_counts(r), job, b.run, b.number),
        )

    def summary(self, job: str, run: int) -> dict[str, Any]:
        return _summary(self._run(_SUMMARY.replace("{j}", self.jobs).replace("%s", "?"), (job, run)).fetchone())

    def failures(self, job: str, run: int) -> list[dict[str, str]]:
        query = _FAILURES.replace("{j}", self.jobs).replace("%s", "?")
        return [f for (doc,) in self._run(query, (job, run)).fetchall() for f in json.loads(doc)]


_SUMMARY = (
    "SELECT count(*), sum(planned), sum(CASE WHEN state = 'done' THEN 1 ELSE 0 END), sum(rows), sum(changed), "
    "sum(current), sum(skipped), sum(failed), sum(key_calls), count(DISTINCT worker) "
    "FROM {j} WHERE job = %s AND run = %s"
)


_FAILURES = "SELECT failures FROM {j} WHERE job = %s AND run = %s AND failures IS NOT NULL ORDER BY batch"


def _summary(row: Any) -> dict[str, Any]:
    names = (
        "batches",
        "planned",
        "batches_done",
        "rows",
        "changed",
        "current",
        "skipped",
        "failed",
        "key_calls",
        "workers",
    )
    return {name: int(value or 0) for name, value in zip(names, row, strict=True)}


def _counts(r: BatchResult) -> tuple[Any, ...]:
    failures = json.dumps([{"key": k, "code": c} for k, c in r.failures]) if r.failures else None
    return (r.rows, r.changed, r.current, r.skipped, r.failed, r.key_calls, failures)


def _ranges(chunks: Iterator[list[Any]]) -> Iterator[tuple[Any, Any, int]]:
    """Key ranges ``(lo, hi]`` covering every key: the first open below, the last open above."""
    lo = None
    previous: tuple[Any, int] | None = None
    for keys in chunks:
        if previous is not None:
            yield lo, previous[0], previous[1]
            lo = previous[0]
        previous = (keys[-1], len(keys))
    yield lo, None, previous[1] if previous else 0


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _pg_reason(exc: Exception) -> str:
    """A PostgreSQL error without its DETAIL (which may quote row values)."""
    state = getattr(exc, "sqlstate", None)
    diag = getattr(exc, "diag", None)
    primary = getattr(diag, "message_primary", None) if diag is not None else None
    return f"{type(exc).__name__}" + (f" [{state}]" if state else "") + (f": {primary}" if primary else "")
