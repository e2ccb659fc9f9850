"""The hash chain and verify: intact chains pass; each kind of tampering is named."""

from __future__ import annotations

import hmac
import os
import sqlite3
import time
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from hypothesis import given, settings
from hypothesis import strategies as st

from kmsguard.audit.chain import AuditKeys, Chain, OutOfSequence
from kmsguard.audit.facts import Hits, Spooled, Template
from kmsguard.audit.record import (
    CLOSE_OPERATION,
    GENESIS,
    RECORD_COLUMNS,
    RUN_ITEM,
    AuditRecord,
    AuditRun,
    format_time,
)
from kmsguard.audit.sqlite import SqliteSink
from kmsguard.audit.verify import load_anchor, save_anchor, verify
from kmsguard.errors import InvalidInput


def fields(n: int, op: str = "encrypt", ctx: tuple[tuple[str, str], ...] = (("tenant", "acme"),)) -> Spooled:
    return Spooled(time.time(), op, "general", ("local:general:v1",), (), "alice", "ok", None, 0.001, 1, False, n, "r",
                   ctx)


def chain_records(keys: AuditKeys, writer: str, count: int, close: bool = True) -> list[AuditRun]:
    chain = Chain(keys, writer)
    out = [chain.link(i + 1, fields(i)) for i in range(count)]
    if close:
        out.append(chain.link(count + 1, fields(0, CLOSE_OPERATION, ())))
    return out


@pytest.fixture
def keys() -> AuditKeys:
    return AuditKeys(os.urandom(32))


@pytest.fixture
def db(tmp_path: Path, keys: AuditKeys) -> Iterator[SqliteSink]:
    with closing(SqliteSink(tmp_path / "audit.db")) as sink:
        sink.write(chain_records(keys, "w1", 6))
        sink.write(chain_records(keys, "w2", 3))
        yield sink


def sql(sink: SqliteSink, statement: str, *params: object) -> None:
    with closing(sqlite3.connect(sink.path)) as conn, conn:
        conn.execute(statement, params)


def test_records_link_and_verify(db: SqliteSink, keys: AuditKeys) -> None:
    records = list(db.records())
    assert [r.seq for r in records if r.writer_id == "w1"] == [1, 2, 3, 4, 5, 6, 7]
    assert records[0].prev_hash == GENESIS and records[1].prev_hash == records[0].hash
    report = verify(records, keys)
    assert report.intact and report.writers == 2 and report.records == 11 and report.open_writers == []


def test_context_values_are_keyed_hashes(db: SqliteSink, keys: AuditKeys) -> None:
    record = next(db.records())
    assert set(record.context) == {"tenant"}
    assert "acme" not in record.context["tenant"]
    assert record.context["tenant"] == keys.hash_context([("tenant", "acme")])["tenant"]
    assert AuditKeys(os.urandom(32)).hash_context([("tenant", "acme")]) != record.context


def test_an_edited_record_is_named(db: SqliteSink, keys: AuditKeys) -> None:
    sql(db, "UPDATE audit_records SET outcome = 'error' WHERE writer_id = 'w1' AND seq = 4")
    report = verify(db.records(), keys)
    assert not report.intact
    [problem] = report.problems
    assert (problem.writer_id, problem.seq, problem.kind) == ("w1", 4, "altered")


def test_a_deleted_record_is_named(db: SqliteSink, keys: AuditKeys) -> None:
    sql(db, "DELETE FROM audit_records WHERE writer_id = 'w1' AND seq = 3")
    [problem] = verify(db.records(), keys).problems
    assert (problem.seq, problem.kind) == (4, "removed")
    assert "3" in problem.detail


def test_deleting_the_first_record_is_detected(db: SqliteSink, keys: AuditKeys) -> None:
    sql(db, "DELETE FROM audit_records WHERE writer_id = 'w2' AND seq = 1")
    [problem] = verify(db.records(), keys).problems
    assert (problem.writer_id, problem.seq, problem.kind) == ("w2", 2, "removed")


def test_swapped_records_are_reported_as_moved(db: SqliteSink, keys: AuditKeys) -> None:
    cols = [f for f in RECORD_COLUMNS if f not in ("writer_id", "seq")]
    with closing(sqlite3.connect(db.path)) as conn, conn:
        a = conn.execute(f"SELECT {', '.join(cols)} FROM audit_records WHERE writer_id='w1' AND seq=2").fetchone()
        b = conn.execute(f"SELECT {', '.join(cols)} FROM audit_records WHERE writer_id='w1' AND seq=3").fetchone()
        assign = ", ".join(f"{c} = ?" for c in cols)
        conn.execute(f"UPDATE audit_records SET {assign} WHERE writer_id='w1' AND seq=2", b)
        conn.execute(f"UPDATE audit_records SET {assign} WHERE writer_id='w1' AND seq=3", a)
    [problem] = verify(db.records(), keys).problems
    assert (problem.seq, problem.kind) == (2, "moved")
    assert "record 3" in problem.detail


def test_renumbering_to_hide_a_deletion_is_detected(db: SqliteSink, keys: AuditKeys) -> None:
    sql(db, "DELETE FROM audit_records WHERE writer_id = 'w1' AND seq = 5")
    for seq in (6, 7):
        sql(db, "UPDATE audit_records SET seq = ? WHERE writer_id = 'w1' AND seq = ?", seq - 1, seq)
    [problem] = verify(db.records(), keys).problems
    assert (problem.seq, problem.kind) == (5, "moved")


@pytest.fixture
def sink(tmp_path: Path) -> Iterator[SqliteSink]:
    with closing(SqliteSink(tmp_path / "a.db")) as sink:
        yield sink


def test_a_cut_tail_of_a_closed_chain_is_detected_and_open_chains_are_listed(sink: SqliteSink, keys: AuditKeys) -> None:
    sink.write(chain_records(keys, "closed", 4))
    sink.write(chain_records(keys, "running", 4, close=False))
    report = verify(sink.records(), keys)
    assert report.intact and report.open_writers == ["running"]
    sql(sink, "DELETE FROM audit_records WHERE writer_id = 'closed' AND seq = 5")
    assert verify(sink.records(), keys).open_writers == ["closed", "running"]


def test_an_anchor_catches_a_deleted_chain_and_a_cut_open_tail(
    tmp_path: Path, keys: AuditKeys, sink: SqliteSink
) -> None:
    """What a chain cannot vouch for by itself: its own existence, and an open chain's tail."""
    sink.write(chain_records(keys, "closed", 3))
    sink.write(chain_records(keys, "running", 4, close=False))
    first = verify(sink.records(), keys)
    assert first.heads == {"closed": (4, first.heads["closed"][1]), "running": (4, first.heads["running"][1])}
    save_anchor(tmp_path / "anchor.json", first)
    anchor = load_anchor(tmp_path / "anchor.json", keys)
    sink.write(chain_records(keys, "later", 2))  # writers and records added since the anchor are fine
    assert verify(sink.records(), keys, anchor).intact
    sql(sink, "DELETE FROM audit_records WHERE writer_id = 'running' AND seq = 4")
    sql(sink, "DELETE FROM audit_records WHERE writer_id = 'closed'")
    assert verify(sink.records(), keys).intact  # without the anchor, nothing to see
    problems = {(p.writer_id, p.seq, p.kind) for p in verify(sink.records(), keys, anchor).problems}
    assert problems == {("closed", 4, "removed"), ("running", 4, "removed")}


def test_an_anchor_must_be_of_this_trail_and_intact(tmp_path: Path, keys: AuditKeys, db: SqliteSink) -> None:
    path = tmp_path / "anchor.json"
    save_anchor(path, verify(db.records(), keys))
    with pytest.raises(InvalidInput, match="another audit key"):
        load_anchor(path, AuditKeys(os.urandom(32)))
    path.write_text("{}")
    with pytest.raises(InvalidInput, match="not an audit anchor"):
        load_anchor(path, keys)
    with pytest.raises(InvalidInput, match="cannot write the anchor"):
        save_anchor(tmp_path / "no-such-dir" / "anchor.json", verify(db.records(), keys))
    sql(db, "UPDATE audit_records SET outcome = 'error' WHERE writer_id = 'w1' AND seq = 4")
    with pytest.raises(InvalidInput, match="broken"):
        save_anchor(path, verify(db.records(), keys))


def test_forging_needs_the_audit_key(db: SqliteSink, keys: AuditKeys) -> None:
    """Someone who rewrites a record and recomputes an unkeyed hash still fails verification."""
    import hashlib

    record = next(db.records())
    forged = AuditRecord.from_dict({**record.to_dict(), "outcome": "error"})
    fake_hash = hashlib.sha256(forged.canonical()).hexdigest()
    sql(db, "UPDATE audit_records SET outcome = 'error', hash = ? WHERE writer_id = 'w1' AND seq = 1", fake_hash)
    assert [p.kind for p in verify(db.records(), keys).problems] == ["altered"]
    assert verify(db.records(), AuditKeys(os.urandom(32))).problems  # and a different key verifies nothing


def test_time_format_is_fixed_width_utc() -> None:
    assert format_time(0.5) == "1970-01-01T00:00:00.500000Z"
    assert format_time(1_700_000_000.9999996) == "2023-11-14T22:13:21.000000Z"
    assert format_time(1_700_000_000.000001) == "2023-11-14T22:13:20.000001Z"


def test_duplicate_delivery_is_stored_once(sink: SqliteSink, keys: AuditKeys) -> None:
    batch = chain_records(keys, "w", 3)
    sink.write(batch)
    sink.write(batch[1:])
    assert [r.seq for r in sink.records()] == [1, 2, 3, 4]
    assert sink.head("w") == (4, batch[-1].hash)


def test_a_chain_links_only_its_next_record(keys: AuditKeys) -> None:
    chain = Chain(keys, "w")
    chain.link(1, fields(1))
    with pytest.raises(OutOfSequence, match="expected record 2, got 3"):
        chain.link(3, fields(3))


# ---------------------------------------------------------------------- lone hits

_text = st.text(max_size=12)
_shapes = st.tuples(
    _text,
    st.none() | _text,
    st.lists(_text, max_size=3).map(tuple),
    st.lists(_text, max_size=2).map(tuple),
    _text,
    st.sampled_from(["ok", "error"]),
    st.none() | _text,
    st.integers(0, 50),
    st.none() | st.booleans(),
    st.lists(st.tuples(_text, _text), max_size=3, unique_by=lambda p: p[0]).map(tuple),
)


@settings(max_examples=300, deadline=None)
@given(
    shape=_shapes,
    prefix=_text,
    started_us=st.integers(0, 4_102_444_800_000_000),  # to 2100
    duration_ns=st.integers(0, 2**40),
    size=st.integers(0, 2**40),
    request=st.integers(0, 2**40),
    writer=_text,
)
def test_a_hit_reads_back_as_the_record_its_full_facts_give(
    shape: tuple, prefix: str, started_us: int, duration_ns: int, size: int, request: int, writer: str
) -> None:
    """A hit frame is the same record as the full path would have spooled: only the row differs.

    Request 0 is a hit under a caller's own request id: the template's prefix is the whole id."""
    keys = AuditKeys(b"k" * 32)
    hits = Hits(Template(shape, prefix), RUN_ITEM.pack(started_us, duration_ns, size, request), started_us)
    request_id = f"{prefix}{request:010x}" if request else prefix
    facts = Spooled.of(shape, started_us / 1e6, duration_ns / 1e9, size, request_id)
    run = Chain(keys, writer, 6, "ab" * 32).link(7, hits)
    lone = Chain(keys, writer, 6, "ab" * 32).link(7, facts)
    [from_hit] = run.records()
    [from_facts] = lone.records()
    assert {**from_hit.to_dict(), "hash": ""} == {**from_facts.to_dict(), "hash": ""}
    assert keys.chain_hash(run.canonical()) == run.hash and keys.chain_hash(lone.canonical()) == lone.hash


def test_chain_hashes_are_hmac_sha256_under_the_derived_chain_key() -> None:
    """Pinned: trails written by earlier releases must still verify, however the MAC is computed."""
    secret = bytes(range(32))
    chain_key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"kmsguard audit v1 chain").derive(secret)
    keys = AuditKeys(secret)
    for message in (b"", b"[1]", os.urandom(500)):
        assert keys.chain_hash(message) == hmac.digest(chain_key, message, "sha256").hex()


def test_a_file_that_is_not_a_database_is_refused_and_its_connection_closed(
    tmp_path: Path, sqlite_connections: list[sqlite3.Connection]
) -> None:
    path = tmp_path / "audit.db"
    path.write_bytes(b"not a database, " * 256)
    with pytest.raises(sqlite3.DatabaseError, match="not a database"):
        SqliteSink(path)
    [refused] = sqlite_connections
    with pytest.raises(sqlite3.ProgrammingError, match="closed"):
        refused.execute("SELECT 1")


def test_a_window_of_a_chain_verifies_from_its_first_record(db: SqliteSink, keys: AuditKeys) -> None:
    """A query since some time gives a slice of a long-lived writer's chain (the self-test reads one)."""
    tail = [r for r in db.records() if r.writer_id == "w1" and r.seq >= 4]
    assert verify(tail, keys, window=True).intact
    [problem] = verify(tail, keys).problems  # without window, what came before is missing
    assert (problem.seq, problem.kind) == (4, "removed")
    # Within the window every check still holds: a gap, and an edit of its first record.
    assert [(p.seq, p.kind) for p in verify([tail[0], *tail[2:]], keys, window=True).problems] == [(6, "removed")]
    sql(db, "UPDATE audit_records SET outcome = 'error' WHERE writer_id = 'w1' AND seq = 4")
    edited = [r for r in db.records() if r.writer_id == "w1" and r.seq >= 4]
    assert [(p.seq, p.kind) for p in verify(edited, keys, window=True).problems] == [(4, "altered")]
