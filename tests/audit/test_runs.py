"""Runs: consecutive hit frames of one template stored as one row and one chain link.

Each test compares with linking the same entries one record at a time: a run must read
back as exactly those records (all but their hashes), verify, and show every kind of
tampering as a single record's would.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kmsguard.audit.deliver import MAX_RUN, link_batch
from kmsguard.audit.postgres import PostgresSink
from kmsguard.audit.record import FIELDS, AuditKeys, AuditRecord, Chain, Compact, Template
from kmsguard.audit.sink import JsonLinesSink, Query, Sink
from kmsguard.audit.sqlite import SqliteSink
from kmsguard.audit.verify import verify

from .conftest import PG_DSN

SHAPE = ("encrypt", "general", ("local:general:v1",), (), "svc", "ok", None, 0, True, (("tenant", "t"),))
OTHER = ("decrypt", "general", ("local:general:v1",), (), "svc", "ok", None, 0, True, (("tenant", "t"),))
START = 1_764_300_000_000_000  # microseconds since the epoch


def full(n: int) -> tuple[Any, ...]:
    return (START / 1e6 + n, "encrypt", "pii", ("local:pii:v1",), (), "svc", "ok", None, 0.002, 1, False, n, "r", ())


def entries(*, templates: dict[tuple[Any, ...], Template] | None = None) -> list[tuple[int, Any]]:
    """Record 1 in full, 2-6 hits of SHAPE (a run), 7 one hit of OTHER, 8-9 hits of SHAPE (a run)."""
    t = templates if templates is not None else {s: Template(s, "abcdef012345") for s in (SHAPE, OTHER)}

    def hit(seq: int, shape: tuple[Any, ...]) -> Compact:
        # Start times out of sequence order, as from several threads.
        return Compact(t[shape], START + (seq * 7919) % 1000, 1_500 + seq, 100 + seq, 40 + seq)

    shapes = {7: OTHER}
    return [(1, full(1))] + [(seq, hit(seq, shapes.get(seq, SHAPE))) for seq in range(2, 10)]


def one_by_one(keys: AuditKeys, writer: str) -> list[list[Any]]:
    chain = Chain(keys, writer)
    return [chain.link(seq, fields) for seq, fields in entries()]


def without_hashes(r: AuditRecord) -> tuple[Any, ...]:
    values = dict(zip(FIELDS, r.as_values(), strict=True))
    return tuple(v for f, v in values.items() if f not in ("prev_hash", "hash"))


@pytest.fixture
def keys() -> AuditKeys:
    return AuditKeys(os.urandom(32))


@pytest.fixture(params=["sqlite", "jsonl", "postgres"])
def sink(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Sink]:
    if request.param == "sqlite":
        s: Sink = SqliteSink(tmp_path / "audit.db")
    elif request.param == "jsonl":
        s = JsonLinesSink(tmp_path / "audit.jsonl")
    else:
        s = PostgresSink(PG_DSN, request.getfixturevalue("pg_schema"))
    yield s
    s.close()


def stored(sink: Sink, keys: AuditKeys, writer: str = "w") -> list[list[Any]]:
    rows = link_batch(Chain(keys, writer), entries())
    sink.write(rows)
    return rows


def test_a_run_reads_back_as_its_records_and_verifies(sink: Sink, keys: AuditKeys) -> None:
    rows = stored(sink, keys)
    assert [(r[1], len(r)) for r in rows] == [(1, 18), (2, 20), (7, 18), (8, 20)]  # two runs, two records
    records = list(sink.records())
    assert [r.seq for r in records] == list(range(1, 10))
    expected = [AuditRecord.from_dict(dict(zip(FIELDS, v, strict=True))) for v in one_by_one(keys, "w")]
    assert [without_hashes(r) for r in records] == [without_hashes(r) for r in expected]
    assert records[3].run is not None and records[3].hash == rows[1][17]  # a run's records carry its hash
    report = verify(records, keys)
    assert report.intact and report.records == 9 and report.heads == {"w": (9, rows[-1][17])}
    assert sink.head("w") == (9, rows[-1][17])
    sink.write(rows[1:])  # delivered again after a lost acknowledgement: stored once
    assert len(list(sink.records())) == 9


def test_the_newest_records_are_found_inside_runs(sink: Sink, keys: AuditKeys) -> None:
    stored(sink, keys)
    everything = sorted(sink.records(), key=lambda r: (r.time, r.seq))
    newest = sink.query(Query(limit=3))
    assert [r.seq for r in newest] == [r.seq for r in everything[-3:]]
    since = everything[4].time
    assert [r.seq for r in sink.query(Query(since=since))] == [r.seq for r in everything if r.time >= since]
    assert [r.seq for r in sink.query(Query(operation="decrypt"))] == [7]


def _sql(sink: Sink, statement: str, *params: object) -> None:
    if isinstance(sink, SqliteSink):
        with sqlite3.connect(sink.path) as conn:
            conn.execute(statement.replace("%s", "?"), params)
    else:
        assert isinstance(sink, PostgresSink)
        with psycopg.connect(PG_DSN, autocommit=True) as conn:
            conn.execute(statement.replace("audit_records", f"{sink.schema}.audit_records"), params)


@pytest.fixture
def sql_sink(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Sink]:
    yield from _sql_sinks(request, tmp_path)


def _sql_sinks(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Sink]:
    s: Sink = (
        SqliteSink(tmp_path / "audit.db")
        if request.param == "sqlite"
        else PostgresSink(PG_DSN, request.getfixturevalue("pg_schema"))
    )
    yield s
    s.close()


TAMPERING = {
    # statement, the record verify names, and what it says
    "an item": ("UPDATE audit_records SET items = %s WHERE seq = 2", 2, "altered"),
    "the time column": ("UPDATE audit_records SET time = '2020-01-01T00:00:00.000000Z' WHERE seq = 2", 2, "altered"),
    "a shape column": ("UPDATE audit_records SET principal = 'mallory' WHERE seq = 8", 8, "altered"),
    "the run's end": ("UPDATE audit_records SET last_seq = 5 WHERE seq = 2", 2, "altered"),
    "the whole run": ("DELETE FROM audit_records WHERE seq = 2", 7, "removed"),
}


@pytest.mark.parametrize("sql_sink", ["sqlite", "postgres"], indirect=True)
@pytest.mark.parametrize("what", list(TAMPERING))
def test_tampering_with_a_run_is_named(sql_sink: Sink, keys: AuditKeys, what: str) -> None:
    rows = stored(sql_sink, keys)
    statement, seq, kind = TAMPERING[what]
    flipped = bytes([rows[1][19][0] ^ 1]) + rows[1][19][1:]
    _sql(sql_sink, statement, *([flipped] if "%s" in statement else []))
    [problem] = verify(sql_sink.records(), keys).problems
    assert (problem.seq, problem.kind) == (seq, kind)


@pytest.mark.parametrize("sql_sink", ["sqlite", "postgres"], indirect=True)
def test_a_run_moved_to_hide_a_deletion_is_named(sql_sink: Sink, keys: AuditKeys) -> None:
    stored(sql_sink, keys)
    _sql(sql_sink, "DELETE FROM audit_records WHERE seq = 7")
    _sql(sql_sink, "UPDATE audit_records SET seq = 7, last_seq = 8 WHERE seq = 8")
    [problem] = verify(sql_sink.records(), keys).problems
    assert (problem.seq, problem.kind) == (7, "moved") and "record 8" in problem.detail


def test_an_anchor_on_a_run_catches_its_deletion(tmp_path: Path, keys: AuditKeys) -> None:
    sink = SqliteSink(tmp_path / "audit.db")
    stored(sink, keys)
    anchor = verify(sink.records(), keys).heads
    assert anchor["w"][0] == 9
    assert verify(sink.records(), keys, anchor).intact
    _sql(sink, "DELETE FROM audit_records WHERE seq = 8")  # the last run: an open chain's tail
    assert verify(sink.records(), keys).intact
    [problem] = verify(sink.records(), keys, anchor).problems
    assert (problem.seq, problem.kind) == (9, "removed")


def test_a_jsonl_run_that_is_not_base64_is_altered(tmp_path: Path, keys: AuditKeys) -> None:
    sink = JsonLinesSink(tmp_path / "audit.jsonl")
    stored(sink, keys)
    lines = sink.path.read_text().splitlines()
    lines[1] = lines[1].replace('"items":"', '"items":"!')
    sink.path.write_text("\n".join(lines) + "\n")
    [problem] = verify(sink.records(), keys).problems
    assert (problem.seq, problem.kind) == (2, "altered")


_OLD_SQLITE_SCHEMA = """
CREATE TABLE audit_records (
    writer_id TEXT NOT NULL, seq INTEGER NOT NULL, prev_hash TEXT NOT NULL, time TEXT NOT NULL,
    operation TEXT NOT NULL, classification TEXT, key_refs TEXT NOT NULL, regions TEXT NOT NULL,
    principal TEXT NOT NULL, outcome TEXT NOT NULL, error_code TEXT, duration_us INTEGER NOT NULL,
    kms_calls INTEGER NOT NULL, cache_hit INTEGER, size INTEGER NOT NULL, request_id TEXT,
    context TEXT NOT NULL, hash TEXT NOT NULL,
    PRIMARY KEY (writer_id, seq)
);
"""


def test_a_database_from_before_runs_is_migrated(tmp_path: Path, keys: AuditKeys) -> None:
    from kmsguard.audit.sink import to_row

    path = tmp_path / "audit.db"
    with sqlite3.connect(path) as conn:
        conn.executescript(_OLD_SQLITE_SCHEMA)
        old = [to_row(v)[:18] for v in one_by_one(keys, "old")]
        conn.executemany(f"INSERT INTO audit_records VALUES ({', '.join('?' * 18)})", old)
    sink = SqliteSink(path)
    stored(sink, keys, "new")
    report = verify(sink.records(), keys)
    assert report.intact and report.records == 18 and sink.head("old") == (9, old[-1][17])
    sink.close()


_OLD_PG_SCHEMA = """
CREATE TABLE {schema}.audit_records (
    writer_id text NOT NULL, seq bigint NOT NULL, prev_hash text NOT NULL, time text NOT NULL,
    operation text NOT NULL, classification text, key_refs text NOT NULL, regions text NOT NULL,
    principal text NOT NULL, outcome text NOT NULL, error_code text, duration_us bigint NOT NULL,
    kms_calls integer NOT NULL, cache_hit boolean, size bigint NOT NULL, request_id text,
    context text NOT NULL, hash text NOT NULL,
    PRIMARY KEY (writer_id, seq)
)
"""


def test_a_postgres_table_from_before_runs_is_migrated(pg_schema: str, keys: AuditKeys) -> None:
    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{pg_schema}"')
        conn.execute(_OLD_PG_SCHEMA.format(schema=f'"{pg_schema}"'))
    sink = PostgresSink(PG_DSN, pg_schema)
    sink.write(one_by_one(keys, "old"))
    stored(sink, keys, "new")
    assert verify(sink.records(), keys).intact
    sink.close()


def test_a_run_never_exceeds_its_limit(keys: AuditKeys) -> None:
    template = Template(SHAPE, "abcdef012345")
    hits = [(seq, Compact(template, START + seq, 1_000, 1, seq)) for seq in range(1, MAX_RUN + 3)]
    rows = link_batch(Chain(keys, "w"), hits)
    assert [(r[1], r[18]) for r in rows] == [(1, MAX_RUN), (MAX_RUN + 1, MAX_RUN + 2)]


@settings(max_examples=200, deadline=None)
@given(
    first=st.integers(1, 2**40),
    items=st.lists(
        st.tuples(st.integers(0, 2**57), st.integers(0, 2**40), st.integers(0, 2**40), st.integers(0, 2**40)),
        min_size=2,
        max_size=40,
    ),
    flip=st.integers(0, 10_000),
)
def test_a_run_is_its_records_and_any_changed_byte_breaks_it(
    first: int, items: list[tuple[int, int, int, int]], flip: int
) -> None:
    from kmsguard.audit.record import AuditRun

    keys = AuditKeys(bytes(32))
    template = Template(SHAPE, "abcdef012345")
    compacts = [Compact(template, *item) for item in items]
    row = Chain(keys, "w", first - 1, "0" * 64).link_run(first, compacts)
    run = AuditRun(AuditRecord.from_dict(dict(zip(FIELDS, row[:18], strict=True))), row[18], row[19])
    singles = Chain(keys, "w", first - 1, "0" * 64)
    expected = [singles.link(first + i, c) for i, c in enumerate(compacts)]
    assert [without_hashes(r) for r in run.records()] == [
        without_hashes(AuditRecord.from_dict(dict(zip(FIELDS, v, strict=True)))) for v in expected
    ]
    assert keys.chain_hash(run.canonical()) == run.hash
    canonical = bytearray(run.canonical())
    canonical[flip % len(canonical)] ^= 1
    assert keys.chain_hash(bytes(canonical)) != run.hash
