"""The SQL sinks' tables, generated from the record's definition (record.SCHEMA).

Both SQLite and PostgreSQL store every column of record.AuditRecord and
record.AuditRun as it is (JSON fields as canonical JSON text), so verify can rebuild
the exact bytes the chain MAC covers. A table created by a release from before runs
existed lacks the run's columns; :func:`added_columns` gives what adds them.
"""

from __future__ import annotations

from kmsguard.audit.record import RECORD_VERSION, SCHEMA, Column

#: SQL type of each Column.kind, per dialect.
TYPES = {
    "sqlite": {"text": "TEXT", "int": "INTEGER", "bigint": "INTEGER", "bool": "INTEGER", "bytes": "BLOB"},
    "postgres": {"text": "text", "int": "integer", "bigint": "bigint", "bool": "boolean", "bytes": "bytea"},
}
RECORDS = "audit_records"
KEYS = "audit_keys"


def _definition(column: Column, dialect: str) -> str:
    return f"{column.name} {TYPES[dialect][column.kind]}{'' if column.null else ' NOT NULL'}"


def create_statements(dialect: str, prefix: str = "") -> list[str]:
    """CREATE TABLE / INDEX IF NOT EXISTS for the records and the wrapped audit key.

    ``prefix`` qualifies the table names (PostgreSQL's ``"schema".``, already quoted).
    """
    columns = ",\n    ".join(_definition(c, dialect) for c in SCHEMA)
    return [
        f"CREATE TABLE IF NOT EXISTS {prefix}{RECORDS} (\n    {columns},\n    PRIMARY KEY (writer_id, seq)\n)",
        f"CREATE INDEX IF NOT EXISTS {RECORDS}_time ON {prefix}{RECORDS} (time)",
        f"CREATE TABLE IF NOT EXISTS {prefix}{KEYS} (name {TYPES[dialect]['text']} PRIMARY KEY,"
        f" blob {TYPES[dialect]['text']} NOT NULL)",
    ]


def added_columns(dialect: str) -> list[tuple[str, str]]:
    """(name, definition) of each column added after the first row format (all nullable)."""
    return [(c.name, _definition(c, dialect)) for c in SCHEMA if c.since > RECORD_VERSION]
