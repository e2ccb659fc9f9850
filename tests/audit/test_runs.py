"""Runs: consecutive hit frames of one template stored as one row and one chain link.

Each test compares with linking the same entries one record at a time: a run must read
back as exactly those records (all but their hashes), verify, and show every kind of
tampering as a single record's would.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import psycopg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kmsguard.audit.chain import AuditKeys, Chain
from kmsguard.audit.deliver import link_batch
from kmsguard.audit.facts import Hits, Spooled, Template
from kmsguard.audit.postgres import PostgresSink
from kmsguard.audit.record import MAX_RUN, RUN_ITEM, AuditRecord, AuditRun
from kmsguard.audit.sink import JsonLinesSink, Query, Sink
from kmsguard.audit.sqlite import SqliteSink
from kmsguard.audit.verify import verify

from .conftest import PG_DSN
from .test_formats import release_0_1_0_rows

SHAPE = ("encrypt", "general", ("local:general:v1",), (), "svc", "ok", None, 0, True, (("tenant", "t"),))
OTHER = ("decrypt", "general", ("local:general:v1",), (), "svc", "ok", None, 0, True, (("tenant", "t"),))
START = 1_764_300_000_000_000  # microseconds since the epoch


def full(n: int) -> Spooled:
    return Spooled(START / 1e6 + n, "encrypt", "pii", ("local:pii:v1",), (), "svc", "ok", None, 0.002, 1, False, n, "r",
                   ())


TEMPLATES = {shape: Template(shape, "abcdef012345") for shape in (SHAPE, OTHER)}


def hit(seq: int, shape: tuple[Any, ...] = SHAPE) -> Hits:
    # Start times out of sequence order, as from several threads.
    started = START + (seq * 7919) % 1000
    return Hits(TEMPLATES[shape], RUN_ITEM.pack(started, 1_500 + seq, 100 + seq, 40 + seq), started)


def hits_of(run: list[Hits]) -> Hits:
    """Lone hits packed as the spool reader would take their frames (frames.take_hits)."""
    return Hits(run[0].template, b"".join(h.items for h in run), max(h.latest for h in run))


def singles() -> list[tuple[int, Any]]:
    """Record 1 in full, then hits: 2-6 and 8-9 of SHAPE, 7 of OTHER."""
    return [(1, full(1))] + [(seq, hit(seq, OTHER if seq == 7 else SHAPE)) for seq in range(2, 10)]


def entries() -> list[tuple[int, Any]]:
    """singles() as the spool reader gives them: consecutive hits of one template as one Hits."""
    return [
        (1, full(1)),
        (2, hits_of([hit(seq) for seq in range(2, 7)])),
        (7, hit(7, OTHER)),
        (8, hits_of([hit(8), hit(9)])),
    ]


def one_by_one(keys: AuditKeys, writer: str) -> list[AuditRun]:
    chain = Chain(keys, writer)
    return [chain.link(seq, entry) for seq, entry in singles()]


def without_hashes(r: AuditRecord) -> dict[str, Any]:
    return {f: v for f, v in r.to_dict().items() if f not in ("prev_hash", "hash")}


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


def stored(sink: Sink, keys: AuditKeys, writer: str = "w") -> list[AuditRun]:
    rows = link_batch(Chain(keys, writer), entries())
    sink.write(rows)
    return rows


def test_a_run_reads_back_as_its_records_and_verifies(sink: Sink, keys: AuditKeys) -> None:
    rows = stored(sink, keys)
    # A record, a run of five, a lone hit (a run of one), a run of two.
    assert [(r.seq, r.last_seq, len(r.items)) for r in rows] == [(1, 1, 0), (2, 6, 160), (7, 7, 32), (8, 9, 64)]
    records = list(sink.records())
    assert [r.seq for r in records] == list(range(1, 10))
    expected = [r for row in one_by_one(keys, "w") for r in row.records()]
    assert [without_hashes(r) for r in records] == [without_hashes(r) for r in expected]
    assert records[3].run is not None and records[3].hash == rows[1].hash  # a run's records carry its hash
    report = verify(records, keys)
    assert report.intact and report.records == 9 and report.heads == {"w": (9, rows[-1].hash)}
    assert sink.head("w") == (9, rows[-1].hash)
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
        with closing(sqlite3.connect(sink.path)) as conn, conn:
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
    "a start no calendar holds": ("UPDATE audit_records SET items = %s WHERE seq = 8", 8, "altered"),
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
    flipped = bytes([rows[1].items[0] ^ 1]) + rows[1].items[1:]
    far = b"\xff" * 8 + rows[3].items[8:]  # the run 8-9's first start, ~5.8e5 years on
    _sql(sql_sink, statement, *([far if seq == 8 else flipped] if "%s" in statement else []))
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
    with closing(SqliteSink(tmp_path / "audit.db")) as sink:
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


#: The records table as release 0.1.0 created it before runs were stored (frozen: its DDL is gone).
PRE_RUNS_TABLE = """CREATE TABLE {schema}audit_records (
    writer_id TEXT NOT NULL, seq INTEGER NOT NULL, prev_hash TEXT NOT NULL, time TEXT NOT NULL,
    operation TEXT NOT NULL, classification TEXT, key_refs TEXT NOT NULL, regions TEXT NOT NULL,
    principal TEXT NOT NULL, outcome TEXT NOT NULL, error_code TEXT, duration_us BIGINT NOT NULL,
    kms_calls INTEGER NOT NULL, cache_hit {bool}, size BIGINT NOT NULL, request_id TEXT,
    context TEXT NOT NULL, hash TEXT NOT NULL,
    PRIMARY KEY (writer_id, seq)
)"""


def _continued(keys: AuditKeys, writer: str, head: tuple[int, str]) -> list[AuditRun]:
    """Today's rows continuing an old chain: a record and a run."""
    chain = Chain(keys, writer, *head)
    return link_batch(chain, [(head[0] + 1, full(head[0] + 1)), (head[0] + 2, hits_of([hit(2), hit(3)]))])


def test_a_database_from_before_runs_is_migrated(tmp_path: Path, keys: AuditKeys) -> None:
    path = tmp_path / "audit.db"
    old = release_0_1_0_rows(keys, "old", 3)
    with closing(sqlite3.connect(path)) as conn, conn:
        conn.execute(PRE_RUNS_TABLE.format(schema="", bool="INTEGER"))
        conn.executemany(f"INSERT INTO audit_records VALUES ({', '.join('?' * 18)})", old)
    with closing(SqliteSink(path)) as sink:
        assert sink.head("old") == (3, old[-1][17])
        sink.write(_continued(keys, "old", (3, old[-1][17])))
        stored(sink, keys, "new")
        report = verify(sink.records(), keys)
        assert report.intact and report.records == 6 + 9 and sink.head("old") == (6, report.heads["old"][1])


def test_a_postgres_table_from_before_runs_is_migrated(pg_schema: str, keys: AuditKeys) -> None:
    from psycopg import sql

    old = release_0_1_0_rows(keys, "old", 3)
    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(pg_schema)))
        conn.execute(PRE_RUNS_TABLE.format(schema=f"{pg_schema}.", bool="BOOLEAN"))
        insert = sql.SQL("INSERT INTO {}.audit_records VALUES ({})").format(
            sql.Identifier(pg_schema), sql.SQL(", ").join(sql.Placeholder() * 18)
        )
        for row in old:
            conn.execute(insert, (*row[:13], bool(row[13]), *row[14:]))
    sink = PostgresSink(PG_DSN, pg_schema)
    sink.write(_continued(keys, "old", (3, old[-1][17])))
    stored(sink, keys, "new")
    report = verify(sink.records(), keys)
    assert report.intact and report.records == 6 + 9
    with psycopg.connect(PG_DSN) as conn:
        storage = conn.execute(
            "SELECT attstorage FROM pg_attribute WHERE attrelid = %s::regclass AND attname = 'items'",
            (f"{pg_schema}.audit_records",),
        ).fetchone()
    assert storage == ("e",)  # items uncompressed (EXTERNAL), as in a new table
    sink.close()


def test_a_run_the_sink_partly_holds_is_linked_from_where_it_stopped(keys: AuditKeys) -> None:
    """A restarted deliverer may read a segment again in other pieces than before."""
    chain = Chain(keys, "w")
    first = link_batch(chain, [(1, full(1)), (2, hits_of([hit(2), hit(3)]))])
    again = link_batch(chain, [(1, full(1)), (2, hits_of([hit(seq) for seq in range(2, 7)])), (7, hit(7, OTHER))])
    assert [(r.seq, r.last_seq) for r in first + again] == [(1, 1), (2, 3), (4, 6), (7, 7)]
    assert len(again[0].items) == 3 * 32
    assert link_batch(chain, [(2, hits_of([hit(seq) for seq in range(2, 7)]))]) == []


def _frames(template: int, seqs: range) -> bytes:
    from kmsguard.audit.frames import HIT_FLAG, HIT_PAYLOAD, hit_check

    out = b""
    for seq in seqs:
        fields = (seq, template, START + seq, 1_000 + seq, seq, 900 + seq)
        header = (HIT_FLAG | HIT_PAYLOAD).to_bytes(4, "big") + hit_check(*fields).to_bytes(4, "big")
        out += header + b"".join(v.to_bytes(8, "big") for v in fields)
    return out


@pytest.mark.parametrize("module", ["compiled", "source"])
def test_the_reader_takes_a_run_of_frames_up_to_the_first_that_does_not_belong(module: str) -> None:
    import importlib.util

    from kmsguard.audit import frames

    if module == "source":
        spec = importlib.util.spec_from_file_location("frames_source", Path(frames.__file__).with_name("frames.py"))
        assert spec is not None and spec.loader is not None
        frames = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(frames)
    take = frames.take_hits
    data = _frames(3, range(1, 6))
    count, items, latest = take(data, 0, 1, 3, MAX_RUN)
    assert (count, latest) == (5, START + 5)
    assert items == b"".join(RUN_ITEM.pack(START + seq, 1_000 + seq, seq, 900 + seq) for seq in range(1, 6))
    assert take(data, 0, 1, 3, 2)[0] == 2  # the limit
    assert take(data, 56, 2, 3, MAX_RUN)[0] == 4  # from a later frame
    assert take(data + _frames(4, range(6, 8)), 0, 1, 3, MAX_RUN)[0] == 5  # another template ends it
    assert take(data + _frames(3, range(7, 9)), 0, 1, 3, MAX_RUN)[0] == 5  # so does a gap in the numbers
    torn = bytearray(data)
    torn[3 * 56 + 30] ^= 1  # frame 4's start time: its check fails
    assert take(bytes(torn), 0, 1, 3, MAX_RUN)[0] == 3
    assert take(data[: 2 * 56 + 20], 0, 1, 3, MAX_RUN)[0] == 2  # a frame cut short
    assert take(b"", 0, 1, 3, MAX_RUN) == (0, b"", 0)


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
    keys = AuditKeys(bytes(32))
    template = Template(SHAPE, "abcdef012345")
    lone = [Hits(template, RUN_ITEM.pack(*item), item[0]) for item in items]
    run = Chain(keys, "w", first - 1, "0" * 64).link(first, hits_of(lone))
    singles = Chain(keys, "w", first - 1, "0" * 64)
    expected = [r for i, h in enumerate(lone) for r in singles.link(first + i, h).records()]
    assert [without_hashes(r) for r in run.records()] == [without_hashes(r) for r in expected]
    assert keys.chain_hash(run.canonical()) == run.hash
    canonical = bytearray(run.canonical())
    canonical[flip % len(canonical)] ^= 1
    assert keys.chain_hash(bytes(canonical)) != run.hash
