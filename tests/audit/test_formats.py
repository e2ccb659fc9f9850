"""The on-disk audit formats (FORMAT.md, "Audit trail"): what release 0.1.0 wrote still reads and
verifies, and the canonical encoder and the parsers hold for any input (hypothesis).

tests/audit/data/ holds a spool segment and the trail delivered from it (SQLite, JSON
lines) as release 0.1.0 wrote them (generate_0_1_0.py says how), with the audit secret
``bytes(range(32))``.
"""

from __future__ import annotations

import json
import marshal
import shutil
import sqlite3
import struct
import zlib
from collections.abc import Iterator, Sequence
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kmsguard.audit.chain import AuditKeys, Chain
from kmsguard.audit.deliver import link_batch
from kmsguard.audit.facts import Hits, Shape, Spooled, Template
from kmsguard.audit.frames import HIT_FLAG, HIT_PAYLOAD, TEMPLATE, hit_check
from kmsguard.audit.record import (
    COLUMNS,
    RUN_ITEM,
    AuditRecord,
    AuditRun,
    canonical,
    records_from_row,
    row_values,
    signed_json,
)
from kmsguard.audit.sink import JsonLinesSink
from kmsguard.audit.spool import SegmentReader, Spool, decode
from kmsguard.audit.sqlite import SqliteSink
from kmsguard.audit.verify import verify
from kmsguard.operation import Operation

DATA = Path(__file__).with_name("data")
KEYS = AuditKeys(bytes(range(32)))
WRITER = "host-1-0a0b0c0d"


def expected() -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = json.loads((DATA / "trail-0.1.0.json").read_text())
    return rows


@pytest.fixture
def old_sqlite(tmp_path: Path) -> Iterator[SqliteSink]:
    shutil.copy(DATA / "trail-0.1.0.db", tmp_path / "audit.db")
    with closing(SqliteSink(tmp_path / "audit.db")) as sink:
        yield sink


def test_a_sqlite_trail_of_release_0_1_0_reads_and_verifies(old_sqlite: SqliteSink) -> None:
    sink = old_sqlite
    records = list(sink.records())
    assert [r.to_dict() for r in records] == expected()
    report = verify(records, KEYS)
    assert report.intact and report.records == 11 and report.open_writers == []
    assert sink.head(WRITER) == (11, expected()[-1]["hash"])


def test_a_jsonl_trail_of_release_0_1_0_reads_and_verifies(tmp_path: Path) -> None:
    shutil.copy(DATA / "trail-0.1.0.jsonl", tmp_path / "audit.jsonl")
    sink = JsonLinesSink(tmp_path / "audit.jsonl")
    assert [r.to_dict() for r in sink.records()] == expected()
    assert verify(sink.records(), KEYS).intact


@pytest.mark.parametrize(
    ("statements", "seq", "kind"),
    [
        (["UPDATE audit_records SET outcome = 'ok', error_code = NULL WHERE seq = 8"], 8, "altered"),  # format 1
        (["UPDATE audit_records SET size = 1 WHERE seq = 2"], 2, "altered"),  # a run (format 2)
        (["DELETE FROM audit_records WHERE seq = 7"], 8, "removed"),
        (["DELETE FROM audit_records WHERE seq = 7", "UPDATE audit_records SET seq = 7 WHERE seq = 8"], 7, "moved"),
    ],
    ids=["edited-record", "edited-run", "deleted", "renumbered"],
)
def test_tampering_with_a_trail_of_release_0_1_0_is_named(
    old_sqlite: SqliteSink, statements: list[str], seq: int, kind: str
) -> None:
    sink = old_sqlite
    with closing(sqlite3.connect(sink.path)) as conn, conn:
        for statement in statements:
            conn.execute(statement)
    [problem] = verify(sink.records(), KEYS).problems
    assert (problem.seq, problem.kind) == (seq, kind)


def without_chain(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k not in ("prev_hash", "hash")}


def test_a_spool_of_release_0_1_0_is_delivered_as_that_release_delivered_it(tmp_path: Path) -> None:
    """A spool left by a crash before an upgrade: the same records, chained in today's format."""
    spool_dir = tmp_path / "spool"
    spool_dir.mkdir()
    shutil.copy(DATA / "spool-0.1.0.bin", spool_dir / f"{WRITER}.00000001.spool")
    entries, _used = SegmentReader(spool_dir, WRITER).read(1 << 20, writer_alive=False)
    assert [type(e).__name__ for _seq, e in entries] == ["Spooled", "Hits", "Hits", "Spooled", "Hits", "Spooled"]
    rows = link_batch(Chain(KEYS, WRITER), entries)
    assert all(row.last_seq is not None for row in rows)  # every row a run now, of one record or many
    with closing(SqliteSink(tmp_path / "audit.db")) as sink:
        sink.write(rows)
        records = list(sink.records())
    assert [without_chain(r.to_dict()) for r in records] == [without_chain(r) for r in expected()]
    assert verify(records, KEYS).intact


def test_a_trail_of_release_0_1_0_continues_in_todays_format(old_sqlite: SqliteSink) -> None:
    sink = old_sqlite
    head = sink.head(WRITER)
    assert head is not None
    chain = Chain(KEYS, WRITER, *head)
    facts = Spooled(1.5e9, "encrypt", "general", (), (), "svc", "ok", None, 0.001, 0, True, 3, None, ())
    sink.write([chain.link(12, facts)])
    [problem] = verify(sink.records(), KEYS).problems  # the chain was closed: still checked across formats
    assert (problem.seq, problem.kind) == (12, "after-close")
    other = Chain(KEYS, "new-writer")
    sink.write([other.link(1, facts)])
    assert {p.writer_id for p in verify(sink.records(), KEYS).problems} == {WRITER}


# ---------------------------------------------------------------------- the canonical encoder

_OLD_ENCODER = json.JSONEncoder(separators=(",", ":"), sort_keys=True, ensure_ascii=True, allow_nan=False)


def release_0_1_0_canonical(values: Sequence[Any], last_seq: int | None, items: bytes) -> bytes:
    """Release 0.1.0's canonical_bytes and run_canonical, frozen: trails it wrote must keep verifying."""
    if last_seq is None:
        return _OLD_ENCODER.encode([1, *values]).encode("ascii")
    return _OLD_ENCODER.encode([2, *values, last_seq]).encode("ascii") + b"\n" + items


def release_0_1_0_rows(keys: AuditKeys, writer: str, count: int) -> list[tuple[Any, ...]]:
    """A chain of ``count`` lone records as release 0.1.0 stored them (format 1: 18 columns, no run)."""
    rows, prev = [], "0" * 64
    for seq in range(1, count + 1):
        values = [writer, seq, prev, f"2025-11-28T03:20:0{seq}.000000Z", "encrypt", "pii", ["local:pii:v1"], [],
                  "svc", "ok", None, 125, 1, False, 100 + seq, f"0123456789ab{seq:010x}", {"tenant": "0f" * 32}]
        prev = keys.chain_hash(release_0_1_0_canonical(values, None, b""))
        json_values = [_OLD_ENCODER.encode(v) if isinstance(v, list | dict) else v for v in values]
        rows.append((*json_values[:13], int(values[13]), *json_values[14:], prev))
    return rows


_text = st.text(max_size=12)
_optional_text = st.none() | _text
_u63 = st.integers(0, 2**63 - 1)
_records = st.builds(
    AuditRecord,
    writer_id=_text,
    seq=st.integers(1, 2**40),
    prev_hash=_text,
    time=_text,
    operation=_text,
    classification=_optional_text,
    key_refs=st.lists(_text, max_size=3).map(tuple),
    regions=st.lists(_text, max_size=2).map(tuple),
    principal=_text,
    outcome=_text,
    error_code=_optional_text,
    duration_us=_u63,
    kms_calls=st.integers(0, 2**31 - 1),
    cache_hit=st.none() | st.booleans(),
    size=_u63,
    request_id=_optional_text,
    context=st.dictionaries(_text, _text, max_size=3),
    hash=_text,
)


@settings(max_examples=300, deadline=None)
@given(record=_records, last_seq=st.none() | st.integers(1, 2**40), items=st.binary(max_size=96))
def test_the_canonical_encoding_is_release_0_1_0s_byte_for_byte(
    record: AuditRecord, last_seq: int | None, items: bytes
) -> None:
    old_values = [list(v) if isinstance(v, tuple) else v for v in record.to_dict().values()][:-1]
    items = b"" if last_seq is None else items
    assert canonical(record.signed_json(), last_seq, items) == release_0_1_0_canonical(old_values, last_seq, items)


@settings(max_examples=200, deadline=None)
@given(values=st.lists(st.none() | st.booleans() | _u63 | _text | st.lists(_text, max_size=2), min_size=1))
def test_signed_json_is_the_inside_of_the_array(values: list[Any]) -> None:
    assert f"[{signed_json(values)}]" == _OLD_ENCODER.encode(values)


# ---------------------------------------------------------------------- rows and lines

_items = st.lists(st.tuples(_u63, _u63, _u63, st.integers(0, 2**40 - 1)), min_size=1, max_size=20)


@st.composite
def _rows(draw: st.DrawFn) -> AuditRun:
    head = draw(_records)
    items = draw(st.none() | _items)
    if items is None:  # a lone record
        return AuditRun(head, head.seq, b"")
    packed = b"".join(RUN_ITEM.pack(*i) for i in items)
    return AuditRun(head, head.seq + len(items) - 1, packed)


@settings(max_examples=200, deadline=None)
@given(row=_rows())
def test_a_row_reads_back_as_it_was_stored(row: AuditRun) -> None:
    values = row_values(row)
    assert len(values) == len(COLUMNS)
    records = records_from_row(values)
    assert all(r.run == row for r in records) and records[0].run is not None
    assert records[0].run.canonical() == row.canonical()


@settings(max_examples=100, deadline=None)
@given(row=_rows())
def test_a_jsonl_line_reads_back_as_it_was_written(tmp_path_factory: pytest.TempPathFactory, row: AuditRun) -> None:
    sink = JsonLinesSink(tmp_path_factory.mktemp("jsonl") / "audit.jsonl")
    sink.write([row])
    assert all(r.run == row for r in sink.records())


# ---------------------------------------------------------------------- spool frames

_shapes = st.builds(
    Shape,
    operation=_text,
    classification=_optional_text,
    key_refs=st.lists(_text, max_size=2).map(tuple),
    regions=st.lists(_text, max_size=2).map(tuple),
    principal=_text,
    outcome=st.sampled_from(["ok", "error"]),
    error_code=_optional_text,
    kms_calls=st.integers(0, 50),
    cache_hit=st.none() | st.booleans(),
    context=st.lists(st.tuples(_text, _text), max_size=3).map(tuple),
)
_facts = st.builds(
    Spooled.of,
    _shapes,
    st.floats(0, 4e9),
    st.floats(0, 1e3),
    _u63,
    _optional_text,
)
# A hit: (template number 1-3, start us, duration ns, size, request number).
_hits = st.tuples(st.integers(1, 3), _u63, _u63, _u63, _u63)


@settings(max_examples=150, deadline=None)
@given(writes=st.lists(st.one_of(_facts, _hits), min_size=1, max_size=30), shapes=st.lists(_shapes, min_size=3,
                                                                                          max_size=3))
def test_the_spool_gives_back_what_was_written(tmp_path_factory: pytest.TempPathFactory, writes: list[Any],
                                               shapes: list[Shape]) -> None:
    """Record, template and hit frames, in any order: decoded as the same facts and hits, in order."""
    directory = tmp_path_factory.mktemp("spool")
    spool = Spool(directory, "w", 1 << 30, segment_bytes=64 << 10)
    for write in writes:
        if isinstance(write, Spooled):
            spool.append(write, durable=False)
        else:
            template, started, duration, size, request = write
            spool.hit(template, shapes[template - 1], "p", started, duration, size, request)
    spool.close()
    entries, _used = SegmentReader(directory, "w").read(1 << 30, writer_alive=False)
    got: list[Any] = []
    for seq, entry in entries:
        assert seq == len(got) + 1
        if isinstance(entry, Hits):
            got.extend((entry.template.shape, *item) for item in RUN_ITEM.iter_unpack(entry.items))
        else:
            got.append(entry)
    want = [w if isinstance(w, Spooled) else (shapes[w[0] - 1], *w[1:]) for w in writes]
    assert got == want


def _record_frame(seq: int, facts: Spooled) -> bytes:
    payload = marshal.dumps((seq, *facts))
    return struct.pack(">II", len(payload), zlib.crc32(payload)) + payload


def _template_frame(number: int, shape: tuple[Any, ...]) -> bytes:
    payload = marshal.dumps((TEMPLATE, number, shape, "p"))
    return struct.pack(">II", len(payload), zlib.crc32(payload)) + payload


def _hit_frame(seq: int, template: int, item: tuple[int, int, int, int]) -> bytes:
    values = (seq, template, *item)
    return struct.pack(">II", HIT_FLAG | HIT_PAYLOAD, hit_check(*values)) + struct.pack(">6Q", *values)


@settings(max_examples=200, deadline=None)
@given(facts=st.lists(_facts, min_size=1, max_size=5), shape=_shapes, items=_items, cut=st.integers(0, 10_000))
def test_a_torn_segment_reads_as_a_prefix_of_its_frames(
    facts: list[Spooled], shape: Shape, items: list[tuple[int, int, int, int]], cut: int
) -> None:
    """A crash mid-write leaves a torn tail: what reads is whole frames, in order, and nothing after."""
    frames = [_record_frame(i + 1, f) for i, f in enumerate(facts)] + [_template_frame(1, tuple(shape))]
    frames += [_hit_frame(len(facts) + 1 + i, 1, item) for i, item in enumerate(items)]
    data = b"".join(frames)
    cut %= len(data) + 1
    entries, used = decode(data[:cut], {})
    ends = [sum(map(len, frames[: k + 1])) for k in range(len(frames))]
    assert used == max([0, *[e for e in ends if e <= cut]])
    whole = [e for e in ends if e <= cut]
    records = sum(1 for e in ends[: len(facts)] if e <= cut)
    hits = max(0, len(whole) - len(facts) - 1)
    assert [e for _seq, e in entries if isinstance(e, Spooled)] == facts[:records]
    assert sum(len(e) for _seq, e in entries if isinstance(e, Hits)) == hits


def test_a_template_of_the_first_0_1_0_spools_still_reads() -> None:
    """Its shape held six fields: a spool left behind by a crash before an upgrade is delivered as it was meant."""
    old = ("encrypt", "general", ("local:general:v1",), (), "svc", (("tenant", "t"),))
    entries, _used = decode(_template_frame(3, old) + _hit_frame(1, 3, (1, 2, 3, 4)), {})
    [(_seq, hits)] = entries
    assert isinstance(hits, Hits) and isinstance(hits.template, Template)
    assert hits.template.shape == Shape("encrypt", "general", ("local:general:v1",), (), "svc", "ok", None, 0, True,
                                        (("tenant", "t"),))


def test_the_worked_example_of_format_md() -> None:
    """FORMAT.md's worked example, pinned: the document and the code must not drift apart."""
    chain = Chain(KEYS, WRITER)
    facts = Spooled(1764300000.25, "encrypt", "pii", ("local:pii:v1",), (), "svc", "ok", None, 0.0125, 1, False, 1024,
                    "0123456789ab0000000001", (("tenant", "t-42"),))
    lone = chain.link(1, facts)
    assert lone.canonical().endswith(b',1]\n') and lone.hash == (
        "7cb1b1a0c06dbf68cef9a8813c39bf7aa4d7ce2fd6bbeb5ccaa421d1f102b2e0"
    )
    shape = ("encrypt", "pii", ("local:pii:v1",), (), "svc", "ok", None, 0, True, (("tenant", "t-42"),))
    items = RUN_ITEM.pack(1764300001000000, 2500, 1024, 2) + RUN_ITEM.pack(1764300001000500, 3100, 2048, 3)
    run = chain.link(2, Hits(Template(shape, "0123456789ab"), items, 1764300001000500))
    assert run.hash == "aa008bd5e1e122c5bd2ce523a4df71f810b263c3dd0a9d59e0e28a5695ae4872"
    assert [(r.seq, r.duration_us, r.request_id) for r in run.records()] == [
        (2, 2, "0123456789ab0000000002"), (3, 3, "0123456789ab0000000003")
    ]
    items = RUN_ITEM.pack(1764300002000000, 4000, 512, 0) + RUN_ITEM.pack(1764300002000250, 4200, 256, 0)
    shared = chain.link(4, Hits(Template(shape, "abc-123"), items, 1764300002000250))  # a caller's request id
    assert shared.canonical().startswith(b"[3,") and shared.hash == (
        "4605bfd429a4678197929106086fa2b78146a2fbeb5b147e9112d56ec0f28789"
    )
    assert [(r.seq, r.size, r.request_id) for r in shared.records()] == [(4, 512, "abc-123"), (5, 256, "abc-123")]
    assert KEYS.fingerprint == "cdbcc23085da09db"


def test_a_shape_names_the_fields_of_an_event_kinds_shape() -> None:
    """Template frames store EventKind.shape as it is: Shape must name its fields in its order."""
    op = Operation("encrypt", "pii", {"tenant": "t"}, "svc")
    op.key_refs.append("local:pii:v1")
    op.regions.append("eu-west-1")
    op.kms_calls, op.cache_hit = 2, False
    op.finish(None)
    assert Shape._make(op.event().kind.shape) == Shape(
        operation="encrypt", classification="pii", key_refs=("local:pii:v1",), regions=("eu-west-1",),
        principal="svc", outcome="ok", error_code=None, kms_calls=2, cache_hit=False, context=(("tenant", "t"),),
    )
